"""Config files and settings (issue 15): every way a config can be wrong gives one `error:` line
naming the file and the key; YAML's string-typed numbers and single-string lists are accepted;
--help is complete."""
import argparse
import dataclasses

import pytest

from calrft import cli, config
from calrft.config import TrainConfig


def _cfg(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_numeric_strings_and_single_string_lists(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"
    path = _cfg(tmp_path, "c.yaml", "lr: 1e-4\nwarmup: '5'\nsteps: 1e2\nood_eval: sketch/\nprogress: 'false'\n")
    values = config.read_file(path)
    assert values["lr"] == "1e-4"
    cfg = config.merge(TrainConfig, values, {}, source=path).validate()
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.warmup == 5 and cfg.steps == 100 and isinstance(cfg.steps, int)
    assert cfg.ood_eval == ["sketch/"]  # not ['s', 'k', 'e', ...]
    assert cfg.progress is False


@pytest.mark.parametrize("text,message", [
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("steps: 2.5\n", "steps: expected an integer, got 2.5"),
    ("progress: maybe\n", "progress: expected bool"),
    ("ood_eval: {a: 1}\n", "ood_eval: expected a list of strings"),
    ("batch_size: true\n", "batch_size: expected int"),
    ("nope: 1\n", "unknown keys ['nope']"),
])
def test_wrong_types_name_the_file_and_key(tmp_path, text, message):
    path = _cfg(tmp_path, "c.yaml", text)
    with pytest.raises(ValueError) as exc:
        config.merge(TrainConfig, config.read_file(path), {}, source=path)
    assert str(exc.value).startswith(f"config {path!r}: ") and message in str(exc.value)


@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "lr: [1,\nsteps: 3\n", "is not valid YAML (line 3 column 1: expected ',' or ']'"),
    ("c.json", '{"lr": 1e-4,}', "is not valid JSON (line 1 column 13"),
    ("c.toml", "lr = \n", "is not valid TOML"),
    ("c.cfg", "lr=1", "unknown format '.cfg'; use .yaml, .yml, .json or .toml"),
    ("c.yaml", "- 1\n- 2\n", "must hold a mapping of settings, got list"),
])
def test_unreadable_config_files(tmp_path, name, text, message):
    path = _cfg(tmp_path, name, text)
    with pytest.raises(ValueError) as exc:
        config.read_file(path)
    assert path in str(exc.value) and message in str(exc.value)


def test_toml_config_is_read_as_toml(tmp_path):
    path = _cfg(tmp_path, "c.toml", 'lr = 1e-4\nood_eval = ["a", "b=c"]\nmethod = "flyp"\n')
    cfg = config.merge(TrainConfig, config.read_file(path), {}, source=path).validate()
    assert (cfg.lr, cfg.ood_eval, cfg.method) == (1e-4, ["a", "b=c"], "flyp")


def test_flags_override_the_file(tmp_path):
    path = _cfg(tmp_path, "c.json", '{"lr": "2e-4", "steps": 3}')
    cfg = config.merge(TrainConfig, config.read_file(path), {"lr": 5e-4, "steps": None}, source=path)
    assert cfg.lr == 5e-4 and cfg.steps == 3


def test_config_errors_through_the_cli(tmp_path, capsys):
    bad = _cfg(tmp_path, "c.yaml", "lr: [1,\n")
    assert cli.main(["train", "--config", bad, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"calrft train: error: config: {bad!r} is not valid YAML")
    bad = _cfg(tmp_path, "c.json", "{\n  \"lr\": oops\n}")
    assert cli.main(["eval", "--config", bad, "--id-eval", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad!r} is not valid JSON (line 2 column 9" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value,message", [
    ("log_every", 0, "log_every: must be >= 1"),
    ("warmup", -5, "warmup: must be >= 0"),
    ("eval_every", -1, "eval_every: must be >= 0"),
    ("epochs", 0, "epochs: must be >= 1"),
    ("stop_after", 0, "stop_after: must be >= 1"),
    ("lr", float("nan"), "lr: must be a finite number > 0"),
    ("grad_clip", 0.0, "grad_clip: must be > 0"),
    ("ema_warmup", -0.1, "ema_warmup: must lie in [0, 1]"),
    ("seed", -1, "seed: must be >= 0"),
    ("device", "cuda:x", "device: expected cpu, cuda or cuda:N"),
    ("ood_eval", ["name="], "ood_eval: 'name=' names no folder"),
    ("out", "", "out: must name a folder"),
    ("method", "nope", "method: expected carot, flyp or ft"),
])
def test_validate_names_the_setting(field, value, message):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError) as exc:
        cfg.validate()
    assert message in str(exc.value)


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ValueError, match="overwrite: --overwrite and --resume exclude each other"):
        TrainConfig(device="cpu", resume="c.pt", overwrite=True).validate()


def test_top_level_help_is_whole(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    first, second = (" ".join(p.split()) for p in cli.__doc__.split("\n\n")[:2])
    assert first in out and second in out  # not cut mid-sentence
    for command in ("train", "eval", "wise-ft", "demo"):
        assert command in out


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_a_one_line_description():
    for command, sub in _subparsers().items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").strip()
            assert text and not text.startswith("(default"), (command, action.dest, text)
            assert "\n" not in text and len(text.split("(default")[0].split()) >= 3, (command, action.dest)
    train_flags = {a.dest for a in _subparsers()["train"]._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= train_flags
    assert fields <= set(cli.TRAIN_HELP), sorted(fields - set(cli.TRAIN_HELP))  # a written description each
