"""CPU benchmark of the spectral ops against the goals of the spectral issue.

    PYTHONPATH=. python benchmarks/bench_spectral.py [--repeats 9] [--quick] [--threads N] [--plot PATH]

Timings are medians of interleaved repeats (every contender runs once per round, so machine
load hits all of them alike); every figure is reported as a ratio within this one run."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import interleaved, log_spectrum_features, spectrum_matrix  # noqa: E402
from calrft_kernels import batch_covariance, covariance_sigma_min, smallest_eigenvalue  # noqa: E402


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def bench_eigen(d, kappa, repeats):
    a = spectrum_matrix(d, kappa)
    a32 = a.float()
    ref = float(torch.linalg.eigvalsh(a)[0])
    _, v_prev, info_prev = smallest_eigenvalue(a, return_info=True)
    # the next step's matrix: a symmetric drift of spectral norm 1e-3 lambda_min ("slow"), one of
    # 0.5 lambda_min (the bottom eigenvectors mix: ~40 eigenvalues lie within 2x of lambda_min on
    # these spectra), and a PSD drift of norm 50 lambda_min (the bottom changes completely)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(d, d, dtype=torch.float64, generator=g)
    p_psd = e @ e.T
    e = (e + e.T) / 2
    e = e / torch.linalg.matrix_norm(e, 2)
    drifted = {"warm, drift 1e-3 lambda_min": a + 1e-3 * ref * e,
               "warm, drift 0.5 lambda_min": a + 0.5 * ref * e,
               "warm, PSD drift 50 lambda_min": a + 50 * ref * p_psd / torch.linalg.matrix_norm(p_psd, 2)}
    refs = {k: float(torch.linalg.eigvalsh(m)[0]) for k, m in drifted.items()}
    import scipy.sparse.linalg as sla
    a_np = a.numpy()
    x0 = torch.randn(d, 1, dtype=torch.float64)
    out = {}

    def cold():
        out["cold"] = smallest_eigenvalue(a, return_info=True)

    def warm(name):
        def run():
            out[name] = smallest_eigenvalue(drifted[name], v0=v_prev, factor=info_prev,
                                            return_info=True)
        return run

    def lanczos_cold():
        out["lanczos"] = smallest_eigenvalue(a, method="lanczos", return_info=True)

    def lanczos_warm():
        out["lanczos warm"] = smallest_eigenvalue(drifted["warm, drift 1e-3 lambda_min"],
                                                  method="lanczos", v0=v_prev, return_info=True)

    def lobpcg():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["lobpcg"] = torch.lobpcg(a, k=1, X=x0, largest=False, tol=1e-6, niter=200)[0][0]

    def eigsh():
        out["eigsh"] = sla.eigsh(a_np, k=1, sigma=0.0, which="LM", tol=1e-6)[0][0]

    fns = {
        "eigvalsh fp64": lambda: torch.linalg.eigvalsh(a),
        "eigvalsh fp32": lambda: torch.linalg.eigvalsh(a32),
        "cholesky fp64": lambda: torch.linalg.cholesky(a),
        "cholesky fp32": lambda: torch.linalg.cholesky(a32),
        "smallest_eigenvalue cold": cold,
        **{f"smallest_eigenvalue {k}": warm(k) for k in drifted},
        "smallest_eigenvalue lanczos cold": lanczos_cold,
        "smallest_eigenvalue lanczos warm, drift 1e-3 lambda_min": lanczos_warm,
        "torch.lobpcg": lobpcg,
        "scipy eigsh shift-invert": eigsh,
    }
    ms = interleaved(fns, repeats)
    errs = {"smallest_eigenvalue cold": rel(out["cold"][0], ref),
            "torch.lobpcg": rel(out["lobpcg"], ref), "scipy eigsh shift-invert": rel(out["eigsh"], ref)}
    iters = {"smallest_eigenvalue cold": out["cold"][2].iterations}
    for name, key, r in (("smallest_eigenvalue lanczos cold", "lanczos", ref),
                         ("smallest_eigenvalue lanczos warm, drift 1e-3 lambda_min",
                          "lanczos warm", refs["warm, drift 1e-3 lambda_min"])):
        errs[name] = rel(out[key][0], r)
        iters[name] = out[key][2].iterations
    for k in drifted:
        errs[f"smallest_eigenvalue {k}"] = rel(out[k][0], refs[k])
        iters[f"smallest_eigenvalue {k}"] = out[k][2].iterations
    return ms, errs, iters


def bench_sigma(d, kappa, repeats):
    z = log_spectrum_features(4 * d, d, kappa)
    ref = float(torch.linalg.eigvalsh(torch.cov(z.double().T))[0])
    out = {}

    def fused(accumulate):
        def run():
            out[accumulate] = covariance_sigma_min(z, accumulate=accumulate)
        return run

    fns = {"torch.cov + eigvalsh fp32": lambda: torch.linalg.eigvalsh(torch.cov(z.T)),
           "covariance_sigma_min (fp64 accumulate, default)": fused("fp64"),
           "covariance_sigma_min (fp32 accumulate)": fused("fp32")}
    ms = interleaved(fns, repeats)
    baseline_err = rel(torch.linalg.eigvalsh(torch.cov(z.T))[0], ref)
    return ms, {"covariance_sigma_min (fp64 accumulate, default)": rel(out["fp64"], ref),
                "covariance_sigma_min (fp32 accumulate)": rel(out["fp32"], ref),
                "torch.cov + eigvalsh fp32": baseline_err}


def bench_covariance(b, d, repeats):
    z = torch.randn(b, d) + 50.0
    fns = {"torch.mm(z.T, z)": lambda: torch.mm(z.T, z),
           "batch_covariance": lambda: batch_covariance(z),
           "torch.cov": lambda: torch.cov(z.T)}
    return interleaved(fns, repeats)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="d=512 only, small covariance")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--eigen-only", action="store_true",
                   help="only the smallest_eigenvalue cases (Davidson vs Lanczos vs eigvalsh)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every contender (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, record = [], {"threads": torch.get_num_threads(), "torch": torch.__version__}
    dims = (512,) if args.quick else (512, 1024)
    for d in dims:
        for kappa in (1e4, 1e6):
            ms, errs, iters = bench_eigen(d, kappa, args.repeats)
            record[f"eigen d={d} kappa={kappa:g}"] = {"ms": ms, "min_ms": interleaved.minimum,
                                                     "rel_err": errs, "iterations": iters}
            f64, f32 = ms["eigvalsh fp64"], ms["eigvalsh fp32"]
            mins = interleaved.minimum
            for k, t in ms.items():
                rows.append((f"eigen d={d} kappa={kappa:.0e}", k, t, t / f64, t / f32,
                             errs.get(k), iters.get(k), mins[k] / mins["eigvalsh fp64"]))
        for kappa in (() if args.eigen_only else (1e4, 1e6)):
            ms, errs = bench_sigma(d, kappa, args.repeats)
            base = ms["torch.cov + eigvalsh fp32"]
            mins = interleaved.minimum
            record[f"sigma d={d} kappa={kappa:g}"] = {"ms": ms, "min_ms": mins, "rel_err": errs}
            for k, t in ms.items():
                rows.append((f"sigma_min B={4 * d} d={d} kappa={kappa:.0e}", k, t, t / base, None,
                             errs.get(k), None, mins[k] / mins["torch.cov + eigvalsh fp32"]))
    b = 16384 if args.quick else 65536
    ms = {} if args.eigen_only else bench_covariance(b, 512, max(3, args.repeats // 3))
    mins = interleaved.minimum
    if ms:
        record[f"covariance B={b} d=512"] = {"ms": ms, "min_ms": mins}
    for k, t in ms.items():
        rows.append((f"covariance B={b} d=512", k, t, t / ms["torch.mm(z.T, z)"], None, None, None,
                     mins[k] / mins["torch.mm(z.T, z)"]))
    print("| case | contender | median ms | median / ref | median / fp32 eigvalsh | "
          "min / ref | rel err | iters |")
    print("|---|---|---|---|---|---|---|---|")
    for case, k, t, r1, r2, e, it, rmin in rows:
        print(f"| {case} | {k} | {t:.3f} | {r1:.3f} | {'' if r2 is None else f'{r2:.3f}'} | "
              f"{rmin:.3f} | {'' if e is None else f'{e:.1e}'} | {'' if it is None else it} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
    if args.plot:
        plot(record, args.plot)


def plot(record, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    eig = [k for k in record if k.startswith("eigen")]
    contenders = ["eigvalsh fp32", "cholesky fp32", "smallest_eigenvalue cold",
                  "smallest_eigenvalue warm, drift 1e-3 lambda_min",
                  "smallest_eigenvalue warm, drift 0.5 lambda_min",
                  "smallest_eigenvalue warm, PSD drift 50 lambda_min",
                  "torch.lobpcg", "scipy eigsh shift-invert"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(contenders)
    for i, c in enumerate(contenders):
        vals = [record[k]["ms"][c] / record[k]["ms"]["eigvalsh fp64"] for k in eig]
        ax.bar([j + i * width for j in range(len(eig))], vals, width, label=c)
    ax.axhline(0.2, color="k", ls="--", lw=0.8, label="cold goal 0.2x")
    ax.axhline(0.05, color="r", ls=":", lw=0.8, label="warm goal 0.05x")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(eig))])
    ax.set_xticklabels([k.replace("eigen ", "") for k in eig])
    ax.set_ylabel("time / torch.linalg.eigvalsh fp64 (median)")
    ax.set_title(f"smallest eigenvalue on CPU ({record['threads']} threads), lower is better")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
