"""Two gloo processes on CPU train exactly like one process on the same global batch, with the
plain step and with the feature-cached step (--micro-batch-size: each rank's 4 rows in
micro-batches, the loss global across ranks, gradients all-reduced once)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from calrft import models
from calrft.train import Trainer

from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, method, steps, micro=None, name=models.TINY):
    # float64, so that reduction-order noise stays far below Adam's eps: parameters whose true
    # gradient is 0 (e.g. attention key biases) would otherwise take noise-sized-but-normalised steps
    model, tok = tiny_model(name=name)
    model.double()
    train, eval_sets = tiny_data(dtype=torch.float64)
    t = Trainer(tiny_config(out, method=method, steps=steps, batch_size=8, micro_batch_size=micro,
                            model=name),
                model=model, tokenizer=tok, train_set=train, eval_sets=eval_sets, classnames=CLASSES)
    t.reductions = []
    if hasattr(t.wrapped, "register_comm_hook"):  # count DDP's bucket all-reduces
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def counting(state, bucket):
            t.reductions.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)
        t.wrapped.register_comm_hook(None, counting)
    result = t.fit()
    return t, result


SIGMOID = models.TINY_SIGMOID
# (method, micro-batch size per rank, model) of the two-rank runs; each compares with the plain
# single-process run of its method and model. 4 rows a rank: micro 2 -> 2 + 2, micro 3 -> 3 + 1.
# calrft-tiny-sigmoid trains with the sigmoid family (--loss auto): its process-group path and
# logit bias.
CASES = (("carot", None, models.TINY), ("flyp", None, models.TINY), ("carot", 2, models.TINY),
         ("flyp", 3, models.TINY), ("ft", 3, models.TINY), ("carot", None, SIGMOID),
         ("carot", 2, SIGMOID), ("flyp", 3, SIGMOID))
SINGLES = sorted({(method, name) for method, _, name in CASES})


def _worker(rank, world, port, out, steps, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import calrft.dist as dist
    for method, micro, name in CASES:  # one process group for every case: spawning is the slow part
        t, result = _train(f"{out}/{method}{micro}{name}", method, steps, micro, name)
        teacher = {k: v.clone() for k, v in t.teacher.state_dict().items()} if t.teacher is not None else None
        torch.save(({k: v.clone() for k, v in t.clip.state_dict().items()}, teacher,
                    {k: result[k] for k in ("id", "ood", "sigma_min")}, len(t.reductions)),
                   f"{result_path}.{method}{micro}{name}.{rank}")
    dist.shutdown()


def test_two_gloo_ranks_match_one_process(tmp_path):
    steps = 3
    ctx = mp.get_context("spawn")
    port = _free_port()
    result_path = str(tmp_path / "rank_result")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path / "ddp"), steps, result_path))
             for r in range(2)]
    for p in procs:
        p.start()
    initial = {name: tiny_model(name=name)[0].double() for name in (models.TINY, SIGMOID)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each too; more only contend here
    try:
        singles = {(m, name): _train(tmp_path / "single" / f"{m}{name}", m, steps, name=name)
                   for m, name in SINGLES}
    finally:
        torch.set_num_threads(threads)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    reductions = {}
    for method, micro, name in CASES:
        got = {r: torch.load(f"{result_path}.{method}{micro}{name}.{r}", weights_only=False)
               for r in range(2)}
        _compare(initial[name], *singles[method, name], {r: v[:3] for r, v in got.items()})
        reductions[method, micro, name] = got[0][3]
    # gradients are all-reduced once a step, in the last micro-batch's backward: as many bucket
    # reductions as the plain step's
    assert reductions["carot", 2, models.TINY] == reductions["carot", None, models.TINY] > 0
    assert reductions["flyp", 3, models.TINY] == reductions["flyp", None, models.TINY] > 0
    assert reductions["carot", 2, SIGMOID] == reductions["carot", None, SIGMOID] > 0


def _compare(initial, single, single_result, got):
    init = initial.state_dict()
    for rank in (0, 1):
        state, teacher, result = got[rank]
        for name, value in single.clip.state_dict().items():
            moved = (value - init[name]).abs().max().item()
            diff = (state[name] - value).abs().max().item()
            assert diff <= 1e-6 * moved + 1e-12, (rank, name, diff, moved)
        if teacher is not None:
            for name, value in single.teacher.state_dict().items():
                assert torch.allclose(teacher[name], value, atol=1e-10, rtol=1e-8), name
        assert result["id"]["acc"] == single_result["id"]["acc"]
        for k in ("ece", "nll", "brier"):
            assert result["id"][k] == pytest.approx(single_result["id"][k], rel=1e-4, abs=1e-6)
        assert result["sigma_min"] == pytest.approx(single_result["sigma_min"], rel=1e-3)
        assert result["ood"]["avg"]["nll"] == pytest.approx(single_result["ood"]["avg"]["nll"], rel=1e-4)
