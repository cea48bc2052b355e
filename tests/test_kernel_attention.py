"""Flash attention kernels against the engine's PyTorch attention computed in float64.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with
16-wide tiles, in fp32 and fp16 (the interpreter's bf16 dot is wrong), on tiny shapes. On CUDA the
`gpu` tests apply flash-attention's accuracy rule in bf16 and fp16 at realistic lengths.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.ops import Ops, attention_reference
from kernels.attention import (
    AttentionBlocks,
    _forward,
    attention_flops,
    default_blocks,
    flash_attention,
)
from kernels.attention_tiles import DKDV_CANDIDATES, DQ_CANDIDATES, FWD_CANDIDATES

from kernel_marks import INTERPRETER_ONLY

# Max error allowed, relative to max(1, largest reference magnitude), per input dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3}
# Tiles with several key tiles per query tile on the diagonal (and the converse for dK/dV).
WIDE_BLOCKS = AttentionBlocks(32, 16, 1, 1, 16, 32, 1, 1, 32, 16, 1, 1, preprocess_m=16)


def _inputs(batch, seq, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, seq, h, head_dim, generator=gen).to(device, dtype)
    return make(heads).requires_grad_(), make(kv_heads).requires_grad_(), make(kv_heads).requires_grad_()


def _run(fn, q, k, v, dout, **kwargs):
    out = fn(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, dq, dk, dv


def _reference(q, k, v, dout, causal, softmax_scale=None):
    """Output and gradients of PyTorch's attention in float64: exact next to any kernel dtype."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return _run(attention_reference, q64, k64, v64, dout.double(), causal=causal,
                softmax_scale=softmax_scale)


def _exact(q, k, v, causal=True):
    with torch.no_grad():
        return attention_reference(q.detach().double(), k.detach().double(), v.detach().double(), causal)


def _assert_close(name, got, want, dtype):
    err = (got.float() - want).abs().max().item()
    bound = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _check_against_reference(batch, seq, heads, kv_heads, head_dim, causal, dtype, blocks=None,
                             softmax_scale=None, use_tma=None):
    q, k, v = _inputs(batch, seq, heads, kv_heads, head_dim, dtype)
    dout = torch.randn(batch, seq, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(flash_attention, q, k, v, dout, causal=causal, softmax_scale=softmax_scale, blocks=blocks,
               use_tma=use_tma)
    want = _reference(q, k, v, dout, causal, softmax_scale)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        _assert_close(name, g, w, dtype)


# (batch, seq, heads, kv_heads, head_dim, causal, dtype): GQA ratios 1, 2, 4, 8; sequences that are
# not multiples of the 16-wide tile (1, 17, 33, 50) and one that is (64); head_dim 16, 32 and 64.
CASES = [
    (1, 17, 2, 2, 16, True, torch.float32),
    (2, 33, 4, 2, 32, False, torch.float32),
    (1, 50, 4, 1, 16, True, torch.float16),
    (1, 50, 8, 1, 16, True, torch.float32),
    (1, 33, 8, 1, 32, False, torch.float16),
    (1, 1, 2, 1, 16, True, torch.float32),
    (1, 1, 4, 2, 16, False, torch.float16),
    (1, 40, 2, 1, 64, True, torch.float16),
    (1, 64, 2, 2, 64, False, torch.float32),
    (2, 17, 4, 4, 32, True, torch.float16),
]


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal,dtype", CASES,
                         ids=[f"b{c[0]}-s{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-{'causal' if c[5] else 'full'}-"
                              f"{str(c[6])[6:]}" for c in CASES])
def test_forward_and_gradients_match_reference(batch, seq, heads, kv_heads, head_dim, causal, dtype):
    _check_against_reference(batch, seq, heads, kv_heads, head_dim, causal, dtype)


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("seq,causal,dtype", [(50, True, torch.float32), (33, False, torch.float16),
                                              (7, True, torch.float16)])
def test_wide_tiles_match_reference(seq, causal, dtype):
    """Query tiles spanning two key tiles (forward, dQ) and key tiles spanning two query tiles (dK/dV)."""
    _check_against_reference(1, seq, 4, 2, 16, causal, dtype, blocks=WIDE_BLOCKS)


# The TMA path (descriptor loads, zero fill and clipped stores past the sequence end) in the
# interpreter, which applies the descriptors' bounds the way the copy engine does.
TMA_CASES = [(1, 17, 2, 2, 16, True), (2, 33, 4, 1, 32, False), (1, 50, 8, 2, 16, True),
             (1, 1, 4, 2, 16, True)]


@pytest.fixture
def descriptor_paths(monkeypatch):
    """The load path of every descriptors() call, so a test can tell that TMA really ran."""
    import kernels.attention as A

    seen = []
    real = A.descriptors

    def spy(path, *tensors):
        seen.append(path)
        return real(path, *tensors)

    monkeypatch.setattr(A, "descriptors", spy)
    return seen


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal", TMA_CASES)
def test_tma_descriptor_path_matches_reference(batch, seq, heads, kv_heads, head_dim, causal,
                                               descriptor_paths):
    for blocks in (None, WIDE_BLOCKS):
        descriptor_paths.clear()
        _check_against_reference(batch, seq, heads, kv_heads, head_dim, causal, torch.float16,
                                 use_tma=True, blocks=blocks)
        assert descriptor_paths == ["tma"] * 3, descriptor_paths  # forward, dK/dV, dQ


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("head_dim,seq,causal,path", [(64, 150, True, "either"), (128, 100, False, "either"),
                                                      (128, 70, True, "ampere")])
def test_tuner_candidates_are_correct(head_dim, seq, causal, path, monkeypatch):
    """The CUDA tuners driven in the interpreter (path "either": the Hopper TMA and pointer
    candidates; "ampere": those of compute capability 8.x): each candidate writes every output
    element (outputs are NaN-poisoned first) and matches the float64 reference."""
    import kernels.attention as A

    q, k, v = (t.detach() for t in _inputs(1, seq, 4, 2, head_dim, torch.float16))
    dout = torch.randn(1, seq, 4, head_dim, generator=torch.Generator().manual_seed(1)).half()
    want_out, want_dq, want_dk, want_dv = _reference(q, k, v, dout, causal)
    checked = []

    def checking_bench(tuner, name, want):
        def bench(kernel_call, quantiles):
            out = tuner.nargs[name]
            out.fill_(float("nan"))
            kernel_call()
            checked.append(name)
            _assert_close(f"{name} ({tuner.nargs.get('q_desc') is not None})", out, want, torch.float16)
            return [1.0] * len(quantiles)
        return bench

    cls = 64 if head_dim <= 64 else 128
    tuners = ((A._FWD_TUNED, "O", want_out), (A._DKDV_TUNED, "DK", want_dk), (A._DQ_TUNED, "DQ", want_dq))
    for table, name, want in tuners:
        tuner = table[(cls, path)]
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setitem(tuner.__dict__, "do_bench", checking_bench(tuner, name, want))
    monkeypatch.setattr(A, "_tuned_or_none", lambda blocks, q, path: blocks)  # tune on CPU too
    out, lse = A._forward(q, k, v, causal, 1 / math.sqrt(head_dim), None, True, path)
    dq, dk, dv = A._backward(dout, q, k, v, out, lse, causal, 1 / math.sqrt(head_dim), None, path)
    kinds = ("tma", "pointer") if path == "either" else (path,)
    for name, candidates in (("O", FWD_CANDIDATES), ("DK", DKDV_CANDIDATES), ("DQ", DQ_CANDIDATES)):
        assert checked.count(name) == sum(len(candidates[(cls, kind)]) for kind in kinds)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                               (want_out, want_dq, want_dk, want_dv)):
        _assert_close(f"tuned {name}", got, want, torch.float16)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_tma_refuses_unaligned_tensors():
    q, k, v = _inputs(1, 17, 2, 2, 16, torch.float16)
    q_odd = torch.zeros(1 * 17 * 2 * 16 + 1, dtype=torch.float16)[1:].view(1, 17, 2, 16)
    with pytest.raises(ValueError, match="16-byte-aligned.*q has data pointer"):
        flash_attention(q_odd, k.detach(), v.detach(), use_tma=True)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        flash_attention(q.detach().float(), k.detach().float(), v.detach().float(), use_tma=True)
    # Automatic choice on CPU: pointer loads, no error.
    flash_attention(q_odd, k.detach(), v.detach())


def test_sequences_beyond_32_bit_row_offsets_are_refused_on_pointer_loads(monkeypatch):
    """seq x row stride >= 2^31 elements: pointer loads would overflow, so without TMA it is an error
    (meta tensors: the check happens before anything is allocated or launched), and Ops("triton")
    (its kernels allowed on meta tensors here) sends such calls to PyTorch instead, saying why."""
    import kernels.attention as attention_module

    q = torch.empty(1, 2**20, 16, 128, device="meta", dtype=torch.float16)
    k = v = torch.empty(1, 2**20, 4, 128, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="32-bit row offsets"):
        flash_attention(q, k, v)
    assert not attention_module.supports(q, k, v)
    assert attention_module.supports(q[:, :2**19], k[:, :2**19], v[:, :2**19])
    called = []
    monkeypatch.setattr(attention_module, "flash_attention", lambda *a, **kw: called.append(1))
    ops = Ops("triton", kernel_devices=("meta",))
    with pytest.warns(RuntimeWarning, match="attention inputs .* outside what its kernel takes"):
        assert ops.attention(q, k, v).shape == q.shape and called == []
    fused = torch.empty(1, 2**19, 2 * 16 * 128, device="meta", dtype=torch.float16)
    q_view = fused[..., :16 * 128].unflatten(-1, (16, 128))  # half the length, twice the row stride
    with pytest.raises(ValueError, match="32-bit row offsets"):
        flash_attention(q_view, k[:, :2**19], v[:, :2**19], use_tma=False)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_tma_with_a_misaligned_output_gradient(descriptor_paths):
    """dO that a descriptor cannot address (base off by one element) is copied, not refused."""
    q, k, v = _inputs(1, 21, 4, 2, 16, torch.float16)
    dout = torch.randn(1, 21, 4, 16, generator=torch.Generator().manual_seed(2)).half()
    dout_odd = torch.zeros(dout.numel() + 1, dtype=torch.float16)[1:].view(dout.shape)
    dout_odd.copy_(dout)
    got = _run(flash_attention, q, k, v, dout_odd, use_tma=True)
    want = _reference(q, k, v, dout, True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(name, g, w, torch.float16)
    assert descriptor_paths == ["tma"] * 3


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("causal", [True, False])
def test_custom_softmax_scale(causal):
    _check_against_reference(1, 33, 2, 1, 16, causal, torch.float32, softmax_scale=0.37)


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("causal", [True, False])
def test_saved_log_sum_exp(causal):
    """The saved statistic is the base-2 log-sum-exp of the scaled scores, per (batch, head, row)."""
    q, k, v = (t.detach() for t in _inputs(2, 33, 4, 2, 16, torch.float32))
    scale = 0.3
    _, lse = _forward(q, k, v, causal, scale, None, store_lse=True, path="pointer")
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.logsumexp(scores, dim=-1) * math.log2(math.e)
    assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, want, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_backward_is_deterministic():
    q, k, v = _inputs(1, 50, 8, 2, 16, torch.float32, seed=3)
    dout = torch.randn(1, 50, 8, 16, generator=torch.Generator().manual_seed(4))
    first = _run(flash_attention, q, k, v, dout)
    second = _run(flash_attention, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.triton
@INTERPRETER_ONLY
def test_forward_without_autograd():
    q, k, v = _inputs(1, 33, 4, 2, 32, torch.float16)
    want = _exact(q, k, v)
    with torch.no_grad():
        out = flash_attention(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    _assert_close("out (no_grad)", out, want, torch.float16)
    plain = flash_attention(q.detach(), k.detach(), v.detach())  # grad mode on, nothing requires grad
    assert plain.grad_fn is None
    assert torch.equal(plain, out)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_causal_never_visits_key_tiles_above_the_diagonal():
    """A NaN in V at key 40 (tile 2) poisons any query tile that loads tile 2, masked or not
    (0 * NaN); query tiles 0 and 1 must stay finite, and so must their dQ. A NaN in Q at row 10
    (tile 0) likewise poisons dK/dV of every key tile whose pass visits query tile 0."""
    q, k, v = (t.detach() for t in _inputs(1, 64, 2, 1, 16, torch.float32))
    v[:, 40] = float("nan")
    q_, k_, v_ = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, dq, _, _ = _run(flash_attention, q_, k_, v_, torch.ones(1, 64, 2, 16))
    assert torch.isfinite(out[:, :32]).all() and torch.isfinite(dq[:, :32]).all()
    assert torch.isnan(out[:, 40:]).all()  # the poison is real where key 40 is visible

    q, k, v = (t.detach() for t in _inputs(1, 64, 2, 1, 16, torch.float32))
    q[:, 10] = float("nan")
    q_, k_, v_ = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    _, _, dk, dv = _run(flash_attention, q_, k_, v_, torch.ones(1, 64, 2, 16))
    assert torch.isfinite(dk[:, 16:]).all() and torch.isfinite(dv[:, 16:]).all()
    assert torch.isnan(dk[:, :11]).all()


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("use_tma,dtype", [(None, torch.float32), (True, torch.float16)])
def test_strided_views_of_a_fused_projection(use_tma, dtype):
    """q, k, v sliced out of one [batch, seq, (heads + 2 * kv_heads) * head_dim] tensor, and a
    [batch, heads, seq, head_dim] tensor seen as [batch, seq, heads, head_dim]: strides honoured
    (by pointer loads, and by TMA descriptors), gradients flow back into the fused tensor."""
    batch, seq, heads, kv_heads, head_dim = 2, 21, 4, 2, 16
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(batch, seq, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    fused.requires_grad_()

    def split(t):
        q, k, v = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return (q.view(batch, seq, heads, head_dim), k.view(batch, seq, kv_heads, head_dim),
                v.view(batch, seq, kv_heads, head_dim))

    q, k, v = split(fused)
    assert not q.is_contiguous()
    dout = torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype)
    out = flash_attention(q, k, v, use_tma=use_tma)
    (grad_fused,) = torch.autograd.grad(out, fused, dout)
    fused64 = fused.detach().double().requires_grad_()
    want = attention_reference(*split(fused64), True)
    (want_grad,) = torch.autograd.grad(want, fused64, dout.double())
    _assert_close("out", out, want, dtype)
    _assert_close("d fused", grad_fused, want_grad, dtype)

    q_bhsd = torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype).transpose(1, 2)
    k_c, v_c = k.detach().contiguous(), v.detach().contiguous()
    with torch.no_grad():
        _assert_close("out (seq-strided q)", flash_attention(q_bhsd, k_c, v_c, causal=False,
                                                             use_tma=use_tma),
                      _exact(q_bhsd, k_c, v_c, False), dtype)


def test_flop_accounting():
    assert attention_flops(2, 8, 1024, 128, causal=False) == 4 * 2 * 8 * 1024 ** 2 * 128
    assert attention_flops(2, 8, 1024, 128, causal=True) == 2 * 2 * 8 * 1024 ** 2 * 128
    assert attention_flops(2, 8, 1024, 128, causal=True, backward=True) == 5 * 2 * 8 * 1024 ** 2 * 128


@pytest.mark.parametrize("shapes,dtypes,match", [
    (((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16)), None, "multiple of k/v heads"),
    (((1, 8, 4, 48), (1, 8, 4, 48), (1, 8, 4, 48)), None, "head_dim 48 unsupported"),
    (((1, 8, 4, 16), (1, 9, 4, 16), (1, 9, 4, 16)), None, "batch and seq"),
    (((1, 8, 4, 16), (1, 8, 4, 32), (1, 8, 4, 32)), None, "head_dim 32 differs"),
    (((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 1, 16)), None, "must have one shape"),
    (((8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16)), None, "q must be 4-D"),
    (((1, 8, 4, 16),) * 3, (torch.float16, torch.float32, torch.float32), "share a dtype"),
    (((1, 8, 4, 16),) * 3, (torch.float64,) * 3, "q has dtype torch.float64"),
])
def test_bad_inputs_are_refused_by_name(shapes, dtypes, match):
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(q, k, v)


def test_engine_dispatch_falls_back_beyond_the_launch_grid(monkeypatch):
    """batch * heads is a grid axis capped at MAX_BATCH_HEADS: the kernel refuses more by name, and
    Ops("triton") (its kernels allowed on CPU tensors here) sends such calls to PyTorch instead."""
    import kernels.attention as attention_module

    q = torch.zeros(attention_module.MAX_BATCH_HEADS + 1, 1, 1, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="batch \\* heads = 65536 exceeds"):
        flash_attention(q, q, q)

    called = []
    monkeypatch.setattr(attention_module, "flash_attention", lambda *a, **kw: called.append(a[0].shape))
    ops = Ops("triton", kernel_devices=("cpu",))
    with pytest.warns(RuntimeWarning, match="batch \\* heads up to 65535"):
        out = ops.attention(q, q, q)
    assert called == [] and out.shape == q.shape
    fits = q[:attention_module.MAX_BATCH_HEADS]
    ops.attention(fits, fits, fits)
    assert called == [fits.shape]


def test_bad_tiles_are_refused():
    with pytest.raises(ValueError, match="fwd_m=16 must be a multiple of fwd_n=32"):
        AttentionBlocks(16, 32, 4, 3, 32, 64, 4, 3, 64, 32, 4, 3)
    with pytest.raises(ValueError, match="dq_m=48: tiles must be powers of two"):
        AttentionBlocks(64, 32, 4, 3, 32, 64, 4, 3, 48, 24, 4, 3)


# ---------------------------------------------------------------------------------------------- GPU


def _errors(got, want):
    return [(g.float() - w).abs().max().item() for g, w in zip(got, want)]


def _rounding_floor(want):
    # The fp32 rounding error of the reference's own magnitude, so a near-zero baseline error cannot
    # make the bound unreachable.
    return [2 * (w.float() + 0.3 - 0.3 - w.float()).abs().max().item() for w in want]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch,seq,heads,kv_heads,causal", [(2, 1024, 16, 4, True),
                                                             (1, 4095, 8, 2, True),
                                                             (1, 1024, 8, 1, False)])
def test_gpu_accuracy_rule(batch, seq, heads, kv_heads, causal, head_dim, dtype):
    """Our max error against float64 is at most 2x (output) and 3x (gradients) that of PyTorch's
    attention (the engine's scaled_dot_product_attention path) in the same precision, with the
    default (tuned) tiles: the rule the engine's start-up self-check applies."""
    q, k, v = _inputs(batch, seq, heads, kv_heads, head_dim, dtype, device="cuda")
    dout = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    got = _run(flash_attention, q, k, v, dout, causal=causal)
    want = _reference(q, k, v, dout, causal)
    baseline = _run(attention_reference, q, k, v, dout, causal=causal)
    ours, theirs, floors = _errors(got, want), _errors(baseline, want), _rounding_floor(want)
    for name, factor, e_ours, e_theirs, floor in zip(("out", "dq", "dk", "dv"), (2, 3, 3, 3),
                                                     ours, theirs, floors):
        assert e_ours <= factor * e_theirs + floor, (
            f"{name}: error {e_ours:.3e} > {factor} x half-precision PyTorch {e_theirs:.3e} + {floor:.1e}")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_every_candidate_tile_is_correct(head_dim, causal):
    """Whatever the tuner picks must be right: each candidate configuration, on an odd length."""
    cls = 64 if head_dim <= 64 else 128
    q, k, v = _inputs(2, 777, 8, 2, head_dim, torch.float16, device="cuda")
    dout = torch.randn(2, 777, 8, head_dim, device="cuda", dtype=torch.float16)
    want = _reference(q, k, v, dout, causal)
    baseline = _errors(_run(attention_reference, q, k, v, dout, causal=causal), want)
    hopper = torch.cuda.get_device_capability()[0] == 9  # the Hopper lists: 9.x only
    for kind in ("tma", "pointer") if hopper else ("ampere",):
        use_tma = kind == "tma"
        key = (cls, kind)
        fwd, dkdv, dq = FWD_CANDIDATES[key], DKDV_CANDIDATES[key], DQ_CANDIDATES[key]
        for i in range(max(len(fwd), len(dkdv), len(dq))):
            blocks = AttentionBlocks(*fwd[i % len(fwd)], *dkdv[i % len(dkdv)], *dq[i % len(dq)])
            errors = _errors(_run(flash_attention, q, k, v, dout, causal=causal, blocks=blocks,
                                  use_tma=use_tma), want)
            for name, factor, e_ours, e_theirs in zip(("out", "dq", "dk", "dv"), (2, 3, 3, 3), errors,
                                                      baseline):
                assert e_ours <= factor * e_theirs + 1e-6, (
                    f"{blocks} tma={use_tma}: {name} error {e_ours:.3e} vs {e_theirs:.3e}")


@pytest.mark.gpu
def test_gpu_deterministic_and_inference():
    q, k, v = _inputs(2, 2048, 16, 4, 128, torch.bfloat16, device="cuda")
    dout = torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16)
    first = _run(flash_attention, q, k, v, dout)
    second = _run(flash_attention, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v), first[0])
    fp32 = default_blocks(128, torch.float32, "cuda")
    q32, k32, v32 = (t.detach().float()[:, :300].requires_grad_() for t in (q, k, v))
    got = _run(flash_attention, q32, k32, v32, dout.float()[:, :300], blocks=fp32)
    want = _reference(q32, k32, v32, dout.float()[:, :300], True)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(f"fp32 {name}", g, w, torch.float32)


@pytest.mark.triton
def test_default_tiles_compile_for_hopper_without_spills(tmp_path):
    """The interpreter never compiles: build the default bf16 tiles (head_dim 64 and 128, GQA 4,
    causal and not; TMA and pointer loads for sm_90, the ampere tiles for sm_80) with Triton's bundled
    ptxas, in a fresh process without TRITON_INTERPRET, and read the resource report: no stack frame
    (no register spills), wgmma tensor-core instructions on sm_90, TMA copies on the TMA path."""
    script = r'''
import json, sys
sys.argv = ["kernel_resources"]
import runpy
tool = runpy.run_path("tools/kernel_resources.py", run_name="kernel_resources")
for kernel in ("fwd", "dkdv", "dq"):
    for head_dim in (64, 128):
        for kind, sm in (("tma", 90), ("pointer", 90), ("ampere", 80)):
            config = tool["CANDIDATES"][kernel][(head_dim, kind)][0]
            for causal in (True, False):
                r = tool["resources"](tool["compile_attention"](kernel, "bf16", head_dim, causal, 4,
                                                                config, kind == "tma", sm))
                print(json.dumps(dict(kernel=kernel, head_dim=head_dim, kind=kind, sm=sm,
                                      causal=causal, config=config, **vars(r))))
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root)
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=400, cwd=root)
    if result.returncode and ("ptxas" in result.stderr and "not found" in result.stderr):
        pytest.skip("Triton's NVIDIA backend (ptxas) is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 36
    for row in rows:
        assert row["stack"] == 0, f"register spills: {row}"
        assert (row["wgmma"] > 0) == (row["sm"] == 90), f"wgmma tensor cores exactly on sm_90: {row}"
        assert (row["tma_copies"] > 0) == (row["kind"] == "tma"), f"TMA copies exactly on the TMA path: {row}"
