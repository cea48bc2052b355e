"""Small launch helpers shared by the Triton kernels (no engine imports)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Dtypes every kernel here accepts for activations.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in (4) elsewhere.

    The stand-in keeps the interpreter (one program at a time) quick while still splitting work over
    several programs, so the multi-program code paths are exercised on CPU too.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _sm_count(index)
    return 4


def num_warps_for(elements: int, values_per_thread: int = 16) -> int:
    """Warps for a program that holds `elements` values per tensor, ~`values_per_thread` each (4..32)."""
    return max(4, min(32, next_power_of_2(elements) // (32 * values_per_thread)))


def check_float_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """fp32 -> `dtype`, rounding to nearest even.

    BF16_BY_HAND rounds to bfloat16 with integer ops first: the Triton interpreter's own fp32 ->
    bfloat16 cast truncates, while GPUs round to nearest even. Pass `interpreting()` for it.
    """
    if BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # keep NaN payloads as NaN
    return x.to(dtype)
