#!/usr/bin/env python
"""Benchmark the Triton kernels (RMSNorm, flash attention) against PyTorch and fused libraries.

    python tools/bench_kernels.py --out benchmarks/results/kernels_h100
    python tools/bench_kernels.py --out /tmp/kb --rmsnorm-shapes 8192x4096 --attention-shapes 2,32,8,8192,128

First measures the device's ceilings in the same run (device-to-device copy bandwidth, counting bytes
read plus written; the dense matmul rate in the benchmark dtype), then times every implementation
forward and backward and reports TFLOP/s (attention) or GB/s (RMSNorm) and the share of the ceiling.
Baselines: PyTorch eager, torch.nn.functional.scaled_dot_product_attention, and NVIDIA apex
(FusedRMSNorm, when its compiled `fused_layer_norm_cuda` is present), liger-kernel and flash-attn when
importable. Writes results.csv, results.png and table.txt to --out and prints the table.

Without CUDA it still runs, saying so: Triton kernels go through the interpreter on tiny shapes, only
CPU-capable implementations run, and the timings are a smoke test, not speed numbers.

Timing (CUDA): warm-up calls (compilation and autotuning happen there), then each repetition flushes
the L2 cache by writing a 1 GiB buffer (which also covers the host's launch overhead) and is timed
alone with CUDA events; the median is reported. Every implementation is first checked against an fp32
reference on the same random inputs (rel_err = max |out - ref| / max |ref| over the output or the
gradients).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from engine.fileio import atomic_open
from engine.ops import rms_norm_reference

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # before any kernel module is imported: Triton picks the interpreter at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_RMSNORM_SHAPES = [(4096, 4096), (8192, 4096), (16384, 4096), (8192, 5120), (8192, 8192), (8192, 2048)]
GPU_ATTENTION_SHAPES = [  # (batch, heads, kv_heads, seq, head_dim): 16k tokens per shape
    (16, 32, 8, 1024, 128), (8, 32, 8, 2048, 128), (4, 32, 8, 4096, 128), (2, 32, 8, 8192, 128),
    (1, 32, 8, 16384, 128), (4, 32, 32, 4096, 128), (4, 32, 8, 4096, 64), (2, 40, 40, 8192, 128),
]
CPU_RMSNORM_SHAPES = [(64, 48), (256, 1000)]
CPU_ATTENTION_SHAPES = [(1, 4, 2, 48, 64)]
# Targets expressed as a share of a measured ceiling (attention targets are ratios to SDPA: see vs_baseline).
TARGET_SHARE = {("rmsnorm", "fwd"): 0.80, ("rmsnorm", "bwd"): 0.70}
FIELDS = ["kernel", "impl", "pass", "shape", "dtype", "causal", "ms", "tflops", "gbps", "ceiling_share",
          "vs_baseline", "rel_err", "note"]


@dataclass
class Row:
    kernel: str
    impl: str
    pass_: str
    shape: str
    dtype: str
    causal: str = ""
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    ceiling_share: float | None = None
    vs_baseline: float | None = None
    rel_err: float | None = None
    note: str = ""

    def as_csv(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return {k: ("" if d[k] is None else (f"{d[k]:.6g}" if isinstance(d[k], float) else d[k])) for k in FIELDS}


@dataclass
class Bench:
    device: torch.device
    warmup: int
    reps: int
    messages: list[str] = field(default_factory=list)
    _flush: torch.Tensor | None = None

    def say(self, message: str) -> None:
        print(message, flush=True)
        self.messages.append(message)

    def time_ms(self, fn) -> float:
        """Median milliseconds of fn() over `reps` repetitions, L2 flushed before each (CUDA)."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        if self._flush is None:
            # Far larger than L2, and its write (~0.3 ms) keeps the GPU busy while the host enqueues
            # the timed call, so host-side launch overhead stays out of the measured interval.
            l2 = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 64 << 20)
            self._flush = torch.empty(max(4 * l2, 1 << 30), dtype=torch.uint8, device=self.device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        torch.cuda.synchronize(self.device)
        for start, end in events:
            self._flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in events)


# ------------------------------------------------------------------------------------- ceilings
def _copy_ms(bench: Bench, n_bytes: int) -> float:
    """Time of one device-to-device copy of ``n_bytes`` (its buffers are freed on return)."""
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    return bench.time_ms(lambda: dst.copy_(src))


def measure_ceilings(bench: Bench, dtype: torch.dtype) -> tuple[float, float]:
    """(copy GB/s counting read + write, matmul TFLOP/s in `dtype`) measured on this device."""
    cuda = bench.device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (64 << 20)
    copy_gbps = 2 * n_bytes / (_copy_ms(bench, n_bytes) * 1e-3) / 1e9
    n = 8192 if cuda else 512
    mm_dtype = dtype if cuda else torch.float32
    a = torch.randn(n, n, device=bench.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=bench.device, dtype=mm_dtype)
    mm_ms = bench.time_ms(lambda: a @ b)
    mm_tflops = 2 * n**3 / (mm_ms * 1e-3) / 1e12
    bench.say(f"ceilings: copy {copy_gbps:.1f} GB/s ({n_bytes >> 20} MiB read + written), "
              f"matmul {mm_tflops:.2f} TFLOP/s ({n}^3, {str(mm_dtype).replace('torch.', '')})")
    return copy_gbps, mm_tflops


def _rel_err(got, ref) -> float:
    got = got if isinstance(got, (list, tuple)) else [got]
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    return max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
               for g, r in zip(got, ref))


def _time_pair(bench: Bench, forward, inputs: list[torch.Tensor], dy: torch.Tensor):
    """(forward ms, backward ms): forward with grad enabled; backward = autograd.grad of one output."""
    fwd_ms = bench.time_ms(lambda: forward())
    out = forward()
    bwd_ms = bench.time_ms(lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True))
    return fwd_ms, bwd_ms


# --------------------------------------------------------------------------------------- RMSNorm
def rmsnorm_impls(bench: Bench) -> dict:
    """name -> factory(weight) returning (fn(x) -> y, extra differentiable params)."""
    from kernels.rmsnorm import rms_norm

    impls = {
        "triton": lambda w, eps: (lambda x: rms_norm(x, w, eps), [w]),
        "torch eager": lambda w, eps: (lambda x: rms_norm_reference(x, w, eps), [w]),
    }
    if hasattr(F, "rms_norm"):
        impls["torch F.rms_norm"] = lambda w, eps: (lambda x: F.rms_norm(x, (w.shape[0],), w, eps), [w])
    if bench.device.type != "cuda":
        bench.say("rmsnorm: apex and liger-kernel need CUDA; not run")
        return impls
    if importlib.util.find_spec("fused_layer_norm_cuda") is not None:
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            impls["apex FusedRMSNorm"] = lambda w, eps: (
                lambda x: fused_rms_norm_affine(x, w, (w.shape[0],), eps), [w])
        except Exception as e:
            bench.say(f"rmsnorm: apex present but unusable ({e}); not run")
    else:
        bench.say("rmsnorm: NVIDIA apex not installed (no fused_layer_norm_cuda); not run")
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # Llama casting mode, not in place (in place would overwrite dy between repetitions).
        impls["liger-kernel"] = lambda w, eps: (
            lambda x: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False), [w])
    except Exception as e:
        bench.say(f"rmsnorm: liger-kernel not importable ({type(e).__name__}: {e}); not run")
    return impls


def bench_rmsnorm(bench: Bench, shapes, dtype, copy_gbps: float) -> list[Row]:
    impls = rmsnorm_impls(bench)
    name = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    eps = 1e-6
    for tokens, hidden in shapes:
        g = torch.Generator(device="cpu").manual_seed(tokens * 7919 + hidden)
        x0 = (torch.randn(tokens, hidden, generator=g) + 0.5).to(bench.device, dtype)
        w0 = (1 + 0.2 * torch.randn(hidden, generator=g)).to(bench.device, dtype)
        dy = torch.randn(tokens, hidden, generator=g).to(bench.device, dtype)
        xr, wr = x0.float().requires_grad_(), w0.float().requires_grad_()
        y_ref = rms_norm_reference(xr, wr, eps)
        grads_ref = torch.autograd.grad(y_ref, (xr, wr), dy.float())
        e = x0.element_size()
        fwd_bytes = 2 * tokens * hidden * e + hidden * w0.element_size()
        bwd_bytes = 3 * tokens * hidden * e + 2 * hidden * w0.element_size()
        base: dict[str, float] = {}
        for impl, make in impls.items():
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            try:
                fn, params = make(w, eps)
                y = fn(x)
                err_f = _rel_err(y, y_ref)
                err_b = _rel_err(torch.autograd.grad(y, [x] + params, dy), grads_ref)
                fwd_ms, bwd_ms = _time_pair(bench, lambda: fn(x), [x] + params, dy)
            except Exception as exc:  # one failing implementation must not stop the sweep
                bench.say(f"rmsnorm {impl} {tokens}x{hidden}: failed ({type(exc).__name__}: {exc})")
                continue
            for pass_, ms, n_bytes, err in (("fwd", fwd_ms, fwd_bytes, err_f), ("bwd", bwd_ms, bwd_bytes, err_b)):
                gbps = n_bytes / (ms * 1e-3) / 1e9
                if impl == "torch eager":
                    base[pass_] = ms
                rows.append(Row("rmsnorm", impl, pass_, f"{tokens}x{hidden}", name, "", ms, None, gbps,
                                gbps / copy_gbps, None, err))
        for row in rows:
            if row.shape == f"{tokens}x{hidden}" and row.pass_ in base:
                row.vs_baseline = base[row.pass_] / row.ms
    return rows


# ------------------------------------------------------------------------------------ attention
def attention_flops(batch, heads, seq, head_dim, causal: bool) -> float:
    """Forward FLOPs: two matmuls of 2*S*S*D per head, halved when causal. Backward is 2.5x this."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def eager_attention(q, k, v, causal: bool, scale: float):
    """Plain attention on [b, h, s, d] (k, v already with h heads): scores in the input dtype,
    softmax in fp32 (as HF Llama's eager path)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def attention_impls(bench: Bench) -> dict:
    """name -> fn(q, k, v, causal, scale) on [b, s, h, d] / [b, s, kv_h, d] inputs, plus its note.

    Layout changes and K/V head expansion happen in `prepare`, outside the timed region."""
    impls = {}
    try:
        attention = importlib.import_module("kernels.attention")
        impls["triton"] = (lambda t: t, lambda q, k, v, c, s: attention.flash_attention(
            q, k, v, causal=c, softmax_scale=s), "")
        if bench.device.type == "cuda" and torch.cuda.get_device_capability(bench.device)[0] == 9:
            # Here "triton" tunes over TMA and pointer loads together; time pointer loads alone too.
            impls["triton pointer"] = (lambda t: t, lambda q, k, v, c, s: attention.flash_attention(
                q, k, v, causal=c, softmax_scale=s, use_tma=False), "pointer loads instead of TMA")
    except Exception as e:
        bench.say(f"attention: kernels.attention unavailable ({type(e).__name__}: {e}); "
                  "its rows are skipped")

    def to_bhsd(t):  # [b, s, h, d] -> contiguous [b, h, s, d] with K/V heads repeated to match q
        q, k, v = (x.transpose(1, 2) for x in t)
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return [x.detach().contiguous().requires_grad_() for x in (q, k, v)]

    impls["torch SDPA"] = (to_bhsd, lambda q, k, v, c, s: F.scaled_dot_product_attention(
        q, k, v, is_causal=c, scale=s), "K/V heads expanded before timing")
    impls["torch eager"] = (to_bhsd, lambda q, k, v, c, s: eager_attention(q, k, v, c, s),
                            "K/V heads expanded before timing")
    if bench.device.type == "cuda":
        try:
            from flash_attn import flash_attn_func

            impls["flash-attn"] = (lambda t: t, lambda q, k, v, c, s: flash_attn_func(
                q, k, v, causal=c, softmax_scale=s), "")
        except Exception:
            bench.say("attention: flash-attn not installed; not run (apex/liger have no attention kernel)")
    return impls


def _attention_reference(q, k, v, dy, causal: bool, scale: float):
    """fp32 output and (dq, dk, dv) for batch 0 and the query heads of KV head 0 (bounded memory)."""
    group = q.shape[2] // k.shape[2]
    qs, ks, vs = (t[:1, :, :n].float().transpose(1, 2).requires_grad_()
                  for t, n in ((q, group), (k, 1), (v, 1)))
    out = eager_attention(qs, ks.expand(-1, group, -1, -1), vs.expand(-1, group, -1, -1), causal, scale)
    grads = torch.autograd.grad(out, (qs, ks, vs), dy[:1, :, :group].float().transpose(1, 2))
    return out.transpose(1, 2), [g.transpose(1, 2) for g in grads]


def _eager_fits(bench: Bench, batch, heads, seq) -> bool:
    if bench.device.type != "cuda":
        return True
    need = batch * heads * seq * seq * 16  # fp32 scores + probs, saved copies for the backward
    return need < 0.4 * torch.cuda.get_device_properties(bench.device).total_memory


def bench_attention(bench: Bench, shapes, dtype, causal: bool, mm_tflops: float) -> list[Row]:
    impls = attention_impls(bench)
    name = str(dtype).replace("torch.", "")
    rows: list[Row] = []
    for batch, heads, kv_heads, seq, head_dim in shapes:
        shape = f"b{batch} h{heads} kv{kv_heads} s{seq} d{head_dim}"
        if heads % kv_heads:
            bench.say(f"attention {shape}: heads must be a multiple of kv_heads; skipped")
            continue
        g = torch.Generator(device="cpu").manual_seed(batch * 131 + heads * 17 + seq + head_dim)
        q0 = torch.randn(batch, seq, heads, head_dim, generator=g).to(bench.device, dtype)
        k0 = torch.randn(batch, seq, kv_heads, head_dim, generator=g).to(bench.device, dtype)
        v0 = torch.randn(batch, seq, kv_heads, head_dim, generator=g).to(bench.device, dtype)
        dy = torch.randn(batch, seq, heads, head_dim, generator=g).to(bench.device, dtype)
        scale = 1.0 / math.sqrt(head_dim)
        out_ref, grads_ref = _attention_reference(q0, k0, v0, dy, causal, scale)
        group = heads // kv_heads
        fwd_flops = attention_flops(batch, heads, seq, head_dim, causal)
        base: dict[str, float] = {}
        for impl, (prepare, fn, note) in impls.items():
            if impl == "torch eager" and not _eager_fits(bench, batch, heads, seq):
                bench.say(f"attention torch eager {shape}: scores would not fit in memory; skipped")
                continue
            bshd = [t.clone().requires_grad_() for t in (q0, k0, v0)]
            inputs = prepare(bshd)
            grad_out = dy if inputs[0] is bshd[0] else dy.transpose(1, 2).contiguous()
            try:
                out = fn(*inputs, causal, scale)
                grads = torch.autograd.grad(out, inputs, grad_out)
                if inputs[0] is bshd[0]:
                    got_out = out[:1, :, :group]
                    got_grads = [grads[0][:1, :, :group], grads[1][:1, :, :1], grads[2][:1, :, :1]]
                else:  # [b, h, s, d] with expanded K/V: dK of KV head 0 sums over its query heads
                    got_out = out[:1, :group].transpose(1, 2)
                    got_grads = [grads[0][:1, :group].transpose(1, 2)] + [
                        gr[:1, :group].sum(1, keepdim=True).transpose(1, 2) for gr in grads[1:]]
                err_f, err_b = _rel_err(got_out, out_ref), _rel_err(got_grads, grads_ref)
                del out, grads
                fwd_ms, bwd_ms = _time_pair(bench, lambda: fn(*inputs, causal, scale), inputs, grad_out)
            except Exception as exc:
                bench.say(f"attention {impl} {shape}: failed ({type(exc).__name__}: {exc})")
                continue
            for pass_, ms, flops, err in (("fwd", fwd_ms, fwd_flops, err_f), ("bwd", bwd_ms, 2.5 * fwd_flops, err_b)):
                tflops = flops / (ms * 1e-3) / 1e12
                if impl == "torch SDPA":
                    base[pass_] = ms
                rows.append(Row("attention", impl, pass_, shape, name, str(causal), ms, tflops, None,
                                tflops / mm_tflops, None, err, note))
        for row in rows:
            if row.shape == shape and row.pass_ in base:
                row.vs_baseline = base[row.pass_] / row.ms
    return rows


# ---------------------------------------------------------------------------------------- output
def format_table(rows: list[Row]) -> str:
    header = ["kernel", "impl", "pass", "shape", "dtype", "ms", "TFLOP/s", "GB/s", "of ceiling",
              "vs base", "rel_err"]
    lines = [header]
    for r in rows:
        lines.append([r.kernel, r.impl, r.pass_, r.shape, r.dtype,
                      "" if r.ms is None else f"{r.ms:.4g}",
                      "" if r.tflops is None else f"{r.tflops:.4g}",
                      "" if r.gbps is None else f"{r.gbps:.4g}",
                      "" if r.ceiling_share is None else f"{100 * r.ceiling_share:.1f}%",
                      "" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x",
                      "" if r.rel_err is None else f"{r.rel_err:.1e}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_csv(path: str, rows: list[Row]) -> None:
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(r.as_csv())


def plot(path: str, rows: list[Row], device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, p) for k in ("rmsnorm", "attention") for p in ("fwd", "bwd")
              if any(r.kernel == k and r.pass_ == p for r in rows)]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(11, 3.6 * max(1, len(panels))), squeeze=False)
    for ax, (kernel, pass_) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r.kernel == kernel and r.pass_ == pass_]
        shapes = list(dict.fromkeys(r.shape for r in sel))
        impls = list(dict.fromkeys(r.impl for r in sel))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = {r.shape: 100 * r.ceiling_share for r in sel if r.impl == impl}
            xs = [j + i * width for j, s in enumerate(shapes) if s in values]
            ax.bar(xs, [values[s] for s in shapes if s in values], width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=15, fontsize=8)
        unit = "of copy bandwidth" if kernel == "rmsnorm" else "of matmul TFLOP/s"
        target = TARGET_SHARE.get((kernel, pass_))
        if target is not None:
            ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.0%}")
        ax.set_ylabel(f"% {unit}")
        ax.set_title(f"{kernel} {pass_} — {device_name}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _parse_shapes(text: str, arity: int, sep: str) -> list[tuple[int, ...]]:
    shapes = []
    for item in filter(None, (s.strip() for s in text.replace(";", " ").split())):
        parts = item.split(sep)
        if len(parts) != arity or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected {arity} positive integers "
                                             f"separated by {sep!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.csv, results.png, table.txt")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 in the interpreter")
    p.add_argument("--rmsnorm-shapes", type=lambda s: _parse_shapes(s, 2, "x"),
                   help="space-separated TOKENSxHIDDEN, e.g. '8192x4096 4096x5120'")
    p.add_argument("--attention-shapes", type=lambda s: _parse_shapes(s, 5, ","),
                   help="space-separated B,H,KV_H,S,D, e.g. '2,32,8,8192,128'")
    p.add_argument("--only", choices=("rmsnorm", "attention"), help="run one kernel family")
    p.add_argument("--no-causal", action="store_true", help="non-causal attention")
    p.add_argument("--warmup", type=int, help="warm-up calls per measurement (default 5 CUDA, 1 CPU)")
    p.add_argument("--reps", type=int, help="timed repetitions, median reported (default 30 CUDA, 3 CPU)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if HAS_CUDA else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references must really be fp32
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name(device) if HAS_CUDA else "CPU (Triton interpreter)"
    dtype = DTYPES[args.dtype or ("bf16" if HAS_CUDA else "fp32")]
    bench = Bench(device, args.warmup if args.warmup is not None else (5 if HAS_CUDA else 1),
                  args.reps if args.reps is not None else (30 if HAS_CUDA else 3))
    bench.say(f"device: {device_name}; torch {torch.__version__}; dtype {str(dtype).replace('torch.', '')}")
    if not HAS_CUDA:
        bench.say("no CUDA device: Triton kernels run in the interpreter on tiny shapes; timings below are "
                  "a correctness smoke test, not speed numbers")
        if dtype == torch.bfloat16:
            bench.say("warning: the Triton interpreter's bf16 tl.dot is wrong; use fp32 or fp16 here")
    os.makedirs(args.out, exist_ok=True)

    copy_gbps, mm_tflops = measure_ceilings(bench, dtype)
    mm_dtype = str(dtype if HAS_CUDA else torch.float32).replace("torch.", "")
    rows = [Row("ceiling", "device copy", "", "", "uint8", "", None, None, copy_gbps, 1.0, note=device_name),
            Row("ceiling", "matmul", "", "", mm_dtype, "", None, mm_tflops, None, 1.0, note=device_name)]
    if args.only in (None, "rmsnorm"):
        shapes = args.rmsnorm_shapes or (GPU_RMSNORM_SHAPES if HAS_CUDA else CPU_RMSNORM_SHAPES)
        rows += bench_rmsnorm(bench, shapes, dtype, copy_gbps)
    if args.only in (None, "attention"):
        shapes = args.attention_shapes or (GPU_ATTENTION_SHAPES if HAS_CUDA else CPU_ATTENTION_SHAPES)
        rows += bench_attention(bench, shapes, dtype, not args.no_causal, mm_tflops)

    table = format_table(rows)
    print(table)
    write_csv(os.path.join(args.out, "results.csv"), rows)
    plot(os.path.join(args.out, "results.png"), [r for r in rows if r.kernel != "ceiling"], device_name)
    with atomic_open(os.path.join(args.out, "table.txt")) as f:
        f.write(f"command: python tools/bench_kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
        f.write(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        f.write("\n".join(bench.messages) + "\n\n" + table + "\n")
    print(f"wrote {args.out}/results.csv, results.png, table.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
