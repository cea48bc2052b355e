"""RMSNorm: Triton forward and backward and its autograd.Function.

Casting order is Hugging Face Llama's: the statistics and the normalisation run in fp32, the
normalised x is cast back to the input dtype, and only then multiplied by the weight:

    y = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)

Forward: one pass over rows; each program normalises a tile of rows and keeps the per-row reciprocal
RMS (fp32) for the backward. Backward: one pass over rows computing dx and the weight gradient; each
program owns a contiguous run of rows, accumulates its partial weight gradient in fp32 registers and
writes it to a [programs, hidden] buffer that a second small kernel sums in a fixed order, so the
result is deterministic (no atomics, no locks). The weight gradient follows the casting order:
dweight = sum over rows of dy * normalised_x_in_input_dtype, accumulated in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels._utils import (
    FLOAT_DTYPES,
    cast_rtne,
    cdiv,
    check_float_tensor,
    interpreting,
    multiprocessor_count,
    next_power_of_2,
    num_warps_for,
)

# A row is held whole in registers; beyond this the kernel would spill, so larger rows are refused.
MAX_HIDDEN = 65536
# Values per tensor a program holds at once: small rows are batched into [rows, hidden] tiles.
_TILE_ELEMENTS = 4096
# Partial weight-gradient rows summed per step by the final reduction.
_SUM_TILE_ROWS = 128


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    # Round the normalised x to the input dtype before the weight multiplies it (HF order).
    x_hat = cast_rtne(x * rstd[:, None], X.dtype.element_ty, BF16_BY_HAND).to(tl.float32)
    y = cast_rtne(x_hat * w[None, :], Y.dtype.element_ty, BF16_BY_HAND)
    tl.store(Y + rows64 * stride_y + cols[None, :], y, mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program, stride_dy, stride_x, stride_dx,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE_DW: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        if COMPUTE_DW:
            x_hat_cast = cast_rtne(x_hat, X.dtype.element_ty, BF16_BY_HAND).to(tl.float32)
            dw_acc += tl.sum(dy * x_hat_cast, axis=0)
        # The cast of x_hat is the identity for gradients, so dL/dx_hat = dy * w.
        g = dy * w[None, :]
        mean_g_xhat = tl.sum(g * x_hat, axis=1) / n_cols
        dx = (g - x_hat * mean_g_xhat[:, None]) * rstd[:, None]
        dx = cast_rtne(dx, DX.dtype.element_ty, BF16_BY_HAND)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx, mask=mask)

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    PARTIAL, OUT, n_partials, n_cols,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    """OUT[c] = sum_p PARTIAL[p, c] over [BLOCK_P, BLOCK_C] tiles: a fixed order, same bits every run."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p_start in range(0, n_partials, BLOCK_P):
        parts = p_start + tl.arange(0, BLOCK_P)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        tile = tl.load(PARTIAL + parts[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + cols, cast_rtne(acc, OUT.dtype.element_ty, BF16_BY_HAND), mask=col_mask)


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int  # hidden size rounded up to a power of two
    fwd_block_m: int  # rows per forward tile
    fwd_warps: int
    bwd_block_m: int  # rows per backward tile
    bwd_warps: int
    bwd_programs_per_sm: int


# Backward registers per thread in the sm_90 compile report (8 values per thread, bf16/fp16/fp32):
# 48-52 for one-row tiles, 64-79 for multi-row tiles. Used to size the grid to what fits at once.
_BWD_REGISTERS = {True: 52, False: 80}
_REGISTERS_PER_SM, _MAX_WARPS_PER_SM = 65536, 64


def launch_config(n_rows: int, hidden: int) -> LaunchConfig:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {hidden} exceeds the supported maximum {MAX_HIDDEN}")
    block_n = next_power_of_2(hidden)
    rows_pow2 = next_power_of_2(max(n_rows, 1))
    fwd_block_m = max(1, min(_TILE_ELEMENTS // block_n, rows_pow2))
    # The backward keeps w, its dweight partial, x and dy live: half the forward's values per thread.
    bwd_block_m = max(1, min(_TILE_ELEMENTS // 2 // block_n, rows_pow2))
    bwd_warps = num_warps_for(bwd_block_m * block_n, 8)
    registers = _BWD_REGISTERS[bwd_block_m == 1] * 32 * bwd_warps
    per_sm = max(1, min(_REGISTERS_PER_SM // registers, _MAX_WARPS_PER_SM // bwd_warps))
    return LaunchConfig(block_n, fwd_block_m, num_warps_for(fwd_block_m * block_n, 16),
                        bwd_block_m, bwd_warps, per_sm)


def default_backward_programs(device: torch.device, cfg: LaunchConfig) -> int:
    """Programs for the backward grid: as many as fit on the GPU at once (one wave)."""
    if interpreting() or device.type != "cuda":
        return multiprocessor_count(device)
    return multiprocessor_count(device) * cfg.bwd_programs_per_sm


def backward_partition(n_rows: int, block_m: int, target_programs: int) -> tuple[int, int]:
    """(rows per program, programs): contiguous runs of whole tiles; the last run may be shorter."""
    rows_per_program = cdiv(cdiv(n_rows, max(1, target_programs)), block_m) * block_m
    return rows_per_program, cdiv(n_rows, rows_per_program)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm takes these inputs: float dtypes, a hidden size 1..MAX_HIDDEN that the 1-D
    weight matches, one device."""
    return (x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES and x.dim() >= 1
            and 0 < x.shape[-1] <= MAX_HIDDEN and weight.dim() == 1 and weight.shape[0] == x.shape[-1]
            and weight.device == x.device)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check_float_tensor("rms_norm input x", x)
    check_float_tensor("rms_norm weight", weight)
    if x.dim() < 1:
        raise ValueError("rms_norm: input x must have at least one dimension (the hidden size)")
    if x.shape[-1] == 0:
        raise ValueError(f"rms_norm: the hidden size (last dimension of x, shape {tuple(x.shape)}) is 0")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight shape {tuple(weight.shape)} does not match the hidden size "
            f"{x.shape[-1]} of x (shape {tuple(x.shape)})"
        )
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be positive, got {eps}")


def _forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    n_rows, hidden = x2d.shape
    cfg = launch_config(n_rows, hidden)
    y = torch.empty((n_rows, hidden), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x2d.device)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(cdiv(n_rows, cfg.fwd_block_m),)](
            x2d, weight, y, rstd, n_rows, hidden, x2d.stride(0), y.stride(0), eps,
            BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.block_n, BF16_BY_HAND=interpreting(),
            num_warps=cfg.fwd_warps,
        )
    return y, rstd


def _backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    compute_dw: bool, programs: int | None = None,
):
    n_rows, hidden = x2d.shape
    cfg = launch_config(n_rows, hidden)
    dx = torch.empty((n_rows, hidden), dtype=x2d.dtype, device=x2d.device)
    dw = torch.empty_like(weight) if compute_dw else None
    if n_rows == 0:
        return dx, (dw.zero_() if compute_dw else None)
    target = programs if programs is not None else default_backward_programs(x2d.device, cfg)
    rows_per_program, grid = backward_partition(n_rows, cfg.bwd_block_m, target)
    partial = torch.empty((grid, hidden), dtype=torch.float32, device=x2d.device) if compute_dw else dx
    _rms_norm_bwd_kernel[(grid,)](
        dy2d, x2d, weight, rstd, dx, partial,
        n_rows, hidden, rows_per_program, dy2d.stride(0), x2d.stride(0), dx.stride(0),
        BLOCK_M=cfg.bwd_block_m, BLOCK_N=cfg.block_n, COMPUTE_DW=compute_dw,
        BF16_BY_HAND=interpreting(), num_warps=cfg.bwd_warps,
    )
    if compute_dw:
        # Narrow column blocks give many programs; all partial rows of a block are summed in one tile.
        block_p, block_c = min(_SUM_TILE_ROWS, next_power_of_2(grid)), min(32, cfg.block_n)
        _sum_partials_kernel[(cdiv(hidden, block_c),)](
            partial, dw, grid, hidden, BLOCK_P=block_p, BLOCK_C=block_c,
            BF16_BY_HAND=interpreting(), num_warps=num_warps_for(block_p * block_c, 16),
        )
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, backward_programs_override):
        hidden = x.shape[-1]
        x2d = x.reshape(-1, hidden)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        weight_c = weight.contiguous()
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y, rstd = _forward(x2d, weight_c, eps, out_dtype)
        ctx.save_for_backward(x2d, weight_c, rstd)
        ctx.x_shape = x.shape
        ctx.programs = backward_programs_override
        return y.view(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = _backward(dy2d, x2d, weight, rstd, ctx.needs_input_grad[1], ctx.programs)
        dx = dx.view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backward_programs: int | None = None) -> torch.Tensor:
    """Fused RMSNorm over the last dimension of `x` (any leading shape), HF Llama casting order.

    x: float16, bfloat16 or float32; weight: [hidden]. Output dtype is promote(x.dtype, weight.dtype),
    as in Llama's RMSNorm. Differentiable in x and weight. `backward_programs` overrides how many
    programs split the rows in the backward (default: a few per multiprocessor).
    """
    _check_inputs(x, weight, eps)
    if backward_programs is not None and backward_programs < 1:
        raise ValueError(f"rms_norm: backward_programs must be >= 1, got {backward_programs}")
    return RMSNormFunction.apply(x, weight, float(eps), backward_programs)
