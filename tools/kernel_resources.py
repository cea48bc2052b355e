#!/usr/bin/env python
"""Compile the attention and RMSNorm kernels for a GPU target without a GPU; report resource use.

    python tools/kernel_resources.py                      # every attention tile candidate, sm_90, bf16
    python tools/kernel_resources.py --defaults --head-dim 128 --sm 80
    python tools/kernel_resources.py --rmsnorm 8192x4096 8192x1024   # RMSNorm launches, no attention

For each kernel and tile configuration it prints registers per thread, stack bytes (non-zero means
register spills to local memory), shared memory per program, and how many wgmma (Hopper tensor-core)
and TMA (bulk tensor copy) instructions the PTX holds. Triton compiles with its bundled ptxas, so the
numbers are the ones a GPU with this Triton would run; no CUDA device or driver is needed.

The builds model a launch with 16-byte-aligned tensors and a sequence length that is a multiple of
16: pointer arguments, strides and seq_len / n_cols get Triton's divisibility-16 attribute, and
descriptors the tile shapes of the configuration (as the launch pre-hook sets them). What differs
from some real launches: an odd sequence length drops seq_len's attribute (the head_dim-128 pointer
forward then takes 211 registers instead of 202, still without a stack); integer arguments equal to
1 (num_kv_heads=1, seq_len=1), which Triton turns into constants, are not modelled; the forward is
built with STORE_LSE=True (training), not the inference variant.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; the interpreter never compiles

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.cli import HelpFormatter  # noqa: E402
import kernels.attention as A  # noqa: E402
import kernels.attention_tiles as T  # noqa: E402
import kernels.rmsnorm as R  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
KERNELS = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}
CANDIDATES = {"fwd": T.FWD_CANDIDATES, "dkdv": T.DKDV_CANDIDATES, "dq": T.DQ_CANDIDATES}
FP32_POINTERS = ("LSE", "DELTA", "RSTD", "DW_PARTIAL", "PARTIAL")
FP32_SCALARS = ("qk_scale", "softmax_scale", "eps")


@dataclass
class Resources:
    registers: int
    stack: int
    shared: int
    wgmma: int
    tma_copies: int


def _signature(fn, dtype: str, constexprs: dict, tiles: tuple[int, int], head_dim: int, use_tma: bool):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_desc"):
            if use_tma:
                rows = tiles[0] if name in T.QUERY_SIDE_DESCS else tiles[1]
                signature[name] = f"tensordesc<{dtype}[1,{rows},1,{head_dim}]>"
            else:
                signature[name] = "constexpr"
                constexprs[name] = None
        elif name.isupper():
            signature[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FP32_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("seq_len", "n_cols"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_attention(kernel: str, dtype: str, head_dim: int, causal: bool, group: int,
                      config: tuple[int, int, int, int], use_tma: bool, sm: int = 90):
    """Compile one attention kernel for compute capability `sm` (x 10) with TMA descriptor loads or
    pointer loads; returns Triton's compiled kernel."""
    fn = KERNELS[kernel]
    block_m, block_n, warps, stages = config
    constexprs = dict(GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, USE_TMA=use_tma,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=block_m,
                      BLOCK_N=block_n)
    if kernel == "fwd":
        constexprs["STORE_LSE"] = True
    signature, attrs = _signature(fn, dtype, constexprs, (block_m, block_n), head_dim, use_tma)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", sm, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_rmsnorm(kernel: str, dtype: str, rows: int, hidden: int, sm: int = 90):
    """Compile an RMSNorm kernel ("fwd", "bwd" or "sum") with the launch settings rms_norm picks for
    [rows, hidden] (the dweight sum as for an H100-sized backward grid); returns (compiled, settings)."""
    cfg = R.launch_config(rows, hidden)
    if kernel == "fwd":
        fn, warps = R._rms_norm_fwd_kernel, cfg.fwd_warps
        constexprs = dict(BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n, BF16_BY_HAND=False)
    elif kernel == "bwd":
        fn, warps = R._rms_norm_bwd_kernel, cfg.bwd_warps
        constexprs = dict(BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.block_n, COMPUTE_DW=True,
                          BF16_BY_HAND=False)
    else:
        grid = 132 * cfg.bwd_programs_per_sm
        block_p, block_c = min(R._SUM_TILE_ROWS, R.next_power_of_2(grid)), min(32, cfg.block_n)
        fn, warps = R._sum_partials_kernel, R.num_warps_for(block_p * block_c, 16)
        constexprs = dict(BLOCK_P=block_p, BLOCK_C=block_c, BF16_BY_HAND=False)
    signature, attrs = _signature(fn, dtype, constexprs, (0, 0), 0, False)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", sm, 32), options=dict(num_warps=warps))
    tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
    return compiled, dict(warps=warps, **tiles)


def resources(compiled) -> Resources:
    """Registers and stack from cuobjdump's resource report; instruction counts from the PTX."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                                text=True, check=True).stdout
    fields = {}
    for line in report.splitlines():
        if "REG:" in line:
            for item in line.split():
                if ":" in item:
                    key, _, value = item.partition(":")
                    fields[key] = value
    ptx = compiled.asm["ptx"]
    return Resources(registers=int(fields["REG"]), stack=int(fields["STACK"]),
                     shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                     tma_copies=ptx.count("cp.async.bulk.tensor"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--sm", type=int, default=90,
                        help="target compute capability x 10: 90 for H100/H200 (Hopper tiles), 80 for A100; "
                        "any other value compiles the Ampere tiles for that target")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="element type of the tensors the kernels are built for")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="attention head sizes to build")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                        help="which attention kernels to build")
    parser.add_argument("--group", type=int, default=4, help="query heads per kv head")
    parser.add_argument("--defaults", action="store_true", help="only the untuned default tiles")
    parser.add_argument("--rmsnorm", nargs="+", metavar="ROWSxHIDDEN", type=_shape,
                        help="report the RMSNorm kernels at these shapes instead of attention")
    parser.add_argument("--path", choices=("tma", "pointer", "both"), default="both",
                        help="on sm_90: TMA descriptor or pointer loads (other targets: the ampere tiles)")
    args = parser.parse_args(argv)
    if not os.path.exists(CUOBJDUMP):
        sys.exit(f"kernel_resources: Triton's cuobjdump is missing ({CUOBJDUMP})")

    if args.rmsnorm:
        return _report_rmsnorm(args.rmsnorm, args.dtype, args.sm)
    kinds = {"tma": ["tma"], "pointer": ["pointer"], "both": ["tma", "pointer"]}[args.path]
    if args.sm != 90:  # the Hopper lists serve compute capability 9.x only
        kinds = ["ampere"]
    print(f"triton {triton.__version__}, target sm_{args.sm}, {args.dtype}, GQA group {args.group}")
    print(f"{'kernel':6} {'path':7} {'d':>3} {'causal':6} {'tiles':9} {'warps':>5} {'stages':>6} "
          f"{'regs':>4} {'stack':>5} {'smem':>6} {'wgmma':>5} {'tma':>3}")
    for kernel in args.kernels:
        for head_dim in args.head_dim:
            for kind in kinds:
                use_tma = kind == "tma"
                configs = CANDIDATES[kernel][(T.head_dim_class(head_dim), kind)]
                for config in configs[:1] if args.defaults else configs:
                    for causal in (True, False):
                        try:
                            r = resources(compile_attention(kernel, args.dtype, head_dim, causal,
                                                            args.group, config, use_tma, args.sm))
                            cells = (f"{r.registers:4d} {r.stack:5d} {r.shared:6d} {r.wgmma:5d} "
                                     f"{r.tma_copies:3d}")
                        except Exception as e:  # report and go on: one bad tile must not hide the rest
                            cells = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                        m, n, w, s = config
                        print(f"{kernel:6} {kind:7} {head_dim:3d} "
                              f"{str(causal):6} {f'{m}x{n}':9} {w:5d} {s:6d} {cells}", flush=True)
    return 0


def _shape(text: str) -> str:
    """argparse type of --rmsnorm: ROWSxHIDDEN with positive integers (a usage error otherwise)."""
    try:
        rows, hidden = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not ROWSxHIDDEN") from None
    if rows < 1 or hidden < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs positive ROWS and HIDDEN")
    return text


def _report_rmsnorm(shapes: list[str], dtype: str, sm: int) -> int:
    print(f"triton {triton.__version__}, target sm_{sm}, {dtype}, RMSNorm")
    print(f"{'kernel':6} {'shape':12} {'launch':38} {'regs':>4} {'stack':>5} {'smem':>6}")
    for shape in shapes:
        rows, hidden = (int(s) for s in shape.lower().split("x"))
        for kernel in ("fwd", "bwd", "sum"):
            compiled, settings = compile_rmsnorm(kernel, dtype, rows, hidden, sm)
            r = resources(compiled)
            launch = " ".join(f"{k}={v}" for k, v in settings.items())
            print(f"{kernel:6} {shape:12} {launch:38} {r.registers:4d} {r.stack:5d} {r.shared:6d}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
