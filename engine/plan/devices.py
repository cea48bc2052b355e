"""The GPUs the planner knows: peak, memory, links, and the two efficiencies its time model uses.

Peaks are the dense bf16 tensor-core figures of ``engine.train.metrics`` (the ones the training log
divides by for MFU); memory sizes, HBM bandwidth, NVLink and inter-node bandwidth are the vendors'
data-sheet figures for an 8-GPU server (DGX / HGX) with one InfiniBand NIC per GPU. Link bandwidths
are per GPU and per direction, which is what a ring collective moves data at.

Two constants per device describe how much of that hardware the engine's step gets (see
:mod:`engine.plan.timing`): ``matmul_efficiency``, the fraction of the peak that large GEMMs reach,
and ``bandwidth_efficiency``, the fraction of any nominal bandwidth (HBM, NVLink, network) that
memory-bound kernels and collectives reach. They are fitted for the A100 on a third of the rows of
Megatron-LM's published A100 table (:mod:`engine.plan.published`); no text copy of Megatron-LM's H100
table was found, so the H100 and H200 entries carry the A100 values, unvalidated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.train.metrics import DEVICE_PEAK_BF16_TFLOPS

GIB = 2**30

# Fitted on rows 1, 6 and 10 of Megatron-LM's A100 table (engine.plan.published.fit_device).
A100_MATMUL_EFFICIENCY = 0.71
A100_BANDWIDTH_EFFICIENCY = 1.0


@dataclass(frozen=True)
class Device:
    """One GPU model in a multi-GPU server."""
    name: str
    peak_tflops: float            # dense bf16
    memory_bytes: int             # HBM capacity
    hbm_gbps: float               # HBM bandwidth, GB/s
    nvlink_gbps: float            # per GPU, per direction, GB/s
    network_gbps: float           # between servers, per GPU, per direction, GB/s
    matmul_efficiency: float = A100_MATMUL_EFFICIENCY
    bandwidth_efficiency: float = A100_BANDWIDTH_EFFICIENCY
    nvlink_latency_s: float = 10e-6     # per collective or p2p exchange inside a server
    network_latency_s: float = 25e-6    # per collective or p2p exchange across servers

    def __post_init__(self):
        for field in ("peak_tflops", "memory_bytes", "hbm_gbps", "nvlink_gbps", "network_gbps"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"device {self.name}: {field} must be a positive number, got {value!r}")
        for field in ("matmul_efficiency", "bandwidth_efficiency"):
            value = getattr(self, field)
            if not 0 < value <= 1:
                raise ValueError(f"device {self.name}: {field} must be in (0, 1], got {value!r}")

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


DEVICES: dict[str, Device] = {
    "A100-40GB": Device("A100-40GB", DEVICE_PEAK_BF16_TFLOPS["A100"], 40 * GIB, 1555.0, 300.0, 25.0),
    "A100-80GB": Device("A100-80GB", DEVICE_PEAK_BF16_TFLOPS["A100"], 80 * GIB, 2039.0, 300.0, 25.0),
    "H100": Device("H100", DEVICE_PEAK_BF16_TFLOPS["H100 SXM"], 80 * GIB, 3350.0, 450.0, 50.0),
    "H200": Device("H200", DEVICE_PEAK_BF16_TFLOPS["H200"], 143771 * 2**20, 4800.0, 450.0, 50.0),
}

OVERRIDABLE = ("peak_tflops", "memory_gib", "hbm_gbps", "nvlink_gbps", "network_gbps",
               "matmul_efficiency", "bandwidth_efficiency")


def get_device(name: str, **overrides) -> Device:
    """A device of the table by name, with any of :data:`OVERRIDABLE` replaced (``memory_gib`` in
    GiB); unknown names and fields are refused, listing the known ones."""
    if name not in DEVICES:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(DEVICES)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown device field(s) {unknown}; overridable: {', '.join(OVERRIDABLE)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "memory_gib" in changes:
        changes["memory_bytes"] = int(changes.pop("memory_gib") * GIB)
    return dataclasses.replace(DEVICES[name], **changes)
