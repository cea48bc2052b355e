"""Triton RMSNorm against the engine's PyTorch RMSNorm in fp32 (interpreter on CPU, real kernels on CUDA)."""
import pytest
import torch

import kernels.rmsnorm as rmsnorm_module
from engine.ops import rms_norm_reference
from kernels.rmsnorm import (
    MAX_HIDDEN,
    backward_partition,
    launch_config,
    rms_norm,
    supports,
)

from kernel_marks import INTERPRETER_ONLY

EPS = 1e-6
# Relative L2 error and elementwise (atol, rtol) per input dtype: a few roundings of that dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ELEMENT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _inputs(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, w, dy


def _kernel_run(x, w, dy, **kwargs):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = rms_norm(x, w, EPS, **kwargs)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), dx, dw


def _fp32_reference(x, w, dy):
    x = x.detach().float().requires_grad_()
    w = w.detach().float().requires_grad_()
    y = rms_norm_reference(x, w, EPS)
    dx, dw = torch.autograd.grad(y, (x, w), dy.float())
    return y.detach(), dx, dw


def _assert_close(name, got, ref, dtype):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got = got.float()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[dtype], f"{name} ({dtype}): relative L2 error {rel:.3g} > {REL_TOL[dtype]}"
    atol, rtol = ELEMENT_TOL[dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name} ({dtype}): {m}")


def _check_against_reference(shape, dtype, seed, device="cpu", **kwargs):
    x, w, dy = _inputs(shape, dtype, seed, device)
    y, dx, dw = _kernel_run(x, w, dy, **kwargs)
    y_ref, dx_ref, dw_ref = _fp32_reference(x, w, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    _assert_close("y", y, y_ref, dtype)
    _assert_close("dx", dx, dx_ref, dtype)
    # dweight sums over rows: allow the per-row rounding to add up.
    _assert_close("dweight", dw, dw_ref, dtype)


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 64), (7, 100), (3, 5, 48), (2, 3, 4, 33), (2, 1000)])
def test_matches_fp32_reference(shape, dtype):
    _check_against_reference(shape, dtype, seed=sum(shape))


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "n_rows, hidden, programs",
    [(10, 3000, 4), (10, 1000, 3), (13, 100, 2), (5, 48, 8), (1, 48, 4), (3, 2, 2)],
)
def test_rows_split_unevenly_over_programs(n_rows, hidden, programs):
    cfg = launch_config(n_rows, hidden)
    rows_per_program, grid = backward_partition(n_rows, cfg.bwd_block_m, programs)
    assert rows_per_program % cfg.bwd_block_m == 0 and grid * rows_per_program >= n_rows
    if (n_rows, hidden) in ((10, 3000), (10, 1000)):
        # These cases must really use several programs, the last one with a shorter run of rows.
        assert grid > 1 and n_rows % rows_per_program != 0
    _check_against_reference((n_rows, hidden), torch.float32, seed=n_rows + hidden, backward_programs=programs)


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("n_rows, hidden, programs", [(10, 3000, 4), (10, 1000, 3)])
def test_weight_gradient_sum_loops_over_partial_tiles(monkeypatch, n_rows, hidden, programs):
    """The final dweight sum handles more partial rows than one of its tiles (also a ragged last tile)."""
    monkeypatch.setattr(rmsnorm_module, "_SUM_TILE_ROWS", 2)
    _, grid = backward_partition(n_rows, launch_config(n_rows, hidden).bwd_block_m, programs)
    assert grid == programs
    _check_against_reference((n_rows, hidden), torch.float32, seed=hidden, backward_programs=programs)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_casting_order_matches_hugging_face():
    """Normalised x is rounded to the input dtype before the weight multiplies it, in y and dweight."""
    dtype = torch.bfloat16
    x, w, dy = _inputs((64, 96), dtype, seed=3)
    y, _, dw = _kernel_run(x, w, dy, backward_programs=4)
    # Forward: the HF reference run in bf16 itself, up to one bf16 rounding step.
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), atol=1e-6, rtol=2**-7)

    h = x.float()
    x_hat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    dw_cast = (dy.float() * x_hat.to(dtype).float()).sum(0)
    dw_uncast = (dy.float() * x_hat).sum(0)
    # The two orders differ far more than one bf16 rounding of dweight, so this check can tell them apart.
    assert ((dw_cast - dw_uncast).abs() > 2 * 2**-8 * dw_cast.abs()).any()
    torch.testing.assert_close(dw.float(), dw_cast, atol=1e-6, rtol=2**-8)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_backward_is_deterministic():
    x, w, dy = _inputs((37, 200), torch.float16, seed=11)
    first = _kernel_run(x, w, dy, backward_programs=5)
    second = _kernel_run(x, w, dy, backward_programs=5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_strided_and_mixed_dtype_inputs():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 5, 64, generator=g)
    x = base[..., :48]  # rows are 64 apart in memory
    w = torch.randn(48, generator=g)
    y = rms_norm(x, w, EPS)
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), atol=1e-5, rtol=1e-5)
    xt = torch.randn(48, 6, generator=g).t()  # last dimension not contiguous
    torch.testing.assert_close(rms_norm(xt, w, EPS), rms_norm_reference(xt, w, EPS), atol=1e-5, rtol=1e-5)
    # bf16 activations with an fp32 weight promote to fp32, as in the reference.
    xb = torch.randn(4, 48, generator=g).to(torch.bfloat16)
    yb = rms_norm(xb, w, EPS)
    assert yb.dtype == torch.float32
    torch.testing.assert_close(yb, rms_norm_reference(xb, w, EPS), atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_gradients_only_where_requested_and_empty_input():
    x, w, dy = _inputs((6, 48), torch.float32, seed=2)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(rms_norm(xr, w, EPS), (xr,), dy)
    _, dx_ref, _ = _fp32_reference(x, w, dy)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    wr = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(rms_norm(x, wr, EPS), (wr,), dy)
    _, _, dw_ref = _fp32_reference(x, w, dy)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)

    empty = torch.zeros(0, 3, 48, requires_grad=True)
    y = rms_norm(empty, wr, EPS)
    assert y.shape == (0, 3, 48)
    dx, dw = torch.autograd.grad(y.sum(), (empty, wr), allow_unused=True)
    assert dx.shape == empty.shape and torch.equal(dw, torch.zeros_like(w))


def test_bad_inputs_are_refused_by_name():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(47), EPS)
    with pytest.raises(TypeError, match="int64"):
        rms_norm(x.long(), torch.ones(48), EPS)
    with pytest.raises(ValueError, match="hidden size .* is 0"):
        rms_norm(torch.randn(4, 0), torch.ones(0), EPS)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(48), 0.0)
    with pytest.raises(ValueError, match=f"hidden size {MAX_HIDDEN + 1}"):
        rms_norm(torch.randn(1, MAX_HIDDEN + 1, dtype=torch.float16), torch.ones(MAX_HIDDEN + 1), EPS)


def test_supports_names_what_the_kernel_takes():
    x = torch.zeros(3, 48, dtype=torch.bfloat16)
    assert supports(x, torch.ones(48)) and supports(x.half(), torch.ones(48, dtype=torch.float16))
    assert not supports(x.long(), torch.ones(48))  # integer input
    assert not supports(x, torch.ones(47))  # weight does not match the hidden size
    assert not supports(x, torch.ones(1, 48))  # weight not 1-D
    assert not supports(torch.zeros(3, 0), torch.ones(0))  # empty hidden size
    assert not supports(torch.zeros(1, MAX_HIDDEN + 1), torch.ones(MAX_HIDDEN + 1))
    assert not supports(x, torch.ones(48, device="meta"))  # two devices


def _max_errors(impl, x, w, dy):
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    y = impl(xr, wr, EPS)
    dx, dw = torch.autograd.grad(y, (xr, wr), dy)
    return y, dx, dw


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8192, 4096), (2, 2048, 5120), (1000, 8192), (3000, 768)])
def test_gpu_error_within_small_factor_of_pytorch(shape, dtype):
    """Max error vs fp32 is at most 2x that of the same PyTorch code run in bf16/fp16."""
    x, w, dy = _inputs(shape, dtype, seed=7, device="cuda")
    ours = _max_errors(rms_norm, x, w, dy)
    torch_low = _max_errors(rms_norm_reference, x, w, dy)
    ref = _fp32_reference(x, w, dy)
    for name, a, b, r in zip(("y", "dx", "dweight"), ours, torch_low, ref):
        err_ours = (a.float() - r).abs().max().item()
        err_torch = (b.float() - r).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, f"{name} {dtype} {shape}: {err_ours:.3g} vs torch {err_torch:.3g}"
    first = _max_errors(rms_norm, x, w, dy)
    assert all(torch.equal(a, b) for a, b in zip(ours, first)), "backward not bitwise reproducible"
