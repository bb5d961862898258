"""Data loading: CSV and ImageFolder formats, OOD subset mapping, corrupt files, the sampler."""
import os

import pytest
import torch
from PIL import Image

from calrft import data, models

@pytest.fixture(scope="module")
def tiny():
    model, train_tf, eval_tf, tok = models.create(models.TINY)
    return eval_tf, tok


def _image(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (40, 36), (value, 255 - value, 7)).save(path)


def _corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")


def make_tree(root, classes, per_class=3, corrupt=()):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(os.path.join(root, name, f"{i}.png"), 20 * c + i)
    for rel in corrupt:
        _corrupt(os.path.join(root, rel))


def test_csv_format(tmp_path, tiny):
    eval_tf, tok = tiny
    for i in range(4):
        _image(str(tmp_path / "img" / f"{i}.jpg"), i * 50)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("filepath\ttitle\n" + "".join(f"img/{i}.jpg\ta photo of thing {i}\n" for i in range(4)))
    ds = data.CsvCaptions(str(csv_path), eval_tf)
    assert len(ds) == 4
    image, caption, label, skipped = ds[(2, 0)]
    assert image.shape == (3, 32, 32) and caption == "a photo of thing 2" and label == -1 and not skipped
    batch = data.CaptionCollate(tok)([ds[(i, 0)] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["texts"].shape == (4, 16)


def test_csv_comma_and_label_column(tmp_path, tiny):
    eval_tf, _ = tiny
    _image(str(tmp_path / "a.png"), 1)
    (tmp_path / "t.csv").write_text("path,caption,y\na.png,hello,3\n")
    ds = data.CsvCaptions(str(tmp_path / "t.csv"), eval_tf, image_key="path", caption_key="caption", label_key="y")
    assert ds[0][1:3] == ("hello", 3)


def test_csv_missing_column_raises(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\na.png,hello\n")
    with pytest.raises(ValueError, match="filepath"):
        data.CsvCaptions(str(tmp_path / "t.csv"))


def test_image_folder_captions_from_templates(tmp_path, tiny):
    eval_tf, _ = tiny
    make_tree(str(tmp_path / "train"), ["golden_retriever", "tabby cat"])
    ds = data.ImageFolderCaptions(str(tmp_path / "train"), eval_tf, templates="openai", seed=3)
    assert ds.classnames == ["golden retriever", "tabby cat"]
    captions = {ds[(0, e)][1] for e in range(20)}
    assert len(captions) > 1 and all("golden retriever" in c for c in captions)
    assert ds[(4, 0)][2] == 1
    assert ds[(1, 5)][1] == ds[(1, 5)][1]  # deterministic per (seed, epoch, index)


def test_ood_tree_maps_onto_a_subset_of_id_classes(tmp_path, tiny):
    eval_tf, _ = tiny
    id_classes = ["ant", "bee", "golden retriever", "tabby cat"]
    make_tree(str(tmp_path / "ood"), ["tabby_cat", "Bee"], per_class=2)
    ds = data.ImageFolderEval(str(tmp_path / "ood"), eval_tf, id_classes)
    # folders sorted: "Bee", "tabby_cat" -> ID indices 1, 3
    assert ds.class_indices == [1, 3]
    assert sorted(ds.labels) == [1, 1, 3, 3]
    make_tree(str(tmp_path / "bad"), ["zebra"], per_class=1)
    with pytest.raises(ValueError, match="zebra"):
        data.ImageFolderEval(str(tmp_path / "bad"), eval_tf, id_classes)


def test_corrupt_images_are_reported_and_skipped(tmp_path, tiny, caplog):
    eval_tf, tok = tiny
    root = str(tmp_path / "tree")
    make_tree(root, ["a", "b"], per_class=2, corrupt=["a/1_broken.png", "b/zz.png"])
    train = data.ImageFolderCaptions(root, eval_tf, templates="simple")
    sampler = data.GlobalBatchSampler(len(train), len(train))
    loader = data.train_loader(train, tok, sampler, workers=2)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["images"].shape[0] == len(train)  # substituted, full batch
    bad = {os.path.basename(s.path) for s in batches[0]["skipped"]}
    assert bad == {"1_broken.png", "zz.png"}
    with caplog.at_level("WARNING"):
        data.report_skipped(batches[0]["skipped"], set())
    assert "1_broken.png" in caplog.text
    ev = data.ImageFolderEval(root, eval_tf, ["a", "b"])
    got = list(data.eval_loader(ev, batch_size=2, workers=2))
    assert sum(b["labels"].numel() for b in got) == 4
    assert {os.path.basename(s.path) for b in got for s in b["skipped"]} == {"1_broken.png", "zz.png"}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_sampler_ranks_partition_the_single_process_batches(world):
    single = list(data.GlobalBatchSampler(23, 8, seed=5, epoch=2))
    per_rank = [list(data.GlobalBatchSampler(23, 8, rank=r, world=world, seed=5, epoch=2)) for r in range(world)]
    assert len(single) == 2
    for t, batch in enumerate(single):
        assert sum((per_rank[r][t] for r in range(world)), []) == batch
    resumed = list(data.GlobalBatchSampler(23, 8, seed=5, epoch=2, start_step=1))
    assert resumed == single[1:]
    assert single != list(data.GlobalBatchSampler(23, 8, seed=5, epoch=3))


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="global_batch"):
        data.GlobalBatchSampler(10, 8, world=3)
    with pytest.raises(ValueError, match="global_batch"):
        data.GlobalBatchSampler(4, 8)
