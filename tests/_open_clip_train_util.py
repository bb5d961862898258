"""Generated open_clip_train inputs (no download) and runs of open_clip_train on them.

`make_data(root)`: a CSV of small PNGs with captions (coloured squares on noise), the calrft-tiny
architecture as an open_clip `local-dir:` model and a teacher checkpoint of it for --distill.
`run(...)`: one open_clip_train run in a child process with a timeout, returning its recorded
loss calls (tests/_open_clip_train_runner.py), final weights and log."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("_open_clip_train_runner.py")
TINY = ROOT / "python" / "calrft" / "model_configs" / "calrft-tiny.json"
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220),
           "yellow": (230, 220, 40), "white": (240, 240, 240), "purple": (150, 40, 190)}
TIMEOUT_S = 300


def make_data(root: Path, n: int = 64) -> dict:
    from PIL import Image
    import open_clip
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = ["filepath\ttitle"]
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        x, y = rng.integers(0, 16, 2)
        pixels[y:y + 16, x:x + 16] = COLOURS[colour]
        path = root / "img" / f"{i:04d}.png"
        Image.fromarray(pixels).save(path)
        rows.append(f"{path}\ta photo of a {colour} square")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": json.loads(TINY.read_text()), "preprocess_cfg": {}}))
    torch.manual_seed(1)  # the teacher: another initialisation of the same architecture
    teacher = open_clip.create_model(f"local-dir:{model_dir}")
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return {"csv": root / "train.csv", "model": f"local-dir:{model_dir}",
            "teacher": root / "teacher.pt"}


# The weight comparisons train with SGD (momentum 0.9): each weight's difference is then the
# accumulated difference of its gradients. Under AdamW a parameter whose exact gradient is zero
# (an attention key bias: softmax ignores it) is moved by up to lr per step on rounding noise,
# whichever loss computed it; ADAMW runs compare every other weight.
SGD = ["--opt", "timm/sgd", "--momentum", "0.9", "--lr", "0.01", "--wd", "0.1"]
ADAMW = ["--opt", "adamw", "--lr", "5e-4", "--beta2", "0.98", "--eps", "1e-6"]


def base_flags(data: dict, name: str, optimizer: list = SGD) -> list:
    """The run writes to ./logs/<name> (open_clip_train's default --logs: torchrun's own parser
    refuses `--logs` as an ambiguous abbreviation of its --logs-specs)."""
    return optimizer + ["--train-data", str(data["csv"]), "--dataset-type", "csv",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--model", data["model"], "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--warmup", "2", "--precision", "fp32", "--seed", "0",
            "--device", "cpu", "--name", name, "--save-frequency", "1",
            "--log-every-n-steps", "1", "--report-to", ""]


@dataclass
class Run:
    calls: list      # rank 0's loss calls: {"class": ..., "terms": {name: value}}
    weights: dict    # the final checkpoint's state_dict ("module." of DDP removed)
    log: str         # open_clip_train's out.log
    stderr: str


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))


def torchrun(nproc: int) -> list:
    """The command head that starts what follows on `nproc` local processes (torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc)]


def command(mode: str, record: Path, flags: list, nproc: int = 1) -> list:
    head = torchrun(nproc) if nproc > 1 else [sys.executable]
    return head + [str(RUNNER), mode, str(record)] + flags


def execute(cmd: list, cwd: Path, name: str) -> Run:
    """Run `cmd` in `cwd` (its logs in cwd/logs/<name>) and read what it left."""
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    out = cwd / "logs" / name
    ckpt = torch.load(out / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    weights = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    record = out.parent / f"{name}.record-rank0.jsonl"
    calls = ([json.loads(line) for line in record.read_text().splitlines()]
             if record.exists() else [])
    return Run(calls, weights, (out / "out.log").read_text(), proc.stderr)


def run(data: dict, cwd: Path, name: str, extra: list, mode: str, nproc: int = 1,
        optimizer: list = SGD) -> Run:
    """open_clip_train through the recording runner, `mode` "plain" or "patched"."""
    record = cwd / "logs" / f"{name}.record"
    cmd = command(mode, record, base_flags(data, name, optimizer) + extra, nproc)
    return execute(cmd, cwd, name)
