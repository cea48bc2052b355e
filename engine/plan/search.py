"""Every layout of a cluster: which fit, how fast each runs, why the others cannot run.

A layout is (TP, PP, DP, virtual stages); its variants are the micro batch (1, 2, 4, 8), sequence
parallelism, the distributed optimizer (ZeRO-1) and recomputation (tried only where a variant does
not fit without it, since it only adds time). A layout is refused, with the
reason, when the engine would refuse it (``validate_layout``: TP must divide the heads, key/value
heads and MLP width, PP x virtual stages the layers; ``check_microbatches``: at least PP
microbatches, a multiple of PP when interleaving), when TP would leave a server, when the global
batch does not split over DP, or when no variant fits in memory on the rank that needs the most.
Memory usable on a GPU is its HBM less :data:`MEMORY_RESERVE_BYTES` and
:data:`MEMORY_RESERVE_FRACTION` (CUDA context, NCCL buffers, allocator fragmentation). The layouts
that fit are ranked by predicted step time, each with its fastest variant; those within
:data:`TIME_TIE` of the fastest come first by memory, least first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import RunConfig, config_from_dict, config_to_dict
from engine.model.config import LlamaConfig
from engine.parallel.state import validate_layout
from engine.plan.devices import GIB, Device
from engine.plan.memory import Layout, MemoryModel, PipelinePlans, RankMemory, Workload
from engine.plan.timing import ENGINE, ModelShape, StepTime, TimeModel
from engine.train.schedules import check_microbatches

MEMORY_RESERVE_BYTES = 2 * GIB
MEMORY_RESERVE_FRACTION = 0.05
# Layouts predicted within this fraction of the fastest are ordered by memory: the time model is not
# that precise, and headroom is worth more than a prediction's last percent.
TIME_TIE = 0.01
MICRO_BATCHES = (1, 2, 4, 8)
MAX_VIRTUAL_STAGES = 8


@dataclass(frozen=True)
class Cluster:
    device: Device
    gpus: int
    gpus_per_node: int

    def __post_init__(self):
        for name in ("gpus", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def usable_bytes(self) -> int:
        return int(self.device.memory_bytes * (1 - MEMORY_RESERVE_FRACTION)) - MEMORY_RESERVE_BYTES


@dataclass(frozen=True)
class Candidate:
    """One variant of a layout with its predictions; ``time`` is None when it does not fit."""
    layout: Layout
    memory: RankMemory
    time: StepTime | None


@dataclass(frozen=True)
class Rejected:
    tp: int
    pp: int
    dp: int
    virtual_stages: int
    reason: str

    def describe(self) -> str:
        vp = f" vp {self.virtual_stages}" if self.virtual_stages > 1 else ""
        return f"tp {self.tp} pp {self.pp} dp {self.dp}{vp}"


@dataclass
class Plan:
    cluster: Cluster
    config: LlamaConfig
    workload: Workload
    ranked: list[Candidate] = field(default_factory=list)      # best variant of each fitting layout
    variants: list[Candidate] = field(default_factory=list)    # every fitting variant
    rejected: list[Rejected] = field(default_factory=list)
    smallest_oom: Candidate | None = None                      # the least memory of what did not fit

    @property
    def best(self) -> Candidate:
        if not self.ranked:
            raise ValueError(self.why_none())
        return self.ranked[0]

    def why_none(self) -> str:
        """Why no layout runs: too many GPUs for the model and batch, or nothing fits in memory."""
        c, w, cfg = self.cluster, self.workload, self.config
        tp_max = max(t for t in range(1, c.gpus_per_node + 1) if c.gpus_per_node % t == 0 and _splits(cfg, t))
        most = tp_max * cfg.num_hidden_layers * w.global_batch_size
        head = f"no layout of {c.gpus} x {c.device.name} runs this model (global batch {w.global_batch_size}, " \
               f"sequence {w.seq_length})"
        if c.gpus > most:
            return (f"{head}: it can use at most {most} GPUs (TP up to {tp_max} inside a server, PP up to the "
                    f"{cfg.num_hidden_layers} layers, DP up to the global batch of {w.global_batch_size} samples)")
        if self.smallest_oom is not None:
            m = self.smallest_oom
            return (f"{head}: the model fits no layout; the least memory any layout needs is "
                    f"{m.memory.total / GIB:.1f} GiB per GPU ({m.layout.describe()}, pipeline rank "
                    f"{m.memory.pp_rank}), {c.usable_bytes / GIB:.1f} GiB usable of {c.device.memory_bytes / GIB:.0f}")
        reasons = sorted({r.reason for r in self.rejected})
        return f"{head}: " + "; ".join(reasons)


def _splits(config: LlamaConfig, tp: int) -> bool:
    try:
        validate_layout(config, tp)
    except ValueError:
        return False
    return True


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(config: LlamaConfig, workload: Workload, cluster: Cluster, *, plans: PipelinePlans | None = None,
           micro_batches=MICRO_BATCHES) -> Plan:
    """Every layout of ``cluster`` for ``config``: the fitting ones ranked by step time, the others
    with their reason."""
    plans = plans if plans is not None else PipelinePlans()
    memory = MemoryModel(config, workload, plans)
    timing = TimeModel(ModelShape.from_llama(config), cluster.device, cluster.gpus_per_node, workload.seq_length,
                       workload.global_batch_size, workload.dtype, ENGINE, plans)
    plan = Plan(cluster, config, workload)
    gbs, seq, usable = workload.global_batch_size, workload.seq_length, cluster.usable_bytes
    for tp in _divisors(cluster.gpus):
        for pp in _divisors(cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            try:
                validate_layout(config, tp, pp, dp, cluster.gpus)
            except ValueError as e:
                plan.rejected.append(Rejected(tp, pp, dp, 1, str(e)))
                continue
            if tp > cluster.gpus_per_node or cluster.gpus_per_node % tp:
                plan.rejected.append(Rejected(tp, pp, dp, 1, f"TP {tp} does not fit in a server of "
                                              f"{cluster.gpus_per_node} GPUs: its collectives would cross the network"))
                continue
            per_stage = config.num_hidden_layers // pp
            for v in [v for v in _divisors(per_stage) if v <= MAX_VIRTUAL_STAGES and (v == 1 or pp > 1)]:
                _search_layout(plan, memory, timing, tp, pp, dp, v, micro_batches, gbs, seq, usable)
    plan.variants.sort(key=lambda c: (c.time.total, c.memory.total))
    best: dict[tuple, Candidate] = {}
    for c in plan.variants:
        best.setdefault((c.layout.tp, c.layout.pp, c.layout.dp, c.layout.virtual_stages), c)
    ranked = list(best.values())
    if ranked:
        fastest = ranked[0].time.total * (1 + TIME_TIE)
        ranked.sort(key=lambda c: (0, c.memory.total) if c.time.total <= fastest else (1, c.time.total))
    plan.ranked = ranked
    return plan


def evaluate(config: LlamaConfig, workload: Workload, cluster: Cluster, layout: Layout,
             plans: PipelinePlans | None = None) -> Candidate:
    """The predictions for one given layout (fitting or not: compare ``memory.total`` with
    ``cluster.usable_bytes``); the engine's own checks refuse layouts it could not run."""
    if layout.gpus != cluster.gpus:
        raise ValueError(f"{layout.describe()} uses {layout.gpus} GPUs, the cluster has {cluster.gpus}")
    validate_layout(config, layout.tp, layout.pp, layout.dp, layout.gpus, layout.virtual_stages)
    if workload.global_batch_size % (layout.micro_batch_size * layout.dp):
        raise ValueError(f"the global batch of {workload.global_batch_size} does not split over DP {layout.dp} "
                         f"in micro batches of {layout.micro_batch_size}")
    check_microbatches(layout.pp, layout.virtual_stages, layout.microbatches(workload.global_batch_size))
    plans = plans if plans is not None else PipelinePlans()
    memory = MemoryModel(config, workload, plans)
    timing = TimeModel(ModelShape.from_llama(config), cluster.device, cluster.gpus_per_node, workload.seq_length,
                       workload.global_batch_size, workload.dtype, ENGINE, plans)
    states = [memory.state_bytes(layout, r) for r in range(layout.pp)]
    return Candidate(layout, memory.worst_rank(layout), timing.step_time(layout, states))


def _search_layout(plan: Plan, memory: MemoryModel, timing: TimeModel, tp: int, pp: int, dp: int, v: int,
                   micro_batches, gbs: int, seq: int, usable: int) -> None:
    sizes = [mb for mb in micro_batches if gbs % (mb * dp) == 0]
    if not sizes:
        plan.rejected.append(Rejected(tp, pp, dp, v, f"the global batch of {gbs} does not split over DP {dp} "
                                      f"in micro batches of {', '.join(map(str, micro_batches))}"))
        return
    runnable, refusal = [], None
    for mb in sizes:
        try:
            check_microbatches(pp, v, gbs // (mb * dp))
            runnable.append(mb)
        except ValueError as e:
            refusal = refusal or str(e)
    if not runnable:
        plan.rejected.append(Rejected(tp, pp, dp, v, f"too few microbatches: {refusal}"))
        return
    fitted = False
    for mb in runnable:
        for sp in ([False, True] if tp > 1 and seq % tp == 0 else [False]):
            for zero in ([False, True] if dp > 1 else [False]):
                # Recomputation only adds time: it is tried where the variant does not fit without it.
                for recompute in (False, True):
                    layout = Layout(tp, pp, dp, v, mb, sp, zero, recompute)
                    worst = memory.worst_rank(layout)
                    if worst.total > usable:
                        if plan.smallest_oom is None or worst.total < plan.smallest_oom.memory.total:
                            plan.smallest_oom = Candidate(layout, worst, None)
                        continue
                    states = [memory.state_bytes(layout, r) for r in range(pp)]
                    plan.variants.append(Candidate(layout, worst, timing.step_time(layout, states)))
                    fitted = True
                    break
    if not fitted:
        least = min((memory.worst_rank(Layout(tp, pp, dp, v, mb, tp > 1 and seq % tp == 0, dp > 1, True))
                     for mb in runnable), key=lambda m: m.total)
        plan.rejected.append(Rejected(tp, pp, dp, v, f"out of memory: even with recomputation, ZeRO-1 and SP it needs "
                                      f"{least.total / GIB:.1f} GiB on pipeline rank {least.pp_rank}, "
                                      f"{usable / GIB:.1f} GiB usable"))


def run_config(candidate: Candidate, base: RunConfig, model: dict, workload: Workload, train_tokens: float) -> RunConfig:
    """``base`` with the candidate's layout, the workload and the model: a config pretrain.py runs.
    ``model`` holds ``preset`` or ``hf_config``; ``train.iters`` covers ``train_tokens``."""
    d = config_to_dict(base)
    lay = candidate.layout
    d["model"] = {**{k: None for k in d["model"]}, **model}
    d["parallel"].update(tp=lay.tp, pp=lay.pp, virtual_stages=lay.virtual_stages, sequence_parallel=lay.sp,
                         distributed_optimizer=lay.distributed_optimizer, bucket_size=workload.bucket_size)
    d["data"]["seq_length"] = workload.seq_length
    d["train"].update(global_batch_size=workload.global_batch_size, micro_batch_size=lay.micro_batch_size,
                      recompute=lay.recompute, dtype=workload.dtype,
                      iters=max(1, math.ceil(train_tokens / (workload.global_batch_size * workload.seq_length))))
    cfg = config_from_dict(d, source="the planned config")
    cfg.train.warmup_iters = min(cfg.train.warmup_iters, cfg.train.decay_iters)
    return cfg
