"""The one dispatch point for the model's hot ops: Triton kernels on CUDA, plain PyTorch elsewhere.

The model calls only these functions. On CUDA tensors, with Triton importable and kernels enabled,
they run ``kernels.rmsnorm`` / ``kernels.attention``; otherwise (CPU, fp32 attention, unsupported head
sizes, kernels switched off) they run the PyTorch code below, which computes exactly what Hugging Face
``LlamaForCausalLM`` computes. Attention also falls back when batch * heads exceeds the kernel's
launch grid (large inference batches).

Kernels are switched off for the whole process by ``use_kernels(False)`` or the environment variable
``LTU_DISABLE_KERNELS=1``.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

_kernels_enabled = os.environ.get("LTU_DISABLE_KERNELS", "0") not in ("1", "true", "yes")
_failed_imports: set[str] = set()

# Attention runs the kernel in half precision only: fp32 runs are the exact-reference path.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def use_kernels(enabled: bool) -> None:
    """Enable (default) or disable the Triton kernels for this process."""
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


def kernels_enabled() -> bool:
    return _kernels_enabled


def _kernel_module(name: str):
    """Import ``kernels.<name>`` lazily; None (with one warning) when Triton or the file is missing."""
    if name in _failed_imports:
        return None
    try:
        import importlib
        return importlib.import_module(f"kernels.{name}")
    except Exception as e:  # no Triton, no driver, or the kernel file is missing
        _failed_imports.add(name)
        warnings.warn(f"Triton kernel kernels.{name} unavailable ({e}); using PyTorch", stacklevel=3)
        return None


def _want_kernel(*tensors: torch.Tensor) -> bool:
    return _kernels_enabled and all(t.is_cuda for t in tensors)


# --------------------------------------------------------------------------------------- RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Llama defines it: fp32 statistics, normalised x cast back, then times weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x``."""
    if _want_kernel(x, weight) and (mod := _kernel_module("rmsnorm")) is not None:
        return mod.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


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
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention with PyTorch's scaled_dot_product_attention, [b, s, h, d] layout."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> [b, heads, s, d]
    # enable_gqa lets SDPA broadcast the key/value heads instead of copying them.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None) -> torch.Tensor:
    """Softmax attention: q [b, s, h, d], k and v [b, s, kv_h, d] (h a multiple of kv_h) -> [b, s, h, d].

    ``softmax_scale`` defaults to 1/sqrt(d).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] \
            or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (expected [b, s, h, d] and [b, s, kv_h, d])")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if (_want_kernel(q, k, v) and q.dtype in _FLASH_DTYPES
            and (mod := _kernel_module("attention")) is not None and mod.supports(q, k, v)):
        return mod.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
