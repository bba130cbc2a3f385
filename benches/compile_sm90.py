"""Registers, spills and shared memory of the W8A8 kernels compiled for sm_90, on a machine without a GPU.

    python benches/compile_sm90.py        # run without TRITON_INTERPRET; needs Triton's bundled ptxas

Triton compiles for GPUTarget("cuda", 90, 32) and the bundled ptxas -v reports each kernel's use: the
figures benches/NOTES.md (INT8, W8A8 v5) quotes for the preparation kernels' configs and the TMA GEMM.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> dict:
    """{"regs", "spill_bytes", "smem"} of fn compiled for sm_90."""
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(kernel.asm["ptx"])
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(regs=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else 0,
                smem=kernel.metadata.shared)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    import tune_w8a8

    from decoding.kernels import w8a8, w8a8_prep

    absmax = {"x_ptr": "*bf16", "stride_xm": "i32", "ws_ptr": "*i32", "rmax_ptr": "*fp32", "idx_ptr": "*i64",
              "cnt_ptr": "*i32", "keep_ptr": "*i8", "M": "i32", "K": "i32", "KO": "i32", "threshold_bits": "i32",
              "rows_per": "i32"}
    for cfg in tune_w8a8.ABSMAX_CONFIGS:
        r = compile_sm90(w8a8_prep._absmax_plan_kernel, absmax,
                         dict(PLAN=True, CLEAN=True, ROW_MAX=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=128,
                              PLAN_BLOCK=w8a8_prep.PLAN_BLOCK, KO_PAD=64), cfg["num_warps"])
        print(f"abs-max + plan {cfg}: {r}")
    quant = {"x_ptr": "*bf16", "stride_xm": "i32", "keep_ptr": "*i8", "rmax_ptr": "*fp32", "cnt_ptr": "*i32",
             "idx_ptr": "*i64", "w_ptr": "*i8", "q_ptr": "*i8", "s_ptr": "*fp32", "xo_ptr": "*bf16", "wo_ptr": "*i8",
             "M": "i32", "N": "i32", "K": "i32", "KO": "i32", "NB": "i32"}
    for k, cfgs in tune_w8a8.QUANT_CONFIGS.items():
        for cfg in cfgs:
            for row_max in (True, False):
                r = compile_sm90(w8a8_prep._quantize_kernel, quant,
                                 dict(APPLY_KEEP=row_max, ROW_MAX=row_max, HAS_CNT=row_max, GATHER=row_max,
                                      ROWS=cfg["ROWS"], BLOCK=cfg["BLOCK"], SINGLE=cfg["BLOCK"] >= k, KO_PAD=64,
                                      W_ROWS=16, RM_BLOCK=128, NB_PAD=triton.next_power_of_2(triton.cdiv(k, 128))),
                                 cfg["num_warps"])
                print(f"quantize K={k} {'row maxima + gathers' if row_max else 'plain'} {cfg}: {r}")
    for (n, k), cfg in w8a8.TMA_CONFIGS.items():
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        for outliers, split, stages in ((False, 2, cfg["num_stages"]), (True, 2, cfg["num_stages"] - 1),
                                        (True, 4, cfg["num_stages"])):
            sig = {"a_desc": f"tensordesc<i8[{bm}, {bk}]>", "b_desc": f"tensordesc<i8[{bn}, {bk}]>",
                   "c_desc": f"tensordesc<bf16[{bm}, {bn // split}]>", "sa_ptr": "*fp32", "sb_ptr": "*fp32",
                   "bias_ptr": "*fp32", "xo_ptr": "*bf16", "wo_ptr": "*i8", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
                   "K": "i32", "KO": "i32", "stride_xo": "i32", "stride_wo": "i32"}
            r = compile_sm90(w8a8._int8_gemm_tma_kernel, sig,
                             dict(HAS_BIAS=False, HAS_OUTLIERS=outliers, HAS_CNT=outliers, KO_PAD=64, OUT_INT32=False,
                                  FP32_DOT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_SMS=132,
                                  SUBTILE=split, FLATTEN=True, WARP_SPECIALIZE=False, BLOCK_O=16, PREFETCH=False),
                             cfg["num_warps"], stages)
            print(f"TMA GEMM {n}x{k} outliers={outliers} stores={split} stages={stages}: {r}")


if __name__ == "__main__":
    main()
