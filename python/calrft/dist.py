"""torch.distributed plumbing: torchrun initialisation, and gathers/reductions for evaluation."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as tdist


def is_on() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_on() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_on() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None):
    """Initialise from torchrun's environment (NCCL on GPU, gloo on CPU); returns the device.
    Without torchrun this is a no-op returning `device` or the default device."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_on():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def shutdown(barrier: bool = True):
    """Destroy the process group (the ranks meet first with `barrier`; skip it when a rank may be
    gone, e.g. after an error). Ending a process with a live gloo group can abort it at exit
    ("terminate called without an active exception")."""
    if is_on():
        if barrier:
            tdist.barrier(group=cpu_group())
        _CPU_GROUPS.clear()
        tdist.destroy_process_group()


_CPU_GROUPS: dict = {}


def cpu_group():
    """A process group for small CPU tensors over all ranks: the default group when its backend
    is gloo, else a gloo group created once (every rank must call this at the same point, e.g.
    at set-up). None without a process group."""
    if not is_on():
        return None
    default = tdist.group.WORLD
    if tdist.get_backend(default) == "gloo":
        return default
    if default not in _CPU_GROUPS:
        _CPU_GROUPS[default] = tdist.new_group(backend="gloo")
    return _CPU_GROUPS[default]


def agree(values, group=None) -> list[int]:
    """The maximum of each of `values` (small ints) over all ranks, on every rank: one all-reduce
    of a few int64s on the CPU (through `group`, default cpu_group()), so it adds no GPU sync.
    Without a process group, the values themselves."""
    values = [int(v) for v in values]
    if not is_on():
        return values
    t = torch.tensor(values, dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group or cpu_group())
    return t.tolist()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (row counts may differ) on every rank."""
    if not is_on():
        return x
    parts = [None] * world_size()
    tdist.all_gather_object(parts, x.cpu())
    parts = [p for p in parts if p.numel() or p.ndim == 1]
    return torch.cat([p for p in parts if p.shape[0]]) if any(p.shape[0] for p in parts) else x


def merge_accumulators(acc):
    """Merge every rank's CovarianceAccumulator into one, identical on every rank."""
    if not is_on():
        return acc
    states = [None] * world_size()
    tdist.all_gather_object(states, {k: v.cpu() if torch.is_tensor(v) else v
                                     for k, v in acc.state_dict().items()})
    merged = None
    for state in states:
        part = copy.deepcopy(acc)  # same dimension, dtype and device as ours
        part.load_state_dict(state)
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    return merged


def all_reduce_mean(value: float, device="cpu") -> float:
    if not is_on():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return (t / world_size()).item()


def gather_objects(items: list) -> list:
    """Concatenate every rank's list (picklable items) on every rank, in rank order."""
    if not is_on():
        return list(items)
    parts = [None] * world_size()
    tdist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]
