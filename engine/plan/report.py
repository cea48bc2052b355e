"""Text of a plan: the ranked table, the refused layouts and why, the chosen layout in detail."""
from __future__ import annotations

from engine.plan.devices import GIB
from engine.plan.search import Candidate, Plan


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def _options(c: Candidate) -> str:
    lay = c.layout
    flags = [name for name, on in (("sp", lay.sp), ("zero1", lay.distributed_optimizer),
                                   ("recompute", lay.recompute)) if on]
    return f"mb {lay.micro_batch_size}" + ("" if not flags else " " + ",".join(flags))


def ranked_table(plan: Plan, top: int, train_tokens: float, variants: bool = False) -> str:
    rows = plan.variants if variants else plan.ranked
    header = (f"{'#':>3}  {'tp':>3} {'pp':>3} {'dp':>4} {'vp':>3}  {'options':<24} {'GiB/GPU':>7}  {'step s':>7}  "
              f"{'tokens/s':>10}  {'MFU':>6}  {'TFLOP/s':>7}  {'to ' + _tokens(train_tokens):>11}  "
              f"{'bubble':>6} {'tp':>5} {'dp':>5}")
    lines = [header, "-" * len(header)]
    for i, c in enumerate(rows[:top], start=1):
        t, lay = c.time, c.layout
        lines.append(f"{i:>3}  {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.virtual_stages:>3}  {_options(c):<24} "
                     f"{_gib(c.memory.total):>7}  {t.total:>7.2f}  {t.tokens_per_s:>10,.0f}  {100 * t.mfu:>5.1f}%  "
                     f"{t.tflops_per_gpu:>7.1f}  {_duration(train_tokens / t.tokens_per_s):>11}  "
                     f"{100 * t.bubble / t.total:>5.1f}% {100 * t.tp_comm / t.total:>4.1f}% {100 * t.dp_comm / t.total:>4.1f}%")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more {'variants' if variants else 'layouts'} fit")
    return "\n".join(lines)


def _tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n:g}"


def rejected_list(plan: Plan) -> str:
    if not plan.rejected:
        return "every layout fits"
    return "\n".join(f"  {r.describe():<24} {r.reason}" for r in plan.rejected)


def chosen_layout(c: Candidate, plan: Plan, train_tokens: float) -> str:
    m, t, lay = c.memory, c.time, c.layout
    s = m.state
    lines = [
        (f"chosen: {lay.describe()}  ({plan.cluster.gpus} x {plan.cluster.device.name}, "
         f"{plan.cluster.gpus_per_node} per server)"),
        (f"  memory on pipeline rank {m.pp_rank} (the largest): {_gib(m.total)} GiB of "
         f"{_gib(plan.cluster.usable_bytes)} usable = weights {_gib(s.params)} + fp32 grads {_gib(s.grads)} + "
         f"optimizer {_gib(s.optimizer)} + activations {_gib(m.activations)} ({m.in_flight} microbatch-chunks "
         f"in flight) + rotary tables {_gib(m.rotary_tables)} + working {_gib(m.working)}"),
        (f"  step {t.total:.2f} s = compute {t.compute:.2f} + TP {t.tp_comm:.2f} + bubble {t.bubble:.2f} + "
         f"p2p {t.p2p:.3f} + DP exposed {t.dp_comm:.3f} + optimizer {t.optimizer:.3f}"),
        (f"  {t.tokens_per_s:,.0f} tokens/s, {t.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {100 * t.mfu:.1f}% "
         f"(model FLOPs / {plan.cluster.device.peak_tflops:g} TFLOP/s bf16 peak); "
         f"{_tokens(train_tokens)} tokens in {_duration(train_tokens / t.tokens_per_s)}"),
    ]
    return "\n".join(lines)
