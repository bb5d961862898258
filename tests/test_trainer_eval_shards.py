"""Evaluation sets as WebDataset shards in clip_benchmark's layout (issue 22): `calrft eval` and
`calrft wise-ft` read them with the same metrics as ImageFolder trees of the same images, count
and skip unreadable samples, and refuse class names that are not ID classes as they refuse folders."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from calrft import cli, data, models

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["ant", "bee", "cat"]
BROKEN = b"\x89PNG\r\n\x1a\n not really a png"


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_set(tree, shards, classes, per_class, seed, corrupt=0, n_shards=2):
    """The same images as an ImageFolder tree and as clip_benchmark shards (shards/test/{k}.tar,
    nshards.txt, classnames.txt, templates), in the order the tree is listed; `corrupt` files
    that are not images in both."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(tree, c), exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(tree, c, f"{i:03d}.png"), "wb") as f:
                f.write(_png(rng))
    for i in range(corrupt):
        with open(os.path.join(tree, classes[i % len(classes)], f"broken{i}.png"), "wb") as f:
            f.write(BROKEN)
    folders, items = data.scan_image_folder(tree)
    os.makedirs(os.path.join(shards, "test"), exist_ok=True)
    chunks = np.array_split(np.arange(len(items)), n_shards)
    for k, chunk in enumerate(chunks):
        with tarfile.open(os.path.join(shards, "test", f"{k}.tar"), "w") as tar:
            for j in chunk:
                path, label = items[j]
                for ext, payload in (("png", open(path, "rb").read()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{j:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    with open(os.path.join(shards, "test", "nshards.txt"), "w") as f:
        f.write(f"{n_shards}\n")
    with open(os.path.join(shards, "classnames.txt"), "w") as f:
        f.write("\n".join(data.class_name_from_folder(c) for c in folders) + "\n")
    with open(os.path.join(shards, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("a photo of a {c}.\n")
    return tree, shards


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    out = {}
    # ID: more images (75 readable) than the tiny model's 64 feature dimensions, so sigma_min is
    # a real eigenvalue; one unreadable file. OOD: a subset of the ID classes, in another order.
    out["id"] = write_set(str(root / "id_tree"), str(root / "id_shards"), CLASSES, 25, seed=1, corrupt=1)
    out["ood"] = write_set(str(root / "ood_tree"), str(root / "ood_shards"), ["cat", "bee"], 5, seed=2)
    out["zebra"] = write_set(str(root / "z_tree"), str(root / "z_shards"), ["cat", "zebra"], 2, seed=3)
    with open(root / "classnames.txt", "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    out["classnames"] = str(root / "classnames.txt")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, _, _, _ = models.create(models.TINY)
        torch.save(model.state_dict(), root / f"weights{seed}.pt")
        out[f"weights{seed}"] = str(root / f"weights{seed}.pt")
    return out


def _eval(sets, out, id_path, ood_path, *extra):
    argv = ["eval", "--model", models.TINY, "--pretrained", sets["weights0"], "--templates", "short",
            "--id-eval", f"val={id_path}", "--ood-eval", f"sketch={ood_path}", "--out", str(out),
            "--workers", "0", "--eval-batch-size", "16", *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())["methods"]["model"]


def test_shards_and_folders_give_identical_metrics(sets, tmp_path):
    folder = _eval(sets, tmp_path / "folder", sets["id"][0], sets["ood"][0], "--classnames", sets["classnames"])
    # the ID set as its clip_benchmark root folder, the OOD set as a shard pattern
    pattern = os.path.join(sets["ood"][1], "test", "{0..1}.tar")
    shards = _eval(sets, tmp_path / "shards", sets["id"][1], pattern, "--classnames", sets["classnames"])
    assert shards == folder                      # every metric, bit for bit
    assert set(shards["id"]) == {"acc", "ece", "nll", "brier"} and set(shards["ood"]) == {"sketch", "avg"}
    assert shards["unreadable"] == {"val": 1, "sketch": 0}
    assert not shards["sigma_min_rank_deficient"] and shards["sigma_min"] > 0


def test_an_id_shard_set_brings_its_own_class_names(sets, tmp_path):
    """Without --classnames the ID classes are the ID shard set's classnames.txt."""
    folder = _eval(sets, tmp_path / "folder", sets["id"][0], sets["ood"][0], "--classnames", sets["classnames"])
    shards = _eval(sets, tmp_path / "shards", sets["id"][1], sets["ood"][1])
    assert shards == folder


def test_wise_ft_reads_shards(sets, tmp_path):
    def sweep(out, id_path, ood_path):
        argv = ["wise-ft", "--model", models.TINY, "--zeroshot", sets["weights0"], "--finetuned",
                sets["weights1"], "--alphas", "0,1", "--templates", "short", "--classnames", sets["classnames"],
                "--id-eval", f"val={id_path}", "--ood-eval", f"sketch={ood_path}", "--out", str(out),
                "--workers", "0"]
        assert cli.main(argv) == 0
        return json.loads((out / "results.json").read_text())["methods"]
    assert sweep(tmp_path / "s", sets["id"][1], sets["ood"][1]) == sweep(tmp_path / "f", sets["id"][0], sets["ood"][0])


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_ood_classes_outside_the_id_classes_are_refused_before_any_work(sets, tmp_path, capsys, kind):
    ood = sets["zebra"][0 if kind == "folder" else 1]
    out = tmp_path / "refused"
    argv = ["eval", "--model", models.TINY, "--pretrained", sets["weights0"], "--classnames", sets["classnames"],
            "--id-eval", sets["id"][1], "--ood-eval", ood, "--out", str(out), "--workers", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    what = "class folders" if kind == "folder" else "class names (classnames.txt)"
    assert err == f"calrft eval: error: {ood}: {what} ['zebra'] match no ID class name"
    assert not out.exists()


# ---- the shard index ------------------------------------------------------------------------------

def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_index_counts_every_unreadable_sample(tmp_path):
    rng = np.random.default_rng(0)
    good = _png(rng)
    (tmp_path / "classnames.txt").write_text("ant\nbee\n")
    _tar(tmp_path / "a.tar", [("k0.png", good), ("k0.cls", b"1"),
                              ("k1.png", BROKEN), ("k1.cls", b"0"),          # not an image
                              ("k2.png", good),                              # no label
                              ("k3.txt", b"caption"), ("k3.cls", b"0"),       # no image
                              ("k4.JPG", good), ("k4.cls", b"7"),             # label outside
                              ("k5.webp", good), ("k5.cls", b"x")])           # label not a number
    _tar(tmp_path / "b.tar", [("dir/k6.png", good), ("dir/k6.cls", b"0"), ("k7.png", good), ("k7.cls", b"1")])
    with open(tmp_path / "b.tar", "ab") as f:                                 # garbage past the end
        f.write(b"\x01" * 4096)
    ds = data.ShardEval(str(tmp_path), lambda im: torch.zeros(1), ["bee", "ant", "cat"])
    assert len(ds) == 9                          # 8 samples and one broken tail
    items = [ds[i] for i in range(len(ds))]
    readable = [it for it in items if not isinstance(it, data.Skipped)]
    assert [label for _, label in readable] == [0, 1, 0]   # cls indexes classnames.txt: mapped to the ID list
    skipped = [it for it in items if isinstance(it, data.Skipped)]
    reasons = [s.reason for s in skipped]
    assert "no label (cls)" in reasons[1] and "no image" in reasons[2]
    assert "outside the 2 class names" in reasons[3] and "is not an integer" in reasons[4]
    assert skipped[0].path.endswith("a.tar#k1") and "corrupt tar after 2 samples" in reasons[5]


def test_a_truncated_shard_counts_what_it_lost(tmp_path):
    rng = np.random.default_rng(1)
    _tar(tmp_path / "0.tar", [(f"k{i}.{e}", p) for i in range(3) for e, p in (("png", _png(rng)), ("cls", b"0"))])
    raw = (tmp_path / "0.tar").read_bytes()
    (tmp_path / "0.tar").write_bytes(raw[:3000])
    (tmp_path / "classnames.txt").write_text("ant\n")
    index = data.scan_shards(str(tmp_path / "0.tar"), "id_eval")
    assert sum(bool(s.problem) for s in index.samples) >= 1
    assert any("corrupt tar" in s.problem or "no label" in s.problem for s in index.samples)


@pytest.mark.parametrize("case,match", [
    ("missing shard", r"ood_eval: no such shard .*1\.tar' \(1 of 2 missing\)"),
    ("no readable image", r"ood_eval: none of the 1 images in .* is readable"),
    ("no samples", r"ood_eval: .* holds no sample with an image and a label \(first: no label"),
    ("remote", r"ood_eval: evaluation reads local shard files"),
    ("bad nshards", r"ood_eval: .*nshards.txt' does not hold a number of shards"),
])
def test_preflight_refuses_a_bad_shard_set(tmp_path, case, match):
    from calrft import preflight
    root = tmp_path / "set"
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("ant\n")
    spec = str(root)
    if case == "missing shard":
        _tar(root / "test" / "0.tar", [("k.png", b"x"), ("k.cls", b"0")])
        (root / "test" / "nshards.txt").write_text("2")
    elif case == "no readable image":
        _tar(root / "test" / "0.tar", [("k.png", BROKEN), ("k.cls", b"0")])
    elif case == "no samples":
        _tar(root / "test" / "0.tar", [("k.png", BROKEN)])
    elif case == "remote":
        spec = "pipe:curl -s https://example.invalid/{0..3}.tar"
    else:
        _tar(root / "test" / "0.tar", [("k.png", BROKEN), ("k.cls", b"0")])
        (root / "test" / "nshards.txt").write_text("many")
    with pytest.raises(ValueError, match=match):
        preflight.check_eval_set(spec, "ood_eval")


def test_folders_stay_folders(tmp_path):
    """An ImageFolder tree (class folders of images, a class named `test` included) is not taken
    for a shard set."""
    for c in ("test", "ant"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "0.png")
    assert not data.is_shard_set(str(tmp_path))
    assert data.is_shard_set(str(tmp_path / "x-{0..3}.tar")) and data.is_shard_set("one.tar")


def test_templates_from_the_sets_own_file(sets, tmp_path):
    """--templates FILE reads clip_benchmark's zeroshot_classification_templates.txt ({c} for the
    class): the same heads as the same template given by name."""
    own = os.path.join(sets["id"][1], "zeroshot_classification_templates.txt")
    by_file = _eval(sets, tmp_path / "file", sets["id"][1], sets["ood"][1], "--templates", own)
    by_name = _eval(sets, tmp_path / "name", sets["id"][1], sets["ood"][1], "--templates", "simple")
    assert by_file == by_name


@pytest.mark.parametrize("text,match", [
    ("", "must hold templates one a line"),
    ("a photo of a {c}.\na photo.\n", r"not 'a photo\.'"),
])
def test_a_bad_templates_file_is_refused(tmp_path, text, match):
    from calrft import templates
    path = tmp_path / "t.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        templates.get(str(path))
    with pytest.raises(ValueError, match="unknown set 'nonesuch'"):
        templates.get("nonesuch")


def test_without_classnames_txt_cls_indexes_the_id_classes(tmp_path):
    good = _png(np.random.default_rng(2))
    _tar(tmp_path / "0.tar", [("k0.png", good), ("k0.cls", b"1"), ("k1.png", good), ("k1.cls", b"5")])
    ds = data.ShardEval(str(tmp_path), lambda im: torch.zeros(1), ["ant", "bee"])
    assert ds.class_indices == [0, 1] and ds[0][1] == 1
    assert isinstance(ds[1], data.Skipped) and "outside the 2 ID classes" in ds[1].reason
