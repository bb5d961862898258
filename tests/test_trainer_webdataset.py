"""WebDataset tar shards as training input: decoding, corrupt samples skipped and reported, ranks
and loader workers reading disjoint samples, and `calrft train --train-data` end to end."""
import io
import json
import logging
import os

import pytest
import torch
from PIL import Image

from calrft import cli, data, models

from test_trainer_data import make_tree

CLASSES = ["ant", "bee", "cat"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_shards(root, n_shards=4, per_shard=5, corrupt=("000007",)):
    """Shards as img2dataset writes them: <key>.jpg / .png / .webp, <key>.txt, <key>.cls."""
    import webdataset as wds
    os.makedirs(root, exist_ok=True)
    key = 0
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(root, f"shard-{s:05d}.tar")) as sink:
            for _ in range(per_shard):
                name = f"{key:06d}"
                label = key % len(CLASSES)
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][key % 3]
                buf = io.BytesIO()
                Image.new("RGB", (40, 36), (20 * label, 200 - key, 7)).save(buf, fmt)
                raw = b"\xff\xd8 definitely not a jpeg" if name in corrupt else buf.getvalue()
                sink.write({"__key__": name, ext: raw, "txt": f"a photo of a {CLASSES[label]}.",
                            "cls": str(label)})
                key += 1
    return os.path.join(root, "shard-{00000..%05d}.tar" % (n_shards - 1))


@pytest.fixture(scope="module")
def tiny():
    _, train_tf, eval_tf, tok = models.create(models.TINY)
    return train_tf, tok


def keys_of(items):
    return [it[1] for it in items]


def take(stream, n):
    out = []
    for item in stream:
        out.append(item)
        if len(out) == n:
            return out
    return out


def test_stream_decodes_and_skips_the_corrupt_sample(tmp_path, tiny):
    train_tf, _ = tiny
    urls = write_shards(str(tmp_path))
    ds = data.WebDatasetCaptions(urls, train_tf, shuffle_buffer=1)
    assert len(ds.urls) == 4
    items = take(iter(ds), 19)  # one pass over the 20 samples, less the corrupt one
    image, caption, label, _, _ = items[0]
    assert image.shape == (3, 32, 32) and caption.startswith("a photo of a") and label in (0, 1, 2)
    assert len(set(keys_of(items))) == 3  # captions: one per class
    skipped = [s for it in items for s in it[3]]
    assert [os.path.basename(s.path) for s in skipped] == ["shard-00001.tar#000007"]
    assert "UnidentifiedImageError" in skipped[0].reason or "cannot identify" in skipped[0].reason
    assert [it[4] for it in items] == [1] * 19   # readable samples read per item (buffer of 1)


def test_two_ranks_and_two_workers_read_disjoint_samples(tmp_path, tiny):
    train_tf, _ = tiny
    ds = data.WebDatasetCaptions(write_shards(str(tmp_path), corrupt=()), train_tf, seed=3, shuffle_buffer=1)
    seen = {}
    for rank in (0, 1):
        part = ds.for_rank(epoch=0, rank=rank, world=2)
        shards = [part.shards(w, 2) for w in (0, 1)]
        assert all(len(s) == 1 for s in shards) and shards[0] != shards[1]
        seen[rank] = {os.path.basename(u) for s in shards for u in s}
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4
    # the shard order changes with the epoch, the split stays a partition
    later = [set(ds.for_rank(epoch=1, rank=r, world=2).shards()) for r in (0, 1)]
    assert not later[0] & later[1] and len(later[0] | later[1]) == 4

    # through the loader (2 worker processes): each rank's rows come from its own shards only
    def rows(rank):
        tok = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
        batches = list(data.webdataset_loader(ds, tok, global_batch=4, rank=rank, world=2, epoch=0,
                                              steps_per_epoch=6, workers=2))
        assert len(batches) == 6 and all(b["images"].shape[0] == 2 for b in batches)
        # each image is one colour, unique per sample: a pixel identifies it
        return {tuple(round(v, 4) for v in x[:, 0, 0].tolist()) for b in batches for x in b["images"]}
    a, b = rows(0), rows(1)
    assert len(a) == len(b) == 10 and not a & b  # 12 rows each: both shards' 10 samples


def test_bad_shard_specs(tmp_path):
    with pytest.raises(ValueError, match="train_data"):
        data.WebDatasetCaptions(str(tmp_path / "none-{0..3}.tar"))
    ds = data.WebDatasetCaptions(write_shards(str(tmp_path), n_shards=1))
    with pytest.raises(ValueError, match="shards cannot feed"):
        next(iter(ds.for_rank(0, 1, 2)))


def test_train_on_shards_and_evaluate(tmp_path, caplog):
    urls = write_shards(str(tmp_path / "shards"))
    make_tree(str(tmp_path / "val"), CLASSES, per_class=2)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", models.TINY, "--pretrained", "", "--train-data", urls,
            "--train-num-samples", "16", "--batch-size", "4", "--micro-batch-size", "2", "--steps", "5",
            "--classnames", str(tmp_path / "classes.txt"), "--id-eval", str(tmp_path / "val"),
            "--templates", "short", "--workers", "2", "--warmup", "1", "--ema-every", "2", "--lr", "1e-3",
            "--no-progress", "--out", str(out), "--device", "cpu"]
    with caplog.at_level(logging.WARNING, logger="calrft"):
        assert cli.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["train_data"] == urls and doc["config"]["micro_batch_size"] == 2
    assert set(doc["methods"]["carot"]["id"]) >= {"acc", "ece", "nll", "brier"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 5
    assert [r["train_unreadable"] for r in log if "loss" in r][-1] == 1  # counted once
    assert "000007" in caplog.text  # the corrupt sample was reported


def test_a_resumed_epoch_continues_the_same_stream(tmp_path, tiny):
    train_tf, _ = tiny
    ds = data.WebDatasetCaptions(write_shards(str(tmp_path)), train_tf, seed=1, shuffle_buffer=8)
    tok = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731

    def run(start):
        return [b["images"] for b in data.webdataset_loader(ds, tok, global_batch=3, epoch=2, start_step=start,
                                                            steps_per_epoch=5, workers=0)]
    full, resumed = run(0), run(2)
    assert len(full) == 5 and len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], full[1])
