"""Run safety, end to end through the `calrft` command on tiny data (issue 15): a finished run is
never lost, every argument is checked before any work, every failure is one `error:` line with
the right exit status, and a command that fails leaves earlier results on disk untouched."""
import errno
import hashlib
import json
import os
import shutil

import pytest
import torch

from calrft import checkpoint, cli, models, rundir
from calrft.train import Trainer

from test_trainer_data import _corrupt, make_tree

TINY_ARGS = ["--model", models.TINY, "--pretrained", "", "--templates", "short", "--workers", "0",
             "--batch-size", "4", "--warmup", "1", "--ema-every", "1", "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    classes = ["ant", "bee", "cat"]
    make_tree(str(root / "train"), classes, per_class=4)
    make_tree(str(root / "val"), classes, per_class=2)
    make_tree(str(root / "sketch"), ["cat", "bee"], per_class=2)
    make_tree(str(root / "val_one_bad"), classes, per_class=2, corrupt=["bee/broken.png"])
    for c in classes:  # a set whose every image is unreadable
        _corrupt(str(root / "broken" / c / "x.png"))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _train_argv(trees, out, *extra, steps=2):
    return ["train", *TINY_ARGS, "--train-folder", str(trees / "train"), "--id-eval", str(trees / "val"),
            "--ood-eval", f"sketch={trees / 'sketch'}", "--steps", str(steps), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished(trees, tmp_path_factory):
    """A finished carot run (2 steps): checkpoint, results, report, plots, log."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(_train_argv(trees, out, "--save-every", "1")) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def snapshot(folder):
    """{relative path: (sha256, mode)} of every file under `folder`."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                                      os.stat(path).st_mode)
    return out


def fails(argv, capsys, status=2):
    """Run the command; assert its exit status and a single stderr line; return that line."""
    capsys.readouterr()
    assert cli.main(argv) == status
    err = [line for line in capsys.readouterr().err.splitlines() if "calrft " in line]
    assert len(err) == 1, err
    return err[0]


# ---- output folders ----

def test_train_refuses_a_folder_holding_a_run(trees, run_copy, capsys):
    before = snapshot(run_copy)
    line = fails(_train_argv(trees, run_copy), capsys)
    assert line.startswith("calrft train: error: out:") and "already holds a run" in line
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_run_outputs_and_keeps_other_files(trees, run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"partial")  # a killed save's leftover
    assert (run_copy / "reliability_carot.png").exists()
    assert cli.main(_train_argv(trees, run_copy, "--overwrite", "--method", "flyp", steps=1)) == 0
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert not (run_copy / "reliability_carot.png").exists()  # the old run's plot went with it
    assert not (run_copy / ".checkpoint.pt.abcd1234.tmp").exists()
    doc = json.loads((run_copy / "results.json").read_text())
    assert set(doc["methods"]) == {"flyp"}
    steps = [r["step"] for r in map(json.loads, (run_copy / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1]  # a fresh log, not appended to the old one
    assert checkpoint.load(run_copy / "checkpoint.pt")["config"]["method"] == "flyp"


def test_subcommands_have_their_own_default_folders(trees, finished, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished, tmp_path / "runs" / "train")
    before = snapshot(tmp_path / "runs" / "train")
    assert cli.main(["eval", "--model", models.TINY, "--pretrained", "runs/train/checkpoint.pt",
                     "--train-folder", str(trees / "train"), "--templates", "short", "--workers", "0",
                     "--id-eval", str(trees / "val")]) == 0
    assert (tmp_path / "runs" / "eval" / "results.json").exists()
    assert snapshot(tmp_path / "runs" / "train") == before
    parser = cli.build_parser()
    for command, extra in (("train", []), ("eval", []), ("wise-ft", ["--zeroshot", "z", "--finetuned", "f"])):
        args = parser.parse_args([command, *extra])
        assert cli.config_from(args, command).out == rundir.DEFAULT_OUT[command]
    assert len(set(rundir.DEFAULT_OUT.values())) == len(rundir.DEFAULT_OUT)


def test_eval_refuses_a_training_folder(trees, run_copy, capsys):
    before = snapshot(run_copy)
    line = fails(["eval", "--model", models.TINY, "--pretrained", str(run_copy / "checkpoint.pt"),
                  "--train-folder", str(trees / "train"), "--templates", "short", "--workers", "0",
                  "--id-eval", str(trees / "val"), "--out", str(run_copy)], capsys)
    assert "calrft eval: error: out:" in line and "already holds a run" in line
    assert snapshot(run_copy) == before


def test_eval_overwrite_keeps_the_checkpoint_it_reads(trees, run_copy, capsys):
    ckpt = (run_copy / "checkpoint.pt").read_bytes()
    assert cli.main(["eval", "--model", models.TINY, "--pretrained", str(run_copy / "checkpoint.pt"),
                     "--train-folder", str(trees / "train"), "--templates", "short", "--workers", "0",
                     "--id-eval", str(trees / "val"), "--out", str(run_copy), "--overwrite"]) == 0
    assert (run_copy / "checkpoint.pt").read_bytes() == ckpt
    assert set(json.loads((run_copy / "results.json").read_text())["methods"]) == {"model"}


# ---- every argument checked before any work ----

@pytest.mark.parametrize("flags,message", [
    (["--log-every", "0"], "log_every: must be >= 1"),
    (["--warmup", "-5"], "warmup: must be >= 0"),
    (["--device", "tpu"], "device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--lr", "-1"], "lr: must be a finite number > 0"),
    (["--ema-end", "1.5"], "ema_end: must lie in [0, 1]"),
    (["--templates", "nope"], "templates: unknown set"),
])
def test_bad_settings_are_refused_before_any_work(trees, run_copy, capsys, flags, message):
    before = snapshot(run_copy)
    # --overwrite: a refused command must not have cleared the folder first
    line = fails(_train_argv(trees, run_copy, "--overwrite", *flags), capsys)
    assert line.startswith("calrft train: error: ") and message in line
    assert snapshot(run_copy) == before


def test_cuda_without_a_gpu(trees, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = fails(_train_argv(trees, tmp_path / "out", "--device", "cuda"), capsys)
    assert "device: 'cuda' requested but no CUDA GPU is available" in line
    assert not (tmp_path / "out").exists()


def test_a_set_without_readable_images_fails_before_training(trees, run_copy, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", lambda *a: pytest.fail("trained before the check"))
    before = snapshot(run_copy)
    for option in ("--id-eval", "--ood-eval", "--train-folder"):
        argv = _train_argv(trees, run_copy, "--overwrite")
        argv[argv.index(option) + 1] = str(trees / "broken")
        line = fails(argv, capsys)
        assert f"error: {option[2:].replace('-', '_')}: none of the 3 images in" in line
    assert snapshot(run_copy) == before


def test_wise_ft_without_ood_eval_fails_before_the_sweep(trees, finished, run_copy, capsys, monkeypatch):
    from calrft import wiseft
    monkeypatch.setattr(wiseft, "sweep", lambda *a: pytest.fail("swept before the check"))
    before = snapshot(run_copy)
    line = fails(["wise-ft", "--model", models.TINY, "--zeroshot", str(finished / "checkpoint.pt"),
                  "--finetuned", str(finished / "checkpoint.pt"), "--train-folder", str(trees / "train"),
                  "--id-eval", str(trees / "val"), "--out", str(run_copy), "--overwrite"], capsys)
    assert "calrft wise-ft: error: ood_eval:" in line and "--ood-eval" in line
    assert snapshot(run_copy) == before


def test_demo_checks_its_arguments_and_folder(tmp_path, capsys, monkeypatch):
    from calrft import demo
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("ran before the check"))
    (tmp_path / "d" / "carot").mkdir(parents=True)
    (tmp_path / "d" / "results.json").write_text("{}")
    (tmp_path / "d" / "carot" / "checkpoint.pt").write_bytes(b"old")
    before = snapshot(tmp_path / "d")
    line = fails(["demo", "--threads", "-1", "--out", str(tmp_path / "d"), "--overwrite"], capsys)
    assert line == "calrft demo: error: threads: must be >= 1, got -1"
    assert "seeds" in fails(["demo", "--seeds", "0,x", "--out", str(tmp_path / "d"), "--overwrite"], capsys)
    cfg = tmp_path / "loss.yaml"
    cfg.write_text("loss: sigmoid\n")
    line = fails(["demo", "--config", str(cfg), "--out", str(tmp_path / "d"), "--overwrite"],
                 capsys)
    assert "'loss' is not a fine-tuning override of the demo" in line and "--loss" in line
    line = fails(["demo", "--out", str(tmp_path / "d")], capsys)
    assert "error: out:" in line and "already holds a run (carot/checkpoint.pt, results.json)" in line
    assert snapshot(tmp_path / "d") == before


def test_missing_classnames_file(trees, run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    argv = ["train", *TINY_ARGS, "--train-csv", str(trees / "classes.txt"), "--classnames",
            str(tmp_path / "nope.txt"), "--id-eval", str(trees / "val"), "--out", str(run_copy), "--overwrite"]
    assert "error: classnames: no such file" in fails(argv, capsys)
    (tmp_path / "empty.txt").write_text("\n")
    argv[argv.index("--classnames") + 1] = str(tmp_path / "empty.txt")
    assert "error: classnames: " in fails(argv, capsys) and "holds no class names" in fails(argv, capsys)
    assert snapshot(run_copy) == before


def test_invalid_out(trees, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = fails(_train_argv(trees, tmp_path / "file" / "sub"), capsys)
    assert "error: out: cannot create folder" in line
    assert "error: out: " in fails(_train_argv(trees, tmp_path / "file"), capsys)


def test_read_only_out(trees, tmp_path, capsys, monkeypatch):
    # (the tests may run as root, whom chmod does not stop: simulate the refusal of the write)
    def refuse(folder):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(rundir, "probe_write", refuse)
    monkeypatch.setattr(Trainer, "train_step", lambda *a: pytest.fail("trained before the check"))
    line = fails(_train_argv(trees, tmp_path / "ro"), capsys)
    assert "error: out: folder" in line and "is not writable (Permission denied)" in line


def _bad_files(tmp_path, finished):
    good = (finished / "checkpoint.pt").read_bytes()
    files = {"empty": b"", "truncated": good[: len(good) // 2], "text": b"hello, not a checkpoint\n"}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("option", ["--resume", "--pretrained"])
def test_unreadable_checkpoint_files(trees, finished, tmp_path, capsys, option):
    for kind, path in _bad_files(tmp_path, finished).items():
        line = fails(_train_argv(trees, tmp_path / f"o_{kind}", option, str(path)), capsys)
        assert f"error: {option[2:]}: '{path}' is " in line, line
        assert {"empty": "empty", "truncated": "truncated", "text": "not a checkpoint"}[kind] in line
        assert not (tmp_path / f"o_{kind}").exists()


def test_wise_ft_reads_safetensors_and_refuses_broken_ones(trees, finished, tmp_path, capsys):
    from safetensors.torch import save_file
    state = checkpoint.load(finished / "checkpoint.pt")["state_dict"]
    st = tmp_path / "ft.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(st))
    base = ["wise-ft", "--model", models.TINY, "--zeroshot", str(finished / "checkpoint.pt"),
            "--alphas", "1", "--train-folder", str(trees / "train"), "--templates", "short", "--workers", "0",
            "--id-eval", str(trees / "val"), "--ood-eval", str(trees / "sketch")]
    assert cli.main(base + ["--finetuned", str(st), "--out", str(tmp_path / "w")]) == 0
    got = json.loads((tmp_path / "w" / "results.json").read_text())["methods"]["alpha=1.00"]["id"]
    expected = json.loads((finished / "results.json").read_text())["methods"]["carot"]["id"]
    assert got == pytest.approx(expected)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(st.read_bytes()[:-100])
    line = fails(base + ["--finetuned", str(broken), "--out", str(tmp_path / "w2")], capsys)
    assert "error: finetuned: " in line and "truncated" in line and not (tmp_path / "w2").exists()


# ---- write failures and interruptions ----

def _enospc_after(n_ok):
    calls = {"n": 0}
    real = checkpoint._write

    def write(obj, f):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)
    return write


def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(trees, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr(checkpoint, "_write", _enospc_after(1))  # the step-1 save works, step 2's fails
    line = fails(_train_argv(trees, out, "--save-every", "1", steps=3), capsys, status=1)
    assert line == (f"calrft train: error: no space left on device writing {out / 'checkpoint.pt'} (ENOSPC); "
                    f"the last checkpoint is step 1: {out / 'checkpoint.pt'} (continue with --resume "
                    f"{out / 'checkpoint.pt'})")
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 1  # intact
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    monkeypatch.setattr(checkpoint, "_write", _enospc_after(0))
    line = fails(_train_argv(trees, tmp_path / "o2", "--save-every", "1"), capsys, status=1)
    assert "(ENOSPC); no checkpoint was written" in line


def test_ctrl_c_names_the_last_checkpoint(trees, tmp_path, capsys, monkeypatch):
    real = Trainer.train_step

    def step(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, batch)
    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "o"
    line = fails(_train_argv(trees, out, "--save-every", "2", steps=4), capsys, status=130)
    ckpt = out / "checkpoint.pt"
    assert line == (f"calrft train: interrupted at step 3 of 4; the last checkpoint is step 2: {ckpt} "
                    f"(continue with --resume {ckpt})")
    assert checkpoint.load(ckpt)["step"] == 2
    # resuming replays step 3: the log keeps one record per step
    monkeypatch.setattr(Trainer, "train_step", real)
    assert cli.main(_train_argv(trees, out, "--save-every", "2", "--resume", str(ckpt), steps=4)) == 0
    steps = [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]


# ---- resume checks ----

def test_resume_with_another_lr_is_refused(trees, run_copy, capsys):
    before = snapshot(run_copy)
    line = fails(_train_argv(trees, run_copy, "--resume", str(run_copy / "checkpoint.pt"), "--lr", "0.01"),
                 capsys)
    assert "error: resume: " in line and "lr 1e-05 -> 0.01" in line
    assert snapshot(run_copy) == before


@pytest.fixture(scope="module")
def other_checkpoints(trees, tmp_path_factory):
    root = tmp_path_factory.mktemp("others")
    paths = {}
    for method in ("flyp", "ft"):
        assert cli.main(_train_argv(trees, root / method, "--method", method, steps=1)) == 0
        paths[method] = root / method / "checkpoint.pt"
    torch.manual_seed(0)
    paths["weights"] = root / "pretrained.pt"  # what the demo's pretraining cache holds
    checkpoint.atomic_save({"state_dict": models.create(models.TINY)[0].state_dict()}, paths["weights"])
    return paths


@pytest.mark.parametrize("kind,message", [
    ("flyp", "is a --method flyp checkpoint; this run is --method carot"),
    ("ft", "is a --method ft checkpoint; this run is --method carot"),
    ("weights", "is not a calrft training checkpoint (no optimizer, scheduler, step, rng, config)"),
])
def test_resume_checks_method_and_kind(trees, other_checkpoints, run_copy, capsys, kind, message):
    before = snapshot(run_copy)
    path = other_checkpoints[kind]
    line = fails(_train_argv(trees, run_copy, "--resume", str(path)), capsys)
    assert line.startswith("calrft train: error: resume: ") and message in line
    assert snapshot(run_copy) == before


def test_resume_model_mismatch(trees, finished, tmp_path, capsys):
    argv = _train_argv(trees, tmp_path / "o", "--resume", str(finished / "checkpoint.pt"))
    argv[argv.index("--model") + 1] = "RN50"
    line = fails(argv, capsys)
    assert "is a --model calrft-tiny checkpoint; this run is --model RN50" in line


# ---- reported numbers ----

def test_ood_eval_without_id_eval_is_not_reported_as_id(trees, tmp_path):
    out = tmp_path / "o"
    argv = _train_argv(trees, out, steps=1)
    i = argv.index("--id-eval")
    del argv[i:i + 2]
    assert cli.main(argv) == 0
    carot = json.loads((out / "results.json").read_text())["methods"]["carot"]
    assert carot["id"] is None and carot["sigma_min"] is None
    assert set(carot["ood"]) == {"sketch", "avg"}
    assert "no ID evaluation set" in (out / "report.md").read_text()


def test_unreadable_eval_images_are_counted_and_warned(trees, tmp_path, caplog):
    out = tmp_path / "o"
    argv = _train_argv(trees, out, steps=1)
    argv[argv.index("--id-eval") + 1] = str(trees / "val_one_bad")
    with caplog.at_level("WARNING", logger="calrft"):
        assert cli.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())["methods"]["carot"]
    assert doc["unreadable"] == {"id": 1, "sketch": 0}
    assert "unreadable images skipped (metrics exclude them): id 1" in (out / "report.md").read_text()
    assert "evaluation set 'id': 1 of 7 images unreadable" in caplog.text


def test_rank_deficient_sigma_min_is_flagged(finished):
    # the finished run's ID set has 6 images for 64 feature dimensions
    carot = json.loads((finished / "results.json").read_text())["methods"]["carot"]
    assert carot["sigma_min"] == 0.0 and carot["sigma_min_rank_deficient"] is True
    report = (finished / "report.md").read_text()
    assert "0 (rank-deficient)" in report and "no more images than feature dimensions" in report


# ---- permissions and leftovers of a killed save ----

def test_outputs_share_one_mode(trees, tmp_path):
    old = os.umask(0o027)
    try:
        assert cli.main(_train_argv(trees, tmp_path / "o", steps=1)) == 0
    finally:
        os.umask(old)
    modes = {name: os.stat(tmp_path / "o" / name).st_mode & 0o777
             for name in ("checkpoint.pt", "results.json", "report.md", "log.jsonl")}
    assert set(modes.values()) == {0o640}, modes


def test_progress_lines_when_not_a_terminal(trees, tmp_path, capsys):
    argv = [a for a in _train_argv(trees, tmp_path / "o", steps=3) if a != "--no-progress"]
    assert cli.main(argv + ["--log-every", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("carot step")]
    assert [line.split()[2] for line in lines] == ["2/3", "3/3"]


def test_overwrite_never_removes_the_checkpoint_the_run_starts_from(trees, run_copy, capsys):
    before = snapshot(run_copy)
    line = fails(_train_argv(trees, run_copy, "--overwrite", "--pretrained", str(run_copy / "checkpoint.pt")),
                 capsys)
    assert line == (f"calrft train: error: overwrite: --overwrite would remove '{run_copy / 'checkpoint.pt'}', "
                    "which --pretrained reads; copy it elsewhere or choose another --out")
    assert snapshot(run_copy) == before


def test_resume_never_writes_over_another_run(trees, finished, run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    line = fails(_train_argv(trees, run_copy, "--resume", str(other / "checkpoint.pt")), capsys)
    assert "error: out:" in line and "holds another run" in line and "its checkpoint's folder" in line
    assert snapshot(run_copy) == before


def test_an_undownloadable_tag_is_one_line(trees, tmp_path, capsys, monkeypatch):
    import open_clip

    def offline(*a, **k):  # what open_clip raises without network (after its retries)
        raise RuntimeError("Failed to download weights for tag 'openai': Failed to download file "
                           "(open_clip_pytorch_model.bin). Please check your connection")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    line = fails(["eval", "--model", "ViT-B-32", "--pretrained", "openai", "--train-folder", str(trees / "train"),
                  "--id-eval", str(trees / "val"), "--out", str(tmp_path / "e")], capsys)
    assert line.startswith("calrft eval: error: pretrained: open_clip could not download the 'openai' "
                           "weights of ViT-B-32 (no network?)")
