"""Everything worth measuring on a lent GPU, in one short run (see DEVELOPERS.md: ~15 minutes of
device time per task, so this script must spend it measuring, not debugging).

    python benchmarks/gpu_suite.py [--skip-build] [--sections loss,sigmoid,covariance,spectral,trainer] [--out FILE]

1. builds the extension in place with CUDA for the local GPU's architecture (unless --skip-build),
2. runs each section module benchmarks/gpu/<name>.py (`run() -> list[dict]`): each checks every
   kernel configuration against a float64 reference, then times it with CUDA events,
3. prints one table (op, config, check, ms, TFLOP/s, note) and writes it as Markdown.
A section that fails is reported in the table and the others still run. The two loss sections
(softmax "loss", sigmoid "sigmoid") need no native code, so (unless --no-parallel-loss) they run
in a child process, one after the other, during the build.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("loss", "sigmoid", "covariance", "spectral", "trainer")
# Sections that need no native code: run in a child process while the extension builds.
BUILD_FREE = ("loss", "sigmoid")


def build_extension(jobs: int | None = None) -> str:
    import torch
    major, minor = torch.cuda.get_device_capability()
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}",
               MAX_JOBS=str(jobs or os.cpu_count()))
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


def start_section_child(names):
    """Run sections (a name or a list of names, one after the other) in a child process (they
    must not need the native extension: the loss sections run torch.mm and Triton only) while
    this process builds the extension."""
    names = [names] if isinstance(names, str) else list(names)
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); "
            f"from benchmarks.gpu_suite import run_section; "
            f"print('@@ROWS@@' + json.dumps([row for name in {names!r} "
            f"for row in run_section(name)]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return ",".join(names), proc


def finish_section_child(child) -> list[dict]:
    name, proc = child
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("@@ROWS@@"):
            return json.loads(line[len("@@ROWS@@"):])
    tail = (err.strip().splitlines() or ["no output"])[-1]
    return [{"op": name, "config": "-", "check": "SECTION FAILED", "ms": None, "tflops": None,
             "note": f"child exited {proc.returncode}: {tail}"}]


def format_table(rows: list[dict]) -> str:
    cols = ("op", "config", "check", "ms", "tflops", "note")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--no-parallel-loss", dest="parallel_loss", action="store_false",
                        help="run the loss sections after the build instead of during it")
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
    names = [name.strip() for name in args.sections.split(",")]
    rows = []
    if not args.skip_build:
        # The loss sections need no native code: they run in a child process while the
        # extension builds (two cores left to it), which keeps the suite short.
        early = [n for n in names if n in BUILD_FREE] if args.parallel_loss else []
        child = start_section_child(early) if early else None
        start = time.time()
        print(build_extension(jobs=max(1, (os.cpu_count() or 4) - 2) if child else None),
              flush=True)
        if child is not None:
            names = [n for n in names if n not in early]
            section = finish_section_child(child)
            rows += section
            print(f"[{','.join(early)}] {len(section)} rows in {time.time() - start:.0f}s "
                  f"(during the build)", flush=True)
    for name in names:
        start = time.time()
        section = run_section(name)
        rows += section
        print(f"[{name}] {len(section)} rows in {time.time() - start:.0f}s", flush=True)
    table = format_table(rows)
    print(table)
    with open(args.out, "w") as fh:
        fh.write(f"# GPU suite\n\n{header}\n\n`python benchmarks/gpu_suite.py`\n\n{table}\n")
    return 0 if all("FAILED" not in str(r.get("check")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
