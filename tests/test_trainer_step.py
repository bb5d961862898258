"""The feature-cached step (--micro-batch-size, step.py) equals the full-batch step: gradients,
updated weights, teacher, loss terms and the random state after the step, for carot, flyp and ft,
with and without dropout; activation checkpointing; precision settings; resume; no host sync."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from calrft import data, models, step as steps
from calrft.config import TrainConfig
from calrft.train import Trainer

from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model

METHODS = ("carot", "flyp", "ft")


pytestmark = pytest.mark.usefixtures("one_thread")


def add_dropout(model, p=0.3):
    """Dropout on the output of every residual block of both towers (the tiny architecture has
    none of its own): the forward draws from the global generator, as open_clip's dropouts do."""
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    for block in blocks:
        block.register_forward_hook(lambda mod, args, out: F.dropout(out, p, training=mod.training))
    return model


def make_trainer(tmp_path, method, micro=None, dropout=False, dtype=torch.float64, evals=True,
                 model_name=models.TINY, **kw):
    model, tok = tiny_model(name=model_name)
    model.to(dtype)
    if dropout:
        add_dropout(model)
    train, eval_sets = tiny_data(dtype=dtype)
    cfg = tiny_config(tmp_path, method=method, micro_batch_size=micro, ema_every=1,
                      model=model_name, **kw)
    return Trainer(cfg, model=model, tokenizer=tok, train_set=train,
                   eval_sets=eval_sets if evals else None, classnames=CLASSES)


def batches(t, n):
    sampler = data.GlobalBatchSampler(**t.sampler_args)
    return list(itertools.islice(data.train_loader(t.train_set, t.tokenizer, sampler, 0), n))


class ChunkedForward(torch.nn.Module):
    """The full-batch step's forward with the micro-batches' dropout draws: the student runs the
    same row chunks in the same order, but in ONE graph, and the loss sees the whole batch. With
    dropout on, this is the full-batch step the cached one must reproduce (a single forward over
    all rows draws its masks in a different order)."""

    def __init__(self, student, micro):
        super().__init__()
        self.student, self.micro = student, micro

    def forward(self, images, texts=None):
        outs = [self.student(*(x[lo:hi] for x in (images, texts) if x is not None))
                for lo, hi in steps.spans(images.shape[0], self.micro)]
        if torch.is_tensor(outs[0]):
            return torch.cat(outs)
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[-1][2]


def run_steps(t, bs):
    terms, grads, rng = [], None, None
    for b in bs:
        terms.append(steps.materialise(t.train_step(b)))
    grads = {n: p.grad.clone() for n, p in t.student.named_parameters() if p.grad is not None}
    return terms, grads, torch.get_rng_state()


def assert_same_step(ref, got, ref_out, got_out, rel=1e-9):
    (ref_terms, ref_grads, ref_rng), (got_terms, got_grads, got_rng) = ref_out, got_out
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        diff = (got_grads[name] - g).abs().max().item()
        assert diff <= rel * g.abs().max().item() + 1e-13, (name, diff)
    for a, b in zip(ref_terms, got_terms):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12), k
    modules = [(ref.student, got.student)]
    if ref.teacher is not None:
        modules.append((ref.teacher, got.teacher))
    for x, y in modules:
        for (name, v), (_, w) in zip(x.state_dict().items(), y.state_dict().items()):
            # Adam's normalised update amplifies rounding where a gradient is ~0: compare the
            # weights to the size of the step they took
            assert (v - w).abs().max().item() <= 1e-8 * max(1.0, v.abs().max().item()), name
    assert torch.equal(ref_rng, got_rng)  # the step consumed the random stream as the reference


# (method, model): the softmax family on calrft-tiny, the sigmoid family (--loss auto) on
# calrft-tiny-sigmoid, whose logit bias is a parameter the cached step must also get right
CASES = [(m, models.TINY) for m in METHODS] + [(m, models.TINY_SIGMOID) for m in ("carot", "flyp")]


@pytest.mark.parametrize("method,model_name", CASES)
def test_micro_batched_step_equals_the_full_batch_step(tmp_path, method, model_name):
    """No dropout: the reference is the plain trainer step (one forward over all rows). Two steps,
    so the second distils from the teacher the first EMA update made; micro-batches 3, 3, 2."""
    ref = make_trainer(tmp_path / "ref", method, steps=2, model_name=model_name)
    got = make_trainer(tmp_path / "got", method, micro=3, steps=2, model_name=model_name)
    if model_name == models.TINY_SIGMOID:
        assert got.family == "sigmoid" and got.clip.logit_bias.requires_grad
    bs = batches(ref, 2)
    assert len(steps.spans(bs[0]["images"].shape[0], 3)) == 3
    assert_same_step(ref, got, run_steps(ref, bs), run_steps(got, bs))


@pytest.mark.parametrize("method", METHODS)
def test_micro_batched_step_with_dropout_replays_the_random_state(tmp_path, method):
    ref = make_trainer(tmp_path / "ref", method, dropout=True, steps=2)
    ref.stepper.wrapped = ChunkedForward(ref.student, 3)
    got = make_trainer(tmp_path / "got", method, micro=3, dropout=True, steps=2)
    bs = batches(ref, 2)
    # dropout is live: two forwards of the same rows differ
    with torch.no_grad():
        x = bs[0]["images"][:2].double()
        assert not torch.equal(got.clip.encode_image(x), got.clip.encode_image(x))
    torch.manual_seed(5)
    ref_out = run_steps(ref, bs)
    torch.manual_seed(5)
    assert_same_step(ref, got, ref_out, run_steps(got, bs))


def test_without_the_replay_the_gradients_would_differ(tmp_path):
    """The dropout test can fail: skipping the restore of the random state changes the result."""
    ref = make_trainer(tmp_path / "ref", "flyp", dropout=True, steps=1)
    ref.stepper.wrapped = ChunkedForward(ref.student, 4)
    got = make_trainer(tmp_path / "got", "flyp", micro=4, dropout=True, steps=1)
    got.stepper.rng.restore = lambda state: None
    bs = batches(ref, 1)
    torch.manual_seed(5)
    _, ref_grads, _ = run_steps(ref, bs)
    torch.manual_seed(5)
    _, got_grads, _ = run_steps(got, bs)
    assert max((ref_grads[n] - g).abs().max().item() for n, g in got_grads.items()) > 1e-6


def test_grad_checkpointing_gives_the_same_step(tmp_path):
    ref = make_trainer(tmp_path / "ref", "carot", micro=3, dropout=True, steps=2)
    got = make_trainer(tmp_path / "got", "carot", micro=3, dropout=True, steps=2, grad_checkpointing=True)
    assert got.clip.visual.transformer.grad_checkpointing and got.clip.transformer.grad_checkpointing
    assert not ref.clip.transformer.grad_checkpointing
    bs = batches(ref, 2)
    torch.manual_seed(1)
    ref_out = run_steps(ref, bs)
    torch.manual_seed(1)
    assert_same_step(ref, got, ref_out, run_steps(got, bs))


@pytest.mark.parametrize("model_name", [models.TINY, models.TINY_SIGMOID])
def test_resume_in_the_middle_of_a_micro_batched_run(tmp_path, model_name):
    kw = dict(micro=3, dropout=True, steps=5, evals=False, model_name=model_name)
    full = make_trainer(tmp_path / "full", "carot", **kw)
    full.fit()
    part = make_trainer(tmp_path / "part", "carot", stop_after=2, **kw)
    assert part.fit() is None and part.step == 2
    resumed = make_trainer(tmp_path / "part", "carot", resume=str(tmp_path / "part" / "checkpoint.pt"), **kw)
    resumed.fit()
    assert resumed.step == full.step == 5  # crosses the epoch boundary (4 steps an epoch)
    for a, b in ((full.student, resumed.student), (full.teacher, resumed.teacher)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_is_honoured(tmp_path, precision):
    """bf16 / fp16 autocast run on CPU too; fp16 brings a gradient scaler whose state is saved."""
    fp32 = make_trainer(tmp_path / "fp32", "carot", micro=4, dtype=torch.float32, steps=2, precision="fp32")
    low = make_trainer(tmp_path / precision, "carot", micro=4, dtype=torch.float32, steps=2,
                       precision=precision)
    assert (low.scaler is not None) == (precision == "fp16") and fp32.scaler is None
    bs = batches(fp32, 1)
    (x,), _, _ = run_steps(fp32, bs)
    (y,), _, _ = run_steps(low, bs)
    assert y["contrastive"] == pytest.approx(x["contrastive"], rel=0.05)
    assert y["contrastive"] != x["contrastive"]  # autocast really ran in low precision
    assert all(p.grad is not None for p in low.student.parameters() if p.requires_grad)
    low.save()
    if precision == "fp16":
        from calrft import checkpoint
        assert "grad_scaler" in checkpoint.load(tmp_path / precision / "checkpoint.pt")
    with steps.autocast("cpu", precision):
        assert torch.get_autocast_dtype("cpu") == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_cuda():
    assert steps.autocast_dtype("auto", "cpu") is None
    assert steps.autocast_dtype("auto", "cuda") is torch.bfloat16
    assert steps.autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ValueError, match="precision"):
        steps.autocast_dtype("fp8", "cpu")


def test_no_host_sync_outside_log_steps(tmp_path, monkeypatch):
    """The step returns device tensors; fit reads them (one sync) only at a log step."""
    t = make_trainer(tmp_path, "carot", micro=4, dtype=torch.float32, steps=3, log_every=2, evals=False)
    calls = []
    real = steps.materialise
    monkeypatch.setattr(steps, "materialise", lambda terms: calls.append(terms) or real(terms))
    t.fit()
    assert len(calls) == 2  # steps 2 and the last (3)
    assert all(torch.is_tensor(v) and v.ndim == 0 for k, v in calls[0].items() if k != "ema_momentum")


def test_the_objective_skips_the_ops_synchronising_checks(tmp_path, monkeypatch):
    """Inside a step the ops' GPU-synchronising checks are off (calrft_kernels.device_checks);
    outside it they are on again. Checked through the policy the ops consult."""
    from calrft_kernels import _backend
    off_cpu = torch.empty((), device="meta")
    t = make_trainer(tmp_path, "carot", micro=4, dtype=torch.float32, steps=1, evals=False)
    seen = []
    real = t.stepper.objective.carot_loss.forward

    def spy(*args, **kwargs):
        seen.append(_backend.host_checks_for(off_cpu))
        return real(*args, **kwargs)

    monkeypatch.setattr(t.stepper.objective.carot_loss, "forward", spy)
    t.fit()
    assert seen and not any(seen)
    assert _backend.host_checks_for(off_cpu)


def test_a_non_finite_loss_stops_at_the_log_step():
    steps.check_finite_loss({"loss": 1.5, "contrastive": 0.5}, step=3)
    with pytest.raises(FloatingPointError, match="not finite at step 7 .*loss=nan"):
        steps.check_finite_loss({"loss": float("nan"), "contrastive": 0.5}, step=7)


@pytest.mark.parametrize("kw,match", [({"micro_batch_size": 0}, "micro_batch_size"),
                                      ({"precision": "half"}, "precision"),
                                      ({"train_data": "a.tar", "train_csv": "b.csv"}, "train"),
                                      ({"train_data": "a.tar", "steps": None}, "train_num_samples")])
def test_bad_settings(tmp_path, kw, match):
    base = dict(model="calrft-tiny", pretrained=None, out=str(tmp_path), device="cpu")
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        TrainConfig(**base).validate()


def test_spans():
    assert steps.spans(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert steps.spans(8, None) == steps.spans(8, 8) == steps.spans(8, 100) == [(0, 8)]


class _NormedPair(torch.nn.Module):
    """A two-tower toy with batch norm in the image tower: (image features, text features, scale)."""

    def __init__(self):
        super().__init__()
        self.img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.BatchNorm1d(6))
        self.txt = torch.nn.Embedding(10, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        return (F.normalize(self.img(images), dim=-1), F.normalize(self.txt(texts).mean(1), dim=-1),
                self.logit_scale.exp())


def test_batch_norm_running_statistics_update_once_per_micro_batch():
    torch.manual_seed(0)
    model = _NormedPair().train()
    batch = {"images": torch.randn(8, 3, 2, 2), "texts": torch.randint(0, 10, (8, 3)),
             "labels": torch.zeros(8, dtype=torch.long)}
    stepper = steps.Stepper("flyp", student=model, objective=steps.Objective("flyp"), micro_batch_size=4)
    stepper.forward_backward(batch)
    bn = model.img[2]
    assert bn.num_batches_tracked.item() == 2  # two micro-batches, pass 2 undone
    expected = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        feats = model.img[1](model.img[0](batch["images"]))
        for lo in (0, 4):
            expected(feats[lo:lo + 4])
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
