"""The CPU loss-benchmark harness shared by bench_contrastive.py and bench_sigmoid.py (one copy).

A benchmark script supplies `make_step(method, B, d) -> (step, clear)` (one forward+backward and
the clearing of its gradients) and a `table(results, sizes)`; `LossBench.main` is then its whole
command line (the options of `add_arguments`), and the same script serves as the child process
(`LossBench.main_child`, which a script with its own main calls first):

- Memory: every (method, B) runs once in a fresh subprocess, so its peak is its own: the child
  builds the inputs, warms up at a small batch, resets the peak-RSS counter (/proc/self/clear_refs)
  and reports VmHWM - VmRSS around one forward+backward (gradients and every temporary count as
  extra; the inputs do not).
- Time: one more subprocess per B runs all methods round-robin (reps rounds, the order rotating
  each round) and reports each method's median, so that every ratio compares runs made under the
  same machine load (this machine is shared: load varies by 2x within minutes).
- Safety: a method that materialises B x B buffers (it has an entry in bytes_per_b2) never runs
  above MAX_MATERIALISED_B (this machine has 24 GiB and no swap), nor where its estimated peak
  exceeds the memory limit. Run the scripts under an address-space cap (prlimit --as=...): the
  children inherit it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks._common import mem_available_bytes, proc_status_kib, reset_peak_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MATERIALISED_B = 16384  # at 65536 one fp32 B x B buffer is 16 GiB


class LossBench:
    def __init__(self, script: str, make_step, bytes_per_b2: dict):
        self.script = os.path.abspath(script)
        self.make_step = make_step
        self.bytes_per_b2 = bytes_per_b2

    # ---- child side: one method at one size, or all methods of one size round-robin ---------
    def child(self, method, B, d, reps):
        import torch
        warm, warm_clear = self.make_step(method, 256, d)
        warm()
        warm_clear()
        step, clear = self.make_step(method, B, d)
        reset_peak_rss()  # VmHWM := current RSS
        base = proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        step()
        times = [time.perf_counter() - t0]
        peak = proc_status_kib("VmHWM")
        clear()
        for _ in range(reps - 1):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            clear()
        timed = sorted(times[1:] if len(times) > 1 else times)
        return dict(method=method, B=B, d=d, threads=torch.get_num_threads(), runs=len(timed),
                    seconds=timed[len(timed) // 2], extra_mib=(peak - base) / 1024)

    def child_times(self, methods, B, d, reps):
        """Median forward+backward seconds of each method, run round-robin in this process."""
        steps = {}
        for method in methods:
            warm, warm_clear = self.make_step(method, 256, d)
            warm()
            warm_clear()
            step, clear = self.make_step(method, B, d)
            step()  # first run: page faults, allocator growth
            clear()
            steps[method] = (step, clear)
        times = {m: [] for m in methods}
        for r in range(reps):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                step, clear = steps[m]
                t0 = time.perf_counter()
                step()
                times[m].append(time.perf_counter() - t0)
                clear()
        return {m: sorted(t)[len(t) // 2] for m, t in times.items()}

    def main_child(self, args) -> bool:
        """Run the child side when the script was started as a child (--child / --child-times);
        True when it did (the script then returns)."""
        if getattr(args, "child_times", None):
            B, d, reps, *methods = args.child_times
            print(json.dumps(self.child_times(methods, int(B), int(d), int(reps))))
            return True
        if getattr(args, "child", None):
            method, B, d, reps = args.child
            print(json.dumps(self.child(method, int(B), int(d), int(reps))))
            return True
        return False

    @staticmethod
    def add_child_arguments(ap) -> None:
        ap.add_argument("--child", nargs=4, metavar=("METHOD", "B", "D", "REPS"),
                        help=argparse.SUPPRESS)
        ap.add_argument("--child-times", nargs="+", help=argparse.SUPPRESS)

    # ---- the command line of a loss benchmark script ----------------------------------------
    def main(self, argv, doc: str, table, sizes, methods, *, reps: int, big_reps: int) -> None:
        """Parse the standard options (add_arguments), run as the child when started as one, else
        measure, print the table and write it with --md."""
        ap = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawTextHelpFormatter)
        add_arguments(ap, sizes, methods, reps=reps, big_reps=big_reps)
        args = ap.parse_args(argv)
        if self.main_child(args):
            return
        results = self.measure_args(args, args.sizes, list(args.methods))
        text = table(results, args.sizes)
        print(text)
        if args.md:
            write_md(args.md, text, results)

    def measure_args(self, args, sizes, methods) -> list:
        """measure() with the options of add_arguments; the memory limit is --limit-gib or 80%
        of MemAvailable, whichever is lower."""
        limit = min(args.limit_gib * 2**30, 0.8 * mem_available_bytes())
        print(f"sizes {sizes}, d={args.d}, memory limit {limit / 2**30:.1f} GiB", flush=True)
        return self.measure(sizes, methods, args.d, args.reps, args.big_reps, limit,
                            args.timeout)

    # ---- parent side ------------------------------------------------------------------------
    def _run(self, args, timeout):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, self.script, *args], capture_output=True,
                              text=True, env=env, timeout=timeout)

    def run_child(self, method, B, d, reps, timeout):
        out = self._run(["--child", method, str(B), str(d), str(reps)], timeout)
        if out.returncode != 0:
            return dict(method=method, B=B, error=out.stderr.strip().splitlines()[-1:] or ["?"])
        return json.loads(out.stdout.strip().splitlines()[-1])

    def run_times(self, methods, B, d, reps, timeout):
        out = self._run(["--child-times", str(B), str(d), str(reps), *methods], timeout)
        if out.returncode != 0:
            print("   round-robin timing failed:", out.stderr.strip().splitlines()[-1:], flush=True)
            return {}
        return json.loads(out.stdout.strip().splitlines()[-1])

    def skip_reason(self, method, B, limit_bytes):
        """Why (method, B) must not run here, or None."""
        if method not in self.bytes_per_b2:
            return None
        if B > MAX_MATERIALISED_B:
            return f"materialises B x B: never above B = {MAX_MATERIALISED_B} here"
        need = self.bytes_per_b2[method] * B * B
        if need >= limit_bytes:
            return f"needs ~{need / 2**30:.0f} GiB"
        return None

    def measure(self, sizes, methods, d, reps, big_reps, limit_bytes, timeout, big_from=8192):
        results = []
        for B in sizes:
            runnable = []
            for method in methods:
                why = self.skip_reason(method, B, limit_bytes)
                if why:
                    results.append(dict(method=method, B=B, skipped=why))
                    print(f"  skip {method:14s} B={B}: {why}", flush=True)
                    continue
                r = self.run_child(method, B, d, 1, timeout)  # memory (and one time sample)
                results.append(r)
                print("  ", json.dumps(r), flush=True)
                if "seconds" in r:
                    runnable.append(method)
            # All methods of this B in one process, round-robin: the times that the ratios use.
            # Materialising methods run one at a time there, so the largest one must fit alone.
            n = reps if B <= big_from else big_reps
            if len(runnable) > 1 and n > 0:
                medians = self.run_times(runnable, B, d, n, timeout)
                for r in results:
                    if r["B"] == B and r["method"] in medians:
                        r.update(single_run_seconds=r["seconds"], seconds=medians[r["method"]],
                                 runs=n)
                print("   round-robin medians:", json.dumps(medians), flush=True)
        return results


def add_arguments(ap, sizes, methods, *, reps: int, big_reps: int, extra_methods=()) -> None:
    """The options every loss benchmark script takes (and the hidden ones of its child)."""
    ap.add_argument("--sizes", type=int, nargs="+", default=list(sizes))
    ap.add_argument("--methods", nargs="+", default=list(methods),
                    choices=tuple(methods) + tuple(extra_methods))
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--reps", type=int, default=reps, help="round-robin rounds for B <= 8192")
    ap.add_argument("--big-reps", type=int, default=big_reps,
                    help="round-robin rounds for B > 8192 (0: the single memory run only)")
    ap.add_argument("--limit-gib", type=float, default=12.0,
                    help="skip configs whose estimated memory exceeds this "
                         "(or 80%% of MemAvailable)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--md", default=None, help="also write the table (and raw JSON) here")
    LossBench.add_child_arguments(ap)


def write_md(path: str, text: str, results: list) -> None:
    """The table with the command that produced it and the raw results (JSON lines)."""
    with open(path, "w") as f:
        f.write(f"Command: `python {' '.join(sys.argv)}`\n\n{text}\n\n```json\n"
                + "\n".join(json.dumps(r) for r in results) + "\n```\n")


def skip_reason(result: dict) -> str:
    """Why a result has no time: the reason it was skipped, or its child's error line."""
    return result.get("skipped") or ("error: " + " ".join(result.get("error", [])))


def runs_note(result: dict) -> str:
    """How the time of a result was taken, as the tables write it after the seconds."""
    return f" (median of {result['runs']})" if result["runs"] > 1 else " (1 run)"


def at_size(results, B, methods):
    """(method, result) for each of `methods` that has a result at B, in the order given (a
    result without "seconds" was skipped or failed: skip_reason says why)."""
    for method in methods:
        r = next((x for x in results if x["method"] == method and x["B"] == B), None)
        if r is not None:
            yield method, r


def get(results, method, B):
    """The result of (method, B) that has a time, or None."""
    for r in results:
        if r["method"] == method and r["B"] == B and "seconds" in r:
            return r
    return None


def patch_table(results, sizes, names, suffix: str, kind: str, library: str, what: str) -> str:
    """The table of an integration's benchmark: for each B and name, the library's own `name`
    against `name + suffix` (the same under the patch): time, ratio and extra peak memory."""
    lines = [f"| B | d | {kind} | {library} {what} s | patched s | patched / {library} | "
             f"{library} extra peak MiB | patched extra peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for B in sizes:
        for name in names:
            theirs, ours = get(results, name, B), get(results, name + suffix, B)
            if ours is None:
                continue
            if theirs is None:
                why = next((skip_reason(r) for _, r in at_size(results, B, [name])), "not run")
                lines.append(f"| {B} | {ours['d']} | {name} | skipped ({why}) | "
                             f"{ours['seconds']:.3f} | | | {ours['extra_mib']:.0f} |")
                continue
            lines.append(f"| {B} | {ours['d']} | {name} | {theirs['seconds']:.3f} | "
                         f"{ours['seconds']:.3f}{runs_note(ours)} | "
                         f"{ours['seconds'] / theirs['seconds']:.2f}x | "
                         f"{theirs['extra_mib']:.0f} | {ours['extra_mib']:.0f} |")
    return "\n".join(lines)


def unit_features(B: int, d: int, seed: int = 0):
    """A make_step's inputs: (features, gen), where features() draws the next seeded [B, d]
    fp32 block of unit rows from gen (the student's, then the teacher's and any other draws of
    that step, in the order they are made)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)

    def features():
        return F.normalize(torch.randn(B, d, generator=gen), dim=1)
    return features, gen


def clearer(*leaves):
    """A make_step's `clear`: drop the gradients of its leaves."""
    def clear():
        for x in leaves:
            x.grad = None
    return clear
