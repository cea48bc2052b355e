"""The model's hot ops, and the explicit choice of who computes them: Triton kernels or PyTorch.

The PyTorch functions here (``rms_norm_reference``, ``apply_rotary``, ``attention_reference``) are
the one PyTorch version of each op: they compute exactly what Hugging Face ``LlamaForCausalLM``
computes, run on every device, and are what the kernels are checked against. An :class:`Ops` object
chooses per call between them and the Triton kernels in ``kernels/``; the model's modules hold one
(``Llama(config, ops=Ops("auto"))``, ``model.set_ops(ops)``), so training and evaluation can choose
differently. Modes:

    "torch"   PyTorch always (the exact reference; the default of a model built without ``ops``).
    "triton"  a kernel wherever one applies: CUDA tensors of a dtype and shape the kernel supports.
              Elsewhere PyTorch, with one warning per op and reason saying why. Raises, naming the
              op, when Triton or the kernel cannot be imported for a CUDA tensor.
    "auto"    on CUDA, the kernels that pass :meth:`Ops.self_check` on that device; PyTorch
              elsewhere (CPU: PyTorch, nothing checked or imported).

The self-check runs each kernel once on a small random input (a few hundred KB), forward and
backward, and applies flash-attention's error rule to every output and gradient: the kernel's max
abs error against a float64 computation of the op is at most 2x (output) or 3x (gradients) that of
the PyTorch op run in the same low precision. A kernel that fails or raises is switched off for that
op under "auto", with a warning naming the op and the errors. The training loop calls it once per
process and logs the verdicts; an "auto" object that meets a CUDA device it has not checked checks
it before its first kernel call. Random inputs come from a private generator: the global RNG (and so
a resumed run) is not touched.

Attention runs its kernel in fp16 / bf16 only (fp32 attention is the exact path), and falls back
where ``kernels.attention.supports`` refuses the shapes (head sizes, batch * heads beyond the launch
grid, row offsets beyond 32 bits without TMA).
"""
from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MODES = ("auto", "triton", "torch")
KERNEL_OPS = ("rms_norm", "attention")  # the ops that have a Triton kernel (RoPE has none)
_KERNEL_MODULES = {"rms_norm": "rmsnorm", "attention": "attention"}
# Attention runs the kernel in half precision only: fp32 runs are the exact-reference path.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
# Output first, then gradients, with the error factor flash-attention's rule allows each.
_CHECKED_TENSORS = {"rms_norm": (("y", 2.0), ("dx", 3.0), ("dweight", 3.0)),
                    "attention": (("out", 2.0), ("dq", 3.0), ("dk", 3.0), ("dv", 3.0))}


class KernelCheckWarning(RuntimeWarning):
    """A Triton kernel failed its self-check, could not be loaded, or was passed over for PyTorch."""


# --------------------------------------------------------------------------------------- RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama defines it: fp32 statistics, normalised x cast back, then times weight.
    (float64 inputs keep float64 statistics: the self-check's exact computation.)"""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# ------------------------------------------------------------------------------ rotary embedding
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension (the HF/GPT-NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, s, h, d] and k [b, s, kv_h, d] by angles given as cos/sin [b or 1, s, d]."""
    cos = cos.unsqueeze(-2)  # broadcast over heads
    sin = sin.unsqueeze(-2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ------------------------------------------------------------------------------------- attention
def check_attention_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
            or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (expected [b, s, h, d] and [b, s, kv_h, d])")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention with PyTorch's scaled_dot_product_attention: q [b, s, h, d], k and v
    [b, s, kv_h, d] (h a multiple of kv_h) -> [b, s, h, d]; ``softmax_scale`` defaults to 1/sqrt(d)."""
    check_attention_shapes(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [b, heads, s, d]
    # enable_gqa lets SDPA broadcast the key/value heads instead of copying them.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------ self-check
@dataclass(frozen=True)
class CheckShapes:
    """Inputs of the self-check: a few hundred KB per tensor in bf16, lengths that are not multiples
    of the kernels' tiles (so the masked tails run too) and grouped-query attention."""
    batch: int = 2
    seq: int = 200
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    rows: int = 300
    hidden: int = 512

    @classmethod
    def for_model(cls, config) -> "CheckShapes":
        """The model's head size, query-per-KV-head group and hidden size, at the default scale."""
        group = config.num_attention_heads // config.num_key_value_heads
        kv_heads = min(config.num_key_value_heads, 2)
        rows = max(8, min(300, 150_000 // config.hidden_size))
        return cls(batch=1 if config.head_dim > 64 else 2, heads=kv_heads * group, kv_heads=kv_heads,
                   head_dim=config.head_dim, rows=rows, hidden=config.hidden_size)


@dataclass(frozen=True)
class TensorError:
    """Max abs errors of one output or gradient against the float64 computation."""
    kernel: float
    torch: float  # the PyTorch op in the same dtype as the kernel
    bound: float  # factor * torch + a rounding floor

    @property
    def passed(self) -> bool:
        return self.kernel <= self.bound  # False for NaN


@dataclass(frozen=True)
class Verdict:
    """The self-check of one op's kernel on one device."""
    op: str
    passed: bool  # whether "auto" runs the kernel
    reason: str  # one line: what was compared, or why the kernel is not used
    errors: dict[str, TensorError] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.op}: {'kernel' if self.passed else 'PyTorch'} ({self.reason})"


def format_errors(errors: dict[str, TensorError]) -> str:
    return ", ".join(f"{name} {e.kernel:.3g} vs PyTorch {e.torch:.3g} (bound {e.bound:.3g})"
                     for name, e in errors.items())


def compare_to_reference(op: str, kernel_out: list[torch.Tensor], torch_out: list[torch.Tensor],
                         reference: list[torch.Tensor]) -> dict[str, TensorError]:
    """Flash-attention's error rule, tensor by tensor (output first, then gradients).

    The floor, two fp32 roundings of the reference's largest magnitude, keeps a PyTorch error of
    exactly zero from demanding an exact kernel; it is far below any bf16 or fp16 rounding.
    """
    errors = {}
    for (name, factor), got, low, ref in zip(_CHECKED_TENSORS[op], kernel_out, torch_out, reference,
                                             strict=True):
        ref = ref.double()
        kernel_err = (got.double() - ref).abs().max().item()
        torch_err = (low.double() - ref).abs().max().item()
        floor = 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
        errors[name] = TensorError(kernel_err, torch_err, factor * torch_err + floor)
    return errors


def _forward_backward(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def _check_inputs(op: str, shapes: CheckShapes, device: torch.device, dtype: torch.dtype):
    """(inputs, output gradient, module -> kernel function, PyTorch function) for one op."""
    gen = torch.Generator(device="cpu").manual_seed(1234)  # private: the global RNG stays as it was
    rand = lambda *shape, scale=1.0, shift=0.0: (shift + scale * torch.randn(*shape, generator=gen)).to(device, dtype)
    if op == "rms_norm":
        x = rand(shapes.rows, shapes.hidden, scale=2.0, shift=0.5)
        w = rand(shapes.hidden, scale=0.3, shift=1.0)
        eps = 1e-5
        return ([x, w], rand(shapes.rows, shapes.hidden), lambda mod: lambda x, w: mod.rms_norm(x, w, eps),
                lambda x, w: rms_norm_reference(x, w, eps))
    b, s, d = shapes.batch, shapes.seq, shapes.head_dim
    q, k, v = rand(b, s, shapes.heads, d), rand(b, s, shapes.kv_heads, d), rand(b, s, shapes.kv_heads, d)
    return ([q, k, v], rand(b, s, shapes.heads, d), lambda mod: lambda q, k, v: mod.flash_attention(q, k, v),
            lambda q, k, v: attention_reference(q, k, v))


def check_kernel(op: str, module, device: torch.device, dtype: torch.dtype,
                 shapes: CheckShapes) -> dict[str, TensorError]:
    """Run ``op``'s kernel from ``module``, the PyTorch op in ``dtype`` and in float64 on one input."""
    # Gradients are needed even when called from evaluation code (no_grad, inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        inputs, grad_out, kernel_fn, torch_fn = _check_inputs(op, shapes, device, dtype)
        got = _forward_backward(kernel_fn(module), inputs, grad_out)
        low = _forward_backward(torch_fn, inputs, grad_out)
        ref = _forward_backward(torch_fn, [t.double() for t in inputs], grad_out.double())
    return compare_to_reference(op, got, low, ref)


def import_kernel(op: str):
    """The module ``kernels.<name>`` holding ``op``'s kernel (raises if Triton or it is missing)."""
    return importlib.import_module(f"kernels.{_KERNEL_MODULES[op]}")


# ------------------------------------------------------------------------------------------ Ops
def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class Ops:
    """Who computes the hot ops: ``Ops("auto" | "triton" | "torch")`` (see the module doc).

    ``kernel_devices``: the device types the kernels run on. CUDA only, except in Triton's CPU
    interpreter (TRITON_INTERPRET=1, the tests), where adding "cpu" runs the kernels on CPU tensors.
    """

    def __init__(self, mode: str = "auto", *, kernel_devices: tuple[str, ...] = ("cuda",)):
        if mode not in MODES:
            raise ValueError(f"Ops: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(kernel_devices, str) or not all(isinstance(d, str) for d in kernel_devices):
            raise TypeError(f"Ops: kernel_devices must be a tuple of device types, got {kernel_devices!r}")
        self._mode = mode
        self.kernel_devices = tuple(kernel_devices)
        self._verdicts: dict[str, dict[str, Verdict]] = {}  # device -> op -> verdict (not "torch")
        self._modules: dict[str, object] = {}  # op -> imported kernel module
        self._said: set[str] = set()  # warnings already given by this object

    @property
    def mode(self) -> str:
        return self._mode

    def __repr__(self) -> str:
        return f"Ops({self._mode!r})"

    # ------------------------------------------------------------------------------------ ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of ``x`` (HF Llama's casting order)."""
        mod = self._kernel("rms_norm", x, weight)
        if mod is not None:
            if mod.supports(x, weight):
                return mod.rms_norm(x, weight, eps)
            self._passed_over("rms_norm", f"x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} "
                                          f"{tuple(weight.shape)}", f"hidden size up to {mod.MAX_HIDDEN}")
        return rms_norm_reference(x, weight, eps)

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q and k (PyTorch in every mode: there is no kernel for it)."""
        return apply_rotary(q, k, cos, sin)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None) -> torch.Tensor:
        """Softmax attention: q [b, s, h, d], k and v [b, s, kv_h, d] (h a multiple of kv_h) ->
        [b, s, h, d]. ``softmax_scale`` defaults to 1/sqrt(d)."""
        check_attention_shapes(q, k, v)
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(q.shape[-1])
        mod = self._kernel("attention", q, k, v)
        if mod is not None:
            if q.dtype in _FLASH_DTYPES and mod.supports(q, k, v):
                return mod.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
            self._passed_over("attention", f"q {q.dtype} {tuple(q.shape)}, k/v {tuple(k.shape)}",
                              f"fp16/bf16, head_dim in {mod.SUPPORTED_HEAD_DIMS}, batch * heads up to "
                              f"{mod.MAX_BATCH_HEADS}")
        return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)

    # ----------------------------------------------------------------------------- dispatch
    def _kernel(self, op: str, *tensors: torch.Tensor):
        """The kernel module to run ``op`` with on these tensors, or None for PyTorch."""
        if self._mode == "torch":
            return None
        device = tensors[0].device
        if device.type not in self.kernel_devices:
            if self._mode == "triton":
                self._say(f"device {device.type} {op}", f"Ops('triton'): {op} got {device.type} tensors; the "
                          f"Triton kernels run on {'/'.join(self.kernel_devices)} tensors only, so PyTorch "
                          "computes it")
            return None
        if self._mode == "triton":
            return self._load(op, device)
        verdicts = self._verdicts.get(_device_key(device))
        if verdicts is None:  # "auto" on a device nobody checked: check it before trusting a kernel
            dtype = tensors[0].dtype if tensors[0].dtype in _FLASH_DTYPES else torch.bfloat16
            verdicts = self.self_check(device, dtype, allow_cpu=True)
        return self._modules.get(op) if verdicts[op].passed else None

    def _load(self, op: str, device: torch.device):
        """The kernel module ("triton" mode): a load failure raises, naming the op."""
        if op not in self._modules:
            try:
                self._modules[op] = import_kernel(op)
            except Exception as exc:
                raise RuntimeError(f"Ops('triton'): the Triton kernel for {op} cannot be loaded for {device} "
                                   f"tensors ({type(exc).__name__}: {exc}); install Triton, or use mode "
                                   "'auto' or 'torch'") from exc
        return self._modules[op]

    def _passed_over(self, op: str, inputs: str, supported: str) -> None:
        if self._mode == "triton":
            self._say(f"unsupported {op} {inputs}", f"Ops('triton'): {op} inputs ({inputs}) are outside "
                      f"what its kernel takes ({supported}); PyTorch computes them")

    def _say(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, KernelCheckWarning, stacklevel=4)

    # --------------------------------------------------------------------------- self-check
    def self_check(self, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *,
                   shapes: CheckShapes = CheckShapes(), allow_cpu: bool = False) -> dict[str, Verdict]:
        """Check every kernel on ``device`` against the PyTorch op; returns {op: Verdict} for the log.

        ``dtype``: bf16 on GPUs; in Triton's CPU interpreter (``allow_cpu=True``, the tests) fp16 or
        fp32, since the interpreter's bf16 dot products are wrong. Without ``allow_cpu`` a CPU device
        is not checked: its verdicts say PyTorch. Under "auto" the verdicts decide which kernels run
        on that device from now on; under "triton" a failure is reported but the kernels stay (the
        explicit choice); under "torch" nothing changes. Each failure warns, naming the op and errors.
        """
        device = torch.device(device)
        if device.type == "cpu" and not allow_cpu:
            verdicts = {op: Verdict(op, False, "not checked: the Triton kernels run on CUDA only")
                        for op in KERNEL_OPS}
        else:
            verdicts = {op: self._check_one(op, device, dtype, shapes) for op in KERNEL_OPS}
        if self._mode != "torch":
            self._verdicts[_device_key(device)] = verdicts
        return verdicts

    def verdicts(self, device: torch.device | str) -> dict[str, Verdict] | None:
        """The verdicts of the last self-check on ``device``, or None if it was not checked."""
        return self._verdicts.get(_device_key(device))

    def _check_one(self, op: str, device: torch.device, dtype: torch.dtype, shapes: CheckShapes) -> Verdict:
        consequence = {"auto": f"PyTorch computes {op} on {device}", "triton": "the kernel stays in use "
                       "(mode 'triton')", "torch": "PyTorch computes it anyway (mode 'torch')"}[self._mode]
        try:
            module = self._modules.get(op) or import_kernel(op)
        except Exception as exc:
            reason = f"kernel unavailable ({type(exc).__name__}: {exc})"
            warnings.warn(f"Triton kernel for {op} unavailable on {device} ({type(exc).__name__}: {exc}); "
                          f"{consequence}", KernelCheckWarning, stacklevel=3)
            return Verdict(op, False, reason)
        if self._mode != "torch":
            self._modules[op] = module
        try:
            errors = check_kernel(op, module, device, dtype, shapes)
        except Exception as exc:
            warnings.warn(f"SELF-CHECK FAILED: the Triton kernel for {op} raised on {device} "
                          f"({type(exc).__name__}: {exc}); {consequence}", KernelCheckWarning, stacklevel=3)
            return Verdict(op, False, f"kernel raised {type(exc).__name__}: {exc}")
        dtype_name = str(dtype).replace("torch.", "")
        if all(e.passed for e in errors.values()):
            return Verdict(op, True, f"passed in {dtype_name}: {format_errors(errors)}", errors)
        failed = {name: e for name, e in errors.items() if not e.passed}
        warnings.warn(f"SELF-CHECK FAILED: the Triton kernel for {op} on {device} ({dtype_name}) exceeds "
                      f"the error rule (2x PyTorch's error for the output, 3x for gradients): "
                      f"{format_errors(failed)}; {consequence}", KernelCheckWarning, stacklevel=3)
        return Verdict(op, False, f"failed in {dtype_name}: {format_errors(failed)}", errors)


TORCH_OPS = Ops("torch")  # stateless in this mode: safe to share as the modules' default
