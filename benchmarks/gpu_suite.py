"""Everything worth measuring on a lent GPU, in one short run (see DEVELOPERS.md: ~15 minutes of
device time per task, so this script must spend it measuring, not debugging).

    python benchmarks/gpu_suite.py [--skip-build] [--sections loss,covariance,spectral] [--out FILE]

1. builds the extension in place with CUDA for the local GPU's architecture (unless --skip-build),
2. runs each section module benchmarks/gpu/<name>.py (`run() -> list[dict]`): each checks every
   kernel configuration against a float64 reference, then times it with CUDA events,
3. prints one table (op, config, check, ms, TFLOP/s, note) and writes it as Markdown.
A section that fails is reported in the table and the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("loss", "covariance", "spectral")


def build_extension() -> str:
    import torch
    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count()))
    start = time.time()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    took = time.time() - start
    tail = "\n".join(proc.stdout.splitlines()[-5:] + proc.stderr.splitlines()[-20:])
    if proc.returncode != 0:
        return f"build FAILED in {took:.0f}s (CUDA C++ rows will fail; Triton rows still run):\n{tail}"
    return f"built in {took:.0f}s for sm_{major}{minor}"


def run_section(name: str) -> list[dict]:
    try:
        module = importlib.import_module(f"benchmarks.gpu.{name}")
        return module.run()
    except Exception:
        return [{"op": name, "config": "-", "check": "SECTION FAILED", "ms": None,
                 "tflops": None, "note": traceback.format_exc(limit=3).strip().splitlines()[-1]}]


def format_table(rows: list[dict]) -> str:
    cols = ("op", "config", "check", "ms", "tflops", "note")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "gpu_suite_results.md"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; nothing to measure")
        return 2
    header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"cuda {torch.version.cuda}")
    print(header, flush=True)
    if not args.skip_build:
        print(build_extension(), flush=True)
    rows = []
    for name in args.sections.split(","):
        start = time.time()
        section = run_section(name.strip())
        rows += section
        print(f"[{name}] {len(section)} rows in {time.time() - start:.0f}s", flush=True)
    table = format_table(rows)
    print(table)
    with open(args.out, "w") as fh:
        fh.write(f"# GPU suite\n\n{header}\n\n`python benchmarks/gpu_suite.py`\n\n{table}\n")
    return 0 if all("FAILED" not in str(r.get("check")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
