"""The trainer on the sigmoid family: --loss auto|softmax|sigmoid, the model's and the EMA
teacher's logit bias in the loss, checkpoints and open_clip loading with the bias, the CLI and
results.json naming the family. (The cached step against the full-batch step and exact resume on
calrft-tiny-sigmoid are in test_trainer_step.py; 2 and 3 ranks in test_sigmoid_distributed.py
and test_trainer_distributed.py.)"""
import json

import open_clip
import pytest
import torch

from calrft import checkpoint, cli, data, models, step as steps
from calrft.train import Trainer
from calrft_kernels.reference import sigmoid_loss_reference

from _trainer_util import CLASSES, tiny_config, tiny_data, tiny_model
from test_trainer_data import make_tree

pytestmark = pytest.mark.usefixtures("one_thread")


def make(tmp_path, name=models.TINY_SIGMOID, dtype=torch.float64, **kw):
    model, tok = tiny_model(name=name)
    model.to(dtype)
    train, eval_sets = tiny_data(dtype=dtype)
    cfg = tiny_config(tmp_path, model=name, ema_every=1, **kw)
    return Trainer(cfg, model=model, tokenizer=tok, train_set=train, eval_sets=eval_sets,
                   classnames=CLASSES)


def first_batch(t):
    sampler = data.GlobalBatchSampler(**t.sampler_args)
    return next(iter(data.train_loader(t.train_set, t.tokenizer, sampler, 0)))


@pytest.mark.parametrize("name,setting,family", [
    (models.TINY_SIGMOID, "auto", "sigmoid"), (models.TINY, "auto", "softmax"),
    (models.TINY_SIGMOID, "softmax", "softmax"), (models.TINY, "sigmoid", "sigmoid"),
])
def test_loss_auto_picks_sigmoid_for_a_model_with_a_logit_bias(tmp_path, name, setting, family):
    t = make(tmp_path, name, loss=setting, steps=1)
    assert t.family == family
    assert t.loss_fn.family == family and t.stepper.objective.family == family
    assert t.report_config()["loss_family"] == family
    assert (models.logit_bias(t.clip) is not None) == (name == models.TINY_SIGMOID)
    if name == models.TINY_SIGMOID:  # the softmax family ignores the bias: frozen (DDP, AdamW)
        assert t.clip.logit_bias.requires_grad == (family == "sigmoid")
        before = t.clip.logit_bias.item()
        t.fit()
        assert (t.clip.logit_bias.item() != before) == (family == "sigmoid")


def test_bad_loss_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss: expected one of auto, softmax, sigmoid"):
        tiny_config(tmp_path, loss="siglip").validate()
    with pytest.raises(ValueError, match="family: expected softmax or sigmoid"):
        steps.Objective("flyp", family="auto")


def test_flyp_step_is_the_sigmoid_loss_with_the_models_bias(tmp_path):
    t = make(tmp_path, method="flyp", steps=1)
    batch = first_batch(t)
    with torch.no_grad():
        img, txt, scale, bias = t.clip(batch["images"], batch["texts"])
    want = sigmoid_loss_reference(img, txt, scale, bias)
    bias_before = t.clip.logit_bias.detach().clone()
    terms = steps.materialise(t.train_step(batch))
    # materialise reports float32 values
    assert terms["contrastive"] == pytest.approx(want.item(), rel=1e-6)
    assert t.clip.logit_bias.grad is not None and t.clip.logit_bias != bias_before


def test_carot_distils_from_the_teachers_own_bias(tmp_path):
    """After one step the EMA teacher's bias has moved (it carries the bias); the second step's
    terms are CaRotLoss(family="sigmoid") with the teacher's bias in the soft targets, and equal
    a plain float64 formula of them."""
    t = make(tmp_path, steps=2)
    batch = first_batch(t)
    t.train_step(batch)
    m = t.ema_schedule.momentum(1)
    student_bias, teacher_bias = t.clip.logit_bias.item(), t.teacher.logit_bias.item()
    assert teacher_bias == pytest.approx(m * -10.0 + (1 - m) * student_bias, rel=1e-12)
    assert teacher_bias != student_bias
    with torch.no_grad():
        t.teacher.logit_bias.fill_(-4.0)  # a teacher bias far from the student's -10
        img, txt, scale, bias = t.clip(batch["images"], batch["texts"])
        ti, tt, ts, tb = t.teacher(batch["images"], batch["texts"])
        w_v, w_t = t.clip.visual.proj, t.clip.text_projection
        eye = torch.eye(w_v.shape[1], dtype=w_v.dtype)
        params = (0.2 * torch.linalg.matrix_norm(w_v.T @ w_v - eye)
                  + 0.05 * torch.linalg.matrix_norm(w_v @ w_t.T))

        def formula(teacher_bias):
            return params + sigmoid_loss_reference(
                img, txt, scale, bias, teacher_image_features=ti, teacher_text_features=tt,
                teacher_logit_scale=ts, teacher_logit_bias=teacher_bias, distill_weight=1.5)

        want, with_student_bias = formula(tb), formula(bias)
    terms = steps.materialise(t.train_step(batch))
    assert terms["total"] == pytest.approx(want.item(), rel=1e-6)  # reported in float32
    assert terms["total"] != pytest.approx(with_student_bias.item(), rel=1e-3)
    assert terms["distillation"] > 0


def test_checkpoint_carries_the_bias_of_student_and_teacher(tmp_path):
    t = make(tmp_path, steps=2, dtype=torch.float32)
    t.fit()
    path = tmp_path / "checkpoint.pt"
    state = checkpoint.load(path)
    assert torch.equal(state["state_dict"]["logit_bias"], t.clip.logit_bias.detach())
    assert torch.equal(state["teacher"]["logit_bias"], t.teacher.logit_bias)
    assert state["config"]["loss"] == "auto"
    loaded = open_clip.create_model(models.TINY_SIGMOID, pretrained=str(path))
    assert torch.equal(loaded.logit_bias, t.clip.logit_bias.detach())
    assert t.clip.logit_bias.item() != -10.0  # it trained


def test_resume_refuses_another_loss_family(tmp_path):
    t = make(tmp_path / "a", steps=3, stop_after=1, dtype=torch.float32)
    t.fit()
    with pytest.raises(ValueError, match="loss 'auto' -> 'softmax'"):
        make(tmp_path / "a", steps=3, dtype=torch.float32, loss="softmax",
             resume=str(tmp_path / "a" / "checkpoint.pt"))


def test_cli_train_with_the_sigmoid_family_names_it_in_the_report(tmp_path):
    classes = CLASSES[:3]
    make_tree(str(tmp_path / "train"), classes, per_class=3)
    make_tree(str(tmp_path / "val"), classes, per_class=2)
    out = tmp_path / "run"
    argv = ["train", "--model", models.TINY_SIGMOID, "--pretrained", "", "--method", "flyp",
            "--train-folder", str(tmp_path / "train"), "--id-eval", str(tmp_path / "val"),
            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--templates", "short",
            "--workers", "0", "--log-every", "1", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["loss"] == "auto" and doc["config"]["loss_family"] == "sigmoid"
    assert "Contrastive loss family: **sigmoid**" in (out / "report.md").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


def test_siglip_weights_load_into_the_architecture_with_a_bias(tmp_path):
    """Weights of a SigLIP-style run of a plain architecture (open_clip_train --siglip builds
    ViT-B-16 with init_logit_bias) load with --model <that architecture>: the model is built
    with a bias, so --loss auto picks the sigmoid family; torch and .safetensors files alike."""
    from safetensors.torch import save_file
    trained = open_clip.create_model(models.TINY, init_logit_bias=-7.5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "siglip.pt")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "siglip.safetensors"))
    for path in (tmp_path / "siglip.pt", tmp_path / "siglip.safetensors"):
        model, *_ = models.create(models.TINY, str(path))
        assert model.logit_bias.item() == -7.5
        assert torch.equal(model.visual.proj, trained.visual.proj)
        assert steps.loss_family("auto", model) == "sigmoid"
    plain, *_ = models.create(models.TINY, None)
    assert models.logit_bias(plain) is None and steps.loss_family("auto", plain) == "softmax"


def test_carot_refuses_a_model_without_projections_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "visual_projection", lambda model: None)
    with pytest.raises(ValueError, match="method: carot's orthogonality .* image tower has none"):
        make(tmp_path / "carot", steps=1)
    make(tmp_path / "flyp", method="flyp", steps=1)  # flyp has no parameter terms


def test_visual_projection_of_a_timm_style_linear_head():
    """open_clip's TimmModel keeps its projection as visual.head.proj (an nn.Linear) when
    timm_proj is "linear"; W_v is its weight transposed, [width, embed] like visual.proj."""
    from collections import OrderedDict
    clip = torch.nn.Module()
    clip.visual = torch.nn.Module()
    clip.visual.head = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(12, 5, bias=False)))
    w = models.visual_projection(clip)
    assert w.shape == (12, 5) and torch.equal(w, clip.visual.head.proj.weight.T)
    clip.visual.head = torch.nn.Sequential(OrderedDict(drop=torch.nn.Dropout()))
    assert models.visual_projection(clip) is None
