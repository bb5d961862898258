"""Ahead-of-time compile of every shipped Triton contrastive kernel configuration for sm_90 (H100 /
H200), on a machine without a GPU.

triton.compile needs the kernels decorated WITHOUT the interpreter (an InterpretedFunction has no
cache_key), while conftest.py turns the interpreter on for this process: the compile runs in a
subprocess whose environment lacks TRITON_INTERPRET. This file is also that subprocess's script:

    python tests/test_triton_aot.py            # JSON, one record per compiled variant
    python tests/test_triton_aot.py --table    # the same as a markdown table
    python tests/test_triton_aot.py --full --table   # every (teacher, with_cols) variant
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SM90_MAX_DYNAMIC_SHARED = 232448  # bytes per block (227 KB opt-in) on sm_90

# Operand dtypes and the dot precision a launch would use for them (fp32: tf32 by default, ieee
# when torch.backends.cuda.matmul.allow_tf32 is off).
DTYPES = [("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")]
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]  # (teacher, with_cols)


def _signature(kernel_name, op):
    """Argument types in the kernels' order; pointers and sizes as a launch with 16-aligned
    tensors and sizes (B = 4096..65536, d = 512/768) specialises them."""
    operands = {"q_ptr": op, "k_ptr": op, "tq_ptr": op, "tk_ptr": op}
    scalars = {"scale_ptr": "*fp32", "bias_ptr": "*fp32", "tscale_ptr": "*fp32"}
    if kernel_name == "forward":
        outputs = {"row_ptr": "*fp32", "col_packed_ptr": "*i64", "col_stats_ptr": "*fp32",
                   "col_lock_ptr": "*i32"}
    else:
        outputs = {"grad_row_ptr": "*fp32", "grad_col_ptr": "*fp32", "row_ptr": "*fp32",
                   "col_ptr": "*fp32", "dq_ptr": "*fp32", "dk_ptr": "*fp32"}
    sizes = {"M": "i32", "N": "i32", "D": "i32", "DT": "i32", "M_BUCKET": "i32",
             "N_BUCKET": "i32"}
    return {**operands, **scalars, **outputs, **sizes}


# The chunked kernel's fused passes (calrft_kernels/triton/contrastive_chunked.py): one shipped
# configuration each, fp32 buffers; dS is written in every operand dtype.
CHUNK_DS_DTYPES = ("fp32", "bf16", "fp16")


def _chunk_signature(kernel_name, ds_dtype="fp32"):
    common = {"x_ptr": "*fp32", "t_ptr": "*fp32"}
    scalars = {"scale_ptr": "*fp32", "bias_ptr": "*fp32", "tscale_ptr": "*fp32"}
    if kernel_name == "stats":
        return {**common, **scalars, "row_part_ptr": "*fp32", "col_part_ptr": "*fp32",
                "C": "i32", "N": "i32"}
    vectors = {name: "*fp32" for name in ("g0_ptr", "r0_ptr", "g2_ptr", "r1_ptr", "h0_ptr",
                                          "c0_ptr", "h2_ptr", "c1_ptr")}
    return {**common, "ds_ptr": "*" + ds_dtype, **scalars, **vectors, "factor": "fp32",
            "C": "i32", "N": "i32"}


def _chunk_jobs():
    jobs = []
    for teacher, with_cols in VARIANTS:
        jobs.append(("chunk:stats", 0, "fp32", "ieee", teacher, with_cols))
        for ds_dtype in CHUNK_DS_DTYPES:
            jobs.append(("chunk:ds", 0, ds_dtype, "ieee", teacher, with_cols))
    return jobs


def _pointers_and_sizes(sig):
    """The arguments a chunk pass's launch has 16-aligned: its pointers and C, N."""
    return [a for a in sig if sig[a].startswith("*") or a in ("C", "N")]


def _compile_sm90(fn, sig, constexprs, cfg, divisible):
    """Compile one variant of `fn` for sm_90: (its PTX, the record fields every table shares).
    sig: the non-constexpr argument types; divisible: the arguments specialised as multiples of
    16 (pointers and sizes, as a launch with aligned tensors and sizes is)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**sig, **{c: "constexpr" for c in constexprs}}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    regs, static_smem, local, stack = _resource_usage(compiled.asm["cubin"],
                                                      compiled.metadata.name)
    ptx = compiled.asm["ptx"]
    return ptx, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, ptx_bytes=len(ptx),
                     cubin_bytes=len(compiled.asm["cubin"]), regs=regs,
                     shared=compiled.metadata.shared + static_smem, spill_local=local,
                     stack=stack)


def compile_chunk(job):
    from calrft_kernels.triton import contrastive_chunked as mod

    kernel_name, ci, op, precision, teacher, with_cols = job
    name = kernel_name.split(":")[1]
    fn = mod.KERNELS[name]
    cfg = mod.CONFIGS[name]
    sig = _chunk_signature(name, op)
    _, fields = _compile_sm90(fn, sig, {"HAS_TEACHER": teacher, "WITH_COLS": with_cols,
                                        **cfg.kwargs}, cfg,
                              _pointers_and_sizes(sig))
    return dict(kernel=kernel_name, config=ci, **cfg.kwargs, BLOCK_D="-", dtype=op,
                precision=precision, teacher=teacher, with_cols=with_cols, **fields,
                wgmma=False, mma=False)


# The sigmoid family's chunked pass (calrft_kernels/triton/sigmoid_chunked.py): one shipped
# configuration, fp32 buffers; G is written in every operand dtype.
SIGMOID_VARIANTS = [(teacher, labels) for teacher in (False, True) for labels in (False, True)]


def _sigmoid_jobs():
    jobs = []
    for teacher, labels in SIGMOID_VARIANTS:
        for g_dtype in CHUNK_DS_DTYPES:
            jobs.append(("sigmoid:pairs", g_dtype, teacher, labels, True))
        jobs.append(("sigmoid:pairs", "fp32", teacher, labels, False))  # no_grad: no G written
    return jobs


def compile_sigmoid(job):
    from calrft_kernels.triton import sigmoid_chunked as mod

    kernel_name, g_dtype, teacher, labels, with_grads = job
    cfg = mod.CONFIG
    sig = {"x_ptr": "*fp32", "t_ptr": "*fp32", "g_ptr": "*" + g_dtype, "part_ptr": "*fp32",
           "scale_ptr": "*fp32", "bias_ptr": "*fp32", "tscale_ptr": "*fp32",
           "tbias_ptr": "*fp32", "qlabels_ptr": "*i64", "klabels_ptr": "*i64", "row0": "i32",
           "C": "i32", "N": "i32", "weight": "fp32", "factor": "fp32"}
    constexprs = {"HAS_TEACHER": teacher, "HAS_LABELS": labels, "WITH_GRADS": with_grads,
                  **cfg.kwargs}
    _, fields = _compile_sm90(mod.KERNELS["pairs"], sig, constexprs, cfg,
                              _pointers_and_sizes(sig))
    return dict(kernel=kernel_name, config=0, **cfg.kwargs, BLOCK_D="-", dtype=g_dtype,
                precision="-", teacher=teacher, with_cols="-", labels=labels,
                with_grads=with_grads, **fields, wgmma=False, mma=False)


def _resource_usage(cubin: bytes, name: str):
    """REG / SHARED (static) / LOCAL (spill) bytes from cuobjdump (bundled with triton)."""
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(item.split(":") for item in line.split())
    return int(fields["REG"]), int(fields["SHARED"]), int(fields["LOCAL"]), int(fields["STACK"])


def _jobs(full):
    """(kernel, config index, dtype, precision, teacher, with_cols) to compile. The test compiles
    every config x dtype in the heaviest variant (teacher and column statistics: the lock merge,
    most registers) and, in bf16, the no-teacher variant with column statistics (the CAS merge;
    CLIP training's path); `full` adds every other variant (~2 s of CPU per compile)."""
    from calrft_kernels.triton import contrastive as mod
    jobs = []
    for kernel_name, configs in (("forward", mod.FORWARD_CONFIGS),
                                 ("backward", mod.BACKWARD_CONFIGS)):
        for ci in range(len(configs)):
            for op, precision in DTYPES:
                for teacher, with_cols in VARIANTS:
                    wanted = (teacher and with_cols) or (op == "bf16" and with_cols) or (
                        full and precision == "tf32")
                    if wanted:
                        jobs.append((kernel_name, ci, op, precision, teacher, with_cols))
    return jobs


def compile_one(job):
    if job[0].startswith("chunk:"):
        return compile_chunk(job)
    if job[0].startswith("sigmoid:"):
        return compile_sigmoid(job)
    from calrft_kernels.triton import contrastive as mod

    kernel_name, ci, op, precision, teacher, with_cols = job
    fn = mod.KERNELS[kernel_name]
    cfg = (mod.FORWARD_CONFIGS if kernel_name == "forward" else mod.BACKWARD_CONFIGS)[ci]
    sig = _signature(kernel_name, "*" + op)
    constexprs = {"HAS_TEACHER": teacher, "WITH_COLS": with_cols, "INPUT_PRECISION": precision,
                  **cfg.kwargs}
    ptx, fields = _compile_sm90(fn, sig, constexprs, cfg, list(sig))
    return dict(kernel=kernel_name, config=ci, **cfg.kwargs, dtype=op, precision=precision,
                teacher=teacher, with_cols=with_cols, **fields,
                wgmma="wgmma.mma_async" in ptx,
                mma="mma.sync" in ptx or "wgmma.mma_async" in ptx)


def compile_all(full=False, workers=2):
    from concurrent.futures import ProcessPoolExecutor
    jobs = _jobs(full) + _chunk_jobs() + _sigmoid_jobs()
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, jobs))


def _table(records):
    head = ("kernel", "BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages", "dtype",
            "precision", "teacher", "with_cols", "regs", "shared", "spill_local", "stack",
            "wgmma")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in records]
    return "\n".join(lines)


def _run_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_shipped_config_compiles_for_sm90():
    from calrft_kernels.triton import contrastive as mod
    all_records = _run_subprocess()
    chunk_records = [r for r in all_records if r["kernel"].startswith("chunk:")]
    sigmoid_records = [r for r in all_records if r["kernel"].startswith("sigmoid:")]
    records = [r for r in all_records if r["kernel"] not in ("chunk:stats", "chunk:ds")
               and not r["kernel"].startswith("sigmoid:")]
    _check_chunk_records(chunk_records)
    _check_sigmoid_records(sigmoid_records)
    n_configs = len(mod.FORWARD_CONFIGS) + len(mod.BACKWARD_CONFIGS)
    assert len(records) == n_configs * (len(DTYPES) + 1)
    for kernel_name, configs in (("forward", mod.FORWARD_CONFIGS),
                                 ("backward", mod.BACKWARD_CONFIGS)):
        for ci in range(len(configs)):
            got = {(r["dtype"], r["precision"]) for r in records
                   if r["kernel"] == kernel_name and r["config"] == ci}
            assert got == set(DTYPES), (kernel_name, ci, got)
    for r in records:
        what = f"{r['kernel']} config {r['config']} {r['dtype']}/{r['precision']}"
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, what
        assert 0 < r["regs"] <= 255, what
        assert r["shared"] <= SM90_MAX_DYNAMIC_SHARED, f"{what}: {r['shared']} B shared"
        # 16-bit operands (and tf32) must reach the Hopper tensor cores.
        if r["dtype"] in ("bf16", "fp16") or r["precision"] == "tf32":
            assert r["wgmma"], f"{what}: no wgmma in the PTX"


def _check_chunk_records(records):
    """Every variant of the chunked kernel's two passes compiled for sm_90, without spills."""
    assert len(records) == len(VARIANTS) * (1 + len(CHUNK_DS_DTYPES)), records
    for r in records:
        what = f"{r['kernel']} {r['dtype']} teacher={r['teacher']} with_cols={r['with_cols']}"
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, what
        assert 0 < r["regs"] <= 255 and r["spill_local"] == 0, (what, r)
        assert r["shared"] <= SM90_MAX_DYNAMIC_SHARED, what


def _check_sigmoid_records(records):
    """Every variant of the sigmoid family's chunked pass compiled for sm_90, without spills."""
    assert len(records) == len(_sigmoid_jobs()), records
    assert {(r["dtype"], r["teacher"], r["labels"], r["with_grads"]) for r in records} == {
        job[1:] for job in _sigmoid_jobs()}
    for r in records:
        what = f"sigmoid pass {r['dtype']} teacher={r['teacher']} labels={r['labels']}"
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, what
        assert 0 < r["regs"] <= 255 and r["spill_local"] == 0, (what, r)
        assert r["shared"] <= SM90_MAX_DYNAMIC_SHARED, what


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET (kernels must be compiled, not interpreted)")
    recs = compile_all(full="--full" in sys.argv)
    print(_table(recs) if "--table" in sys.argv else json.dumps(recs))
