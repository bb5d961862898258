"""Gloo process groups on CPU for the loss tests: start `world` processes, each running
`worker(rank, world, *args)` inside an initialised gloo group, and collect what each returns.

Results travel through files (tensors sent through a queue die with the process that shared
them); an exception inside a rank comes back as its traceback and fails the test with it. Every
process is joined with a timeout, so a deadlock fails instead of hanging the suite."""
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

JOIN_TIMEOUT_S = 300


def _entry(rank, world, init_file, out_dir, worker, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = worker(rank, world, *args)
    except Exception:  # report instead of leaving the parent guessing
        result = RankFailure(traceback.format_exc())
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


class RankFailure(str):
    """The traceback of an exception raised inside a rank."""


def spawn(worker, world: int, out_dir: str, *args):
    """{rank: worker's result}, or a string saying which ranks died without reporting.
    worker must be a module-level function (the processes are spawned)."""
    ctx = mp.get_context("spawn")
    init_file = os.path.join(out_dir, "dist_init")
    procs = [ctx.Process(target=_entry, args=(r, world, init_file, out_dir, worker, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=JOIN_TIMEOUT_S)
    for p in procs:  # a rank still running after the timeout: a deadlock; stop our own child
        if p.is_alive():
            p.kill()
            p.join(timeout=30)
    codes = [p.exitcode for p in procs]
    missing = [r for r in range(world) if not os.path.exists(os.path.join(out_dir, f"rank{r}.pt"))]
    if codes != [0] * world or missing:
        return f"exit codes {codes}, no result from ranks {missing}"
    results = {r: torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
               for r in range(world)}
    for rank, result in results.items():
        assert not isinstance(result, RankFailure), f"rank {rank} failed:\n{result}"
    return results


def spawn_with_retry(tmp_path_factory, worker, world: int, *args):
    """spawn once more when processes die before reporting (gloo's rendezvous has been seen to
    drop a connection once on this loaded 2-core machine); errors raised inside a rank are never
    retried, and a second crash fails with both reasons."""
    first = spawn(worker, world, str(tmp_path_factory.mktemp("dist")), *args)
    if not isinstance(first, str):
        return first
    second = spawn(worker, world, str(tmp_path_factory.mktemp("dist_retry")), *args)
    assert not isinstance(second, str), f"two gloo groups crashed: {first}; then {second}"
    return second


def assert_ranks_equal_one_process(per_rank, single_loss, single_grads, b_local: int):
    """The api.md process-group convention of both loss families. per_rank: [(loss, grads)] of
    each rank on its b_local rows; single_*: one process over the concatenated batch; grads are
    [d image, d text, scalar gradients...]. The mean of the rank losses is the single-process
    loss; after DDP's averaging the gradients are the single-process ones: each rank's feature
    gradient is world x the single-process gradient of its rows (DDP divides by world), scalar
    gradients average over ranks."""
    world = len(per_rank)
    torch.testing.assert_close(sum(loss for loss, _ in per_rank) / world, single_loss,
                               rtol=1e-10, atol=1e-12)
    for r, (_, grads) in enumerate(per_rank):
        rows = slice(r * b_local, (r + 1) * b_local)
        for got, want in zip(grads[:2], single_grads[:2]):
            torch.testing.assert_close(got / world, want[rows], rtol=1e-9, atol=1e-12)
    for i in range(2, len(single_grads)):
        avg = sum(grads[i] for _, grads in per_rank) / world
        torch.testing.assert_close(avg, single_grads[i], rtol=1e-9, atol=1e-12)
