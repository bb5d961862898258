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
