"""Training benchmarks on CPU (gloo for the multi-process parts), written to results.json + tables.md.

    python benchmarks/bench_train.py --out DIR [--sections step,zero,overlap,layout] [sizes, repeats]

Sections:
  step     one process: the engine's step (build_parallel_llama + GradBuffer + MixedPrecisionAdamW +
           train_step, as the training loop builds it) against a plain loop over transformers'
           LlamaForCausalLM with the same weights, torch.optim.AdamW and clip_grad_norm_; repeats
           interleaved (alternating order), warm-up excluded; a phase breakdown of both and, with
           --profile-steps, torch.profiler's top operators per step.
  zero     DP = 1, 2, 4 processes (--dp-sizes), distributed optimizer off and on: bytes of the fp32
           master weights and Adam moments each rank's optimizer holds after two steps, and each
           rank's peak RSS (one launch per case).
  overlap  DP = 2, small buckets: the last microbatch's backward, the wait for the reduction
           (GradBuffer.finalize) and the whole step, with buckets launched from the backward hooks
           (overlap on) or all after the backward (off), alternating step by step on one buffer.
  layout   TP = 2: all_gather_along / reduce_scatter_along on [b, s, h] along dim 1 (movedim +
           contiguous copies both ways) against the same bytes as [s, b, h] along dim 0 (no copy),
           and the copies alone.

Every multi-process measurement runs this file again as worker processes (one per rank, fresh
interpreters, so each ru_maxrss is that rank's own; overlap and layout share one launch of two),
rendezvous on 127.0.0.1, killed on timeout. Times are wall clock; a multi-rank time is, repeat by
repeat, that of the slowest rank.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.model.config import LlamaConfig
from engine.model.hf import engine_to_hf_name
from engine.parallel.collectives import all_gather_along, reduce_scatter_along
from engine.parallel.layout import is_vocab_parallel
from engine.parallel.state import init_parallel, single_process_state
from engine.parallel.tensor_parallel import build_parallel_llama, sequence_parallel_names
from engine.train.grads import GradBuffer
from engine.train.optimizer import AdamWConfig, MixedPrecisionAdamW, no_weight_decay
from engine.train.step import global_loss_tokens, make_loss_fn, train_step

SECTIONS = ("step", "zero", "overlap", "layout")
ADAM = AdamWConfig(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
CLIP = 1.0
SEED = 0


@dataclass
class ModelSize:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    vocab: int = 1024  # a multiple of 128: the engine's padded vocabulary adds no columns
    seq: int = 256

    def config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           max_position_embeddings=self.seq)


# ------------------------------------------------------------------------------------ helpers
def median_spread(values: list[float]) -> dict:
    """Median, min, max and the interquartile range of a list of timings (seconds -> ms)."""
    ms = sorted(v * 1e3 for v in values)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1],
            "iqr_ms": q[2] - q[0], "n": len(ms)}


def random_batches(size: ModelSize, batch: int, count: int) -> list[dict]:
    """``count`` CT-style batches: seq + 1 random tokens cut into inputs and next-token labels."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(count):
        sample = torch.randint(0, size.vocab, (batch, size.seq + 1), generator=g)
        out.append({"tokens": sample[:, :-1].contiguous(), "labels": sample[:, 1:].contiguous(),
                    "loss_mask": torch.ones(batch, size.seq)})
    return out


def split_microbatches(batch: dict, micro: int, dp: int, dp_rank: int) -> list[dict]:
    """This DP rank's microbatches of a global batch (microbatch j takes rows of rank-major blocks)."""
    rows = batch["tokens"].shape[0]
    if rows % (micro * dp):
        raise ValueError(f"global batch {rows} is not divisible by micro batch {micro} x DP {dp}")
    out = []
    for j in range(rows // (micro * dp)):
        first = (j * dp + dp_rank) * micro
        out.append({k: v[first:first + micro] for k, v in batch.items()})
    return out


def build_engine(config: LlamaConfig, state, *, bucket_size: int = 40_000_000, distributed_optimizer=False):
    """The model, gradient buffer and optimizer exactly as engine.train.loop.Trainer builds them."""
    model = build_parallel_llama(config, state, seed=SEED, device=state.device, dtype=torch.float32)
    grads = GradBuffer([model], state, bucket_size=bucket_size, distributed_optimizer=distributed_optimizer,
                       sequence_parallel_names=sequence_parallel_names(model))
    return model, grads, MixedPrecisionAdamW(grads, ADAM)


def rss_mib() -> dict:
    """Current and peak resident memory of this process (MiB), from /proc/self/status. The peak is
    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child started by a big
    parent would report at least the parent's resident size."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


# --------------------------------------------------------------------------- section 1: step
def build_hf(config: LlamaConfig, engine_model):
    """transformers' LlamaForCausalLM with the engine model's weights, and its plain AdamW."""
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).float()
    # The engine pads the vocabulary rows to a multiple of 128, HF does not.
    weights = {engine_to_hf_name(n): p.detach()[:config.vocab_size].clone()
               if is_vocab_parallel(n) else p.detach().clone() for n, p in engine_model.named_parameters()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF model weights: missing {missing}, unexpected {unexpected}")
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not no_weight_decay(n)], "weight_decay": ADAM.weight_decay},
              {"params": [p for n, p in named if no_weight_decay(n)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=ADAM.lr, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps)
    return model, optimizer


def hf_step(model, optimizer, batch: dict, timer=None) -> tuple[float, float]:
    """A plain training step: forward, mean token cross entropy, backward, clip, AdamW."""
    mark = timer or (lambda name: None)
    logits = model(input_ids=batch["tokens"]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
    mark("forward + loss")
    loss.backward()
    mark("backward")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    mark("grad norm + clip")
    optimizer.step()
    mark("optimizer")
    optimizer.zero_grad(set_to_none=True)
    mark("zero grads")
    return loss.item(), float(norm)


def engine_step_phases(model, grads, optimizer, state, microbatches: list[dict], timer) -> tuple[float, float]:
    """train_step's sequence written out from the same public pieces, with a timer mark per phase."""
    tokens = global_loss_tokens(microbatches, state, grads.grads.device)
    loss_fn = make_loss_fn(model, state, tokens)
    total = 0.0
    for i, mb in enumerate(microbatches):
        grads.sync = i == len(microbatches) - 1
        loss, loss_sum = loss_fn(model(mb["tokens"]), mb)
        timer("forward + loss")
        loss.backward()
        timer("backward")
        total += float(loss_sum.detach())
    grads.sync = True
    grads.finalize()
    norm = grads.grad_norm()
    timer("grad norm + clip")
    optimizer.step(ADAM.lr, CLIP, norm)
    timer("optimizer")
    grads.zero_grads()
    timer("zero grads")
    return total / tokens, norm


def phase_timer():
    """(times, mark): ``mark(name)`` adds the time since the previous mark to ``times[name]``."""
    times, last = {}, [time.perf_counter()]

    def mark(name: str) -> None:
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - last[0]
        last[0] = now
    return times, mark


def top_operators(run_step, steps: int, top: int) -> list[dict]:
    """torch.profiler's operators with the most self CPU time, in ms per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in rows]


def bench_step(args, size: ModelSize) -> dict:
    torch.set_num_threads(args.threads)
    config = size.config()
    state = single_process_state()
    model, grads, optimizer = build_engine(config, state)
    hf_model, hf_optimizer = build_hf(config, model)
    batches = random_batches(size, args.batch, 4)
    # Wall and process CPU time (less sensitive to other processes), losses, per-phase times.
    runs, cpu, losses, phases = ({"engine": [], "transformers": []} for _ in range(4))

    def run(impl: str, batch: dict) -> float:
        if impl == "engine":
            return train_step([model], [batch], grads, optimizer, state, lr=ADAM.lr, clip_grad=CLIP).loss
        return hf_step(hf_model, hf_optimizer, batch)[0]

    for r in range(args.warmup + args.repeats):
        order = ("engine", "transformers") if r % 2 == 0 else ("transformers", "engine")
        batch = batches[r % len(batches)]
        for impl in order:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = run(impl, batch)
            elapsed, cpu_elapsed = time.perf_counter() - t0, time.process_time() - c0
            losses[impl].append(loss)
            if r >= args.warmup:
                runs[impl].append(elapsed)
                cpu[impl].append(cpu_elapsed)

    for r in range(args.phase_repeats):
        batch = batches[r % len(batches)]
        times, mark = phase_timer()
        engine_step_phases(model, grads, optimizer, state, [batch], mark)
        phases["engine"].append(times)
        times, mark = phase_timer()
        hf_step(hf_model, hf_optimizer, batch, mark)
        phases["transformers"].append(times)

    tokens = args.batch * size.seq
    result = {"threads": args.threads, "batch": args.batch, "tokens_per_step": tokens,
              "parameters": sum(p.numel() for p in hf_model.parameters()),
              "max_loss_difference": max(abs(a - b) for a, b in zip(losses["engine"], losses["transformers"])),
              "losses": losses, "impls": {}}
    for impl in runs:
        stats = median_spread(runs[impl])
        stats["tokens_per_s"] = tokens / (stats["median_ms"] / 1e3)
        stats["cpu"] = median_spread(cpu[impl])
        stats["phases_ms"] = {name: statistics.median(p[name] for p in phases[impl]) * 1e3
                              for name in phases[impl][0]} if phases[impl] else {}
        result["impls"][impl] = stats
    # Each repeat ran both back to back: the ratio within a repeat cancels most of the load drift.
    paired = [e / t for e, t in zip(runs["engine"], runs["transformers"])]
    result["engine_over_transformers"] = {"median": statistics.median(paired), "min": min(paired),
                                          "max": max(paired)}
    if args.profile_steps:
        batch = batches[0]
        result["profile"] = {
            "engine": top_operators(lambda: run("engine", batch), args.profile_steps, args.profile_top),
            "transformers": top_operators(lambda: run("transformers", batch), args.profile_steps, args.profile_top),
        }
    return result


# ------------------------------------------------------------------ multi-process workers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(jobs: list[tuple[str, dict]], world: int, timeout: float) -> list[dict]:
    """Run the worker ``jobs`` ([(kind, spec)], in order) in ``world`` fresh processes, one per rank;
    returns, by rank, ``{kind: result}``."""
    port = free_port()
    procs, files = [], []
    try:
        for rank in range(world):
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                   "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(jobs)],
                                          stdout=out, stderr=err, env=env))
        deadline = time.monotonic() + timeout
        for rank, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"workers {[k for k, _ in jobs]} (world {world}): rank {rank} did not finish "
                                   f"in {timeout:.0f} s") from None
        results = []
        for rank, (p, (out, err)) in enumerate(zip(procs, files)):
            out.seek(0)
            err.seek(0)
            if p.returncode != 0:
                raise RuntimeError(f"workers {[k for k, _ in jobs]} (world {world}): rank {rank} exited with "
                                   f"{p.returncode}:\n{err.read()[-4000:]}")
            results.append(json.loads(out.read().strip().splitlines()[-1]))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out, err in files:
            out.close()
            err.close()


def run_worker(jobs: list) -> dict:
    torch.set_num_threads(1)
    return {kind: WORKERS[kind](spec) for kind, spec in jobs}


def worker_zero(spec: dict) -> dict:
    before = rss_mib()
    state = init_parallel(1, 1, timeout_s=120)
    size = ModelSize(**spec["size"])
    model, grads, optimizer = build_engine(size.config(), state, bucket_size=spec["bucket_size"],
                                           distributed_optimizer=spec["distributed_optimizer"])
    built = rss_mib()
    for batch in random_batches(size, spec["batch"], spec["steps"]):
        train_step([model], split_microbatches(batch, spec["micro"], state.dp_size, state.dp_rank), grads,
                   optimizer, state, lr=ADAM.lr, clip_grad=CLIP)
    held = {"master": optimizer.master.numel() * optimizer.master.element_size(), "exp_avg": 0, "exp_avg_sq": 0}
    for view in optimizer.master_views:
        for kind in ("exp_avg", "exp_avg_sq"):
            t = optimizer.inner.state[view][kind]
            held[kind] += t.numel() * t.element_size()
    return {"dp_rank": state.dp_rank, "bytes": held, "optimizer_bytes": sum(held.values()),
            "model_elements": sum(p.numel() for p in model.parameters()),
            "buffer_elements": grads.numel, "buckets": len(grads.buckets),
            "rss_after_import_mib": before["rss_mib"], "rss_after_build_mib": built["rss_mib"],
            "peak_rss_mib": rss_mib()["peak_rss_mib"]}


def worker_overlap(spec: dict) -> dict:
    import torch.distributed as dist

    state = init_parallel(1, 1, timeout_s=120)
    size = ModelSize(**spec["size"])
    model, grads, optimizer = build_engine(size.config(), state, bucket_size=spec["bucket_size"])
    batches = [split_microbatches(b, spec["micro"], state.dp_size, state.dp_rank)
               for b in random_batches(size, spec["batch"], 4)]
    # The reduction alone: each bucket all-reduced in turn, nothing else running.
    alone = []
    for _ in range(spec["repeats"]):
        dist.barrier()
        t0 = time.perf_counter()
        for bucket in grads.buckets:
            dist.all_reduce(grads.grads[bucket.start:bucket.end], group=state.dp_group)
        alone.append(time.perf_counter() - t0)
    grads.zero_grads()
    keys = ("last_backward", "finalize", "train_step")
    times = {mode: {k: [] for k in keys} for mode in ("on", "off")}
    for r in range(spec["warmup"] + spec["repeats"]):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            grads.overlap = mode == "on"  # read at each hook and at finalize: switching between steps is safe
            microbatches = batches[r % len(batches)]
            dist.barrier()
            tokens = global_loss_tokens(microbatches, state, grads.grads.device)
            loss_fn = make_loss_fn(model, state, tokens)
            for i, mb in enumerate(microbatches):
                last = i == len(microbatches) - 1
                grads.sync = last
                loss, _ = loss_fn(model(mb["tokens"]), mb)
                t0 = time.perf_counter()
                loss.backward()
                if last:
                    t_backward = time.perf_counter() - t0
            grads.sync = True
            t0 = time.perf_counter()
            grads.finalize()
            t_finalize = time.perf_counter() - t0
            optimizer.step(ADAM.lr, CLIP, grads.grad_norm())
            grads.zero_grads()
            dist.barrier()
            t0 = time.perf_counter()
            train_step([model], microbatches, grads, optimizer, state, lr=ADAM.lr, clip_grad=CLIP)
            t_train_step = time.perf_counter() - t0
            if r >= spec["warmup"]:
                for k, v in zip(keys, (t_backward, t_finalize, t_train_step)):
                    times[mode][k].append(v)
    return {"dp_rank": state.dp_rank, "buckets": len(grads.buckets),
            "bucket_elements": [b.size for b in grads.buckets],
            "microbatches": len(batches[0]), "times": times, "reduction_alone": alone}


def worker_layout(spec: dict) -> dict:
    import torch.distributed as dist

    state = init_parallel(spec["tp"], 1, timeout_s=300)
    group, tp = state.tp_group, state.tp_size
    rows = []
    for b, s, h in spec["sizes"]:
        if s % tp:
            raise ValueError(f"layout size {b}x{s}x{h}: sequence {s} is not divisible by TP {tp}")
        g = torch.Generator().manual_seed(state.rank)
        local_bsh = torch.randn(b, s // tp, h, generator=g)          # gather input, [b, s/tp, h]
        local_sbh = local_bsh.transpose(0, 1).contiguous()            # the same values as [s/tp, b, h]
        full_bsh = torch.randn(b, s, h, generator=g)                  # reduce-scatter input
        full_sbh = full_bsh.transpose(0, 1).contiguous()
        # The two layouts carry the same numbers: the results must be transposes of each other.
        if not torch.equal(all_gather_along(local_bsh, 1, group), all_gather_along(local_sbh, 0, group).transpose(0, 1)):
            raise AssertionError(f"{b}x{s}x{h}: all-gather along dim 1 and dim 0 disagree")
        if not torch.allclose(reduce_scatter_along(full_bsh, 1, group),
                              reduce_scatter_along(full_sbh, 0, group).transpose(0, 1)):
            raise AssertionError(f"{b}x{s}x{h}: reduce-scatter along dim 1 and dim 0 disagree")
        gathered_sbh = all_gather_along(local_sbh, 0, group)
        scattered_sbh = reduce_scatter_along(full_sbh, 0, group)
        ops = {
            "gather [b,s,h] dim 1": lambda: all_gather_along(local_bsh, 1, group),
            "gather [s,b,h] dim 0": lambda: all_gather_along(local_sbh, 0, group),
            "gather copies": lambda: (local_bsh.movedim(1, 0).contiguous(), gathered_sbh.movedim(0, 1).contiguous()),
            "reduce-scatter [b,s,h] dim 1": lambda: reduce_scatter_along(full_bsh, 1, group),
            "reduce-scatter [s,b,h] dim 0": lambda: reduce_scatter_along(full_sbh, 0, group),
            "reduce-scatter copies": lambda: (full_bsh.movedim(1, 0).contiguous(),
                                              scattered_sbh.movedim(0, 1).contiguous()),
        }
        times = {name: [] for name in ops}
        for r in range(spec["warmup"] + spec["repeats"]):
            names = list(ops) if r % 2 == 0 else list(reversed(ops))
            for name in names:
                dist.barrier(group=group)
                t0 = time.perf_counter()
                ops[name]()
                if r >= spec["warmup"]:
                    times[name].append(time.perf_counter() - t0)
        rows.append({"b": b, "s": s, "h": h, "times": times})
        del local_bsh, local_sbh, full_bsh, full_sbh, gathered_sbh, scattered_sbh
    return {"rank": state.rank, "rows": rows, "peak_rss_mib": rss_mib()["peak_rss_mib"]}


WORKERS = {"zero": worker_zero, "overlap": worker_overlap, "layout": worker_layout}


# ------------------------------------------------------------------- sections 2-4: parents
def slowest_rank(per_rank: list[list[float]]) -> list[float]:
    """Repeat by repeat, the time of the slowest rank (the one the others wait for)."""
    return [max(ts) for ts in zip(*per_rank)]


def bench_zero(args, size: ModelSize) -> list[dict]:
    rows = []
    for dp in args.dp_sizes:
        for zero in args.zero_modes:
            spec = {"size": asdict(size), "batch": args.batch, "micro": args.zero_micro, "steps": 2,
                    "bucket_size": args.zero_bucket_size, "distributed_optimizer": zero}
            ranks = [r["zero"] for r in launch([("zero", spec)], dp, args.worker_timeout)]
            rows.append({"dp": dp, "distributed_optimizer": zero, "ranks": ranks})
    # The whole model's state: three fp32 copies (master, exp_avg, exp_avg_sq) of every parameter.
    full_bytes = 3 * 4 * rows[0]["ranks"][0]["model_elements"]
    for row in rows:
        row["max_optimizer_bytes"] = max(r["optimizer_bytes"] for r in row["ranks"])
        row["share_of_full"] = row["max_optimizer_bytes"] / full_bytes
        row["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in row["ranks"])
    return rows


def two_rank_jobs(args, size: ModelSize) -> list[tuple[str, dict]]:
    """The overlap (DP = 2) and layout (TP = 2) workers: one launch of two processes runs both."""
    specs = {"overlap": {"size": asdict(size), "batch": args.batch, "micro": args.overlap_micro,
                         "bucket_size": args.overlap_bucket_size, "warmup": args.warmup, "repeats": args.repeats},
             "layout": {"tp": 2, "sizes": args.layout_sizes, "warmup": 1, "repeats": args.layout_repeats}}
    return [(k, specs[k]) for k in ("overlap", "layout") if k in args.sections]


def summarize_overlap(ranks: list[dict]) -> dict:
    result = {"dp": 2, "buckets": ranks[0]["buckets"], "bucket_elements": ranks[0]["bucket_elements"],
              "microbatches_per_rank": ranks[0]["microbatches"],
              "reduction_alone": median_spread(slowest_rank([r["reduction_alone"] for r in ranks])),
              "modes": {}}
    for mode in ("on", "off"):
        result["modes"][mode] = {k: median_spread(slowest_rank([r["times"][mode][k] for r in ranks]))
                                 for k in ranks[0]["times"][mode]}
    return result


def summarize_layout(ranks: list[dict]) -> list[dict]:
    rows = []
    for i, first in enumerate(ranks[0]["rows"]):
        times = {name: median_spread(slowest_rank([r["rows"][i]["times"][name] for r in ranks]))
                 for name in first["times"]}
        b, s, h = first["b"], first["s"], first["h"]
        row = {"b": b, "s": s, "h": h, "gathered_mib": b * s * h * 4 / 2**20, "times": times}
        for op in ("gather", "reduce-scatter"):
            bsh = times[f"{op} [b,s,h] dim 1"]["median_ms"]
            row[f"{op} copy share"] = times[f"{op} copies"]["median_ms"] / bsh
            row[f"{op} [b,s,h] / [s,b,h]"] = bsh / times[f"{op} [s,b,h] dim 0"]["median_ms"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- report
def machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
    import transformers
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(stats: dict) -> str:
    return f"{stats['median_ms']:.1f} ({stats['min_ms']:.1f}-{stats['max_ms']:.1f})"


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def tables(results: dict) -> str:
    """Markdown tables of every section in ``results`` (medians with min-max, in ms)."""
    out = []
    if "step" in results:
        st, ratio = results["step"], results["step"]["engine_over_transformers"]
        impls = st["impls"]
        out += ["### Step: engine vs transformers (one process)", "",
                f"{st['parameters']:,} parameters, batch {st['batch']}, {st['tokens_per_step']} tokens per step, "
                f"{st['threads']} threads; max |loss difference| over all steps {st['max_loss_difference']:.2e}", ""]
        out += md_table(["implementation", "wall ms, median (min-max)", "IQR ms", "CPU ms, median (min-max)",
                         "tokens/s", "n"], [[impl, fmt(s), f"{s['iqr_ms']:.1f}", fmt(s["cpu"]),
                                             f"{s['tokens_per_s']:.0f}", s["n"]] for impl, s in impls.items()])
        out += [f"engine / transformers wall time, paired by repeat: median {ratio['median']:.3f} "
                f"(min {ratio['min']:.3f}, max {ratio['max']:.3f})", ""]
        out += md_table(["phase (median ms)", "engine", "transformers"],
                        [[name, f"{ms:.1f}", f"{impls['transformers']['phases_ms'].get(name, float('nan')):.1f}"]
                         for name, ms in impls["engine"]["phases_ms"].items()])
        for impl, rows in st.get("profile", {}).items():
            out += [f"Top operators by self CPU time, {impl}:", ""]
            out += md_table(["operator", "self ms per step", "calls per step"],
                            [[f"`{r['op']}`", f"{r['self_ms_per_step']:.1f}", f"{r['calls_per_step']:.0f}"]
                             for r in rows])
    if "zero" in results:
        out += ["### Optimizer state per rank (master + exp_avg + exp_avg_sq) and peak RSS", ""]
        out += md_table(["DP", "distributed optimizer", "optimizer MiB per rank (max)", "share of the whole state",
                         "RSS MiB per rank: after import / after build / peak"],
                        [[row["dp"], "on" if row["distributed_optimizer"] else "off",
                          f"{row['max_optimizer_bytes'] / 2**20:.2f}", f"{row['share_of_full']:.3f}",
                          "; ".join(f"{r['rss_after_import_mib']:.0f} / {r['rss_after_build_mib']:.0f} / "
                                    f"{r['peak_rss_mib']:.0f}" for r in row["ranks"])] for row in results["zero"]])
    if "overlap" in results:
        ov = results["overlap"]
        names = {"last_backward": "last microbatch's backward", "finalize": "finalize (wait for DP)",
                 "train_step": "whole step (train_step)"}
        out += ["### DP=2 bucketed reduction: overlap on vs off", "",
                f"{ov['buckets']} buckets, {ov['microbatches_per_rank']} microbatches per rank; "
                f"all buckets all-reduced alone (no compute): {fmt(ov['reduction_alone'])} ms", ""]
        out += md_table(["ms, median (min-max), slowest rank", "overlap on", "overlap off"],
                        [[label, fmt(ov["modes"]["on"][k]), fmt(ov["modes"]["off"][k])] for k, label in names.items()
                         if k in ov["modes"]["on"]])
    if "layout" in results:
        out += ["### Sequence-parallel collectives: [b,s,h] dim 1 vs [s,b,h] dim 0 (TP=2, fp32)", ""]
        rows = []
        for r in results["layout"]:
            t = r["times"]
            rows.append([f"{r['b']}x{r['s']}x{r['h']}", f"{r['gathered_mib']:.0f}"] + [
                cell for op in ("gather", "reduce-scatter") for cell in (
                    fmt(t[f"{op} [b,s,h] dim 1"]), fmt(t[f"{op} [s,b,h] dim 0"]),
                    f"{t[f'{op} copies']['median_ms']:.1f}", f"{r[f'{op} copy share']:.0%}")])
        out += md_table(["b x s x h", "full MiB", "gather dim1 ms", "gather dim0 ms", "copies ms", "copy share",
                         "RS dim1 ms", "RS dim0 ms", "copies ms", "copy share"], rows)
    return "\n".join(out)


def parse_sizes(text: str) -> list[list[int]]:
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"layout size {item!r}: expected BxSxH with positive integers")
        sizes.append([int(p) for p in parts])
    return sizes


def parse_list(text: str) -> list[int]:
    if not all(v.strip().isdigit() and int(v) > 0 for v in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return [int(v) for v in text.split(",")]


def parse_modes(text: str) -> list[bool]:
    names = [v.strip() for v in text.split(",")]
    if not names or any(v not in ("off", "on") for v in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected off, on or off,on")
    return [v == "on" for v in names]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.json and tables.md")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of " + ", ".join(SECTIONS))
    for field, default in asdict(ModelSize()).items():
        p.add_argument(f"--{field}", type=int, default=default, help=f"model/data size (default {default})")
    p.add_argument("--batch", type=int, default=8, help="global batch (samples per step)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the one-process step section")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed repeats")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per implementation / mode")
    p.add_argument("--phase-repeats", type=int, default=3, help="steps of the per-phase breakdown")
    p.add_argument("--profile-steps", type=int, default=0, help="steps under torch.profiler (0: none)")
    p.add_argument("--profile-top", type=int, default=12, help="operators listed per profile")
    p.add_argument("--dp-sizes", type=parse_list, default=[1, 2, 4])
    p.add_argument("--zero-modes", type=parse_modes, default=[False, True],
                   help="distributed optimizer settings of the zero section: off,on (default both)")
    p.add_argument("--zero-micro", type=int, default=2, help="micro batch of the zero section")
    p.add_argument("--zero-bucket-size", type=int, default=40_000_000, help="bucket elements, zero section")
    p.add_argument("--overlap-micro", type=int, default=2, help="micro batch of the overlap section")
    p.add_argument("--overlap-bucket-size", type=int, default=1_000_000, help="bucket elements, overlap")
    p.add_argument("--layout-sizes", type=parse_sizes,
                   default=parse_sizes("1x1024x1024,4x1024x1024,1x4096x1024,4x4096x1024,"
                                       "1x1024x4096,4x1024x4096,1x4096x4096,4x4096x4096"))
    p.add_argument("--layout-repeats", type=int, default=5)
    p.add_argument("--worker-timeout", type=float, default=900.0, help="seconds for one multi-process run")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    for name in ("batch", "threads", "repeats", "phase_repeats", "zero_micro", "overlap_micro",
                 "layout_repeats", "profile_top") + tuple(asdict(ModelSize())):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.profile_steps < 0:
        p.error("--warmup and --profile-steps must be >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    size = ModelSize(**{f: getattr(args, f) for f in asdict(ModelSize())})
    command = " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    results = {"machine": machine(), "command": command, "model": asdict(size), "batch": args.batch,
               "repeats": args.repeats, "warmup": args.warmup}
    t0 = time.perf_counter()
    if "step" in args.sections:
        results["step"] = bench_step(args, size)
    if "zero" in args.sections:
        results["zero"] = bench_zero(args, size)
    if jobs := two_rank_jobs(args, size):
        ranks = launch(jobs, 2, args.worker_timeout)
        if "overlap" in args.sections:
            results["overlap"] = summarize_overlap([r["overlap"] for r in ranks])
        if "layout" in args.sections:
            results["layout"] = summarize_layout([r["layout"] for r in ranks])
    results["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = tables(results)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":  # one rank of a launch(): jobs as JSON
        print(json.dumps(run_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
