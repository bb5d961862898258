"""The GPU suite's loss section and driver, run on CPU tensors so that their first run on a lent
GPU does not crash: every code path of benchmarks/gpu/loss.py at tiny sizes (Triton under the
interpreter, wall-clock timing), and the driver's argument parsing and child-process path."""
import math

from benchmarks import gpu_suite
from benchmarks.gpu import loss as section

KEYS = {"op", "config", "check", "ms", "tflops", "note"}


def test_loss_section_runs_every_code_path_on_cpu(monkeypatch):
    monkeypatch.setenv("CALRFT_LOSS_BUDGET_S", "600")
    rows = section.run(device="cpu", quick=True)
    assert all(set(r) == KEYS for r in rows)
    failed = [r for r in rows if "FAIL" in r["check"] or "FAILED" in r["check"]]
    assert not failed, failed
    checks = [r for r in rows if r["op"].startswith("contrastive_loss (default) vs fp64")]
    assert len(checks) == 2 and all(r["check"].endswith(": ok") for r in checks)
    ops = {r["op"] for r in rows}
    for wanted in ("open_clip ClipLoss fwd+bwd", "contrastive fwd+bwd (auto)",
                   "contrastive fwd+bwd (chunked)", "contrastive fwd+bwd (triton)",
                   "naive CaRot loss fwd+bwd", "contrastive+distill fwd+bwd (auto)",
                   "first call at a new batch size (triton)"):
        assert wanted in ops, (wanted, ops)
    timed = [r for r in rows if r["check"] == "timed"]
    assert timed and all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in timed)


def test_loss_section_budget_skips_instead_of_overrunning():
    budget = section.Budget(-1.0)
    rows = section.time_losses(1.0, device="cpu", reps=1, cases=[(32, 4, "fp32")],
                               selectable=(), budget=budget)
    assert rows[0]["check"] == "skipped: time budget"


def test_suite_driver_parses_arguments_and_runs_a_section_in_a_child():
    # without a GPU the driver stops before measuring (exit code 2)
    assert gpu_suite.main(["--skip-build", "--sections", "loss", "--no-parallel-loss"]) == 2
    rows = gpu_suite.finish_section_child(gpu_suite.start_section_child("loss"))
    assert len(rows) == 1 and rows[0]["check"].startswith("UNRUN"), rows
    table = gpu_suite.format_table(rows)
    assert table.count("\n") == 2 and "UNRUN" in table
