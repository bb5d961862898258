"""Two gloo processes on CPU train exactly like one process on the same global batch."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from calrft.train import Trainer

from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, method, steps):
    # float64, so that reduction-order noise stays far below Adam's eps: parameters whose true
    # gradient is 0 (e.g. attention key biases) would otherwise take noise-sized-but-normalised steps
    model, tok = tiny_model()
    model.double()
    train, eval_sets = tiny_data(dtype=torch.float64)
    t = Trainer(tiny_config(out, method=method, steps=steps, batch_size=8), model=model, tokenizer=tok,
                train_set=train, eval_sets=eval_sets, classnames=CLASSES)
    result = t.fit()
    return t, result


METHODS = ("carot", "flyp")


def _worker(rank, world, port, out, steps, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import calrft.dist as dist
    for method in METHODS:  # one process group for both methods: spawning is the slow part
        t, result = _train(f"{out}/{method}", method, steps)
        teacher = {k: v.clone() for k, v in t.teacher.state_dict().items()} if t.teacher is not None else None
        torch.save(({k: v.clone() for k, v in t.clip.state_dict().items()}, teacher,
                    {k: result[k] for k in ("id", "ood", "sigma_min")}), f"{result_path}.{method}.{rank}")
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
    initial, _ = tiny_model()
    initial.double()
    singles = {m: _train(tmp_path / "single" / m, m, steps) for m in METHODS}
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    for method in METHODS:
        _compare(initial, *singles[method],
                 {r: torch.load(f"{result_path}.{method}.{r}", weights_only=False) for r in range(2)})


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
