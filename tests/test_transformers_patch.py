"""calrft_kernels.integrations.transformers: Hugging Face CLIPModel / SiglipModel / Siglip2Model
on the fused ops. Tiny randomly initialised configs (nothing is downloaded); every comparison is
the same model's unpatched forward against its patched one."""
from __future__ import annotations

import copy
import inspect
import sys

import importlib

import numpy
import pytest
import torch
# Not importorskip: the README's test command installs transformers (requirements.txt), and a
# missing one must fail here rather than skip these tests.
import transformers
from transformers.models.clip import modeling_clip
from transformers.models.siglip import modeling_siglip

from _dist_util import spawn_with_retry
from calrft_kernels.integrations import transformers as integration

# Siglip2Model where the installed transformers has it (5.18.0, the pinned one, does)
siglip2 = importlib.import_module("transformers.models.siglip2.modeling_siglip2") \
    if hasattr(transformers, "Siglip2Model") else None

B = 7            # no other dimension of the tiny models is 7: a tensor with two is B x B
TEXT_LEN = 5
CLASSES = [modeling_clip.CLIPModel, modeling_siglip.SiglipModel] + (
    [siglip2.Siglip2Model] if siglip2 else [])
MODEL_NAMES = [c.__name__ for c in CLASSES]


def tiny_model(name: str, dtype=torch.float32, seed: int = 0):
    """A randomly initialised model of the named class: 2 layers, width 32, 16-pixel images."""
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=8, num_channels=3)
    if name == "CLIPModel":
        config = transformers.CLIPConfig(text_config=text, vision_config={**vision,
                                         "image_size": 16}, projection_dim=24)
    elif name == "SiglipModel":
        config = transformers.SiglipConfig(text_config=text, vision_config={**vision,
                                           "image_size": 16})
    else:
        config = transformers.Siglip2Config(text_config=text, vision_config={**vision,
                                            "num_patches": 4})
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config).to(dtype)
    with torch.no_grad():  # SigLIP's scale and bias start from randn: make them meaningful
        model.logit_scale.fill_(2.3)
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-1.5)
    return model


def batch(name: str, n: int = B, dtype=torch.float32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, 99, (n, TEXT_LEN), generator=g)}
    if name == "Siglip2Model":  # 2 x 2 patches of 8 x 8 x 3 pixels, already patchified
        out["pixel_values"] = torch.randn(n, 4, 3 * 8 * 8, generator=g, dtype=dtype)
        out["pixel_attention_mask"] = torch.ones(n, 4, dtype=torch.int64)
        out["spatial_shapes"] = torch.tensor([[2, 2]] * n)
    else:
        out["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g, dtype=dtype)
    return out


def step(model, inputs, **kw):
    """(output, {parameter name: gradient}) of one return_loss=True forward and backward."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_loss=True, **kw)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def restores_transformers():
    """Every test leaves the classes as it found them (a failing test's patch is undone)."""
    before = {cls: vars(cls)["forward"] for cls in CLASSES}
    yield
    if integration.active_patch() is not None:
        integration.unpatch()
    assert {cls: vars(cls)["forward"] for cls in CLASSES} == before


# ---- the numbers: loss and gradients equal the model's own --------------------------------
def assert_close_rel(actual, expected, rel, what, floor=0.0):
    """max |actual - expected| <= rel * max(max |expected|, floor)."""
    scale = max(expected.abs().max().item(), floor, 1e-30)
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"


def assert_grads_close(grads, ref_grads, rel, floor):
    """Each gradient to `rel` of its own size, or of `floor` times the largest gradient: the
    attention keys' biases have a gradient of exactly 0 in exact arithmetic (softmax ignores a
    shift), so theirs is rounding noise of the dtype's size in both models."""
    assert grads.keys() == ref_grads.keys()
    floor = floor * max(g.abs().max().item() for g in ref_grads.values())
    for k in ref_grads:
        assert_close_rel(grads[k], ref_grads[k], rel, f"grad {k}", floor)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dtype, rel, floor", [(torch.float64, 1e-9, 1e-6),
                                               (torch.float32, 2e-5, 1e-2)])
def test_loss_and_gradients_equal_the_models_own(name, dtype, rel, floor):
    model = tiny_model(name, dtype).train()
    inputs = batch(name, dtype=dtype)
    ref, ref_grads = step(model, inputs)
    with integration.apply() as handle:
        assert handle.families[name] == ("softmax" if name == "CLIPModel" else "sigmoid")
        out, grads = step(model, inputs)
    assert out.loss.dtype == ref.loss.dtype == dtype
    assert_close_rel(out.loss, ref.loss, rel, "loss")
    assert "logit_scale" in grads and ("logit_bias" in grads) == (name != "CLIPModel")
    assert_grads_close(grads, ref_grads, rel, floor)
    assert out.logits_per_image is None and out.logits_per_text is None  # training forward
    for field in ("text_embeds", "image_embeds"):
        assert torch.equal(getattr(out, field), getattr(ref, field))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_matches_to_bf16_precision(name):
    model = tiny_model(name).train()
    inputs = batch(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = step(model, inputs)
        with integration.apply():
            out, grads = step(model, inputs)
    assert out.loss.dtype == ref.loss.dtype == torch.float32  # as autocast's own loss
    assert_close_rel(out.loss, ref.loss, 2e-2, "loss")
    assert_grads_close(grads, ref_grads, 5e-2, 2e-2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_forwards_still_return_the_models_logits(name):
    model = tiny_model(name).eval()
    inputs = batch(name)
    with torch.no_grad():
        ref = model(**inputs, return_loss=True)
        plain = model(**inputs)
        with integration.apply():
            out = model(**inputs, return_loss=True)
            out_plain = model(**inputs)
    for field in ("logits_per_image", "logits_per_text"):
        assert torch.equal(getattr(out, field), getattr(ref, field))
        assert torch.equal(getattr(out_plain, field), getattr(plain, field))
    assert out_plain.loss is None
    assert_close_rel(out.loss, ref.loss, 2e-6, "loss")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_skip_logits_false_and_the_per_call_override_build_the_logits(name):
    model = tiny_model(name).train()
    inputs = batch(name)
    ref, _ = step(model, inputs)
    with integration.apply(skip_logits=False) as handle:
        assert not handle.skip_logits
        kept, _ = step(model, inputs)
        skipped, _ = step(model, inputs, skip_logits=True)
    assert torch.equal(kept.logits_per_text, ref.logits_per_text)
    assert skipped.logits_per_text is None
    with integration.apply():
        built, _ = step(model, inputs, skip_logits=False)
    assert torch.equal(built.logits_per_image, ref.logits_per_image)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_positional_calls_and_return_dict_false_keep_their_meaning(name):
    model = tiny_model(name).eval()
    inputs = batch(name)
    args = [inputs.pop("input_ids"), inputs.pop("pixel_values")]
    with torch.no_grad():
        ref = model(*args, **inputs, return_loss=True, return_dict=False)
        with integration.apply():
            out = model(*args, **inputs, return_loss=True, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref)
    assert_close_rel(out[0], ref[0], 2e-6, "loss")
    assert torch.equal(out[1], ref[1])  # logits_per_image


def test_a_compiled_patched_model_gives_the_same_loss_and_gradients():
    """torch.compile (transformers.Trainer's torch_compile=True) traces the fused forward
    (dynamo and AOT autograd; backend="aot_eager" skips inductor's code generation, ~12 s here)."""
    model = tiny_model("CLIPModel").train()
    inputs = batch("CLIPModel")
    ref, ref_grads = step(model, inputs)
    with integration.apply():
        out, grads = step(torch.compile(model, backend="aot_eager"), inputs)
    assert out.logits_per_text is None
    assert_close_rel(out.loss, ref.loss, 2e-5, "loss")
    assert_grads_close({k.removeprefix("_orig_mod."): g for k, g in grads.items()}, ref_grads,
                       2e-5, 1e-2)


def test_the_patched_forward_shows_the_models_own_signature():
    """transformers.Trainer keeps the dataset columns that model.forward names."""
    before = {cls: inspect.signature(cls.forward) for cls in CLASSES}
    with integration.apply():
        assert {cls: inspect.signature(cls.forward) for cls in CLASSES} == before
        assert all(cls.forward.__doc__ == vars(cls)["forward"].__wrapped__.__doc__
                   for cls in CLASSES)


# ---- memory: the fused op runs and nothing B x B exists in a training step ------------------
FUSED_OP = {"softmax": "calrft::contrastive_stats", "sigmoid": "calrft::sigmoid_pairs"}


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op's output shapes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [(str(func), tuple(t.shape)) for t in torch.utils._pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor)]
        return out


PROFILE_B = 300  # more than the CPU kernels' 256 x 256 tiles, which hold all of a smaller batch


def square(shapes):
    return [(op, s) for op, s in shapes if list(s).count(PROFILE_B) >= 2]


def square_inputs(prof) -> list:
    """The profiled ops (those inside the ops' C++ kernels included) that take a PROFILE_B x
    PROFILE_B tensor."""
    return [(e.name, e.input_shapes) for e in prof.events()
            if square((e.name, s) for s in e.input_shapes if isinstance(s, list))]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_profiled_training_step_runs_the_fused_op_and_nothing_b_by_b(name):
    model = tiny_model(name).train()
    inputs = batch(name, n=PROFILE_B)
    with _Shapes() as unpatched:
        step(model, inputs)
    assert square(unpatched.shapes), "the check must see the unpatched model's B x B logits"
    with integration.apply() as handle:
        family = handle.families[name]
        with torch.profiler.profile(record_shapes=True) as prof, _Shapes() as patched:
            step(model, inputs)
    assert FUSED_OP[family] in {e.name for e in prof.events()}
    assert not square(patched.shapes), square(patched.shapes)[:3]
    assert not square_inputs(prof), square_inputs(prof)[:3]


# ---- gather_across_devices: the global batch's loss on 2 gloo ranks --------------------------
def _two_rank_step(rank, world, name):
    """This rank's (loss, gradients) on its B rows of a 2B batch: gathered, then not."""
    model = tiny_model(name, torch.float64).train()
    full = batch(name, n=world * B, dtype=torch.float64)
    mine = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
    results = {}
    for gather in (True, False):
        with integration.apply(gather_across_devices=gather) as handle:
            assert ("global (gathered)" in handle.summary()) == gather
            out, grads = step(model, mine)
        results[gather] = (out.loss.detach(), grads)
    return results


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_gather_across_devices_gives_the_global_batch_loss_on_two_ranks(name, tmp_path_factory):
    """The ranks' mean loss is the 2B batch's loss in one process, and the ranks' mean gradient
    (DDP's averaging) its gradient; without gathering each rank has its own batch's loss."""
    model = tiny_model(name, torch.float64).train()
    full = batch(name, n=2 * B, dtype=torch.float64)
    ref, ref_grads = step(model, full)
    local = [step(model, {k: v[r * B:(r + 1) * B] for k, v in full.items()})[0].loss.detach()
             for r in range(2)]
    ranks = spawn_with_retry(tmp_path_factory, _two_rank_step, 2, name)
    gathered = [ranks[r][True] for r in range(2)]
    assert_close_rel((gathered[0][0] + gathered[1][0]) / 2, ref.loss.detach(), 1e-9, "loss")
    mean_grads = {k: (gathered[0][1][k] + gathered[1][1][k]) / 2 for k in ref_grads}
    assert_grads_close(mean_grads, ref_grads, 1e-9, 1e-6)
    for r in range(2):  # not gathered: the rank's own B rows, as the model's own loss
        assert_close_rel(ranks[r][False][0], local[r], 1e-9, f"rank {r}'s local loss")
    assert abs(sum(local) / 2 - ref.loss.item()) > 1e-3  # the check can tell the two apart




def test_the_backend_reaches_the_op():
    """backend="reference" (the plain torch formula) materialises the B x B logits inside the
    loss; the default's kernels do not."""
    model = tiny_model("CLIPModel").train()
    inputs = batch("CLIPModel", n=PROFILE_B)
    seen = {}
    for backend in ("auto", "reference"):
        with integration.apply(models=["CLIPModel"], backend=backend), \
                torch.profiler.profile(record_shapes=True) as prof:
            step(model, inputs)
        seen[backend] = square_inputs(prof)
    assert not seen["auto"] and seen["reference"]


# ---- transformers.Trainer: the same weights patched and unpatched --------------------------
class _Pairs(torch.utils.data.Dataset):
    def __init__(self, name, n, dtype, seed=3):
        self.items = batch(name, n=n, dtype=dtype, seed=seed)

    def __len__(self):
        return len(self.items["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.items.items()}


def _collate(rows):
    """As Hugging Face's contrastive image-text example: stack and ask for the loss."""
    return {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "return_loss": True}


def _train(name, tmp_path, dtype, optim, steps=4):
    model = tiny_model(name, dtype, seed=5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=B, max_steps=steps, optim=optim,
        learning_rate=1e-3, weight_decay=0.01, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=11, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args,
                                   train_dataset=_Pairs(name, 4 * B, dtype),
                                   eval_dataset=_Pairs(name, 2 * B, dtype, seed=4),
                                   data_collator=_collate)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    # evaluation: eval mode, so the forwards build the logits, which Trainer collects
    metrics = trainer.evaluate()
    prediction = trainer.predict(_Pairs(name, B, dtype, seed=4))
    return copy.deepcopy(model.state_dict()), losses, metrics["eval_loss"], prediction


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("dtype, optim", [(torch.float32, "sgd"), (torch.float64, "adamw_torch")])
def test_trainer_steps_give_the_same_weights(name, dtype, optim, tmp_path):
    """Four Trainer steps, then evaluate() and predict() (eval forwards: the logits are built and
    collected), patched and unpatched. AdamW runs in float64: in float32, Adam's
    normalisation turns the keys' biases' noise gradients (exactly 0 in exact arithmetic, ~1e-8
    here) into steps of +-lr whose sign is the noise's, in either model."""
    ref, ref_losses, ref_eval, ref_prediction = _train(name, tmp_path / "plain", dtype, optim)
    with integration.apply():
        weights, losses, eval_loss, prediction = _train(name, tmp_path / "fused", dtype, optim)
    start = tiny_model(name, dtype, seed=5).state_dict()
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # the steps changed the weights
    assert len(losses) == len(ref_losses) == 4
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for k in ref:
        torch.testing.assert_close(weights[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    assert eval_loss == pytest.approx(ref_eval, rel=1e-5)
    logits, ref_logits = prediction.predictions[0], ref_prediction.predictions[0]
    assert logits.shape == ref_logits.shape == (B, B)  # logits_per_image, as unpatched
    numpy.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)


# ---- bad use: refused with a clear error, nothing changed ------------------------------------
def test_apply_replaces_the_forwards_and_unpatch_restores_exactly():
    originals = {cls: vars(cls)["forward"] for cls in CLASSES}
    handle = integration.apply()
    assert integration.active_patch() is handle and handle.active
    assert sorted(handle.replaced) == sorted(f"{cls.__module__}.{cls.__name__}.forward"
                                             for cls in CLASSES)
    assert all(vars(cls)["forward"] is not originals[cls] for cls in CLASSES)
    handle.unpatch()
    assert {cls: vars(cls)["forward"] for cls in CLASSES} == originals
    assert integration.active_patch() is None and not handle.active


def test_context_manager_restores_even_when_the_body_raises():
    originals = {cls: vars(cls)["forward"] for cls in CLASSES}
    with pytest.raises(ZeroDivisionError):
        with integration.apply():
            1 / 0
    assert {cls: vars(cls)["forward"] for cls in CLASSES} == originals


def test_applying_twice_is_refused_and_the_first_patch_stays():
    handle = integration.apply()
    with pytest.raises(RuntimeError, match="transformers is already patched"):
        integration.apply(skip_logits=False)
    assert integration.active_patch() is handle and handle.skip_logits
    handle.unpatch()


def test_unpatching_when_not_applied_is_refused():
    with pytest.raises(RuntimeError, match="transformers is not patched"):
        integration.unpatch()
    handle = integration.apply()
    handle.unpatch()
    with pytest.raises(RuntimeError, match="not active"):
        handle.unpatch()


def test_a_forward_with_another_signature_is_refused(monkeypatch):
    original = vars(modeling_clip.CLIPModel)["forward"]

    def forward(self, input_ids=None, pixel_values=None, return_loss=None, output_hidden=False,
                **kwargs):
        return original(self, input_ids=input_ids, pixel_values=pixel_values,
                        return_loss=return_loss, **kwargs)

    monkeypatch.setattr(modeling_clip.CLIPModel, "forward", forward)
    before = {cls: vars(cls)["forward"] for cls in CLASSES}
    with pytest.raises(RuntimeError, match=r"cannot patch transformers .* \(nothing was changed\)"
                       r".*CLIPModel.forward lacks \['attention_mask', 'interpolate_pos_encoding',"
                       r" 'position_ids'\].*takes \['output_hidden'\].*can_return_tuple"):
        integration.apply()
    assert integration.active_patch() is None
    assert {cls: vars(cls)["forward"] for cls in CLASSES} == before  # SigLIP's too


def test_a_missing_class_is_refused_and_an_absent_optional_one_is_reported(monkeypatch):
    monkeypatch.delattr(modeling_siglip, "SiglipModel")
    with pytest.raises(RuntimeError, match="modeling_siglip.SiglipModel is missing"):
        integration.apply()
    monkeypatch.undo()
    if siglip2 is not None:
        monkeypatch.delattr(siglip2, "Siglip2Model")
        with integration.apply() as handle:  # where transformers has no Siglip2Model
            assert "Siglip2Model" in handle.absent and "Siglip2Model" not in handle.families
            assert "not patched: Siglip2Model" in handle.summary()
        with pytest.raises(RuntimeError, match="Siglip2Model is missing"):
            integration.apply(models=["Siglip2Model"])  # asked for by name: required


def test_without_transformers_apply_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(RuntimeError, match=r"needs transformers \(pip install "
                                           r"'calrft-kernels\[transformers\]'\)"):
        integration.apply()
    assert integration.active_patch() is None


def test_an_output_class_without_the_fields_is_refused(monkeypatch):
    monkeypatch.delattr(modeling_clip, "CLIPOutput")
    with pytest.raises(RuntimeError, match="modeling_clip.CLIPOutput is missing"):
        integration.apply()


def test_models_selects_what_is_patched():
    with integration.apply(models=["SiglipModel"]) as handle:
        assert list(handle.families) == ["SiglipModel"]
        assert "CLIPModel" not in "".join(handle.replaced)


@pytest.mark.parametrize("kw, error, match", [
    (dict(models="CLIPModel"), TypeError, "models must be a sequence"),
    (dict(models=["ClipModel"]), ValueError, "models must name some of"),
    (dict(models=[]), ValueError, "models must name some of"),
    (dict(skip_logits=1), TypeError, "skip_logits must be a bool"),
    (dict(gather_across_devices="yes"), TypeError, "gather_across_devices must be a bool"),
    (dict(backend=None), TypeError, "backend must be a str"),
    (dict(backend="fastest"), ValueError, "backend='fastest' is unavailable for CLIPModel"),
    (dict(backend="triton"), ValueError, "backend='triton' is unavailable for SiglipModel's "
                                         "sigmoid loss"),
])
def test_bad_arguments_are_refused_naming_them(kw, error, match):
    with pytest.raises(error, match=match):
        integration.apply(**kw)
    assert integration.active_patch() is None


def test_a_forward_changed_by_someone_else_is_restored_with_a_warning():
    original = vars(modeling_clip.CLIPModel)["forward"]
    handle = integration.apply()
    modeling_clip.CLIPModel.forward = lambda self, **kw: None
    with pytest.warns(RuntimeWarning, match="CLIPModel.forward was changed"):
        handle.unpatch()
    assert vars(modeling_clip.CLIPModel)["forward"] is original


def test_a_subclass_inherits_the_patch_and_keeps_no_forward_of_its_own():
    class MyClip(modeling_clip.CLIPModel):
        pass

    with integration.apply():
        assert MyClip.forward is modeling_clip.CLIPModel.forward
    assert "forward" not in vars(MyClip)


def test_summary_names_the_models_and_their_families():
    with integration.apply() as handle:
        line = handle.summary()
    assert line.startswith("calrft_kernels: transformers CLIPModel (softmax), SiglipModel "
                           "(sigmoid)")
    assert "logits in training forwards: skipped" in line
    assert "TransformersPatch(undone" in repr(handle)


def test_tested_version_is_the_extra_and_the_installed_one():
    """setup.py's [transformers] extra and requirements.txt pin the version these tests ran on."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    pin = f"transformers=={integration.TESTED_VERSION}"
    assert pin in (root / "setup.py").read_text()
    assert pin in (root / "requirements.txt").read_text().split()
    assert transformers.__version__ == integration.TESTED_VERSION
