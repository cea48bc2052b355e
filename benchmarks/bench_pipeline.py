"""Pipeline-parallel benchmarks on CPU (gloo): the bubble of 1F1B and interleaved 1F1B against theory,
and the activation memory each stage holds against the schedule's promise.

    python benchmarks/bench_pipeline.py --out DIR [--pp-sizes 2,4] [--microbatches 4,8,16] [sizes, repeats]

writes DIR/pipeline.json (every measurement, per rank and step), DIR/tables.md, DIR/pipeline_bubble.png.
Each pipeline size p is one launch of p spawned processes (one torch thread each, gloo on 127.0.0.1,
killed on error or timeout) building their chunks with build_model_chunks. They run:

  exchange  ranks 0 and 1 bounce one activation [micro batch, seq, hidden] through PipelineComm.exchange;
            one exchange costs half the round trip.
  bubble    per schedule and microbatch count m, warm-up then timed steps of forward_backward, every
            post of an exchange and every wait on one (for what it receives, before the action that
            reads it; for what it sent, before freeing it) timed on entry and exit by CLOCK_MONOTONIC
            (one clock for all processes) and by the thread's CPU time. A rank is idle inside waits and
            busy elsewhere, posts included. Measured idle share of rank r: 1 - r's busy wall time /
            step span (first rank's start to last rank's end). Replayed: the step re-timed in plain
            Python from each rank's busy CPU time between events plus the measured exchange cost, as
            if each rank had a core, in the engine's way (posts never block; a wait ends when its
            tensors arrived, the cost after both ends posted) and in lockstep (every exchange waited
            for at once, as an engine blocking in each exchange would): with more ranks than
            cores the wall clock counts a ready but descheduled rank as busy; the replay does not.
  memory    per schedule, sent outputs freed (the engine) and not (free_storage a no-op in the worker):
            peak bytes of the tensors autograd saves for backward (saved_tensors_hooks, once per storage
            while a saved tensor holds it; parameters, buffers and module caches excluded), the bytes
            each (microbatch, chunk) forward saves, sent outputs still held, ScheduleStats.max_in_flight.

--baseline OLD/pipeline.json shows an earlier run's idle shares beside this run's (table and plot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import engine.train.schedules as schedules
from engine.model.config import LlamaConfig
from engine.parallel.p2p import PipelineComm
from engine.parallel.state import init_parallel
from engine.parallel.tensor_parallel import build_model_chunks, pipeline_layout
from engine.train.grads import GradBuffer
from engine.train.schedules import ScheduleStats, forward_backward, interleaved_order, one_f_one_b_order, plan_ticks
from engine.train.step import global_loss_tokens, make_loss_fn

SEED = 0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ModelSize:
    hidden: int = 256
    layers: int = 16
    heads: int = 4
    intermediate: int = 688
    vocab: int = 256  # small: the head's extra work on the last stage unbalances the stages little
    seq: int = 128
    micro_batch: int = 1

    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           max_position_embeddings=self.seq)


# ------------------------------------------------------------------------------ theory, replay
def theory_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a stage's step time: (p - 1) / (v m + p - 1)."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def in_flight_promise(pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Most (microbatch, chunk) forwards the schedule keeps before their backward on ``rank``:
    p - rank under 1F1B; its warm-up forwards plus one under interleaving."""
    if virtual_stages == 1:
        return min(pp - rank, microbatches)
    total = microbatches * virtual_stages
    warmup = total if microbatches == pp else min(2 * (pp - rank - 1) + (virtual_stages - 1) * pp, total)
    return total if warmup == total else warmup + 1


def schedule_orders(pp: int, microbatches: int, virtual_stages: int) -> list[list]:
    """Every rank's table of actions, as the engine's schedule builds it."""
    if virtual_stages == 1:
        return [one_f_one_b_order(pp, r, microbatches) for r in range(pp)]
    return [interleaved_order(pp, r, microbatches, virtual_stages) for r in range(pp)]


def schedule_plan(pp: int, microbatches: int, virtual_stages: int) -> list[list]:
    """Every rank's ticks, as the engine plans them (which exchange of a rank meets which of a neighbour)."""
    return plan_ticks(schedule_orders(pp, microbatches, virtual_stages), virtual_stages)


def _peers(tick, rank: int, pp: int) -> set[int]:
    peers = set()
    if tick.send == "next" or tick.recv_next:
        peers.add((rank + 1) % pp)
    if tick.send == "prev" or tick.recv_prev:
        peers.add((rank - 1) % pp)
    return peers


def uniform_busy(plan: list[list], forward_s, backward_s) -> list[list[float]]:
    """Busy times for :func:`replay_step` when every forward takes ``forward_s`` and every backward
    ``backward_s`` (seconds, or one value per rank): the bubble of the tables themselves."""
    return [lockstep_busy(e, b) for e, b in zip(*engine_events(plan, forward_s, backward_s))]


def dataflow_idle(orders: list[list], virtual_stages: int, forward_s: float, backward_s: float) -> list[float]:
    """Idle share per rank of the same tables when each action starts as soon as its rank is free and
    its input has arrived (a send never waits for its receiver), forwards taking ``forward_s``,
    backwards ``backward_s``: what the order of actions allows, without the per-tick exchanges."""
    pp, stages = len(orders), len(orders) * virtual_stages
    done: dict[tuple[str, int, int], float] = {}
    clock, position = [0.0] * pp, [0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                a = orders[r][position[r]]
                s = a.chunk * pp + r
                needs = ([("F", a.microbatch, s - 1)] if s > 0 else []) if a.kind == "F" else \
                    [("F", a.microbatch, s)] + ([("B", a.microbatch, s + 1)] if s < stages - 1 else [])
                if not all(n in done for n in needs):
                    break
                clock[r] = max([clock[r]] + [done[n] for n in needs]) + (forward_s if a.kind == "F" else backward_s)
                done[(a.kind, a.microbatch, s)] = clock[r]
                position[r] += 1
                progressed = True
        if not progressed:
            raise ValueError("the tables cannot complete: every rank waits")
    span = max(clock)
    return [1 - sum(forward_s if a.kind == "F" else backward_s for a in order) / span for order in orders]


def traffic_ticks(plan: list[list]) -> list[list[int]]:
    """Per rank, the ticks with traffic: its k-th post is the exchange of tick traffic_ticks[r][k]."""
    return [[t for t, tick in enumerate(ticks) if tick.send or tick.recv_prev or tick.recv_next] for ticks in plan]


def replay_step(plan: list[list], busy: list[list[float]], exchange_s: float) -> dict:
    """Re-time a step with one core per rank, exchanging in lockstep: each tick's exchange waits for
    all its sends and receives at once (a model of an engine that blocks in every exchange).

    ``busy[r]``: rank r's busy seconds before each of its exchanges, then after the last one
    (len = exchanges + 1). A rank posts its exchange of tick t when it is done with the busy time
    before it; the exchange ends ``exchange_s`` after the last of its two ends posted it.
    Returns the span and, per rank, the idle share 1 - busy / span.
    """
    pp, ticks = len(plan), traffic_ticks(plan)
    for r in range(pp):
        if len(busy[r]) != len(ticks[r]) + 1:
            raise ValueError(f"rank {r}: {len(busy[r])} busy times for {len(ticks[r])} exchanges (need one more)")
    clock, done = [0.0] * pp, [0] * pp
    for t in range(max(map(len, plan))):
        posted = {r: clock[r] + busy[r][done[r]] for r in range(pp) if done[r] < len(ticks[r]) and ticks[r][done[r]] == t}
        for r, at in posted.items():
            peers = _peers(plan[r][t], r, pp)
            if not peers <= posted.keys():
                raise ValueError(f"tick {t}: rank {r} exchanges with {sorted(peers)}, not all of which post")
            clock[r] = max([at] + [posted[q] for q in peers]) + exchange_s
            done[r] += 1
    finish = [clock[r] + busy[r][-1] for r in range(pp)]
    span = max(finish)
    return {"span_s": span, "idle": [1 - sum(b) / span for b in busy]}


def engine_events(plan: list[list], forward_s, backward_s) -> tuple[list[list], list[list[float]]]:
    """The events of a step as :func:`run_pipeline` executes ``plan``, every forward taking
    ``forward_s`` and every backward ``backward_s`` (seconds, or one value per rank): per rank the
    events ("post", k) after each tick with traffic, ("recv", k) before the action that reads what
    post k received, ("sent", k) at the end for every post with sends; and the busy seconds before
    each event, then after the last (the inputs of :func:`replay_posted`)."""
    events, busy = [], []
    for r, ticks in enumerate(plan):
        f = forward_s[r] if isinstance(forward_s, list) else forward_s
        b = backward_s[r] if isinstance(backward_s, list) else backward_s
        mine, segments, current, received_by, sends, k = [], [], 0.0, {}, [], 0
        for tick in ticks:
            if tick.action is not None:
                if tick.action in received_by:
                    mine.append(("recv", received_by.pop(tick.action)))
                    segments.append(current)
                    current = 0.0
                current += f if tick.action.kind == "F" else b
            if tick.send or tick.recv_prev or tick.recv_next:
                mine.append(("post", k))
                segments.append(current)
                current = 0.0
                received_by.update({a: k for a in (tick.recv_prev, tick.recv_next) if a is not None})
                sends += [k] if tick.send else []
                k += 1
        for k in sends:
            mine.append(("sent", k))
            segments.append(current)
            current = 0.0
        events.append(mine)
        busy.append(segments + [current])
    return events, busy


def replay_posted(plan: list[list], events: list[list], busy: list[list[float]], exchange_s: float) -> dict:
    """Re-time a step with one core per rank as the engine exchanges: posts never block; a
    ("recv", k) wait ends when every tensor post k receives has arrived, and a ("sent", k) wait when
    every tensor it sends has; a tensor arrives ``exchange_s`` after the later of its two ends posted
    the tick's exchange (gloo moves a message once both ends posted it).

    ``events[r]``: rank r's events in order, ("post" | "recv" | "sent", k) with k its post count;
    ``busy[r]``: busy seconds before each event, then after the last. Returns the span and, per
    rank, the idle share 1 - busy / span.
    """
    pp, traffic = len(plan), traffic_ticks(plan)
    for r in range(pp):
        if len(busy[r]) != len(events[r]) + 1:
            raise ValueError(f"rank {r}: {len(busy[r])} busy times for {len(events[r])} events (need one more)")
        posts = [k for kind, k in events[r] if kind == "post"]
        if posts != list(range(len(traffic[r]))):
            raise ValueError(f"rank {r}: posts {posts[:8]}... are not its {len(traffic[r])} exchanges in order")
    posted: list[dict[int, float]] = [{} for _ in range(pp)]  # rank -> tick -> time of its post
    clock, position = [0.0] * pp, [0] * pp

    def peers(r: int, kind: str, tick) -> list[int]:
        if kind == "recv":
            found = [(r - 1) % pp] * bool(tick.recv_prev) + [(r + 1) % pp] * bool(tick.recv_next)
        else:
            found = [(r + 1) % pp if tick.send == "next" else (r - 1) % pp] if tick.send else []
        if not found:
            raise ValueError(f"rank {r}: a {kind!r} wait on tick {tick} that has no such traffic")
        return found

    while any(position[r] < len(events[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(events[r]):
                kind, k = events[r][position[r]]
                if not 0 <= k < len(traffic[r]):
                    raise ValueError(f"rank {r}: event {kind!r} of post {k}; it has {len(traffic[r])} exchanges")
                t = traffic[r][k]
                ready = clock[r] + busy[r][position[r]]
                if kind == "post":
                    posted[r][t] = clock[r] = ready
                else:
                    if t not in posted[r]:
                        raise ValueError(f"rank {r}: waits on post {k} before making it")
                    ends = peers(r, kind, plan[r][t])
                    if not all(t in posted[q] for q in ends):
                        break
                    clock[r] = max([ready] + [max(posted[r][t], posted[q][t]) + exchange_s for q in ends])
                position[r] += 1
                progressed = True
        if not progressed:
            raise ValueError("the events cannot complete: every rank waits for a post that never comes")
    span = max(clock[r] + busy[r][-1] for r in range(pp))
    return {"span_s": span, "idle": [1 - sum(b) / span for b in busy]}


def lockstep_busy(events: list, busy: list[float]) -> list[float]:
    """The busy seconds of :func:`replay_step` from those of :func:`replay_posted`: the busy time
    between consecutive posts (waits put in no busy time of their own)."""
    segments, current = [], 0.0
    for (kind, _), seconds in zip(events, busy):
        current += seconds
        if kind == "post":
            segments.append(current)
            current = 0.0
    return segments + [current + busy[-1]]


# ------------------------------------------------------------------------------ worker pieces
def wall() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # the same clock in every process


class SavedTensorBytes:
    """Live and peak bytes of the tensors autograd saves for backward, counted once per storage,
    with the storages of ``excluded`` tensors (parameters, buffers) left out; plus the bytes of
    sent activations still alive (registered with :meth:`sent`), sampled at every save and post."""

    def __init__(self, excluded: list[torch.Tensor]):
        self.excluded = {t.untyped_storage().data_ptr() for t in excluded}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, saved tensors holding it]
        self.current = self.peak = self.peak_sent = self.peak_total = self.sent_count = 0
        self._sent: list[weakref.ref] = []

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.excluded:
            return tensor
        entry = self.live.setdefault(ptr, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
        entry[1] += 1
        self.sample()
        return _Saved(self, tensor, ptr)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _drop(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def sent(self, tensor: torch.Tensor) -> None:
        self._sent.append(weakref.ref(tensor))
        self.sent_count += 1

    def sample(self) -> None:
        alive = [t for t in (r() for r in self._sent) if t is not None]
        self._sent = [weakref.ref(t) for t in alive]
        held = sum(t.untyped_storage().nbytes() for t in alive if t.untyped_storage().data_ptr() not in self.live)
        self.peak = max(self.peak, self.current)
        self.peak_sent = max(self.peak_sent, held)
        self.peak_total = max(self.peak_total, self.current + held)


class _Saved:
    __slots__ = ("owner", "tensor", "ptr")

    def __init__(self, owner: SavedTensorBytes, tensor: torch.Tensor, ptr: int):
        self.owner, self.tensor, self.ptr = owner, tensor, ptr

    def __del__(self):
        self.owner._drop(self.ptr)


class TimedComm(PipelineComm):
    """A PipelineComm that stamps every post and every wait of its transfers by the two clocks.

    ``records`` (while a list): one (kind, post count k, entry wall, exit wall, entry CPU, exit CPU)
    per event, kind "post" (the k-th post), "recv" (a wait for what post k receives) or "sent" (a
    wait for what it sends). Time inside waits is idle; everything else, posts included, is busy."""

    def __init__(self, state):
        super().__init__(state)
        self.records: list[tuple] | None = None
        self.posts = 0  # posts since records was last set
        self.tracker: SavedTensorBytes | None = None

    def post(self, **kwargs):
        if self.tracker is not None:
            self.tracker.sample()  # before this send: previously sent outputs still held
            if kwargs.get("send_next") is not None:
                self.tracker.sent(kwargs["send_next"])
        count, self.posts = self.posts, self.posts + 1
        entry = wall(), time.thread_time()
        transfer = TimedTransfer(super().post(**kwargs), self, count)
        self.stamp("post", count, entry)
        return transfer

    def stamp(self, kind: str, count: int, entry: tuple[float, float]) -> None:
        if self.records is not None:
            self.records.append((kind, count, entry[0], wall(), entry[1], time.thread_time()))


class TimedTransfer:
    """A posted :class:`Transfer` whose waits its comm stamps; what the schedule reads passes through."""

    def __init__(self, transfer, comm: TimedComm, count: int):
        self.transfer, self.comm, self.count = transfer, comm, count
        self.from_prev, self.from_next = transfer.from_prev, transfer.from_next

    def wait_received(self) -> None:
        entry = wall(), time.thread_time()
        self.transfer.wait_received()
        self.comm.stamp("recv", self.count, entry)

    def sent(self) -> bool:
        return self.transfer.sent()

    def wait_sent(self) -> None:
        entry = wall(), time.thread_time()
        self.transfer.wait_sent()
        self.comm.stamp("sent", self.count, entry)


def random_microbatches(size: ModelSize, count: int, seed: int) -> list[dict]:
    """``count`` CT-style microbatches (the same on every rank): inputs and next-token labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        sample = torch.randint(0, size.vocab, (size.micro_batch, size.seq + 1), generator=g)
        out.append({"tokens": sample[:, :-1].contiguous(), "labels": sample[:, 1:].contiguous(),
                    "loss_mask": torch.ones(size.micro_batch, size.seq)})
    return out


class Pipeline:
    """One rank's model chunks for one virtual-stage count, their gradient buffer and a timed comm."""

    def __init__(self, size: ModelSize, state, virtual_stages: int):
        config = size.config()
        self.state, self.virtual_stages = state, virtual_stages
        self.chunks = build_model_chunks(config, state, virtual_stages, seed=SEED)
        self.grads = GradBuffer(self.chunks, state, pipeline=pipeline_layout(config, state, virtual_stages))
        self.comm = TimedComm(state)
        self.forward_cpu = 0.0  # thread CPU seconds inside the chunks' forwards (the rest: backward, loss)
        started = []
        for chunk in self.chunks:
            chunk.register_forward_pre_hook(lambda *_: started.append(time.thread_time()))
            chunk.register_forward_hook(lambda *_: setattr(self, "forward_cpu",
                                                           self.forward_cpu + time.thread_time() - started.pop()))

    def step(self, microbatches: list[dict], loss_wrapper=None) -> tuple[dict, ScheduleStats]:
        """One forward_backward, the ranks started together; its times and the schedule's stats."""
        state = self.state
        loss_fn = make_loss_fn(self.chunks[-1], state, global_loss_tokens(microbatches, state, "cpu"))
        if loss_wrapper is not None:
            loss_fn = loss_wrapper(loss_fn)
        stats = ScheduleStats()
        self.comm.records, self.comm.posts, self.forward_cpu = [], 0, 0.0
        dist.barrier(group=state.pp_group)
        start_wall, start_cpu = wall(), time.thread_time()
        forward_backward(self.chunks, microbatches, loss_fn, state=state, grads=self.grads,
                         virtual_stages=self.virtual_stages, comm=self.comm, stats=stats)
        end_wall, end_cpu = wall(), time.thread_time()
        records, self.comm.records = self.comm.records, None
        self.grads.finalize()
        self.grads.zero_grads()
        # Busy time before each event and after the last; a post's own time is busy, a wait's idle.
        marks_wall = [start_wall] + [x for r in records for x in r[2:4]] + [end_wall]
        marks_cpu = [start_cpu] + [x for r in records for x in r[4:6]] + [end_cpu]

        def busy(marks):
            gaps = [marks[2 * i + 1] - marks[2 * i] for i in range(len(records) + 1)]
            for i, record in enumerate(records):
                if record[0] == "post":
                    gaps[i] += marks[2 * i + 2] - marks[2 * i + 1]
            return gaps

        return {"start": start_wall, "end": end_wall, "events": [list(r[:2]) for r in records],
                "busy_wall": busy(marks_wall), "busy_cpu": busy(marks_cpu), "forward_cpu": self.forward_cpu,
                "schedule_compute_s": stats.compute_s, "schedule_comm_s": stats.comm_s,
                "max_in_flight": stats.max_in_flight}, stats


def worker_exchange(spec: dict, state, size: ModelSize) -> dict:
    """Rank 0 -> rank 1 -> rank 0, one activation each way: round-trip seconds (rank 0's clock)."""
    comm = TimedComm(state)
    shape = (size.micro_batch, size.seq, size.hidden)
    activation = torch.randn(shape)
    round_trips = []
    for i in range(spec["warmup"] + spec["repeats"]):
        dist.barrier(group=state.pp_group)
        if state.pp_rank == 0:
            t0 = wall()
            comm.exchange(send_next=activation)
            _, back = comm.exchange(recv_next=(shape, activation.dtype))
            if i >= spec["warmup"]:
                round_trips.append(wall() - t0)
            comm.release(back)
        elif state.pp_rank == 1:
            received, _ = comm.exchange(recv_prev=(shape, activation.dtype))
            comm.exchange(send_prev=received)
            comm.release(received)
    return {"bytes": activation.numel() * activation.element_size(), "round_trip_s": round_trips}


def worker_bubble(spec: dict, state, size: ModelSize) -> list[dict]:
    rows = []
    for v in spec["virtual_stages"]:
        pipeline = Pipeline(size, state, v)
        for m in spec["microbatches"]:
            microbatches = random_microbatches(size, m, SEED + m)
            steps, trace = [], None
            for r in range(spec["warmup"] + spec["repeats"]):
                record, stats = pipeline.step(microbatches)
                if r >= spec["warmup"]:
                    steps.append(record)
                    trace = trace or [[a.kind, a.microbatch, a.chunk] for a in stats.trace]
            rows.append({"virtual_stages": v, "microbatches": m, "steps": steps, "trace": trace})
    return rows


def worker_memory(spec: dict, state, size: ModelSize) -> list[dict]:
    rows = []
    m = spec["microbatches"]
    microbatches = random_microbatches(size, m, SEED)
    for v in spec["virtual_stages"]:
        pipeline = Pipeline(size, state, v)
        pipeline.step(microbatches)  # warm-up: buffers pooled, first-call allocations done
        excluded = module_state_tensors(pipeline.chunks)
        for free in (True, False):
            tracker = SavedTensorBytes(excluded)
            units: list[int] = []
            starts: list[int] = []
            hooks = [h for c in pipeline.chunks for h in (
                c.register_forward_pre_hook(lambda *_: starts.append(tracker.current)),
                c.register_forward_hook(lambda *_: units.append(tracker.current - starts.pop())))]

            def wrap(loss_fn):
                def counted(output, microbatch):
                    before = tracker.current
                    result = loss_fn(output, microbatch)
                    units[-1] += tracker.current - before  # the loss's saved tensors belong to its forward
                    return result
                return counted

            original = schedules.free_storage
            if not free:
                schedules.free_storage = lambda output: None
            pipeline.comm.tracker = tracker
            try:
                with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
                    _, stats = pipeline.step(microbatches, loss_wrapper=wrap)
            finally:
                schedules.free_storage = original
                pipeline.comm.tracker = None
                for h in hooks:
                    h.remove()
            rows.append({"virtual_stages": v, "microbatches": m, "free_storage": free,
                         "max_in_flight": stats.max_in_flight, "peak_saved_bytes": tracker.peak,
                         "trace_peak_bytes": trace_peak(stats.trace, units),
                         "left_saved_bytes": tracker.current, "unit_saved_bytes": units,
                         "peak_sent_held_bytes": tracker.peak_sent, "peak_total_bytes": tracker.peak_total,
                         "sent_outputs": tracker.sent_count})
    return rows


def module_state_tensors(chunks) -> list[torch.Tensor]:
    """What the modules keep between calls: parameters, buffers and tensors held in attributes
    (the rotary cos/sin cache, shared by every microbatch): state, not activations."""
    found = []
    for chunk in chunks:
        found += [*chunk.parameters(), *chunk.buffers()]
        for module in chunk.modules():
            for value in vars(module).values():
                items = value.values() if isinstance(value, dict) else [value]
                for item in items:
                    found += [t for t in (item if isinstance(item, (tuple, list)) else [item])
                              if isinstance(t, torch.Tensor)]
    return found


def trace_peak(trace, units: list[int]) -> int:
    """Peak of the saved bytes if each forward's ``units`` (in forward order) lived until its backward."""
    saved, live, peak, forwards = {}, 0, 0, iter(units)
    for a in trace:
        key = (a.microbatch, a.chunk)
        if a.kind == "F":
            saved[key] = next(forwards)
            live += saved[key]
            peak = max(peak, live)
        else:
            live -= saved.pop(key)
    return peak


WORKERS = {"exchange": worker_exchange, "bubble": worker_bubble, "memory": worker_memory}


def run_worker(rank: int, world: int, jobs: list, size: dict) -> dict:
    """One pipeline rank of a launch (the process group is up; one torch thread)."""
    state = init_parallel(1, world)
    return {"pp_rank": state.pp_rank, **{kind: WORKERS[kind](spec, state, ModelSize(**size)) for kind, spec in jobs}}


def launch(jobs: list, size: ModelSize, world: int, timeout: float) -> list[dict]:
    """Run ``jobs`` in ``world`` spawned processes (tests/dist_utils.py: gloo on 127.0.0.1, a free
    port, one torch thread each, every process killed on error or timeout); results by rank."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # while spawning too: the children import it
    try:
        from dist_utils import run_distributed
        return run_distributed(run_worker, world, args=(jobs, asdict(size)), timeout=timeout)
    finally:
        sys.path.remove(os.path.join(ROOT, "tests"))


# ------------------------------------------------------------------------------ summaries
def schedule_name(virtual_stages: int) -> str:
    return "1F1B" if virtual_stages == 1 else f"interleaved v={virtual_stages}"


def summarize_bubble(ranks: list[dict], pp: int, exchange_s: float) -> list[dict]:
    rows, med, mean = [], statistics.median, statistics.fmean
    for i, first in enumerate(ranks[0]["bubble"]):
        v, m = first["virtual_stages"], first["microbatches"]
        per_rank = [r["bubble"][i]["steps"] for r in ranks]
        by_step = list(zip(*per_rank))
        orders = schedule_orders(pp, m, v)
        plan = plan_ticks(orders, v)
        spans = [max(s["end"] for s in steps) - min(s["start"] for s in steps) for steps in by_step]
        measured = [[1 - sum(s["busy_wall"]) / span for s in steps] for steps, span in zip(by_step, spans)]
        replays = [replay_posted(plan, [s["events"] for s in steps], [s["busy_cpu"] for s in steps], exchange_s)
                   for steps in by_step]
        lockstep = [replay_step(plan, [lockstep_busy(s["events"], s["busy_cpu"]) for s in steps], exchange_s)
                    for steps in by_step]
        # Per rank, mean forward and backward (with the loss and the schedule's own work) CPU time.
        forward = [med(s["forward_cpu"] for s in steps) / (m * v) for steps in per_rank]
        backward = [med(sum(s["busy_cpu"]) - s["forward_cpu"] for s in steps) / (m * v) for steps in per_rank]
        ratio = sum(backward) / sum(forward)
        own = replay_step(plan, uniform_busy(plan, 1.0 / v, ratio / v), 0.0)
        posted = replay_posted(plan, *engine_events(plan, 1.0 / v, ratio / v), 0.0)
        dataflow = dataflow_idle(orders, v, 1.0 / v, ratio / v)
        staged = replay_posted(plan, *engine_events(plan, forward, backward), exchange_s)
        idle = lambda runs: [med(x) for x in zip(*(r["idle"] for r in runs))]
        measured_idle, replay_idle, lockstep_idle = [med(x) for x in zip(*measured)], idle(replays), idle(lockstep)
        rows.append({
            "pp": pp, "schedule": schedule_name(v), "virtual_stages": v, "microbatches": m, "steps": len(spans),
            "theory": theory_bubble(pp, m, v), "backward_over_forward": ratio,
            "schedule_idle": own["idle"], "schedule_idle_mean": mean(own["idle"]),
            "posted_idle": posted["idle"], "posted_idle_mean": mean(posted["idle"]),
            "dataflow_idle": dataflow, "dataflow_idle_mean": mean(dataflow),
            "stage_mean_idle": staged["idle"], "stage_mean_idle_mean": mean(staged["idle"]),
            "replay_idle": replay_idle, "replay_idle_mean": mean(replay_idle),
            "lockstep_replay_idle": lockstep_idle, "lockstep_replay_idle_mean": mean(lockstep_idle),
            "measured_idle": measured_idle, "measured_idle_mean": mean(measured_idle),
            "span_ms": med(spans) * 1e3, "replay_span_ms": med(r["span_s"] for r in replays) * 1e3,
            "lockstep_replay_span_ms": med(r["span_s"] for r in lockstep) * 1e3,
            "forward_ms": [f * 1e3 for f in forward], "backward_ms": [b * 1e3 for b in backward],
            "busy_wall_ms": [med(sum(s["busy_wall"]) for s in steps) * 1e3 for steps in per_rank],
            "busy_cpu_ms": [med(sum(s["busy_cpu"]) for s in steps) * 1e3 for steps in per_rank],
            "schedule_compute_ms": [med(s["schedule_compute_s"] for s in steps) * 1e3 for steps in per_rank],
            "wait_wall_ms": [med(s["end"] - s["start"] - sum(s["busy_wall"]) for s in steps) * 1e3
                             for steps in per_rank],
            "max_in_flight": [steps[0]["max_in_flight"] for steps in per_rank],
            "in_flight_promise": [in_flight_promise(pp, r, m, v) for r in range(pp)],
            "event_counts": [{kind: sum(e[0] == kind for e in steps[0]["events"]) for kind in ("post", "recv", "sent")}
                             for steps in per_rank],
            "trace_matches_table": all([[a.kind, a.microbatch, a.chunk] for a in orders[r]] == ranks[r]["bubble"][i]["trace"]
                                       for r in range(pp))})
    return rows


def summarize_memory(ranks: list[dict], pp: int) -> list[dict]:
    rows = []
    for i, first in enumerate(ranks[0]["memory"]):
        v, m = first["virtual_stages"], first["microbatches"]
        per_rank = [r["memory"][i] for r in ranks]
        promise = [in_flight_promise(pp, r, m, v) for r in range(pp)]
        last = per_rank[-1]["peak_saved_bytes"]
        rows.append({"pp": pp, "schedule": schedule_name(v), "virtual_stages": v, "microbatches": m,
                     "free_storage": first["free_storage"], "ranks": [{
                         "rank": r, "max_in_flight": x["max_in_flight"], "in_flight_promise": promise[r],
                         "peak_saved_mib": x["peak_saved_bytes"] / 2**20,
                         "unit_saved_mib": statistics.median(x["unit_saved_bytes"]) / 2**20,
                         "peak_in_units": x["peak_saved_bytes"] / statistics.median(x["unit_saved_bytes"]),
                         # 1.0: the peak is exactly the forwards the schedule holds at its fullest moment
                         "peak_over_in_flight_forwards": x["peak_saved_bytes"] / x["trace_peak_bytes"],
                         "peak_over_last_rank": x["peak_saved_bytes"] / last,
                         "promise_over_last_rank": promise[r] / promise[-1],
                         "left_saved_bytes": x["left_saved_bytes"],
                         "peak_sent_held_mib": x["peak_sent_held_bytes"] / 2**20, "sent_outputs": x["sent_outputs"],
                         "peak_total_mib": x["peak_total_bytes"] / 2**20} for r, x in enumerate(per_rank)]})
    return rows


def summarize_exchange(ranks: list[dict]) -> dict:
    trips = ranks[0]["exchange"]["round_trip_s"]
    return {"bytes": ranks[0]["exchange"]["bytes"], "round_trips": len(trips),
            "exchange_ms": statistics.median(trips) / 2 * 1e3,
            "exchange_ms_min": min(trips) / 2 * 1e3, "exchange_ms_max": max(trips) / 2 * 1e3}


# ------------------------------------------------------------------------------ report
def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "commit": git("rev-parse", "HEAD"), "load_average": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def tables(results: dict) -> str:
    pct = lambda values: " / ".join(f"{x:.1%}" for x in values)
    out = ["### Cost of one exchange (one activation, PipelineComm.exchange, half the round trip)", ""]
    out += md_table(["pp launch", "bytes", "ms, median (min-max)", "round trips"],
                    [[pp, e["bytes"], f"{e['exchange_ms']:.3f} ({e['exchange_ms_min']:.3f}-{e['exchange_ms_max']:.3f})",
                      e["round_trips"]] for pp, e in results["exchange"].items()])
    out += ["### Pipeline bubble: idle share of the step, mean over ranks (medians over steps)", ""]
    out += md_table(["p", "schedule", "m", "theory", "tables, waits at use", "tables, lockstep",
                     "+ stage imbalance, exchanges", "replayed (CPU time)", "replayed in lockstep",
                     "measured (wall)", "span ms: measured / replayed", "tB/tF"],
                    [[r["pp"], r["schedule"], r["microbatches"], f"{r['theory']:.1%}",
                      f"{r['posted_idle_mean']:.1%}", f"{r['schedule_idle_mean']:.1%}", f"{r['stage_mean_idle_mean']:.1%}",
                      f"{r['replay_idle_mean']:.1%}", f"{r['lockstep_replay_idle_mean']:.1%}",
                      f"{r['measured_idle_mean']:.1%}", f"{r['span_ms']:.0f} / {r['replay_span_ms']:.0f}",
                      f"{r['backward_over_forward']:.2f}"] for r in results["bubble"]])
    if results.get("baseline"):
        base = results["baseline"]
        before = {(r["pp"], r["schedule"], r["microbatches"]): r for r in base["rows"]}
        out += [f"### Against the baseline run (commit {base['commit'][:7]}, {base['date']}, "
                "the engine waiting for each tick's exchange in lockstep)", ""]
        out += md_table(["p", "schedule", "m", "theory", "before: measured", "before: replayed",
                         "now: measured", "now: replayed", "now: replayed in lockstep", "span ms: before / now"],
                        [[r["pp"], r["schedule"], r["microbatches"], f"{r['theory']:.1%}",
                          f"{b['measured_idle_mean']:.1%}", f"{b['replay_idle_mean']:.1%}",
                          f"{r['measured_idle_mean']:.1%}", f"{r['replay_idle_mean']:.1%}",
                          f"{r['lockstep_replay_idle_mean']:.1%}", f"{b['span_ms']:.0f} / {r['span_ms']:.0f}"]
                         for r in results["bubble"]
                         if (b := before.get((r["pp"], r["schedule"], r["microbatches"]))) is not None])
    out += ["### Pipeline bubble per rank (0 / 1 / ...)", ""]
    out += md_table(["p", "schedule", "m", "measured (wall)", "replayed (CPU time)", "busy CPU ms",
                     "forward / backward CPU ms per (microbatch, chunk)", "max in flight (promise)"],
                    [[r["pp"], r["schedule"], r["microbatches"], pct(r["measured_idle"]), pct(r["replay_idle"]),
                      " / ".join(f"{x:.0f}" for x in r["busy_cpu_ms"]),
                      " / ".join(f"{f:.1f}, {b:.1f}" for f, b in zip(r["forward_ms"], r["backward_ms"])),
                      " / ".join(f"{x} ({y})" for x, y in zip(r["max_in_flight"], r["in_flight_promise"]))]
                     for r in results["bubble"]])
    if results.get("memory"):
        out += ["### Activation memory per rank: saved-for-backward bytes and in-flight microbatches", ""]
        rows = []
        for row in results["memory"]:
            for x in row["ranks"]:
                rows.append([row["pp"], row["schedule"], row["microbatches"], "on" if row["free_storage"] else "off",
                             x["rank"], f"{x['max_in_flight']} ({x['in_flight_promise']})",
                             f"{x['peak_saved_mib']:.2f}", f"{x['unit_saved_mib']:.3f}", f"{x['peak_in_units']:.2f}",
                             f"{x['peak_over_in_flight_forwards']:.3f}",
                             f"{x['peak_over_last_rank']:.2f} ({x['promise_over_last_rank']:.2f})",
                             f"{x['peak_sent_held_mib']:.3f} ({x['sent_outputs']})", f"{x['peak_total_mib']:.2f}"])
        out += md_table(["p", "schedule", "m", "free sent", "rank", "max in flight (promise)", "peak saved MiB",
                         "one forward saves MiB", "peak / one forward", "peak / in-flight forwards' sum",
                         "peak / last rank's (promise)",
                         "sent outputs held MiB (outputs sent)", "peak saved + held MiB"], rows)
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["pp"] for r in results["bubble"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 5.0), squeeze=False)
    for ax, pp in zip(axes[0], sizes):
        rows = [r for r in results["bubble"] if r["pp"] == pp]
        for v, color in zip(sorted({r["virtual_stages"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
            mine = sorted((r for r in rows if r["virtual_stages"] == v), key=lambda r: r["microbatches"])
            ms = [r["microbatches"] for r in mine]
            fine = [ms[0] + (ms[-1] - ms[0]) * k / 100 for k in range(101)]
            name = schedule_name(v)
            ax.plot(fine, [theory_bubble(pp, x, v) for x in fine], color=color, label=f"{name}: theory")
            ax.plot(ms, [r["measured_idle_mean"] for r in mine], "o--", color=color, label=f"{name}: measured (wall)")
            ax.plot(ms, [r["replay_idle_mean"] for r in mine], "s:", color=color, mfc="none",
                    label=f"{name}: replayed (CPU time, a core per rank)")
            before = {(b["pp"], b["schedule"], b["microbatches"]): b for b in results.get("baseline", {}).get("rows", [])}
            old = [(r["microbatches"], before[(pp, name, r["microbatches"])]["measured_idle_mean"])
                   for r in mine if (pp, name, r["microbatches"]) in before]
            if old:
                ax.plot(*zip(*old), "^", color=color, alpha=0.45, ms=8,
                        label=f"{name}: measured before (commit {results['baseline']['commit'][:7]}, lockstep waits)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(x) for x in ms])
        ax.set_xlabel("microbatches per step (m)")
        ax.set_ylabel("idle share of the step (mean over ranks)")
        ax.set_title(f"p = {pp} stages")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line
def parse_list(text: str) -> list[int]:
    if not all(v.strip().isdigit() and int(v) > 0 for v in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return [int(v) for v in text.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for pipeline.json, tables.md and pipeline_bubble.png")
    for name, default in asdict(ModelSize()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"default {default}")
    p.add_argument("--pp-sizes", type=parse_list, default=[2, 4], help="pipeline stages (one launch each)")
    p.add_argument("--microbatches", type=parse_list, default=[4, 8, 16], help="microbatches per step")
    p.add_argument("--virtual-stages", type=int, default=2, help="model chunks per rank of the interleaved schedule")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per (schedule, m)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per (schedule, m)")
    p.add_argument("--exchange-repeats", type=int, default=50, help="timed round trips of one activation")
    p.add_argument("--memory-microbatches", type=int, default=8, help="microbatches of the memory runs (0: none)")
    p.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds for one launch")
    p.add_argument("--from-json", help="measure nothing: write the tables and plot of this pipeline.json to --out")
    p.add_argument("--baseline", help="a pipeline.json of an earlier run, whose idle shares the tables and plot "
                                      "show beside this run's")
    args = p.parse_args(argv)
    for name in ("repeats", "exchange_repeats", "virtual_stages") + tuple(asdict(ModelSize())):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.memory_microbatches < 0:
        p.error("--warmup and --memory-microbatches must be >= 0")
    if args.virtual_stages < 2:
        p.error(f"--virtual-stages must be at least 2 (the interleaved schedule), got {args.virtual_stages}")
    counts = args.microbatches + ([args.memory_microbatches] if args.memory_microbatches else [])
    for pp in args.pp_sizes:
        if pp < 2:
            p.error(f"--pp-sizes: a pipeline needs at least 2 stages, got {pp}")
        if args.layers % (pp * args.virtual_stages):
            p.error(f"--layers {args.layers} must be divisible by pp {pp} x virtual stages {args.virtual_stages}")
        bad = [m for m in counts if m < pp or m % pp]
        if bad:
            p.error(f"microbatch counts {bad} do not suit pp {pp}: the interleaved schedule needs a multiple of pp")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        if baseline is not None:
            results["baseline"] = baseline
        return write_report(results, args.out, write_json=False)
    size = ModelSize(**{f: getattr(args, f) for f in asdict(ModelSize())})
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__)), *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": machine(), "command": command, "model": asdict(size), "warmup": args.warmup,
               "repeats": args.repeats, "exchange": {}, "bubble": [], "memory": []}
    if baseline is not None:
        results["baseline"] = baseline
    t0 = time.perf_counter()
    schedules = [1, args.virtual_stages]
    for pp in args.pp_sizes:
        jobs = [("exchange", {"warmup": 5, "repeats": args.exchange_repeats}),
                ("bubble", {"virtual_stages": schedules, "microbatches": args.microbatches,
                            "warmup": args.warmup, "repeats": args.repeats})]
        if args.memory_microbatches:
            jobs.append(("memory", {"virtual_stages": schedules, "microbatches": args.memory_microbatches}))
        ranks = launch(jobs, size, pp, args.worker_timeout)
        exchange = summarize_exchange(ranks)
        results["exchange"][pp] = exchange
        results["bubble"] += summarize_bubble(ranks, pp, exchange["exchange_ms"] / 1e3)
        if args.memory_microbatches:
            results["memory"] += summarize_memory(ranks, pp)
        results.setdefault("raw", {})[pp] = ranks
    results["seconds"] = time.perf_counter() - t0
    results["machine"]["load_average_after"] = list(os.getloadavg())
    return write_report(results, args.out)


def load_baseline(path: str) -> dict:
    """The idle shares of an earlier run's pipeline.json, with its commit, date and load."""
    with open(path) as f:
        earlier = json.load(f)
    if not earlier.get("bubble"):
        raise SystemExit(f"--baseline {path}: no bubble rows in it (not a pipeline.json of this benchmark?)")
    keys = ("pp", "schedule", "microbatches", "measured_idle_mean", "replay_idle_mean", "span_ms", "replay_span_ms")
    machine_ = earlier["machine"]
    return {"commit": machine_["commit"], "date": machine_["date"], "load_average": machine_.get("load_average"),
            "rows": [{k: row[k] for k in keys} for row in earlier["bubble"]]}


def write_report(results: dict, out: str, write_json: bool = True) -> dict:
    os.makedirs(out, exist_ok=True)
    if write_json:
        with open(os.path.join(out, "pipeline.json"), "w") as f:
            json.dump(results, f, indent=1)
    text = tables(results)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(text + "\n")
    plot(results, os.path.join(out, "pipeline_bubble.png"))
    print(text)
    return results


if __name__ == "__main__":
    main()
