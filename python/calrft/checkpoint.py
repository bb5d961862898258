"""Atomic checkpoints that resume exactly and whose weights load back into open_clip.

A checkpoint is a dict: state_dict (the open_clip model, the key open_clip's loader reads),
teacher, optimizer, scheduler, step, rng, config, plus extras (e.g. the ft head). Everything in it
is loadable with torch.load(weights_only=True).

Every file the trainer writes goes through `atomic_save` / `atomic_write_text`: a temporary file
named `.<name>.<8 random characters>.tmp` in the same folder, fsync, rename over the target. A
process killed mid-write (SIGKILL, power loss) can leave such a temporary file behind; the next
save of the same target and the start of the next run in that folder remove them
(`clean_stale_temps`). Files are created with the mode the process's umask gives any new file
(0644 under the usual umask 022), like the other outputs."""
from __future__ import annotations

import errno
import os
import random
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

# .<target name>.<mkstemp's 8 random characters>.tmp
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask() must set it
    to read it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def clean_stale_temps(folder, target: str | None = None) -> list[str]:
    """Remove temporary files of our naming (`.<target>.XXXXXXXX.tmp`) left in `folder` by a
    killed writer; only those of `target` when given. Returns the names removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        m = _TEMP_RE.match(entry.name)
        if m and entry.is_file(follow_symlinks=False) and (target is None or m["target"] == target):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed


def _write(obj, f) -> None:
    """Serialise `obj` into the open binary file `f` (one place, so tests can simulate a full disk)."""
    if isinstance(obj, (bytes, bytearray)):
        f.write(obj)
    else:
        torch.save(obj, f)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash
    leaves either the old file or the new one, never a torn file. `obj` is anything torch.save
    takes, or bytes. OSError (a full disk: errno ENOSPC) propagates with the target's name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                _write(obj, f)
                f.flush()
                os.fsync(f.fileno())
            except RuntimeError as exc:  # torch's stream writer wraps a failed write
                if "write" in str(exc).lower():
                    raise OSError(errno.EIO, f"write failed ({exc})", str(path)) from exc
                raise
            if hasattr(os, "fchmod"):  # mkstemp creates 0600; give the mode any new file gets
                os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exc.filename is None or str(exc.filename) == tmp:  # name the target, not the temp file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """`atomic_save` for a text file (results.json, report.md)."""
    atomic_save(text.encode(), path)


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


# ---- reading, with one clear error per way a file can be wrong ----

def check_file(path, what: str = "path") -> None:
    """Cheap structural check of a weights file before any work starts: it exists, is not empty,
    and is a complete zip archive (torch.save's format, TorchScript), a legacy pickle, or a
    complete .safetensors file. Raises ValueError naming `what` (the option) otherwise."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{what}: no such file {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what}: {path!r} is empty")
    if path.endswith(".safetensors"):
        _check_safetensors(path, size, what)
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                last = max(z.infolist(), key=lambda i: i.header_offset)
                if last.header_offset + last.compress_size > size:
                    raise zipfile.BadZipFile("member data past the end")
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ValueError(f"{what}: {path!r} is truncated or corrupt (an incomplete torch zip "
                             f"archive: {exc})") from None
        return
    if head[:1] == b"\x80":  # a legacy (pre-1.6) torch.save pickle
        return
    raise ValueError(f"{what}: {path!r} is not a checkpoint (neither a torch file nor .safetensors)")


def _check_safetensors(path, size, what):
    import json
    import struct
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header past the end")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError("tensor data past the end")
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {path!r} is truncated or not a .safetensors file ({exc})") from None


def load(path, map_location="cpu", what: str = "path", mmap: bool = False) -> dict:
    """torch.load(weights_only=True) of a calrft (or open_clip) checkpoint; any unreadable file
    raises ValueError naming `what`. mmap=True maps tensors lazily (cheap metadata reads)."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such checkpoint {str(path)!r}")
    if str(path).endswith(".safetensors"):
        raise ValueError(f"{what}: {str(path)!r} is a .safetensors weights file, not a calrft checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        if mmap:  # legacy formats cannot be mapped
            return load(path, map_location, what, mmap=False)
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"{what}: cannot read checkpoint {str(path)!r} ({type(exc).__name__}: "
                         f"{reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def load_weights(path, what: str = "path") -> dict:
    """A model state dict from a calrft checkpoint, an open_clip weights file (a bare state dict or
    {"state_dict": ...}) or a .safetensors file."""
    check_file(path, what)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{what}: cannot read {str(path)!r} ({type(exc).__name__}: {exc})") from None
    state = load(path, what=what)
    weights = state.get("state_dict", state)
    if not weights or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise ValueError(f"{what}: {str(path)!r} holds no model weights (no 'state_dict' of tensors)")
    return weights


# Settings that a resumed run may change: where and how it reports, where the data lives, and
# how the step is executed (memory, not arithmetic). Every other setting shapes the optimisation
# trajectory (lr, schedule, batch, objective, seed, ...) and must match the checkpoint's.
RESUMABLE_CHANGES = frozenset({
    "out", "resume", "overwrite", "stop_after", "progress", "log_every", "eval_every", "save_every",
    "eval_batch_size", "workers", "data_timeout", "max_unreadable", "unreadable_window", "device",
    "cache_dir", "pretrained", "id_eval", "ood_eval", "train_csv", "train_folder", "train_data", "classnames", "micro_batch_size", "grad_checkpointing",
})
TRAINING_KEYS = ("state_dict", "optimizer", "scheduler", "step", "rng", "config")


def check_resumable(state: dict, config: dict, path, what: str = "resume") -> None:
    """Refuse to resume from `state` a run configured by `config` (a TrainConfig dict) unless it
    is a training checkpoint of the same method and model whose trajectory settings match."""
    path = str(path)
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise ValueError(f"{what}: {path!r} is not a calrft training checkpoint (no {', '.join(missing)}); "
                         "a weights-only file (e.g. a pretrained model) starts a new run with --pretrained")
    saved = state["config"]
    for key in ("method", "model"):
        if key in saved and saved[key] != config.get(key):
            raise ValueError(f"{what}: {path!r} is a --{key} {saved[key]} checkpoint; this run is --{key} "
                             f"{config.get(key)} (resume with the same --{key}, or start a new run with "
                             f"--pretrained {path})")
    method = saved.get("method")
    if method == "carot" and saved.get("distill_weight", 1) > 0 and "teacher" not in state:
        raise ValueError(f"{what}: {path!r} has no EMA teacher for its carot run")
    if method == "ft" and "ft_head" not in state:
        raise ValueError(f"{what}: {path!r} has no ft head for its ft run")
    changed = [k for k in sorted(set(saved) & set(config))
               if k not in RESUMABLE_CHANGES and saved[k] != config[k]]
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {config[k]!r}" for k in changed)
        raise ValueError(f"{what}: the run in {path!r} was trained with other settings ({diffs}); a "
                         "resumed run continues the checkpoint's optimiser and schedule, so these must "
                         "match (drop the flags, or start a new run with --pretrained to change them)")
