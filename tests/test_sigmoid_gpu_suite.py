"""The GPU suite's sigmoid section (benchmarks/gpu/sigmoid.py) run on CPU tensors, so that its
first run on a lent GPU does not crash: every code path at tiny sizes (wall-clock timing, no
memory figures), every check row passing; and the driver running it in the build-time child."""
import math

from benchmarks import gpu_suite
from benchmarks.gpu import sigmoid as section

KEYS = {"op", "config", "check", "ms", "tflops", "note"}


def test_sigmoid_section_runs_every_code_path_on_cpu(monkeypatch):
    monkeypatch.setenv("CALRFT_SIGMOID_BUDGET_S", "600")
    rows = section.run(device="cpu", quick=True)
    assert all(set(r) == KEYS for r in rows)
    failed = [r for r in rows if "FAIL" in r["check"]]
    assert not failed, failed
    checks = [r for r in rows if r["op"].startswith("sigmoid_loss (default) vs fp64")]
    assert len(checks) == 4 and all(r["check"].endswith(": ok") for r in checks), checks
    ops = {r["op"] for r in rows}
    for wanted in ("open_clip SigLipLoss fwd+bwd", "3-unit bound: 3 plain torch.mm",
                   "sigmoid_loss fwd+bwd (auto)", "sigmoid_loss + distill fwd+bwd (auto)",
                   "goal: sigmoid_loss <= 0.5x open_clip SigLipLoss",
                   "goal: sigmoid_loss >= 60% of the bf16 matmul rate (3 units)",
                   "sigmoid_loss fwd+bwd peak extra memory"):
        assert wanted in ops, (wanted, ops)
    goals = [r for r in rows if r["op"].startswith("goal:")]
    assert all(r["check"].endswith(("met", "missed")) for r in goals), goals
    timed = [r for r in rows if r["check"] == "timed"]
    assert timed and all(r["ms"] > 0 and math.isfinite(r["ms"]) for r in timed)


def test_a_wrong_result_fails_its_check_row(monkeypatch):
    """The check rows can fail: a loss that is off by 1% is reported as FAIL."""
    real = section.loss_and_grads

    def off(x, dtype=None, **kw):
        out = real(x, dtype, **kw)
        return out if dtype is not None else (out[0] * 1.01, *out[1:])
    monkeypatch.setattr(section, "loss_and_grads", off)
    row = section.check_large(64, 8, "fp32", False, "cpu")
    assert row["check"].endswith("FAIL"), row


def test_sigmoid_section_budget_skips_instead_of_overrunning():
    rows = section.time_sigmoid(1.0, device="cpu", reps=1, case=(32, 4, "fp32"),
                                budget=section.Budget(-1.0))
    assert rows and all(r["check"] == "skipped: time budget" for r in rows)


def test_suite_runs_both_loss_sections_in_the_build_time_child():
    assert "sigmoid" in gpu_suite.SECTIONS and "sigmoid" in gpu_suite.BUILD_FREE
    rows = gpu_suite.finish_section_child(gpu_suite.start_section_child(["loss", "sigmoid"]))
    # without a GPU each section reports one UNRUN row
    assert [r["op"] for r in rows] == ["contrastive (chunked / triton)", "sigmoid_loss (chunked)"]
    assert all(r["check"].startswith("UNRUN") for r in rows)
