"""Atomic checkpoints that resume exactly and whose weights load back into open_clip.

A checkpoint is a dict: state_dict (the open_clip model, the key open_clip's loader reads),
teacher, optimizer, scheduler, step, rng, config, plus extras (e.g. the ft head). Everything in it
is loadable with torch.load(weights_only=True)."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_save(obj, path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash
    leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, *, model, teacher=None, optimizer=None, scheduler=None, step=0, config=None,
         extra=None) -> None:
    obj = {"state_dict": model.state_dict(), "step": step, "rng": rng_state(),
           "config": config or {}}
    if teacher is not None:
        obj["teacher"] = teacher.state_dict()
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        obj["scheduler"] = scheduler.state_dict()
    obj.update(extra or {})
    atomic_save(obj, path)


def load(path, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"path: no such checkpoint {str(path)!r}")
    return torch.load(path, map_location=map_location, weights_only=True)
