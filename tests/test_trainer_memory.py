"""Peak memory of a feature-cached step grows with the micro-batch, not the global batch.

Each measurement runs one CaRot step (student + EMA teacher, CaRotLoss) in a fresh child process:
the kernel's RSS high-water mark is reset after set-up (/proc/self/clear_refs) and read from
VmHWM after the step, so imports, the model and the input batch do not count, only what the step
allocates. The model is a small open_clip CLIP whose activations per sample (17 image tokens of
width 32 with an 8x MLP) dwarf its 8-wide features, so the O(B d) part of the cached step stays
small; the 8192-row cached step takes ~8 s of one core."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _model():
    import open_clip
    vision = {"image_size": 16, "patch_size": 4, "width": 32, "head_width": 8, "layers": 1, "mlp_ratio": 8}
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    return open_clip.CLIP(8, vision, text)


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _setup(batch: int, micro):
    import torch

    from calrft import ema
    from calrft import step as steps
    from calrft.ops import CaRotLoss
    torch.manual_seed(0)
    model = _model()
    teacher = ema.make_teacher(model)
    stepper = steps.Stepper("carot", student=model, teacher=teacher,
                            objective=steps.Objective("carot", CaRotLoss()), micro_batch_size=micro)
    g = torch.Generator().manual_seed(0)
    batch_ = {"images": torch.randn(batch, 3, 16, 16, generator=g),
              "texts": torch.randint(1, 63, (batch, 8), generator=g),
              "labels": torch.zeros(batch, dtype=torch.long)}
    model.train()
    return stepper, batch_


def child(batch: int, micro) -> dict:
    """In a fresh interpreter: one step's peak RSS growth over the RSS after set-up (MiB)."""
    import torch
    torch.set_num_threads(1)
    # warm-up at 8 rows: the ops' first call loads the native library and initialises (~160 MiB
    # once per process, whatever the batch)
    stepper, batch_ = _setup(8, 4)
    stepper.forward_backward(batch_, use_teacher=True)
    del stepper, batch_
    stepper, batch_ = _setup(batch, micro)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = _status_mib("VmRSS")
    terms = stepper.forward_backward(batch_, use_teacher=True)
    return {"growth_mib": _status_mib("VmHWM") - base, "loss": float(terms["loss"])}


def peak_growth(cases) -> list:
    """One fresh interpreter per case (run side by side): nothing of this process, or of another
    case, pollutes a measurement."""
    # glibc serves large blocks from mmap (returned to the system when freed), not from a heap
    # whose fragmentation after 64 micro-batch allocate/free rounds would add noise to RSS
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    procs = []
    for batch, micro in cases:
        code = (f"import sys, json; sys.path[:0] = {[HERE, os.path.join(ROOT, 'python'), ROOT]!r}; "
                f"import test_trainer_memory as m; print(json.dumps(m.child({batch}, {micro!r})))")
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_cached_step_memory_grows_with_the_micro_batch_not_the_global_batch():
    # 256 in one micro-batch (the plain step), 8192 in 32 micro-batches of 256, plain at 1024
    small, cached, plain = peak_growth([(256, 256), (8192, 256), (1024, None)])
    assert small["growth_mib"] > 5    # the model's activations are what is measured
    assert cached["growth_mib"] < 1.5 * small["growth_mib"], (small, cached)
    assert plain["growth_mib"] > 3 * small["growth_mib"], (small, plain)
