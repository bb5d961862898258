"""The calrft command end to end on tiny data (in-process, the tiny architecture)."""
import json
import os

import pytest
import torch

from calrft import checkpoint, cli, demo, models

from test_trainer_data import make_tree


@pytest.mark.parametrize("command", ["train", "eval", "wise-ft", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    if command == "train":
        assert "--method" in out and "(default: 1e-05)" in out and "(default: 0.2)" in out


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    classes = ["ant", "bee", "cat"]
    make_tree(str(root / "train"), classes, per_class=4, corrupt=["bee/broken.png"])
    make_tree(str(root / "val"), classes, per_class=2)
    make_tree(str(root / "sketch"), ["cat", "bee"], per_class=2)
    return root


def test_train_eval_wiseft_end_to_end(trees, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"model: {models.TINY}\npretrained: null\nbatch_size: 4\nsteps: 5\nlr: 0.001\n"
                        "templates: short\nworkers: 0\nwarmup: 1\nema_every: 2\nprogress: false\n"
                        "method: flyp\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg_file), "--method", "carot", "--train-folder", str(trees / "train"),
            "--id-eval", str(trees / "val"), "--ood-eval", f"sketchy={trees / 'sketch'}",
            "--out", str(out), "--workers", "2"]
    assert cli.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["method"] == "carot"          # the flag overrides the file
    assert doc["config"]["steps"] == 5                 # the file overrides the default
    carot = doc["methods"]["carot"]
    assert set(carot["id"]) == {"acc", "ece", "nll", "brier"}
    assert set(carot["ood"]) == {"sketchy", "avg"} and isinstance(carot["sigma_min"], float)
    assert (out / "report.md").exists() and (out / "reliability_carot.png").stat().st_size > 1000
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 5
    assert any("eval" in r for r in log)

    ckpt = out / "checkpoint.pt"
    assert cli.main(["eval", "--model", models.TINY, "--pretrained", str(ckpt), "--train-folder",
                     str(trees / "train"), "--templates", "short", "--id-eval", str(trees / "val"),
                     "--ood-eval", str(trees / "sketch"), "--out", str(tmp_path / "ev"), "--workers", "0"]) == 0
    ev_doc = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev_doc["methods"]["model"]["id"] == pytest.approx(carot["id"])  # same weights, same numbers

    zs = tmp_path / "zs.pt"
    torch.manual_seed(0)
    checkpoint.atomic_save({"state_dict": models.create(models.TINY)[0].state_dict()}, zs)
    assert cli.main(["wise-ft", "--model", models.TINY, "--zeroshot", str(zs), "--finetuned", str(ckpt),
                     "--alphas", "0,0.5,1", "--train-folder", str(trees / "train"), "--templates", "short",
                     "--id-eval", str(trees / "val"), "--ood-eval", str(trees / "sketch"),
                     "--out", str(tmp_path / "wise"), "--workers", "0"]) == 0
    wise = json.loads((tmp_path / "wise" / "results.json").read_text())
    assert wise["methods"]["alpha=1.00"]["id"] == pytest.approx(carot["id"])
    assert (tmp_path / "wise" / "wiseft.png").exists()


def test_bad_flag_value_is_reported(capsys, tmp_path):
    assert cli.main(["train", "--method", "nope", "--model", models.TINY, "--pretrained", "",
                     "--out", str(tmp_path)]) == 2
    assert "method" in capsys.readouterr().err


def test_demo_pipeline_on_a_tiny_budget(tmp_path):
    profile = dict(steps=3, batch_size=32, lr=1e-4, pretrain_steps=3, alphas=(0.0, 1.0))
    run = demo.run(tmp_path / "demo", seeds=(3,), quick=True, cache=str(tmp_path / "cache"),
                   progress=False, profile=profile)["runs"][0]
    assert set(run["methods"]) == {"zeroshot", "flyp", "carot"}
    assert len(run["methods"]["carot"]["ood"]) == 6  # 5 shifts + avg
    assert [r["alpha"] for r in run["wiseft"]["carot"]] == [0.0, 1.0]
    # alpha = 0 is the zero-shot model, alpha = 1 the fine-tuned one
    assert run["wiseft"]["carot"][0]["id"] == pytest.approx(run["methods"]["zeroshot"]["id"])
    assert run["wiseft"]["carot"][1]["id"] == pytest.approx(run["methods"]["carot"]["id"])
    for name in ("results.json", "report.md", "wiseft.png", "comparison.png", "reliability_carot.png"):
        assert (tmp_path / "demo" / name).exists(), name
    assert len(list((tmp_path / "cache").glob("digits-pretrained-s3-*.pt"))) == 1


def test_demo_with_the_sigmoid_family_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """`calrft demo --loss sigmoid`: every stage on calrft-tiny-sigmoid with the sigmoid loss
    (pretraining included), and the report and results.json say which family ran."""
    from calrft import digits, step as steps
    profile = dict(steps=3, batch_size=32, lr=1e-4, pretrain_steps=3, alphas=(0.0, 1.0))
    monkeypatch.setitem(demo.PROFILES, "quick", profile)
    calls = []
    real = steps.sigmoid_loss
    monkeypatch.setattr(steps, "sigmoid_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--loss", "sigmoid", "--seeds", "3", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert "seed 3 (sigmoid loss family)" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["loss_family"] == "sigmoid"
    assert doc["config"]["finetune"]["model"] == models.TINY_SIGMOID
    assert doc["config"]["finetune"]["loss"] == "sigmoid"
    assert set(doc["methods"]) == {"zeroshot", "flyp", "carot"}
    assert "Contrastive loss family: **sigmoid**" in (out / "report.md").read_text()
    assert len(calls) == 3  # FLYP's steps; CaRot's go through CaRotLoss(family="sigmoid")
    weights = checkpoint.load(doc["config"]["pretrained"])
    assert weights["config"]["loss"] == "sigmoid" and "logit_bias" in weights["state_dict"]
    assert digits.pretrained_path(3, tmp_path / "cache", "sigmoid", steps=3) != \
        digits.pretrained_path(3, tmp_path / "cache", "softmax", steps=3)
    carot = checkpoint.load(out / "carot" / "checkpoint.pt")
    assert "logit_bias" in carot["teacher"]


def test_seed_aggregate_mean_and_spread():
    def doc(acc):
        m = {"acc": acc, "ece": 0.1, "nll": 1.0, "brier": 0.5}
        return {"methods": {"carot": {"id": m, "ood": {"avg": m}, "sigma_min": acc}}}
    agg = demo.aggregate([doc(0.5), doc(0.7), doc(0.9)])["carot"]
    assert agg["id_acc"] == pytest.approx((0.7, 0.2))
    assert agg["ood_avg_ece"] == pytest.approx((0.1, 0.0))
    assert "0.7000 ± 0.2000" in demo.aggregate_table({"carot": agg})
