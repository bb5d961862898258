"""Ahead-of-time compile of every Triton covariance kernel configuration for sm_90 (no GPU
needed): prints one JSON list of {kernel, dtype, config, precision, shared_meta, reg, stack, ...}.
Run WITHOUT TRITON_INTERPRET (an interpreted kernel cannot be compiled); used by
tests/test_covariance_gpu_kernels.py and for benchmarks/results/covariance_gpu.md.

    PYTHONPATH=. python tests/aot/covariance_triton_sm90.py
"""
import json, os, re, subprocess, sys, tempfile
assert os.environ.get("TRITON_INTERPRET", "0") != "1"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import calrft_kernels.triton.covariance as cov

TORCH_TO_SIG = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")

def resources(cubin):
    # REG / SHARED / STACK of the compiled kernel, read back from the cubin.
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin); f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}

def compile_one(fn, signature, constexprs, num_warps, num_stages):
    src = ASTSource(fn, signature, constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = k.asm["ptx"]
    row = {"shared_meta": k.metadata.shared, "wgmma": "wgmma" in ptx,
           "mma_sync": "mma.sync" in ptx}
    row.update(resources(k.asm["cubin"]))
    return row

rows = []
for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    z, acc = "*" + TORCH_TO_SIG[dtype], "*" + TORCH_TO_SIG[cov.accumulate_dtype(dtype)]
    operand, precision = cov.operand_and_precision(dtype, interpreted=False)
    for config in cov.GRAM_CONFIGS[cov.config_kind(dtype)]:
        sig = {"z_ptr": z, "mean_ptr": acc, "out_ptr": acc, "n_rows": "i32", "n_cols": "i32",
               "stride_row": "i32", "stride_col": "i32", "rows_per_chunk": "i32",
               "OPERAND": "constexpr", "PRECISION": "constexpr", "BLOCK_D": "constexpr",
               "BLOCK_K": "constexpr"}
        consts = {"OPERAND": operand, "PRECISION": precision, **config.kwargs}
        row = compile_one(cov._centred_gram_kernel, sig, consts, config.num_warps,
                          config.num_stages)
        row.update(kernel="centred_gram", dtype=str(dtype), precision=precision,
                   config=f"BLOCK_D={config.kwargs['BLOCK_D']} "
                          f"BLOCK_K={config.kwargs['BLOCK_K']} "
                          f"warps={config.num_warps} stages={config.num_stages}")
        rows.append(row)
    sig = {"z_ptr": z, "partial_ptr": acc, "n_rows": "i32", "n_cols": "i32",
           "stride_row": "i32", "stride_col": "i32", "rows_per_chunk": "i32",
           "BLOCK_ROWS": "constexpr", "BLOCK_COLS": "constexpr"}
    consts = {"BLOCK_ROWS": cov.SUM_BLOCK_ROWS, "BLOCK_COLS": cov.SUM_BLOCK_COLS}
    row = compile_one(cov._column_sum_kernel, sig, consts, cov.SUM_NUM_WARPS, 1)
    row.update(kernel="column_sum", dtype=str(dtype), precision="-",
               config=f"BLOCK_ROWS={cov.SUM_BLOCK_ROWS} BLOCK_COLS={cov.SUM_BLOCK_COLS}"
                      f" warps={cov.SUM_NUM_WARPS}")
    rows.append(row)
print(json.dumps(rows))
