"""Launch settings for kernels/attention.py: the AttentionBlocks record, the CUDA tile candidates the
autotuner chooses from, the untuned defaults, and the choice of load path (TMA descriptors or pointer
loads) with the descriptors it needs.

Candidates are (block_m, block_n, warps, stages), per head_dim class (64: head_dim <= 64, else 128)
and kind (Hopper with TMA descriptor loads, Hopper with pointer loads, compute capability 8.x); the
first entry of each list is the default used without tuning. Every entry compiles without register
spills (no stack frame) with Triton's bundled ptxas, for sm_90 (Hopper kinds) or sm_80 (ampere), when
launched with 16-byte-aligned tensors, under Triton 3.6 and 3.9; `python tools/kernel_resources.py
[--sm 80]` reports this per entry (benchmarks/results/kernels.md holds the report), and tiles that
spill are not listed. The autotuner times the entries on the GPU and keeps the fastest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class AttentionBlocks:
    """Tiles and launch settings: forward (fwd_*), dK/dV (dkdv_*) and dQ (dq_*) kernels.

    ``*_m`` tiles queries and ``*_n`` keys. The diagonal split needs fwd_m and dq_m to be multiples
    of fwd_n and dq_n, and dkdv_n a multiple of dkdv_m.
    """

    fwd_m: int
    fwd_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_m: int
    dkdv_n: int
    dkdv_warps: int
    dkdv_stages: int
    dq_m: int
    dq_n: int
    dq_warps: int
    dq_stages: int
    preprocess_m: int = 64

    def __post_init__(self):
        tiles = {name: getattr(self, name) for name in
                 ("fwd_m", "fwd_n", "dkdv_m", "dkdv_n", "dq_m", "dq_n", "preprocess_m")}
        for name, size in tiles.items():
            if size < 16 or size & (size - 1):
                raise ValueError(f"AttentionBlocks.{name}={size}: tiles must be powers of two >= 16")
        for big, small in (("fwd_m", "fwd_n"), ("dkdv_n", "dkdv_m"), ("dq_m", "dq_n")):
            if tiles[big] % tiles[small]:
                raise ValueError(f"AttentionBlocks.{big}={tiles[big]} must be a multiple of "
                                 f"{small}={tiles[small]} (causal diagonal split)")


# Candidate lists are keyed by (head_dim class, kind): "tma" and "pointer" are the two load paths on
# Hopper (compute capability 9.x, wgmma tensor cores), "ampere" the pointer loads of compute
# capability 8.x (mma.sync, fewer registers to spare: most Hopper tiles spill there). Other
# generations get the ampere lists too; those are compiled and checked for sm_80 only.
#
# Forward tiles follow the usual choice of 128 queries x 64 keys where it fits. The dK/dV pass keeps
# two [block_n, head_dim] fp32 accumulators in registers: with TMA loads at head_dim 128, 32 x 128
# tiles spill (120 stack bytes), so that list starts from 32 x 64.
FWD_CANDIDATES = {
    (64, "pointer"): [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    (64, "tma"): [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
    (64, "ampere"): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4)],
    (128, "pointer"): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 4)],
    (128, "tma"): [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                   (128, 32, 8, 4)],
    (128, "ampere"): [(128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
}
DKDV_CANDIDATES = {
    (64, "pointer"): [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (16, 128, 4, 4)],
    (64, "tma"): [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
    (64, "ampere"): [(32, 128, 8, 3), (32, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3)],
    (128, "pointer"): [(32, 128, 8, 3), (32, 64, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2)],
    (128, "tma"): [(32, 64, 8, 3), (16, 128, 8, 3), (32, 64, 8, 4), (16, 64, 4, 3)],
    (128, "ampere"): [(32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 3), (32, 32, 4, 3)],
}
DQ_CANDIDATES = {
    (64, "pointer"): [(128, 32, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
    (64, "tma"): [(128, 32, 4, 4), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
    (64, "ampere"): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
    (128, "pointer"): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
    (128, "tma"): [(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
    (128, "ampere"): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3)],
}
INTERPRETER_BLOCKS = AttentionBlocks(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1, preprocess_m=16)
# fp32 (exact, non-TF32 dots) is for testing, not speed: its dots run on FMA units and need many
# registers, so the tiles are small.
FP32_CUDA_BLOCKS = AttentionBlocks(32, 16, 4, 2, 16, 16, 4, 2, 32, 16, 4, 2)


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def tile_kind(device: torch.device | str, use_tma: bool) -> str:
    """The candidate-list kind for a CUDA device and load path (see the lists above)."""
    if not hopper(torch.device(device)):
        return "ampere"
    return "tma" if use_tma else "pointer"


def default_blocks(head_dim: int, dtype: torch.dtype, device: torch.device | str,
                   use_tma: bool = False) -> AttentionBlocks:
    """Untuned tiles: small ones for the CPU interpreter, the first candidates on CUDA."""
    if torch.device(device).type != "cuda":
        return INTERPRETER_BLOCKS
    if dtype == torch.float32:
        return FP32_CUDA_BLOCKS
    key = (head_dim_class(head_dim), tile_kind(device, use_tma))
    return AttentionBlocks(*FWD_CANDIDATES[key][0], *DKDV_CANDIDATES[key][0], *DQ_CANDIDATES[key][0])


# Load paths: "tma" and "pointer" on Hopper (see attention._load_rows), "either" where the tuner times the
# candidates of both and keeps the fastest (Hopper, when the tensors allow descriptors), and
# "ampere", pointer loads with the tiles of compute capability 8.x.
TILE_KINDS_OF_PATH = {"tma": ("tma",), "pointer": ("pointer",), "either": ("tma", "pointer"),
                      "ampere": ("ampere",)}
LOAD_PATHS = tuple(TILE_KINDS_OF_PATH)


# Descriptors of query-side tensors hold [1, BLOCK_M, 1, HEAD_DIM] tiles, key-side ones BLOCK_N rows.
QUERY_SIDE_DESCS = ("q_desc", "o_desc", "do_desc", "dq_desc")
KEY_SIDE_DESCS = ("k_desc", "v_desc", "dk_desc", "dv_desc")


def set_descriptor_blocks(nargs: dict) -> None:
    """Give each TMA descriptor the tile shape of the config about to run (a launch pre-hook)."""
    for name in QUERY_SIDE_DESCS + KEY_SIDE_DESCS:
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            rows = nargs["BLOCK_M"] if name in QUERY_SIDE_DESCS else nargs["BLOCK_N"]
            desc.block_shape = [1, rows, 1, nargs["HEAD_DIM"]]


def tma_addressable(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte-aligned base, 16-byte-multiple strides and a unit last stride."""
    size = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s * size % 16 == 0 for s in t.stride()[:-1]))


def hopper(device: torch.device) -> bool:
    """Compute capability 9.x: tensor-memory-accelerator copies and the lists tuned for them. (Later
    generations have TMA too; they take the ampere lists, since these tiles are checked for sm_90.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def load_path(use_tma: bool | None, blocks: AttentionBlocks | None, q, k, v) -> str:
    """One of LOAD_PATHS for flash_attention's use_tma argument (see its doc).

    Explicit blocks without use_tma take pointer loads, the path default_blocks() picks tiles for
    by default; fp32 (the exact testing path) never takes TMA.
    """
    if needs_wide_row_offsets(q, k, v):
        # Pointer loads compute row offsets in 32 bits; TMA addresses rows by coordinate.
        if use_tma is False or not tma_possible(q, k, v):
            raise ValueError(f"flash_attention: seq {q.shape[1]} x row stride reaches 2^31 elements, "
                             "beyond the pointer loads' 32-bit row offsets; this length needs the TMA "
                             "path (Hopper, fp16/bf16, 16-byte-aligned tensors, use_tma not False)")
        return "tma"
    if q.device.type == "cuda" and not hopper(q.device) and not use_tma:
        return "ampere"
    if not use_tma:
        tunable = use_tma is None and blocks is None and tma_possible(q, k, v)
        return "either" if tunable else "pointer"
    if q.device.type == "cuda" and not hopper(q.device):
        raise ValueError(f"flash_attention: use_tma=True needs a compute capability 9.x GPU (Hopper); "
                         f"{torch.cuda.get_device_name(q.device)} has "
                         f"{'.'.join(map(str, torch.cuda.get_device_capability(q.device)))}")
    if q.dtype == torch.float32:
        raise ValueError("flash_attention: use_tma=True takes fp16 or bf16 tensors; fp32 runs with "
                         "pointer loads (use_tma=None or False)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not tma_addressable(t):
            raise ValueError(f"flash_attention: use_tma=True needs 16-byte-aligned data pointers and "
                             f"strides; {name} has data pointer {t.data_ptr()} and strides "
                             f"{tuple(t.stride())} ({t.element_size()}-byte elements; pass contiguous "
                             "tensors, or use_tma=None)")
    return "tma"


MAX_ROW_OFFSET = 2**31


def needs_wide_row_offsets(q, k, v) -> bool:
    """Whether seq x row stride of an input or of the [b, s, h, d] output reaches 2^31 elements."""
    seq, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    return seq * max(q.stride(1), k.stride(1), v.stride(1), heads * head_dim) >= MAX_ROW_OFFSET


def tma_possible(q, k, v) -> bool:
    return (hopper(q.device) and q.dtype != torch.float32
            and all(tma_addressable(t) for t in (q, k, v)))


def descriptors(path: str, *tensors: torch.Tensor) -> tuple:
    """[batch, seq, heads, head_dim] TMA descriptors (tile shapes set at launch), or Nones."""
    if path not in ("tma", "either"):
        return (None,) * len(tensors)
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 16, 1, t.shape[-1]])
                 for t in tensors)
