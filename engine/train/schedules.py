"""Forward-backward schedules: one function per schedule behind :func:`forward_backward`.

A schedule runs the ``num_microbatches`` forward and backward passes of one optimizer step over this
rank's model chunks and returns the per-microbatch loss sums (on the stage that computes the loss;
empty elsewhere). It turns the data-parallel gradient reduction on for each microbatch's last
backward only, so the reduction overlaps that backward and earlier microbatches only accumulate.

    losses = forward_backward(chunks, microbatches, loss_fn, state=state, grads=buffer)

``loss_fn(output, microbatch) -> (loss_for_backward, loss_sum)``: the scalar to differentiate (already
normalised by the global number of loss tokens) and the detached, unnormalised sum for the log.

Schedules:

- no pipelining (PP 1): each microbatch forward then backward.
- 1F1B (PP > 1): rank r runs ``pp - r - 1`` warm-up forwards, then one forward and one backward in
  turn, then the remaining backwards; at most ``pp - r`` microbatches are in flight on rank r.
- interleaved 1F1B (PP > 1, ``virtual_stages`` v > 1): each rank holds v chunks; forwards go over
  groups of ``pp`` microbatches chunk by chunk (backwards with the chunks reversed), with
  ``2 (pp - r - 1) + (v - 1) pp`` warm-up forwards, so the bubble shrinks by v.

A pipeline schedule is a table: the order in which this rank runs its forward (F) and backward (B)
actions (:func:`one_f_one_b_order`, :func:`interleaved_order`). :func:`plan_ticks` simulates all
ranks' tables in lockstep, in plain Python, the same way on every rank: at each tick every rank runs
its next action if the tensors it needs arrived in an earlier tick, then all messages produced in the
tick are exchanged. :func:`run_pipeline` executes this rank's part of the plan (:func:`rank_plan`):
its actions, and after each tick that has traffic for it one batched exchange posted to its
neighbours, which post the matching operations in the same tick. So the tables alone decide the
order, and the exchanges are deadlock-free by construction; a table that could never complete is
refused by the simulation before any work. The plan fixes only the order in which exchanges are
posted, not when ranks wait: a rank waits for a received tensor just before the action that reads
it, and for a send just before freeing what it sent, so ranks do not move in lockstep (a rank's
short forward is not held up by its neighbour's long backward of the same tick).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.parallel.p2p import PipelineComm, backward_from, free_storage
from engine.parallel.state import ParallelState
from engine.train.grads import GradBuffer

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Action:
    kind: str        # "F" forward or "B" backward
    microbatch: int
    chunk: int       # model chunk on this rank (0 without virtual stages)


@dataclass
class ScheduleStats:
    """What a schedule measured on this rank (for benchmarks): time computing, time in exchanges,
    and the most microbatches whose activations were held at once."""
    compute_s: float = 0.0
    comm_s: float = 0.0
    max_in_flight: int = 0
    trace: list[Action] = field(default_factory=list)


# ------------------------------------------------------------------------------- checks
def check_microbatches(pp: int, virtual_stages: int, num_microbatches: int) -> None:
    """Refuse, by name and before any work, a microbatch count the schedule cannot run."""
    if num_microbatches < 1:
        raise ValueError(f"a step needs at least one microbatch, got {num_microbatches}")
    if pp == 1:
        return
    if num_microbatches < pp:
        raise ValueError(f"pipeline parallelism with parallel.pp {pp} needs at least {pp} microbatches per "
                         f"step, got {num_microbatches} (train.global_batch_size / (train.micro_batch_size "
                         "x data-parallel size)); raise the global batch or lower the micro batch")
    if virtual_stages > 1 and num_microbatches % pp:
        raise ValueError(f"the interleaved schedule (parallel.virtual_stages {virtual_stages}) needs a number "
                         f"of microbatches per step divisible by parallel.pp {pp}, got {num_microbatches}")


# ------------------------------------------------------------------------------- tables
def one_f_one_b_order(pp: int, rank: int, num_microbatches: int, forward_only: bool = False) -> list[Action]:
    """Rank ``rank``'s 1F1B table: warm-up forwards, alternating forward/backward, cooldown backwards."""
    m = num_microbatches
    if forward_only:
        return [Action("F", i, 0) for i in range(m)]
    warmup = min(pp - rank - 1, m)
    order = [Action("F", i, 0) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", warmup + i, 0), Action("B", i, 0)]
    order += [Action("B", i, 0) for i in range(m - warmup, m)]
    return order


def _interleaved_item(k: int, pp: int, v: int, forward: bool) -> tuple[int, int]:
    """(microbatch, chunk) of the k-th forward (or backward) of a rank under interleaving."""
    group, within = divmod(k, pp * v)
    chunk = within // pp
    return group * pp + within % pp, chunk if forward else v - 1 - chunk


def interleaved_order(pp: int, rank: int, num_microbatches: int, virtual_stages: int,
                      forward_only: bool = False) -> list[Action]:
    """Rank ``rank``'s interleaved-1F1B table over ``virtual_stages`` chunks."""
    v, m = virtual_stages, num_microbatches
    total = m * v
    fwd = [Action("F", *_interleaved_item(k, pp, v, True)) for k in range(total)]
    if forward_only:
        return fwd
    bwd = [Action("B", *_interleaved_item(k, pp, v, False)) for k in range(total)]
    # With as many microbatches as stages there is no steady state: all forwards, then all backwards.
    warmup = total if m == pp else min(2 * (pp - rank - 1) + (v - 1) * pp, total)
    order = fwd[:warmup]
    for k in range(total - warmup):
        order += [fwd[warmup + k], bwd[k]]
    return order + bwd[total - warmup:]


# ------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Tick:
    """One tick of one rank: the action it runs (or None) and the traffic after it."""
    action: Action | None
    send: str | None = None       # "next" (an activation) or "prev" (a gradient)
    recv_prev: Action | None = None  # the consumer action on this rank of a tensor from prev
    recv_next: Action | None = None


def plan_ticks(orders: list[list[Action]], virtual_stages: int) -> list[list[Tick]]:
    """Simulate every rank's table in lockstep; per rank, its ticks up to its last traffic or action.

    Virtual stage s = chunk * pp + rank: F of (mb, s) needs F of (mb, s - 1) from the previous rank
    in the ring; B of (mb, s) needs B of (mb, s + 1) from the next one (the last stage's B needs only
    its own F). A tensor made in tick t is exchanged after tick t and usable from tick t + 1.
    """
    pp = len(orders)
    stages = pp * virtual_stages
    done: dict[tuple[str, int, int], int] = {}  # (kind, microbatch, virtual stage) -> tick
    position = [0] * pp
    ticks: list[list[Tick]] = [[] for _ in range(pp)]
    remaining = sum(map(len, orders))
    t = 0
    while remaining:
        ran: list[Action | None] = [None] * pp
        for r in range(pp):
            if position[r] == len(orders[r]):
                continue
            a = orders[r][position[r]]
            s = a.chunk * pp + r
            if a.kind == "F":
                needs = [("F", a.microbatch, s - 1)] if s > 0 else []
            else:
                needs = [("F", a.microbatch, s)] + ([("B", a.microbatch, s + 1)] if s < stages - 1 else [])
            if all(done.get(n, t) < t for n in needs):
                ran[r] = a
        if not any(ran):
            stuck = {r: orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])}
            raise RuntimeError(f"pipeline schedule cannot complete: every rank waits (next actions {stuck})")
        for r, a in enumerate(ran):
            if a is not None:
                done[(a.kind, a.microbatch, a.chunk * pp + r)] = t
                position[r] += 1
                remaining -= 1
        # Traffic of this tick: F of a non-last stage feeds the next rank, B of a non-first the previous.
        sends: list[str | None] = [None] * pp
        recv_prev: list[Action | None] = [None] * pp
        recv_next: list[Action | None] = [None] * pp
        for r, a in enumerate(ran):
            if a is None:
                continue
            s = a.chunk * pp + r
            if a.kind == "F" and s < stages - 1:
                sends[r] = "next"
                consumer = (r + 1) % pp
                recv_prev[consumer] = Action("F", a.microbatch, (s + 1) // pp)
            elif a.kind == "B" and s > 0:
                sends[r] = "prev"
                consumer = (r - 1) % pp
                recv_next[consumer] = Action("B", a.microbatch, (s - 1) // pp)
        for r in range(pp):
            ticks[r].append(Tick(ran[r], sends[r], recv_prev[r], recv_next[r]))
        t += 1
    for r in range(pp):  # drop trailing idle ticks
        while ticks[r] and ticks[r][-1] == Tick(None):
            ticks[r].pop()
    return ticks


# ------------------------------------------------------------------------------- execution
def _activation_shape(chunks: list[nn.Module], microbatch: dict, state: ParallelState) -> tuple[int, ...]:
    """[micro_batch, seq / TP under sequence parallelism, hidden]: what stages exchange."""
    batch, seq = microbatch["tokens"].shape
    sequence_parallel = state.tp_size > 1 and any(
        getattr(m, "sequence_parallel", False) for chunk in chunks for m in chunk.modules())
    return batch, seq // state.tp_size if sequence_parallel else seq, chunks[0].config.hidden_size


@functools.lru_cache(maxsize=16)
def rank_plan(schedule: str, pp: int, rank: int, num_microbatches: int, virtual_stages: int,
              forward_only: bool) -> tuple[Tick, ...]:
    """Rank ``rank``'s ticks of the ``schedule`` ("1f1b" or "interleaved") plan; a pure function of
    its arguments, remembered because a run asks for the same few plans every step."""
    if schedule == "1f1b":
        orders = [one_f_one_b_order(pp, r, num_microbatches, forward_only) for r in range(pp)]
    else:
        orders = [interleaved_order(pp, r, num_microbatches, virtual_stages, forward_only) for r in range(pp)]
    return tuple(plan_ticks(orders, virtual_stages)[rank])


def run_pipeline(plan: tuple[Tick, ...], chunks: list[nn.Module], microbatches: list[dict], loss_fn: LossFn,
                 *, state: ParallelState, grads: GradBuffer | None, forward_only: bool, comm: PipelineComm | None,
                 stats: ScheduleStats | None = None) -> list[torch.Tensor]:
    """Run this rank's ticks of a plan (:func:`rank_plan`)."""
    pp, rank = state.pp_size, state.pp_rank
    v = len(chunks)
    comm = comm if comm is not None else PipelineComm(state)
    spec = (_activation_shape(chunks, microbatches[0], state), next(chunks[0].parameters()).dtype)
    last = len(microbatches) - 1
    inputs: dict[tuple[int, int], tuple] = {}     # (activation, its transfer), until its forward
    out_grads: dict[tuple[int, int], tuple] = {}  # (gradient, its transfer), until its backward
    in_flight: dict[tuple[int, int], tuple] = {}           # (input, output) kept for the backward
    losses: list[torch.Tensor] = []
    # Sends not yet known complete: (tick, peer, transfer, output whose storage to free, or None).
    sending: list[tuple] = []
    clock = time.perf_counter
    waited = 0.0

    def arrived(slot: dict, key) -> torch.Tensor:
        nonlocal waited, sending
        tensor, transfer, posted, peer = slot.pop(key)
        began = clock()
        transfer.wait_received()
        # The peer posted this at tick `posted`, so it has posted the receives of all our sends to it
        # up to that tick: waiting for those now costs no lockstep (gloo reports a send complete only
        # once waited for, so without this the outputs would stay held until the step ends).
        sending = _free_sent(sending, lambda t, q: q == peer and t <= posted)
        waited += clock() - began
        return tensor

    for t, tick in enumerate(plan):
        a, produced = tick.action, None
        began, waited = clock(), 0.0
        if a is not None:
            key = (a.microbatch, a.chunk)
            s = a.chunk * pp + rank
            if stats is not None:
                stats.trace.append(a)
            if a.kind == "F":
                x = microbatches[a.microbatch]["tokens"] if s == 0 else arrived(inputs, key)
                if s > 0 and not forward_only:
                    x.requires_grad_(True)
                with torch.set_grad_enabled(not forward_only):
                    y = chunks[a.chunk](x)
                    if s == pp * v - 1:
                        y, loss_sum = loss_fn(y, microbatches[a.microbatch])
                        losses.append(loss_sum.detach())
                produced = y if tick.send else None
                if forward_only:
                    if s > 0:
                        comm.release(x)
                else:
                    in_flight[key] = (x if s > 0 else None, y)
                    if stats is not None:
                        stats.max_in_flight = max(stats.max_in_flight, len(in_flight))
            else:
                x, y = in_flight.pop(key)
                if grads is not None:
                    grads.sync = a.microbatch == last
                grad = arrived(out_grads, key) if s < pp * v - 1 else None
                backward_from(y, grad)
                if grad is not None:
                    comm.release(grad)
                if x is not None:
                    produced = x.grad
                    comm.release(x)  # its gradient is a tensor of its own, sent below
        middle = clock()
        if tick.send or tick.recv_prev or tick.recv_next:
            transfer = comm.post(
                send_next=produced if tick.send == "next" else None,
                send_prev=produced if tick.send == "prev" else None,
                recv_prev=spec if tick.recv_prev else None, recv_next=spec if tick.recv_next else None)
            if tick.recv_prev:
                inputs[(tick.recv_prev.microbatch, tick.recv_prev.chunk)] = (transfer.from_prev, transfer, t,
                                                                             comm.prev_rank)
            if tick.recv_next:
                out_grads[(tick.recv_next.microbatch, tick.recv_next.chunk)] = (transfer.from_next, transfer, t,
                                                                                comm.next_rank)
            if tick.send:
                # Once sent, the next stage holds the values: a kept output keeps only its autograd node.
                keep = a.kind == "F" and not forward_only
                peer = comm.next_rank if tick.send == "next" else comm.prev_rank
                sending.append((t, peer, transfer, produced if keep else None))
        sending = _free_sent(sending)
        if stats is not None:
            stats.compute_s += middle - began - waited
            stats.comm_s += clock() - middle + waited
    began = clock()
    _free_sent(sending, lambda t, q: True)
    if stats is not None:
        stats.comm_s += clock() - began
    if grads is not None:
        grads.sync = True
    return losses


def _free_sent(sending: list[tuple], wait_for=None) -> list[tuple]:
    """Free the storage of outputs whose sends completed, first waiting for the sends that
    ``wait_for(tick, peer)`` selects; returns the sends still running."""
    running = []
    for entry in sending:
        tick, peer, transfer, output = entry
        if wait_for is not None and wait_for(tick, peer):
            transfer.wait_sent()
        if transfer.sent():
            if output is not None:
                free_storage(output)
        else:
            running.append(entry)
    return running


def forward_backward_no_pipelining(chunks: list[nn.Module], microbatches: list[dict], loss_fn: LossFn, *,
                                   state: ParallelState, grads: GradBuffer | None, forward_only: bool = False,
                                   comm: PipelineComm | None = None, stats: ScheduleStats | None = None
                                   ) -> list[torch.Tensor]:
    """Each microbatch forward then backward through the one chunk; DP sync on the last backward."""
    if len(chunks) != 1:
        raise ValueError(f"no-pipelining schedule runs one model chunk, got {len(chunks)}")
    model = chunks[0]
    losses = []
    for i, microbatch in enumerate(microbatches):
        if grads is not None:
            grads.sync = i == len(microbatches) - 1
        if stats is not None:
            stats.trace.append(Action("F", i, 0))
        with torch.set_grad_enabled(not forward_only):
            output = model(microbatch["tokens"])
            loss, loss_sum = loss_fn(output, microbatch)
        if not forward_only:
            if stats is not None:
                stats.trace.append(Action("B", i, 0))
            loss.backward()
        losses.append(loss_sum.detach())
    if grads is not None:
        grads.sync = True
    return losses


def forward_backward_1f1b(chunks, microbatches, loss_fn, *, state, grads, forward_only=False, comm=None,
                          stats=None) -> list[torch.Tensor]:
    """1F1B over ``state.pp_size`` stages, one chunk per rank."""
    if len(chunks) != 1:
        raise ValueError(f"the 1F1B schedule runs one model chunk per rank, got {len(chunks)}")
    pp, m = state.pp_size, len(microbatches)
    check_microbatches(pp, 1, m)
    plan = rank_plan("1f1b", pp, state.pp_rank, m, 1, forward_only)
    return run_pipeline(plan, chunks, microbatches, loss_fn, state=state, grads=grads,
                        forward_only=forward_only, comm=comm, stats=stats)


def forward_backward_interleaved(chunks, microbatches, loss_fn, *, state, grads, forward_only=False, comm=None,
                                 stats=None) -> list[torch.Tensor]:
    """Interleaved 1F1B over ``state.pp_size`` ranks of ``len(chunks)`` chunks each."""
    pp, v, m = state.pp_size, len(chunks), len(microbatches)
    check_microbatches(pp, v, m)
    plan = rank_plan("interleaved", pp, state.pp_rank, m, v, forward_only)
    return run_pipeline(plan, chunks, microbatches, loss_fn, state=state, grads=grads,
                        forward_only=forward_only, comm=comm, stats=stats)


def get_forward_backward(state: ParallelState, virtual_stages: int = 1):
    """The schedule for this layout."""
    if state.pp_size == 1:
        if virtual_stages != 1:
            raise ValueError(f"parallel.virtual_stages {virtual_stages} needs parallel.pp >= 2")
        return forward_backward_no_pipelining
    return forward_backward_1f1b if virtual_stages == 1 else forward_backward_interleaved


def forward_backward(chunks: list[nn.Module], microbatches: list[dict], loss_fn: LossFn, *,
                     state: ParallelState, grads: GradBuffer | None, forward_only: bool = False,
                     virtual_stages: int = 1, comm: PipelineComm | None = None,
                     stats: ScheduleStats | None = None) -> list[torch.Tensor]:
    """Run one step's microbatches with the schedule the layout calls for."""
    if len(chunks) != virtual_stages:
        raise ValueError(f"{len(chunks)} model chunk(s) on this rank, but parallel.virtual_stages is {virtual_stages}")
    schedule = get_forward_backward(state, virtual_stages)
    return schedule(chunks, microbatches, loss_fn, state=state, grads=grads, forward_only=forward_only,
                    comm=comm, stats=stats)
