"""Causal flash attention with grouped-query attention (GQA), forward and backward, in Triton.

    out = flash_attention(q, k, v, causal=True, softmax_scale=None)

q is [batch, seq, heads, head_dim]; k and v are [batch, seq, kv_heads, head_dim] with heads a multiple
of kv_heads: query head h reads kv head h // (heads // kv_heads), and K and V are never expanded.
Inputs may be strided views (for example slices of a fused QKV projection) as long as head_dim is the
contiguous dimension; the strides go to the kernels, nothing is copied. The output is contiguous and
in q's dtype. Supported: fp16 and bf16 (fp32 too, computed without TF32), head_dim 16, 32, 64 or 128,
any sequence length (tails masked on loads and stores).

Forward: one program per (query block, batch * head), online softmax in fp32 with exp2 and the scale
folded in (softmax_scale * log2(e)). Key blocks entirely above the diagonal are never visited; the
loop runs unmasked up to the diagonal and applies the causal / sequence-end mask only on the last
(diagonal or tail) blocks. The log-sum-exp is kept in fp32 as [batch, heads, seq], in base 2
(log2 of the sum of exp2 of the scaled scores), and only when a backward will need it.

Backward (no atomics, deterministic): a preprocess kernel computes delta = rowsum(dO * O) in fp32;
a dK/dV kernel runs one program per (key block, batch * kv head), loops over the query heads of its
group and over the query blocks that are not fully masked, and keeps dK and dV in fp32 registers; a
separate dQ kernel runs one program per (query block, batch * head) over the key blocks up to the
diagonal. Gradients are written in the input dtype.

Loads (USE_TMA): on Hopper (compute capability 9.x), q/k/v/dO tiles can arrive through TMA descriptors over
the [batch, seq, heads, head_dim] tensors (bulk copies into shared memory, zero-filled past the
sequence end, no per-element address registers), output tiles leaving the same way; otherwise through
pointer loads with row masks. On Hopper the tuner times both paths; pointer loads serve other GPUs and
tensors whose base or strides are not 16-byte aligned.

Block sizes (kernels/attention_tiles.py): small fixed tiles on CPU (the Triton interpreter,
TRITON_INTERPRET=1), and on CUDA a short list of tile / warp / stage configurations per load path,
tuned per (sequence bucket, head_dim, causal, group) by triton.autotune, the first entry of each list
being the untuned default. Pass ``blocks=default_blocks(...)`` (or any AttentionBlocks) to skip tuning.

FLOP accounting, the same formula as tools/bench_kernels.py and the docs use (attention_flops): the forward
is two matmuls (QK^T and PV), 4 * B * H * S^2 * D FLOPs, halved when causal; the backward is five
matmuls (QK^T recomputed, dV, dP, dQ, dK), counted as 2.5x the forward.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.attention_tiles import (DKDV_CANDIDATES, DQ_CANDIDATES, FWD_CANDIDATES, LOAD_PATHS,
                                     MAX_ROW_OFFSET, TILE_KINDS_OF_PATH, AttentionBlocks, default_blocks,
                                     descriptors, head_dim_class, load_path, needs_wide_row_offsets,
                                     set_descriptor_blocks, tma_addressable, tma_possible)

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# batch * heads is the second launch-grid axis, which CUDA caps at 65535 programs.
MAX_BATCH_HEADS = 65535


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of one attention call: forward 4*B*H*S^2*D (halved when causal); backward 2.5x that."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    if causal:
        flops /= 2
    return flops * 2.5 if backward else flops


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tile_ptrs(base, b, h, stride_b, stride_h, stride_s, rows, cols):
    """Pointers to [rows, cols] of head h in batch b (b and h 64-bit, so large tensors do not wrap)."""
    return base + b * stride_b + h * stride_h + rows[:, None] * stride_s + cols[None, :]


@triton.jit
def _query_tile_program(num_heads, GROUP: tl.constexpr):
    """(query tile, batch * head, batch, head, kv head) of this program in a query-tile grid."""
    # Last query tiles first: under causal they carry the most work, so the short ones fill the tail.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_bh = tl.program_id(1)
    off_h = off_bh % num_heads
    return start_m, off_bh, off_bh // num_heads, off_h, off_h // GROUP


@triton.jit
def _load_rows(desc, ptrs, stride_s, off_b, off_h, start, seq_len, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of one head as a [BLOCK, HEAD_DIM] tile; rows past the end are 0.

    USE_TMA: a tensor-memory-accelerator copy through a [batch, seq, heads, head_dim] descriptor (it
    zero-fills past the sequence end by itself). Otherwise `ptrs` points at row 0 of the tile.
    """
    if USE_TMA:
        tile = desc.load([off_b, start, off_h, 0]).reshape(BLOCK, HEAD_DIM)
    elif MASKED:
        rows = start + tl.arange(0, BLOCK)
        tile = tl.load(ptrs + start * stride_s, mask=rows[:, None] < seq_len, other=0.0)
    else:
        tile = tl.load(ptrs + start * stride_s)
    return tile


@triton.jit
def _store_rows(desc, ptrs, stride_s, off_b, off_h, start, seq_len, tile, BLOCK: tl.constexpr,
                HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Store a [BLOCK, HEAD_DIM] tile at rows [start, start + BLOCK); rows past the end are dropped."""
    if USE_TMA:
        desc.store([off_b, start, off_h, 0], tile.to(desc.dtype).reshape(1, BLOCK, 1, HEAD_DIM))
    else:
        rows = start + tl.arange(0, BLOCK)
        tl.store(ptrs + start * stride_s, tile.to(ptrs.dtype.element_ty), mask=rows[:, None] < seq_len)


@triton.jit
def _fwd_key_loop(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs, off_b,
                  off_kvh, start, end, offs_m, offs_n, seq_len, qk_scale, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        k = _load_rows(k_desc, k_ptrs, stride_ks, off_b, off_kvh, start_n, seq_len, BLOCK_N, HEAD_DIM,
                       MASKED, USE_TMA)
        v = _load_rows(v_desc, v_ptrs, stride_vs, off_b, off_kvh, start_n, seq_len, BLOCK_N, HEAD_DIM,
                       MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            cols = start_n + offs_n
            keep = cols[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, q_desc, k_desc, v_desc, o_desc,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     num_heads, seq_len, seq_bucket, qk_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m, off_bh, off_b, off_h, off_kvh = _query_tile_program(num_heads, GROUP)
    b64, h64, kvh64 = off_b.to(tl.int64), off_h.to(tl.int64), off_kvh.to(tl.int64)

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Pointer tiles at row 0 of this head (unused, and compiled away, on the TMA path).
    rows_m = tl.arange(0, BLOCK_M)
    q_ptrs = _tile_ptrs(Q, b64, h64, stride_qb, stride_qh, stride_qs, rows_m, offs_d)
    k_ptrs = _tile_ptrs(K, b64, kvh64, stride_kb, stride_kh, stride_ks, offs_n, offs_d)
    v_ptrs = _tile_ptrs(V, b64, kvh64, stride_vb, stride_vh, stride_vs, offs_n, offs_d)
    q = _load_rows(q_desc, q_ptrs, stride_qs, off_b, off_h, m0, seq_len, BLOCK_M, HEAD_DIM, True,
                   USE_TMA)

    # A finite start keeps exp2(m_i - m_new) at 1 (not NaN) for a row whose first block is all masked.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        # Keys before this query block are all visible; the diagonal blocks need the mask; the
        # blocks above the diagonal are never visited.
        full_end = m0
        masked_end = tl.minimum(full_end + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs,
                                  off_b, off_kvh, 0, full_end, offs_m, offs_n, seq_len, qk_scale, BLOCK_N,
                                  HEAD_DIM, False, CAUSAL, DOT_PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs,
                                  off_b, off_kvh, full_end, masked_end, offs_m, offs_n, seq_len, qk_scale,
                                  BLOCK_N, HEAD_DIM, True, CAUSAL, DOT_PRECISION, USE_TMA)

    # Rows past the sequence end can have l_i == 0; they are not stored, but must not trap.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = _tile_ptrs(O, b64, h64, stride_ob, stride_oh, stride_os, rows_m, offs_d)
    _store_rows(o_desc, o_ptrs, stride_os, off_b, off_h, m0, seq_len, out, BLOCK_M, HEAD_DIM, USE_TMA)
    if STORE_LSE:
        lse = m_i + tl.math.log2(l_safe)
        tl.store(LSE + off_bh.to(tl.int64) * seq_len + offs_m, lse, mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh,
                                stride_dob, stride_dos, stride_doh, num_heads, seq_len,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    rows = offs_m.to(tl.int64)  # memory-bound: 64-bit row offsets cost nothing here
    o = tl.load(_tile_ptrs(O, off_b, off_h, stride_ob, stride_oh, stride_os, rows, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, off_b, off_h, stride_dob, stride_doh, stride_dos, rows, offs_d),
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * seq_len + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, q_desc, do_desc, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qs,
                     stride_dos, off_b, off_h, start, end, mask_end, offs_n, seq_len, qk_scale,
                     BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    # Works on the transposed scores (keys x queries) so that dK and dV come out as [BLOCK_N, D].
    # Query rows past the sequence end load as zeros with lse = delta = 0: their p is 1 and their
    # dO is 0, so they add exactly nothing.
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < seq_len
        q = _load_rows(q_desc, q_ptrs, stride_qs, off_b, off_h, start_m, seq_len, BLOCK_M, HEAD_DIM,
                       True, USE_TMA)
        do = _load_rows(do_desc, do_ptrs, stride_dos, off_b, off_h, start_m, seq_len, BLOCK_M,
                        HEAD_DIM, True, USE_TMA)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if CAUSAL:
            # Only tiles overlapping the diagonal need the mask. One loop with a uniform branch, not
            # two loops: a second copy of the loop body pushes dK/dV into register spills.
            if start_m < mask_end:
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                          q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                          num_heads, num_kv_heads, seq_len, seq_bucket, qk_scale, softmax_scale,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = off_bkv // num_kv_heads
    off_kvh = off_bkv % num_kv_heads
    b64, kvh64 = off_b.to(tl.int64), off_kvh.to(tl.int64)

    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_n = tl.arange(0, BLOCK_N)
    # Key rows past the sequence end load as zeros; their dK / dV rows are computed but not stored.
    k_ptrs = _tile_ptrs(K, b64, kvh64, stride_kb, stride_kh, stride_ks, rows_n, offs_d)
    v_ptrs = _tile_ptrs(V, b64, kvh64, stride_vb, stride_vh, stride_vs, rows_n, offs_d)
    k = _load_rows(k_desc, k_ptrs, stride_ks, off_b, off_kvh, n0, seq_len, BLOCK_N, HEAD_DIM, True,
                   USE_TMA)
    v = _load_rows(v_desc, v_ptrs, stride_vs, off_b, off_kvh, n0, seq_len, BLOCK_N, HEAD_DIM, True,
                   USE_TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    for g in range(GROUP):
        off_h = off_kvh * GROUP + g
        h64 = off_h.to(tl.int64)
        q_ptrs = _tile_ptrs(Q, b64, h64, stride_qb, stride_qh, stride_qs, offs_m0, offs_d)
        do_ptrs = _tile_ptrs(DO, b64, h64, stride_dob, stride_doh, stride_dos, offs_m0, offs_d)
        row_base = (b64 * num_heads + h64) * seq_len
        # Causal: query tiles before this key tile see none of it and are skipped; the tiles
        # overlapping it need the mask; the later ones see all of it.
        start = n0 if CAUSAL else 0
        dk, dv = _dkdv_query_loop(dk, dv, k, v, q_desc, do_desc, q_ptrs, do_ptrs, LSE + row_base,
                                  DELTA + row_base, stride_qs, stride_dos, off_b, off_h, start, seq_len,
                                  n0 + BLOCK_N, offs_n, seq_len, qk_scale, BLOCK_M, HEAD_DIM, CAUSAL,
                                  DOT_PRECISION, USE_TMA)

    dk = dk * softmax_scale
    dk_ptrs = _tile_ptrs(DK, b64, kvh64, stride_dkb, stride_dkh, stride_dks, rows_n, offs_d)
    dv_ptrs = _tile_ptrs(DV, b64, kvh64, stride_dvb, stride_dvh, stride_dvs, rows_n, offs_d)
    _store_rows(dk_desc, dk_ptrs, stride_dks, off_b, off_kvh, n0, seq_len, dk, BLOCK_N, HEAD_DIM, USE_TMA)
    _store_rows(dv_desc, dv_ptrs, stride_dvs, off_b, off_kvh, n0, seq_len, dv, BLOCK_N, HEAD_DIM, USE_TMA)


@triton.jit
def _dq_key_loop(dq, q, do, lse, delta, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs, off_b,
                 off_kvh, start, end, offs_m, offs_n, seq_len, qk_scale, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        k = _load_rows(k_desc, k_ptrs, stride_ks, off_b, off_kvh, start_n, seq_len, BLOCK_N, HEAD_DIM,
                       MASKED, USE_TMA)
        v = _load_rows(v_desc, v_ptrs, stride_vs, off_b, off_kvh, start_n, seq_len, BLOCK_N, HEAD_DIM,
                       MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            cols = start_n + offs_n
            keep = cols[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, q_desc, k_desc, v_desc, do_desc, dq_desc,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                        stride_dqb, stride_dqs, stride_dqh,
                        num_heads, seq_len, seq_bucket, qk_scale, softmax_scale,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    start_m, off_bh, off_b, off_h, off_kvh = _query_tile_program(num_heads, GROUP)
    b64, h64, kvh64 = off_b.to(tl.int64), off_h.to(tl.int64), off_kvh.to(tl.int64)

    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    rows_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q_ptrs = _tile_ptrs(Q, b64, h64, stride_qb, stride_qh, stride_qs, rows_m, offs_d)
    do_ptrs = _tile_ptrs(DO, b64, h64, stride_dob, stride_doh, stride_dos, rows_m, offs_d)
    q = _load_rows(q_desc, q_ptrs, stride_qs, off_b, off_h, m0, seq_len, BLOCK_M, HEAD_DIM, True, USE_TMA)
    do = _load_rows(do_desc, do_ptrs, stride_dos, off_b, off_h, m0, seq_len, BLOCK_M, HEAD_DIM, True,
                    USE_TMA)
    row_base = off_bh.to(tl.int64) * seq_len
    # Rows past the end get lse = delta = 0 and q = dO = 0: finite values, never stored.
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_ptrs = _tile_ptrs(K, b64, kvh64, stride_kb, stride_kh, stride_ks, offs_n, offs_d)
    v_ptrs = _tile_ptrs(V, b64, kvh64, stride_vb, stride_vh, stride_vs, offs_n, offs_d)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        full_end = m0
        masked_end = tl.minimum(full_end + BLOCK_M, seq_len)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        masked_end = seq_len
    dq = _dq_key_loop(dq, q, do, lse, delta, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs, off_b,
                      off_kvh, 0, full_end, offs_m, offs_n, seq_len, qk_scale, BLOCK_N, HEAD_DIM, False,
                      CAUSAL, DOT_PRECISION, USE_TMA)
    dq = _dq_key_loop(dq, q, do, lse, delta, k_desc, v_desc, k_ptrs, v_ptrs, stride_ks, stride_vs, off_b,
                      off_kvh, full_end, masked_end, offs_m, offs_n, seq_len, qk_scale, BLOCK_N, HEAD_DIM,
                      True, CAUSAL, DOT_PRECISION, USE_TMA)

    dq = dq * softmax_scale
    dq_ptrs = _tile_ptrs(DQ, b64, h64, stride_dqb, stride_dqh, stride_dqs, rows_m, offs_d)
    _store_rows(dq_desc, dq_ptrs, stride_dqs, off_b, off_h, m0, seq_len, dq, BLOCK_M, HEAD_DIM, USE_TMA)


def _configs(candidates: dict, head_dim_cls: int, path: str) -> list:
    configs = []
    for kind in TILE_KINDS_OF_PATH[path]:
        # Only tuners that get descriptors need the hook (a hook also turns off Triton's on-disk
        # tuning cache).
        hook = set_descriptor_blocks if path in ("tma", "either") else None
        configs += [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "USE_TMA": kind == "tma"}, num_warps=w,
                                  num_stages=s, pre_hook=hook)
                    for m, n, w, s in candidates[(head_dim_cls, kind)]]
    return configs


def _tuners(kernel, candidates: dict) -> dict:
    # Tuned per power-of-two sequence bucket (not the exact length, so varying lengths reuse a
    # choice). Every kernel overwrites its outputs completely, so re-running it while tuning is
    # harmless.
    key = ["seq_bucket", "HEAD_DIM", "CAUSAL", "GROUP"]
    return {(cls, path): triton.autotune(_configs(candidates, cls, path), key=key)(kernel)
            for cls in (64, 128) for path in LOAD_PATHS}


_FWD_TUNED = _tuners(_attn_fwd_kernel, FWD_CANDIDATES)
_DKDV_TUNED = _tuners(_attn_bwd_dkdv_kernel, DKDV_CANDIDATES)
_DQ_TUNED = _tuners(_attn_bwd_dq_kernel, DQ_CANDIDATES)


def _launch(kernel, tuners: dict, blocks: AttentionBlocks | None, path: str, tiles, grid_rows,
            grid_cols, args, kwargs):
    """Launch with explicit tiles on the "tma" or "pointer" path, or through the path's autotuner
    when blocks is None."""
    if blocks is None:
        grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_M" if tiles == "m" else "BLOCK_N"]),
                             grid_cols)
        tuners[(head_dim_class(kwargs["HEAD_DIM"]), path)][grid](*args, **kwargs)
        return
    block_m, block_n, warps, stages = _tiles_for(blocks, kernel)
    tile = block_m if tiles == "m" else block_n
    set_descriptor_blocks({**dict(zip(kernel.arg_names, args)), **kwargs,
                            "BLOCK_M": block_m, "BLOCK_N": block_n})
    kernel[(triton.cdiv(grid_rows, tile), grid_cols)](*args, **kwargs, BLOCK_M=block_m, BLOCK_N=block_n,
                                                      USE_TMA=path == "tma", num_warps=warps,
                                                      num_stages=stages)


def _tiles_for(blocks: AttentionBlocks, kernel) -> tuple[int, int, int, int]:
    if kernel is _attn_fwd_kernel:
        return blocks.fwd_m, blocks.fwd_n, blocks.fwd_warps, blocks.fwd_stages
    if kernel is _attn_bwd_dkdv_kernel:
        return blocks.dkdv_m, blocks.dkdv_n, blocks.dkdv_warps, blocks.dkdv_stages
    return blocks.dq_m, blocks.dq_n, blocks.dq_warps, blocks.dq_stages


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D [batch, seq, heads, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; supported: "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    (batch, seq, heads, head_dim), kv_heads = q.shape, k.shape[2]
    if k.shape[0] != batch or k.shape[1] != seq:
        raise ValueError(f"flash_attention: k/v batch and seq {tuple(k.shape[:2])} differ from q's "
                         f"{(batch, seq)}")
    if k.shape[3] != head_dim:
        raise ValueError(f"flash_attention: k/v head_dim {k.shape[3]} differs from q's {head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"flash_attention: q heads ({heads}) must be a multiple of k/v heads ({kv_heads})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {head_dim} unsupported; supported: "
                         f"{SUPPORTED_HEAD_DIMS}")
    if batch * heads > MAX_BATCH_HEADS:
        raise ValueError(f"flash_attention: batch * heads = {batch * heads} exceeds the {MAX_BATCH_HEADS} "
                         "launch-grid limit")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("flash_attention: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 "
                           "set before importing kernels); compute CPU attention with PyTorch otherwise")


def _head_dim_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels need only head_dim to be contiguous; other strides are passed through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are computed in true fp32 (no TF32); the setting is a no-op for 16-bit inputs.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tuned_or_none(blocks: AttentionBlocks | None, q: torch.Tensor,
                   path: str) -> AttentionBlocks | None:
    """None means 'autotune' and is only kept for CUDA with 16-bit inputs."""
    if blocks is not None:
        return blocks
    if q.device.type == "cuda" and q.dtype != torch.float32:
        return None
    return default_blocks(q.shape[-1], q.dtype, q.device, use_tma=path == "tma")


def _forward(q, k, v, causal: bool, softmax_scale: float, blocks: AttentionBlocks | None,
             store_lse: bool, path: str):
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    out = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) if store_lse else None
    if out.numel() == 0:
        return out, lse
    blocks = _tuned_or_none(blocks, q, path)
    # Without a backward the LSE is not stored; a one-element fp32 stand-in keeps the tuner's key
    # (which includes the tensor dtypes) and so its tile choice the same as with one.
    lse_arg = lse if store_lse else torch.empty(1, dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse_arg, *descriptors(path, q, k, v, out),
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), heads, seq,
            triton.next_power_of_2(seq), softmax_scale * LOG2E)
    kwargs = dict(GROUP=heads // kv_heads, HEAD_DIM=head_dim, CAUSAL=bool(causal), STORE_LSE=store_lse,
                  DOT_PRECISION=_dot_precision(q.dtype))
    _launch(_attn_fwd_kernel, _FWD_TUNED, blocks, path, "m", seq, batch * heads, args, kwargs)
    return out, lse


def _backward(do, q, k, v, out, lse, causal: bool, softmax_scale: float,
              blocks: AttentionBlocks | None, path: str):
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    dq = torch.empty((batch, seq, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, seq, kv_heads, head_dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, seq, kv_heads, head_dim), dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    do = _head_dim_major(do)
    if ((path in ("tma", "either") and not tma_addressable(do))
            or do.shape[1] * do.stride(1) >= MAX_ROW_OFFSET):
        do = do.clone(memory_format=torch.contiguous_format)  # aligned, rows heads * head_dim apart
    blocks = _tuned_or_none(blocks, q, path)
    delta = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device)
    pre_m = (blocks or AttentionBlocks).preprocess_m
    _attn_bwd_preprocess_kernel[(triton.cdiv(seq, pre_m), batch * heads)](
        out, do, delta, *_strides3(out), *_strides3(do), heads, seq, HEAD_DIM=head_dim, BLOCK_M=pre_m)

    qk_scale = softmax_scale * LOG2E
    common = dict(GROUP=heads // kv_heads, HEAD_DIM=head_dim, CAUSAL=bool(causal),
                  DOT_PRECISION=_dot_precision(q.dtype))
    seq_bucket = triton.next_power_of_2(seq)
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, *descriptors(path, q, k, v, do, dk, dv),
                 *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk),
                 *_strides3(dv), heads, kv_heads, seq, seq_bucket, qk_scale, softmax_scale)
    _launch(_attn_bwd_dkdv_kernel, _DKDV_TUNED, blocks, path, "n", seq, batch * kv_heads, dkdv_args,
            common)
    dq_args = (q, k, v, do, lse, delta, dq, *descriptors(path, q, k, v, do, dq), *_strides3(q),
               *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), heads, seq, seq_bucket,
               qk_scale, softmax_scale)
    _launch(_attn_bwd_dq_kernel, _DQ_TUNED, blocks, path, "m", seq, batch * heads, dq_args, common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, blocks, path):
        out, lse = _forward(q, k, v, causal, softmax_scale, blocks, store_lse=True, path=path)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.blocks, ctx.path = causal, softmax_scale, blocks, path
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.blocks,
                               ctx.path)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, *, blocks: AttentionBlocks | None = None,
                    use_tma: bool | None = None) -> torch.Tensor:
    """Scaled dot-product attention, [batch, seq, heads, head_dim] in and out (see module doc).

    softmax_scale defaults to 1/sqrt(head_dim). blocks=None tunes tiles on CUDA (16-bit inputs)
    and uses fixed ones elsewhere. Without autograd (torch.no_grad, or no input requiring grad)
    nothing is kept for a backward.

    use_tma: None on a Hopper GPU (compute capability 9.x) with 16-bit tensors whose base and strides
    are 16-byte aligned, and blocks=None, lets the tuner time both load paths (TMA descriptors and
    pointer loads) and keep the faster; otherwise pointer loads. True requires TMA (Hopper, fp16 or
    bf16, aligned tensors; an error naming what is missing otherwise), False never uses it. One
    exception: when seq x row stride reaches 2^31 elements, beyond the pointer loads' 32-bit row
    offsets, TMA is taken where possible and the call is refused otherwise (see supports()).
    """
    _check_inputs(q, k, v)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: softmax_scale must be finite, got {softmax_scale}")
    q, k, v = _head_dim_major(q), _head_dim_major(k), _head_dim_major(v)
    path = load_path(use_tma, blocks, q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, bool(causal), scale, blocks, path)
    out, _ = _forward(q, k, v, bool(causal), scale, blocks, store_lse=False, path=path)
    return out


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether flash_attention can take these (shape-compatible) inputs: dtype, head_dim, the
    launch grid, and sequence lengths whose row offsets need TMA only where TMA is possible."""
    batch, _, heads, head_dim = q.shape
    return (q.dtype in SUPPORTED_DTYPES and head_dim in SUPPORTED_HEAD_DIMS
            and batch * heads <= MAX_BATCH_HEADS
            and (not needs_wide_row_offsets(q, k, v) or tma_possible(q, k, v)))
