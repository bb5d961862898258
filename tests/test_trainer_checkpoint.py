"""Checkpoints: atomic writes, exact resume, weights that load back into open_clip."""
import os

import open_clip
import pytest
import torch

from calrft import checkpoint, models
from calrft.train import Trainer

from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model


def _trainer(tmp_path, **kw):
    model, tok = tiny_model()
    train, eval_sets = tiny_data()
    return Trainer(tiny_config(tmp_path, **kw), model=model, tokenizer=tok, train_set=train,
                   eval_sets=eval_sets, classnames=CLASSES)


@pytest.mark.parametrize("method", ["carot", "ft"])
def test_resume_continues_exactly(tmp_path, method):
    full = _trainer(tmp_path / "full", method=method)
    full.fit()
    part = _trainer(tmp_path / "part", method=method, stop_after=3)
    assert part.fit() is None and part.step == 3
    resumed = _trainer(tmp_path / "part", method=method, resume=str(tmp_path / "part" / "checkpoint.pt"))
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == full.step == 6
    for a, b in ((full.student, resumed.student), (full.teacher, resumed.teacher)):
        if a is None:
            continue
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    sa, sb = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_checkpoint_contents_and_open_clip_loading(tmp_path):
    t = _trainer(tmp_path, steps=2)
    t.fit()
    path = tmp_path / "checkpoint.pt"
    state = checkpoint.load(path)
    assert {"state_dict", "teacher", "optimizer", "scheduler", "step", "rng", "config"} <= set(state)
    assert state["step"] == 2 and state["config"]["method"] == "carot"
    loaded = open_clip.create_model(models.TINY, pretrained=str(path))
    for name, value in t.clip.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    again, *_ = models.create(models.TINY, str(path))
    assert torch.equal(again.visual.proj, t.clip.visual.proj)


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"a": Boom()}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind


def test_rng_state_round_trip():
    import random

    import numpy as np
    state = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_missing_checkpoint_raises():
    with pytest.raises(ValueError, match="path"):
        checkpoint.load("/nonexistent/ckpt.pt")


# ---- issue 15: leftovers of a killed save, file modes, bad files, resume checks ----

def test_sigkill_during_a_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    import subprocess
    import sys
    script = (
        "import os, signal, sys\n"
        "from calrft import checkpoint\n"
        "def write(obj, f):\n"
        "    f.write(b'x' * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "checkpoint._write = write\n"
        "checkpoint.atomic_save({'a': 1}, sys.argv[1])\n")
    target = tmp_path / "checkpoint.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".checkpoint.pt.") and not target.exists()
    (tmp_path / ".other.pt.abcdefgh.tmp").write_bytes(b"another target's")
    (tmp_path / "user.tmp").write_bytes(b"not ours")
    checkpoint.atomic_save({"a": torch.ones(1)}, target)
    assert sorted(os.listdir(tmp_path)) == [".other.pt.abcdefgh.tmp", "checkpoint.pt", "user.tmp"]
    assert checkpoint.clean_stale_temps(tmp_path) == [".other.pt.abcdefgh.tmp"]  # the start of a run


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_mode_follows_the_umask_like_other_files(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.atomic_save({"a": 1}, tmp_path / "c.pt")
        checkpoint.atomic_write_text(tmp_path / "r.json", "{}")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {n: os.stat(tmp_path / n).st_mode & 0o777 for n in ("c.pt", "r.json", "plain.txt")}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_check_file_names_the_option_and_the_problem(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.atomic_save({"state_dict": {"w": torch.ones(300)}}, good)
    checkpoint.check_file(good, "resume")
    cases = {"empty.pt": (b"", "is empty"), "cut.pt": (good.read_bytes()[:200], "is truncated"),
             "text.pt": (b"{}", "is not a checkpoint")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"^resume: .*{name}' {message}"):
            checkpoint.check_file(tmp_path / name, "resume")
    with pytest.raises(ValueError, match="^pretrained: no such file"):
        checkpoint.check_file(tmp_path / "missing.pt", "pretrained")
    with pytest.raises(ValueError, match="^resume: cannot read checkpoint"):
        checkpoint.load(tmp_path / "cut.pt", what="resume")


def test_library_resume_refuses_changed_settings_and_other_methods(tmp_path):
    part = _trainer(tmp_path / "part", stop_after=2)
    part.fit()
    ckpt = str(tmp_path / "part" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"resume: .*\(lr 0\.0001 -> 0\.001\)"):
        _trainer(tmp_path / "part", resume=ckpt, lr=1e-3)
    with pytest.raises(ValueError, match="is a --method carot checkpoint; this run is --method flyp"):
        _trainer(tmp_path / "other", resume=ckpt, method="flyp")
    # bookkeeping settings may change
    t = _trainer(tmp_path / "part", resume=ckpt, log_every=3, eval_every=5, stop_after=4)
    assert t.step == 2


def test_log_has_no_repeated_steps_after_a_resume(tmp_path):
    import json
    part = _trainer(tmp_path, stop_after=2)
    part.fit()
    with open(tmp_path / "log.jsonl", "a") as f:  # records of steps a killed run did past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    resumed = _trainer(tmp_path, resume=str(tmp_path / "checkpoint.pt"))
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_trainer_refuses_a_folder_holding_a_run(tmp_path):
    _trainer(tmp_path, steps=1).fit()
    with pytest.raises(ValueError, match="already holds a run"):
        _trainer(tmp_path, steps=1)
    t = _trainer(tmp_path, steps=1, overwrite=True)
    assert not (tmp_path / "checkpoint.pt").exists() and t.step == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_full_disk_during_a_save_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import tempfile
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, path)
    real = tempfile.mkstemp

    def on_full_disk(**kw):  # the temporary file's writes go to /dev/full
        fd, name = real(**kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", on_full_disk)
    with pytest.raises(OSError) as exc:
        checkpoint.atomic_save({"a": torch.zeros(100_000)}, path)
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(path)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
