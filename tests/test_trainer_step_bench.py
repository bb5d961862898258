"""The large-batch training benchmarks run: the GPU suite's trainer section (benchmarks/gpu/
trainer.py) on CPU with a tiny model, so it cannot crash on first GPU use, and the CPU benchmark's
cached child."""
import pytest
import torch

from benchmarks import bench_train_step
from benchmarks.gpu import trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_trainer_section_runs_on_cpu_with_a_tiny_model():
    rows = trainer.rows(bench_train_step.bench_model, "cpu", batches=(32,), micro=8, precision="fp32",
                        steps=1, naive=False)
    assert [r["check"] for r in rows] == ["ok", "SKIPPED", "ok"], rows  # the sync count is CUDA only
    assert rows[2]["ms"] > 0 and "samples/s" in rows[2]["note"]
    assert set(rows[0]) == {"op", "config", "check", "ms", "tflops", "note"}


def test_gpu_trainer_check_detects_a_broken_replay(monkeypatch):
    from calrft import step as steps
    monkeypatch.setattr(steps.RngState, "restore", lambda self, state: None)
    row = trainer.check_row(bench_train_step.bench_model, "cpu", batch=16, micro=4)
    assert row["check"] == "MISMATCH"


def test_naive_adapter_matches_the_fused_loss():
    torch.manual_seed(0)
    f = [torch.nn.functional.normalize(torch.randn(24, 16, dtype=torch.float64), dim=1) for _ in range(4)]
    wv, wt = torch.randn(20, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    s = torch.tensor(7.0, dtype=torch.float64)
    kw = dict(visual_proj=wv, text_proj=wt, teacher_image_features=f[2], teacher_text_features=f[3],
              teacher_logit_scale=s)
    fused = bench_train_step.CaRotLoss()(f[0], f[1], s, **kw)
    naive = bench_train_step.NaiveCaRot()(f[0], f[1], s, **kw)
    assert naive.item() == pytest.approx(fused.item(), rel=1e-9)


def test_naive_reach_row_runs():
    row = trainer.naive_reach_row("cpu", d=8, start=16, limit=64)
    assert row["check"] == "ok" and "64" in row["note"]


def test_gpu_trainer_step_row_in_bf16_on_cpu():
    """The suite's bf16 path (bf16 host images, bf16 autocast) on CPU."""
    row = trainer.step_row(bench_train_step.bench_model, "cpu", 16, 8, precision="bf16", steps=1)
    assert row["check"] == "ok" and row["ms"] > 0, row
