"""engine.ops.Ops: the explicit choice between Triton kernels and PyTorch, and the kernels' self-check.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
tests allow them on CPU tensors (``kernel_devices=("cpu",)``, ``allow_cpu=True``) and check in fp16
and fp32 on tiny shapes (the interpreter's bf16 dot products are wrong).
"""
import contextlib
import warnings

import pytest
import torch

from engine import ops as ops_module
from engine.ops import (CheckShapes, KernelCheckWarning, Ops, TensorError, Verdict, attention_reference,
                        compare_to_reference, rms_norm_reference)
from kernel_marks import INTERPRETER_ONLY

TINY = CheckShapes(batch=1, seq=23, heads=4, kv_heads=2, head_dim=16, rows=13, hidden=48)


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.fixture
def kernel_calls(monkeypatch):
    """Spy on both kernels: the list of kernel names called, in order (the kernels still compute)."""
    rmsnorm = pytest.importorskip("kernels.rmsnorm")
    attention = pytest.importorskip("kernels.attention")
    calls = []
    for module, name in ((rmsnorm, "rms_norm"), (attention, "flash_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


def _inputs(dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 32, generator=gen).to(dtype), (1 + torch.randn(32, generator=gen)).to(dtype)
    q = torch.randn(1, 9, 4, 16, generator=gen).to(dtype)
    k, v = torch.randn(2, 1, 9, 2, 16, generator=gen).to(dtype).unbind(0)
    return x, w, q, k, v


def _run_ops(ops, dtype=torch.float16):
    x, w, q, k, v = _inputs(dtype)
    return ops.rms_norm(x, w, 1e-5), ops.attention(q, k, v)


def _pytorch(dtype=torch.float16):
    x, w, q, k, v = _inputs(dtype)
    return rms_norm_reference(x, w, 1e-5), attention_reference(q, k, v)


def test_modes_are_named():
    assert [Ops(m).mode for m in ("auto", "triton", "torch")] == ["auto", "triton", "torch"]
    assert repr(Ops("triton")) == "Ops('triton')"
    with pytest.raises(ValueError, match="unknown mode 'fast'; choose one of auto, triton, torch"):
        Ops("fast")
    with pytest.raises(TypeError, match="kernel_devices must be a tuple"):
        Ops("auto", kernel_devices="cuda")


@pytest.mark.triton
@INTERPRETER_ONLY
def test_torch_mode_never_calls_a_kernel(kernel_calls):
    ops = Ops("torch", kernel_devices=("cpu",))  # kernels allowed on CPU, yet never chosen
    for got, want in zip(_run_ops(ops), _pytorch()):
        assert torch.equal(got, want)
    ops.self_check("cpu", torch.float16, shapes=TINY, allow_cpu=True)  # checking changes nothing
    _run_ops(ops)
    assert kernel_calls == ["rms_norm", "flash_attention"]  # the check's own calls only
    assert ops.verdicts("cpu") is None


@pytest.mark.triton
@INTERPRETER_ONLY
def test_triton_mode_on_cpu_tensors_uses_pytorch_and_says_why(kernel_calls):
    ops = Ops("triton")  # kernels on CUDA only, the default
    with pytest.warns(KernelCheckWarning) as record:
        results = _run_ops(ops)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("run on cuda tensors only, so PyTorch computes it" in m for m in messages)
    assert "rms_norm got cpu tensors" in messages[0] and "attention got cpu tensors" in messages[1]
    for got, want in zip(results, _pytorch()):
        assert torch.equal(got, want)
    assert kernel_calls == []
    with warnings_as_errors():  # said once per op and reason, not on every call
        _run_ops(ops)


@pytest.mark.triton
@INTERPRETER_ONLY
def test_triton_mode_takes_the_kernels_where_they_apply(kernel_calls):
    ops = Ops("triton", kernel_devices=("cpu",))
    for got, want in zip(_run_ops(ops), _pytorch()):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert kernel_calls == ["rms_norm", "flash_attention"]
    kernel_calls.clear()
    with pytest.warns(KernelCheckWarning, match=r"attention inputs \(q torch.float32.*fp16/bf16, head_dim in"):
        _run_ops(ops, torch.float32)  # fp32 attention is PyTorch's, fp32 RMSNorm the kernel's
    assert kernel_calls == ["rms_norm"]


def test_triton_mode_without_a_loadable_kernel_raises_by_name(monkeypatch):
    def missing(op):
        raise ImportError(f"No module named 'triton' (loading {op})")

    monkeypatch.setattr(ops_module, "import_kernel", missing)
    x, w, q, k, v = _inputs()
    ops = Ops("triton", kernel_devices=("cpu",))  # CPU stands in for CUDA here
    with pytest.raises(RuntimeError, match="the Triton kernel for rms_norm cannot be loaded for cpu tensors "
                                           r"\(ImportError: No module named 'triton'"):
        ops.rms_norm(x, w, 1e-5)
    with pytest.raises(RuntimeError, match="kernel for attention cannot be loaded"):
        ops.attention(q, k, v)
    # "auto" reports the missing kernels once, then computes with PyTorch.
    auto = Ops("auto", kernel_devices=("cpu",))
    with pytest.warns(KernelCheckWarning) as record:
        results = _run_ops(auto)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "Triton kernel for rms_norm unavailable on cpu", "Triton kernel for attention unavailable on cpu"]
    for got, want in zip(results, _pytorch()):
        assert torch.equal(got, want)
    assert [v.passed for v in auto.verdicts("cpu").values()] == [False, False]
    assert "kernel unavailable (ImportError" in auto.verdicts("cpu")["attention"].reason


def test_auto_on_cpu_checks_and_imports_nothing(monkeypatch):
    def must_not_load(op):
        raise AssertionError(f"kernel {op} loaded on CPU")

    monkeypatch.setattr(ops_module, "import_kernel", must_not_load)
    ops = Ops("auto")
    with warnings_as_errors():
        for got, want in zip(_run_ops(ops), _pytorch()):
            assert torch.equal(got, want)
        verdicts = ops.self_check("cpu")
    assert set(verdicts) == {"rms_norm", "attention"}
    assert all(not v.passed and "not checked" in v.reason for v in verdicts.values())


def test_error_rule_by_hand():
    """Output within 2x PyTorch's error, gradients within 3x, plus a floor of two fp32 roundings of
    the reference's largest magnitude."""
    eps32 = torch.finfo(torch.float32).eps
    ref = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.25]), torch.tensor([4.0])]
    torch_low = [ref[0] + torch.tensor([0.01, 0.0]), ref[1] - torch.tensor([0.0, 0.02]), ref[2] + 0.1]
    kernel = [ref[0] + torch.tensor([0.0, 0.02]), ref[1] + torch.tensor([0.059, 0.0]), ref[2] - 0.3]
    errors = compare_to_reference("rms_norm", kernel, torch_low, ref)
    assert list(errors) == ["y", "dx", "dweight"]
    assert errors["y"].kernel == pytest.approx(0.02) and errors["y"].torch == pytest.approx(0.01)
    assert errors["y"].bound == pytest.approx(2 * 0.01 + 2 * eps32 * 2.0) and errors["y"].passed
    assert errors["dx"].bound == pytest.approx(3 * 0.02 + 2 * eps32 * 0.5) and errors["dx"].passed
    assert errors["dweight"].bound == pytest.approx(3 * 0.1 + 2 * eps32 * 4.0) and errors["dweight"].passed
    kernel[0] = ref[0] + torch.tensor([0.0, 0.0201])  # just over 2x for the output
    kernel[1] = ref[1] + torch.tensor([0.0, 0.061])  # just over 3x for a gradient
    errors = compare_to_reference("rms_norm", kernel, torch_low, ref)
    assert [e.passed for e in errors.values()] == [False, False, True]
    with pytest.raises(ValueError, match="shorter"):  # every output and gradient is compared
        compare_to_reference("rms_norm", kernel[:2], torch_low[:2], ref[:2])
    # NaN never passes; an exact PyTorch result leaves only the floor.
    assert not TensorError(float("nan"), 0.1, 0.2).passed
    exact = compare_to_reference("attention", [ref[0] + 1e-7] * 4, [ref[0]] * 4, [ref[0]] * 4)["out"]
    assert exact.torch == 0 and exact.bound == pytest.approx(2 * eps32 * 2.0) and exact.passed


@pytest.mark.triton
@INTERPRETER_ONLY
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_self_check_passes_the_real_kernels(dtype):
    state = torch.random.get_rng_state()
    ops = Ops("auto", kernel_devices=("cpu",))
    # Called from evaluation code too (an unchecked device met under "auto"): it needs gradients.
    with warnings_as_errors(), torch.inference_mode(), torch.no_grad():
        verdicts = ops.self_check("cpu", dtype, shapes=TINY, allow_cpu=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert set(verdicts) == {"rms_norm", "attention"} and ops.verdicts("cpu") == verdicts
    for op, names in (("rms_norm", ["y", "dx", "dweight"]), ("attention", ["out", "dq", "dk", "dv"])):
        verdict = verdicts[op]
        assert verdict.passed and list(verdict.errors) == names, verdict
        assert all(0 < e.kernel <= e.bound for e in verdict.errors.values())
        assert str(verdict).startswith(f"{op}: kernel (passed in {str(dtype)[6:]}: ")


@pytest.mark.triton
@INTERPRETER_ONLY
def test_a_wrong_kernel_is_switched_off_loudly(monkeypatch, kernel_calls):
    """RMSNorm returning 1% too much fails the check: "auto" warns, naming the op and the errors,
    and computes RMSNorm with PyTorch; the attention kernel passes and stays."""
    import kernels.rmsnorm

    spied = kernels.rmsnorm.rms_norm
    monkeypatch.setattr(kernels.rmsnorm, "rms_norm", lambda x, w, eps, **kw: spied(x, w, eps, **kw) * 1.01)
    ops = Ops("auto", kernel_devices=("cpu",))
    with pytest.warns(KernelCheckWarning) as record:
        verdicts = ops.self_check("cpu", torch.float16, shapes=TINY, allow_cpu=True)
    (message,) = [str(w.message) for w in record]
    assert message.startswith("SELF-CHECK FAILED: the Triton kernel for rms_norm on cpu (float16)")
    assert "y " in message and "vs PyTorch" in message and "PyTorch computes rms_norm on cpu" in message
    assert not verdicts["rms_norm"].passed and verdicts["attention"].passed
    assert not verdicts["rms_norm"].errors["y"].passed
    kernel_calls.clear()
    for got, want in zip(_run_ops(ops), _pytorch()):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    assert kernel_calls == ["flash_attention"]
    assert torch.equal(_run_ops(ops)[0], _pytorch()[0])  # RMSNorm: PyTorch's, bit for bit


@pytest.mark.triton
@INTERPRETER_ONLY
def test_a_raising_kernel_is_switched_off(monkeypatch, kernel_calls):
    import kernels.attention

    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(kernels.attention, "flash_attention", broken)
    ops = Ops("auto", kernel_devices=("cpu",))
    with pytest.warns(KernelCheckWarning, match="kernel for attention raised on cpu .*illegal memory access"):
        verdicts = ops.self_check("cpu", torch.float16, shapes=TINY, allow_cpu=True)
    assert verdicts["rms_norm"].passed and not verdicts["attention"].passed
    assert verdicts["attention"].reason == "kernel raised RuntimeError: illegal memory access"
    kernel_calls.clear()
    _, out = _run_ops(ops)
    assert torch.equal(out, _pytorch()[1]) and kernel_calls == ["rms_norm"]
    # Under "triton" the failure is reported, but the explicit choice stands.
    triton = Ops("triton", kernel_devices=("cpu",))
    with pytest.warns(KernelCheckWarning, match="the kernel stays in use"):
        triton.self_check("cpu", torch.float16, shapes=TINY, allow_cpu=True)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run_ops(triton)


def test_auto_checks_an_unchecked_device_before_its_first_kernel_call(monkeypatch):
    checks = []

    def fake_check(self, device, dtype=torch.bfloat16, *, shapes=CheckShapes(), allow_cpu=False):
        checks.append((str(device), dtype, allow_cpu))
        verdicts = {op: Verdict(op, False, "stand-in") for op in ("rms_norm", "attention")}
        self._verdicts[str(device)] = verdicts
        return verdicts

    monkeypatch.setattr(Ops, "self_check", fake_check)
    ops = Ops("auto", kernel_devices=("cpu",))
    for got, want in zip(_run_ops(ops), _pytorch()):
        assert torch.equal(got, want)
    _run_ops(ops)
    assert checks == [("cpu", torch.float16, True)]  # once, in the inputs' half precision


def test_check_shapes_follow_the_model():
    from engine.model.config import LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8)
    shapes = CheckShapes.for_model(config)
    assert (shapes.head_dim, shapes.heads // shapes.kv_heads, shapes.hidden) == (128, 4, 4096)
    assert (shapes.batch, shapes.kv_heads, shapes.rows) == (1, 2, 36)
    q_bytes = 2 * shapes.batch * shapes.seq * shapes.heads * shapes.head_dim
    assert q_bytes <= 512 * 1024 and 2 * shapes.rows * shapes.hidden <= 512 * 1024  # bf16: small

