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
            step span (first rank's start to last rank's end). Replayed (pipeline_replay.py): the step
            re-timed from each rank's busy CPU time between events plus the measured exchange cost, as
            if each rank had a core, the engine's way and in lockstep: with more ranks than cores the
            wall clock counts a ready but descheduled rank as busy; the replay does not.
  memory    per schedule, sent outputs freed (the engine) and not (free_storage a no-op in the worker):
            peak bytes of the tensors autograd saves for backward (saved_tensors_hooks, once per storage
            while a saved tensor holds it; parameters, buffers and module caches excluded), the bytes
            each (microbatch, chunk) forward saves, ScheduleStats.max_in_flight, and the sent outputs
            still held against the count the plan gives (pipeline_replay.sent_outputs_held).

--baseline OLD/pipeline.json shows an earlier run's idle shares beside this run's (table and plot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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
from engine.train.schedules import ScheduleStats, forward_backward
from engine.train.step import global_loss_tokens, make_loss_fn
from pipeline_replay import plot, summarize_bubble, summarize_exchange, summarize_memory, tables, trace_peak

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
        self.current = self.peak = self.peak_sent = self.peak_total = self.sent_count = self.sent_bytes = 0
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
        self.sent_bytes = max(self.sent_bytes, tensor.untyped_storage().nbytes())  # one whole output

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
                         "sent_outputs": tracker.sent_count, "sent_bytes": tracker.sent_bytes})
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
