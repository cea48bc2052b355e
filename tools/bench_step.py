#!/usr/bin/env python
"""Time one training step of the engine's Llama and the share of it each candidate fused op could save.

    python tools/bench_step.py --preset llama2-7b-L2 --batch 1 --seq 4096 --out benchmarks/results/step_h100
    python tools/bench_step.py --preset tiny --out /tmp/step        # CPU smoke test, not a speed measurement

Step: forward on random token ids, the engine's single-process loss (``vocab_parallel_cross_entropy``,
no group, mean over tokens), backward; no optimizer update. Median time with the Triton kernels off
and on (the model holding ``Ops("torch")``, then ``Ops("triton")``; "on" needs CUDA, and prints the
kernels' self-check verdicts on the device). tokens/s = batch * seq / step time;
    model FLOPs = 6 * P * tokens + 3 * layers * 4 * batch * heads * seq^2 * head_dim / 2
P: parameters in matmuls (not the embedding lookup); causal attention, backward 2x forward.

Depth: presets build 2 layers so that a step fits one GPU; the real model has ``full_layers`` (32 for
Llama-2-7B), and only the per-layer ops grow with it. The step (same mode) is also timed at 1 layer:
    per layer = t(2) - t(1);  outside = t(2) - 2 * per layer (embedding, final norm, lm_head, loss)
    full step = outside + full_layers * per layer     (linear in depth, one device: no PP/TP effects)
If noise gives per layer <= 0 or outside < 0 there is no estimate and the measured step stands in.

Per-op table ("measure first"): RoPE, SwiGLU silu(gate) * up, cross entropy, and for reference
RMSNorm and attention, each timed alone (eager forward + backward at the step's shapes). Floor =
max(minimal bytes / copy bandwidth, FLOPs / matmul rate), bytes per ``min_bytes``. Calls, time, floor
and the most a fused kernel could save, (eager - floor) * calls, are at full depth, with the share of
the full-depth step (the verdict) beside the share of the measured 2-layer step.

Timing, ceilings (copy GB/s counting read + write, matmul TFLOP/s) and the L2 flush between
repetitions come from tools/bench_kernels.py. Writes results.csv and table.txt to --out.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from engine.cli import int_at_least
from engine.fileio import atomic_open
from engine.model.config import LlamaConfig
from engine.model.llama import Llama, RotaryEmbedding
from engine.ops import Ops, apply_rotary, attention_reference, rms_norm_reference
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy

TOOLS = os.path.dirname(os.path.abspath(__file__))


def _load_bench_kernels():
    """tools/bench_kernels.py as a module: its Bench (timing), ceilings and attention FLOP count."""
    name = "ltu_bench_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, "bench_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look the module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


bench_kernels = _load_bench_kernels()
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAVING_THRESHOLD = 0.03  # the decision rule: a kernel is worth writing above this share of the step


@dataclass(frozen=True)
class Preset:
    """A model shape for the benchmark: real widths, few layers (config) so one step fits one GPU, and
    the real model's depth ``full_layers`` that the step is extrapolated to."""
    config: dict
    full_layers: int
    batch: int
    seq: int
    note: str


PRESETS: dict[str, Preset] = {
    "llama2-7b-L2": Preset(dict(hidden_size=4096, num_attention_heads=32, intermediate_size=11008,
                                vocab_size=32000, num_hidden_layers=2), 32, 1, 4096, "Llama-2-7B widths"),
    "llama2-13b-L2": Preset(dict(hidden_size=5120, num_attention_heads=40, intermediate_size=13824,
                                 vocab_size=32000, num_hidden_layers=2), 40, 1, 4096, "Llama-2-13B widths"),
    "llama3-8b-L2": Preset(dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256, num_hidden_layers=2,
                                rope_theta=500000.0), 32, 1, 4096, "Llama-3-8B widths"),
    "tiny": Preset(dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        intermediate_size=128, vocab_size=256, num_hidden_layers=2), 4, 2, 32, "CPU smoke test"),
}


@dataclass(frozen=True)
class StepDims:
    """The shapes one step works on."""
    batch: int
    seq: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @classmethod
    def of(cls, config: LlamaConfig, batch: int, seq: int) -> "StepDims":
        return cls(batch, seq, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                   config.head_dim, config.intermediate_size, config.vocab_size, config.num_hidden_layers)


CANDIDATE_OPS = ("rope", "swiglu", "cross_entropy")
REFERENCE_OPS = ("rmsnorm", "attention")


def min_bytes(op: str, d: StepDims, elem: int) -> int:
    """Minimal bytes one call of ``op`` moves, forward + backward, activations of ``elem`` bytes.

    rope:          fwd reads q, k, cos, sin, writes q', k'; bwd reads dq', dk', cos, sin, writes dq, dk
    swiglu:        fwd reads gate, up, writes h; bwd reads dh, gate, up, writes dgate, dup
    cross_entropy: fwd reads logits, targets (int64), writes loss and log-sum-exp (fp32 per token);
                   bwd reads dloss, logits, targets, log-sum-exp, writes dlogits
    rmsnorm:       fwd reads x, w, writes y, rstd (fp32 per row); bwd reads dy, x, w, rstd, writes dx, dw
    attention:     fwd reads q, k, v, writes o, lse (fp32 per row and head);
                   bwd reads q, k, v, o, do, lse, writes dq, dk, dv
    """
    t = d.tokens
    q, kv = t * d.heads * d.head_dim, t * d.kv_heads * d.head_dim
    if op == "rope":
        return elem * (4 * (q + kv) + 4 * d.seq * d.head_dim)
    if op == "swiglu":
        return elem * 8 * t * d.intermediate
    if op == "cross_entropy":
        return elem * 3 * t * d.vocab + t * (8 + 4 + 4) + t * (4 + 8 + 4)
    if op == "rmsnorm":
        return elem * (5 * t * d.hidden + 3 * d.hidden) + 4 * 2 * t
    if op == "attention":
        return elem * 6 * (q + kv) + 4 * 2 * t * d.heads
    raise ValueError(f"min_bytes: unknown op {op!r} (known: {', '.join(CANDIDATE_OPS + REFERENCE_OPS)})")


def calls_per_step(op: str, d: StepDims) -> int:
    """Per-layer ops run once per layer, RMSNorm twice plus the final norm, the cross entropy once."""
    return 2 * d.layers + 1 if op == "rmsnorm" else 1 if op == "cross_entropy" else d.layers


def attention_model_flops(d: StepDims) -> float:
    """Causal attention FLOPs of one layer, forward + backward (2x forward, no recomputation)."""
    return 3 * bench_kernels.attention_flops(d.batch, d.heads, d.seq, d.head_dim, causal=True)


def step_model_flops(model: Llama, d: StepDims) -> float:
    """6 * P * tokens + attention, P = parameters used in matmuls (the embedding lookup is not one)."""
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if n != "embed_tokens.weight" or model.config.tie_word_embeddings)
    return 6.0 * matmul_params * d.tokens + d.layers * attention_model_flops(d)


@dataclass(frozen=True)
class DepthEstimate:
    """The step at ``layers`` deep: ``full_layers`` extrapolated, or the measured depth when ``problem``."""
    measured_layers: int
    full_layers: int
    per_layer_ms: float
    outside_ms: float  # embedding, final norm, lm_head and loss: once per step whatever the depth
    layers: int  # the depth the full-depth shares and the verdicts refer to
    step_ms: float
    problem: str = ""  # why the extrapolation is refused; empty when it is used


def extrapolate_depth(shallow: tuple[int, float], deep: tuple[int, float], full_layers: int) -> DepthEstimate:
    """(layers, ms) at two depths -> per layer = slope, outside = t(deep) - deep * per layer; refused
    (measured deep step kept) when timing noise gives per layer <= 0 or outside < 0."""
    (lo, t_lo), (hi, t_hi) = shallow, deep
    if not 0 < lo < hi:
        raise ValueError(f"extrapolate_depth: need 0 < shallow < deep layers, got {lo} and {hi}")
    per_layer = (t_hi - t_lo) / (hi - lo)
    outside = t_hi - hi * per_layer
    problem = (f"per-layer time {per_layer:.4g} ms <= 0" if per_layer <= 0 else
               f"time outside the layers {outside:.4g} ms < 0" if outside < 0 else "")
    if problem:
        return DepthEstimate(hi, full_layers, per_layer, outside, hi, t_hi, problem + (
            f" (timing noise: {lo} layer(s) {t_lo:.4g} ms, {hi} layers {t_hi:.4g} ms); no full-depth "
            f"estimate, shares and verdicts use the measured {hi}-layer step"))
    return DepthEstimate(hi, full_layers, per_layer, outside, full_layers, outside + full_layers * per_layer)


# ------------------------------------------------------------------------------------- results
@dataclass
class Result:
    """One CSV row. Op rows: calls_per_step, ms_per_step, step_share, floor_ms_per_step and
    max_saving_share are at ``layers`` deep (the full depth unless the estimate was refused);
    measured_step_share is the share of the step as built."""
    section: str  # "ceiling", "step", "depth" or "op"
    name: str
    impl: str = ""
    shape: str = ""
    dtype: str = ""
    layers: int | None = None
    calls_per_step: int | None = None
    ms: float | None = None
    ms_per_step: float | None = None
    step_share: float | None = None
    measured_step_share: float | None = None
    bytes_per_call: int | None = None
    gbps: float | None = None
    floor_ms_per_step: float | None = None
    max_saving_share: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    loss: float | None = None
    note: str = ""

    def as_csv(self) -> dict:
        return {k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                for k, v in asdict(self).items()}


FIELDS = [f.name for f in fields(Result)]


@dataclass
class Run:
    bench: object  # bench_kernels.Bench
    dtype: torch.dtype
    dims: StepDims
    device: torch.device
    results: list[Result] = field(default_factory=list)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------- step
def build_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0,
                ops: Ops | None = None) -> Llama:
    """The engine's Llama on ``device`` in ``dtype`` computing with ``ops`` (None: PyTorch): norms
    ones, other weights normal(0, init range)."""
    with torch.device("meta"):
        model = Llama(config, ops=ops)
    model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    return model


def training_step(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """Forward, the engine's single-process loss (mean over tokens), backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    loss = vocab_parallel_cross_entropy(logits, targets, 0, model.config.vocab_size).mean()
    loss.backward()
    return loss.detach()


def bench_step(run: Run, config: LlamaConfig, kernels_on: bool) -> Result:
    d = StepDims.of(config, run.dims.batch, run.dims.seq)
    model = build_model(config, run.device, run.dtype, ops=Ops("triton" if kernels_on else "torch"))
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, d.vocab, (d.batch, d.seq + 1), generator=gen).to(run.device)
    note = ""
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    loss = training_step(model, tokens).item()
    ms = run.bench.time_ms(lambda: training_step(model, tokens))
    if run.device.type == "cuda":
        note = f"peak {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GiB"
    flops = step_model_flops(model, d)
    label = "kernels on" if kernels_on else "kernels off"
    run.bench.say(f"step {label}, {d.layers} layer(s): {ms:.3f} ms, loss {loss:.5f}")
    return Result("step", "train step", label, f"b{d.batch} s{d.seq}", dtype_name(run.dtype), d.layers, ms=ms,
                  tokens_per_s=d.tokens / (ms * 1e-3), tflops=flops / (ms * 1e-3) / 1e12, loss=loss, note=note)


# ------------------------------------------------------------------------------------- per op
@dataclass
class OpCase:
    """One op at its step shapes: fn(*inputs) -> output(s); grads taken for ``inputs`` that require grad."""
    inputs: list[torch.Tensor]
    fn: Callable
    grad_out: list[torch.Tensor]
    shape: str


def make_op_case(op: str, d: StepDims, config: LlamaConfig, device: torch.device, dtype: torch.dtype,
                 impl: Callable | None = None) -> OpCase:
    """Random inputs for ``op`` at the step's shapes, with its eager PyTorch function (or ``impl``)."""
    gen = torch.Generator(device="cpu").manual_seed(1 + len(op))

    def rand(*shape, grad=True, scale=1.0):
        t = (scale * torch.randn(*shape, generator=gen)).to(device, dtype)
        return t.requires_grad_(grad)

    t, b, s = d.tokens, d.batch, d.seq
    if op == "rope":
        cos, sin = RotaryEmbedding(config)(s, device, dtype)
        q, k = rand(b, s, d.heads, d.head_dim), rand(b, s, d.kv_heads, d.head_dim)
        return OpCase([q, k], lambda q, k: apply_rotary(q, k, cos, sin), [torch.randn_like(q), torch.randn_like(k)],
                      f"q {b}x{s}x{d.heads}x{d.head_dim}, k {b}x{s}x{d.kv_heads}x{d.head_dim}")
    if op == "swiglu":
        gate, up = rand(t, d.intermediate), rand(t, d.intermediate)
        return OpCase([gate, up], lambda g, u: F.silu(g) * u, [torch.randn_like(gate)], f"{t}x{d.intermediate}")
    if op == "cross_entropy":
        logits = rand(t, d.vocab, scale=2.0)
        targets = torch.randint(0, d.vocab, (t,), generator=gen).to(device)
        dloss = torch.full((t,), 1.0 / t, device=device)
        return OpCase([logits], lambda z: vocab_parallel_cross_entropy(z, targets, 0, d.vocab), [dloss],
                      f"{t}x{d.vocab}")
    if op == "rmsnorm":
        x, w = rand(t, d.hidden), (1 + rand(d.hidden, grad=False, scale=0.1)).requires_grad_()
        fn = impl or (lambda x, w: rms_norm_reference(x, w, config.rms_norm_eps))
        return OpCase([x, w], fn, [torch.randn_like(x)], f"{t}x{d.hidden}")
    if op == "attention":
        q, k, v = rand(b, s, d.heads, d.head_dim), rand(b, s, d.kv_heads, d.head_dim), rand(b, s, d.kv_heads, d.head_dim)
        fn = impl or (lambda q, k, v: attention_reference(q, k, v, causal=True))
        return OpCase([q, k, v], fn, [torch.randn_like(q)],
                      f"b{b} h{d.heads} kv{d.kv_heads} s{s} d{d.head_dim} causal")
    raise ValueError(f"unknown op {op!r}")


def time_op(run: Run, case: OpCase) -> float:
    """Median ms of one forward + backward of the op alone."""
    def fwd_bwd():
        out = case.fn(*case.inputs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return torch.autograd.grad(outs, case.inputs, case.grad_out)
    return run.bench.time_ms(fwd_bwd)


def kernel_impl(op: str, config: LlamaConfig, dtype: torch.dtype) -> Callable | None:
    """The engine's Triton kernel for ``op`` when it is importable and Ops("triton") would use it
    at this dtype, else None."""
    try:
        if op == "rmsnorm":
            from kernels.rmsnorm import rms_norm
            return lambda x, w: rms_norm(x, w, config.rms_norm_eps)
        if op == "attention" and dtype != torch.float32:
            from kernels.attention import flash_attention
            return lambda q, k, v: flash_attention(q, k, v, causal=True)
    except Exception:
        return None
    return None


def depth_rows(depth: DepthEstimate, shallow: Result, deep: Result, tokens: int) -> list[Result]:
    """Per layer, outside the layers and the full-depth step; model FLOPs are linear in depth too."""
    if depth.problem:  # the differences are noise: no numbers, only the reason
        return [Result("depth", "full-depth step", deep.impl, dtype=deep.dtype, note=depth.problem)]
    flops_lo, flops_hi = (r.tflops * 1e12 * r.ms * 1e-3 for r in (shallow, deep))
    flops = flops_hi + (depth.full_layers - deep.layers) * (flops_hi - flops_lo) / (deep.layers - shallow.layers)
    ms = depth.step_ms
    return [Result("depth", "per layer", deep.impl, dtype=deep.dtype, layers=1, ms=depth.per_layer_ms,
                   note=f"t({deep.layers}) - t({shallow.layers}), per layer"),
            Result("depth", "outside the layers", deep.impl, dtype=deep.dtype, layers=0, ms=depth.outside_ms,
                   note="embedding, final norm, lm_head, loss"),
            Result("depth", "full-depth step", deep.impl, deep.shape, deep.dtype, depth.full_layers, ms=ms,
                   tokens_per_s=tokens / (ms * 1e-3), tflops=flops / (ms * 1e-3) / 1e12,
                   note="extrapolated: linear in depth, one device, no pipeline/TP effects")]


def bench_ops(run: Run, config: LlamaConfig, measured_ms: float, depth: DepthEstimate, copy_gbps: float,
              mm_tflops: float) -> list[Result]:
    """Each op alone; per-step figures at ``depth.layers``, plus its share of the measured step."""
    d, elem = run.dims, torch.empty((), dtype=run.dtype).element_size()
    full, full_ms = replace(d, layers=depth.layers), depth.step_ms
    rows = []
    for op in CANDIDATE_OPS + REFERENCE_OPS:
        calls, full_calls = calls_per_step(op, d), calls_per_step(op, full)
        n_bytes = min_bytes(op, d, elem)
        flops = attention_model_flops(d) if op == "attention" else 0.0
        floor_ms = max(n_bytes / (copy_gbps * 1e9), flops / (mm_tflops * 1e12)) * 1e3
        impls = {"eager": None}
        if run.device.type == "cuda" and (k := kernel_impl(op, config, run.dtype)):
            impls["triton"] = k
        for impl, fn in impls.items():
            case = make_op_case(op, d, config, run.device, run.dtype, fn)
            try:
                ms = time_op(run, case)
            except Exception as exc:  # a kernel that cannot take this shape must not stop the table
                run.bench.say(f"{op} {impl}: failed ({type(exc).__name__}: {exc}); row skipped")
                continue
            per_step = ms * full_calls
            saving = max(0.0, per_step - floor_ms * full_calls) / full_ms
            kind = "candidate" if op in CANDIDATE_OPS else "reference: a kernel exists"
            if op == "attention" and impl == "eager":
                kind += "; the PyTorch path is scaled_dot_product_attention"
            rows.append(Result("op", op, impl, case.shape, dtype_name(run.dtype), depth.layers, full_calls, ms,
                               per_step, per_step / full_ms, ms * calls / measured_ms, n_bytes,
                               n_bytes / (ms * 1e-3) / 1e9, floor_ms * full_calls, saving, note=kind))
            del case
    return rows


# -------------------------------------------------------------------------------------- output
def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(results: list[Result], depth: DepthEstimate, verdicts: bool) -> str:
    """The step and per-op tables; ``verdicts`` adds the decision column (off for CPU smoke runs)."""
    step = [["step", "impl", "layers", "shape", "ms", "tokens/s", "model TFLOP/s", "loss", "note"]]
    for r in results:
        if r.section in ("step", "depth"):
            step.append([r.name, r.impl, _fmt(r.layers, "d"), r.shape, _fmt(r.ms, ".3f"), _fmt(r.tokens_per_s, ".0f"),
                         _fmt(r.tflops, ".2f"), _fmt(r.loss, ".5f"), r.note])
    at, est = f"L{depth.layers}", " (no estimate)" if depth.problem else " (est.)"
    op = [["op", "impl", "shape", f"calls {at}", "ms/call", f"ms/step {at}", f"of L{depth.measured_layers} step",
           f"of {at} step{est}", "MB/call", "GB/s", f"floor ms/step {at}", f"max saving {at}", "worth a kernel"]]
    for r in results:
        if r.section == "op":
            worth = "yes" if r.max_saving_share >= SAVING_THRESHOLD else "no"
            worth = worth if verdicts and r.impl == "eager" else "" if verdicts else "n/a (CPU)"
            op.append([r.name, r.impl, r.shape, str(r.calls_per_step), _fmt(r.ms, ".4f"), _fmt(r.ms_per_step, ".4f"),
                       _fmt(100 * r.measured_step_share, ".1f") + "%", _fmt(100 * r.step_share, ".1f") + "%",
                       _fmt(r.bytes_per_call / 1e6, ".2f"), _fmt(r.gbps, ".1f"), _fmt(r.floor_ms_per_step, ".4f"),
                       _fmt(100 * r.max_saving_share, ".1f") + "%", worth])
    return _columns(step) + "\n\n" + _columns(op)


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_outputs(out: str, results: list[Result], header: list[str], table: str) -> None:
    with atomic_open(os.path.join(out, "results.csv")) as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(r.as_csv() for r in results)
    with atomic_open(os.path.join(out, "table.txt")) as f:
        f.write("\n".join(header) + "\n\n" + table + "\n")


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help=f"model shape: {', '.join(PRESETS)}")
    p.add_argument("--batch", type=int_at_least(1), help="sequences per step (default: the preset's)")
    p.add_argument("--seq", type=int_at_least(1), help="tokens per sequence (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="parameters and activations (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int_at_least(1), help="timed repetitions, median reported (default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int_at_least(0), help="untimed calls first (default 3 CUDA, 1 CPU)")
    p.add_argument("--out", required=True, help="directory for results.csv and table.txt")
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)  # fail on a bad --out before the measurements, not after
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = PRESETS[args.preset]
    config = LlamaConfig(**preset.config)
    dims = StepDims.of(config, args.batch or preset.batch, args.seq or preset.seq)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    bench = bench_kernels.Bench(device, args.warmup if args.warmup is not None else (3 if cuda else 1),
                                args.steps or (10 if cuda else 3))
    run = Run(bench, dtype, dims, device)
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    command = "python tools/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = [f"command: {command}", f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    bench.say(f"device: {device_name}; torch {torch.__version__}; triton {triton_version}; dtype {dtype_name(dtype)}")
    bench.say(f"preset {args.preset} ({preset.note}): hidden {dims.hidden}, heads {dims.heads}, kv heads "
              f"{dims.kv_heads}, head dim {dims.head_dim}, intermediate {dims.intermediate}, vocab {dims.vocab}, "
              f"layers {dims.layers} of {preset.full_layers}; batch {dims.batch} x seq {dims.seq} = {dims.tokens} tokens")
    bench.say("loss: engine.parallel.cross_entropy.vocab_parallel_cross_entropy without a group (fp32 upcast "
              "of the logits), mean over tokens; the optimizer update is not timed")
    bench.say("model FLOPs = 6 * P * tokens + 3 * layers * 4 * b * heads * seq^2 * head_dim / 2 "
              "(P: parameters in matmuls, embedding lookup excluded; causal attention, backward 2x forward)")
    if not cuda:
        bench.say("no CUDA device: CPU numbers are a smoke test of the tool, not speed measurements; "
                  "the kernels-on step is skipped (the Triton kernels need CUDA)")
        if args.preset != "tiny":
            bench.say(f"warning: preset {args.preset} on CPU is very slow; use --preset tiny here")

    copy_gbps, mm_tflops = bench_kernels.measure_ceilings(bench, dtype)
    run.results += [Result("ceiling", "device copy", gbps=copy_gbps, note=device_name),
                    Result("ceiling", "matmul", dtype=dtype_name(dtype if cuda else torch.float32),
                           tflops=mm_tflops, note=device_name)]
    steps = [bench_step(run, config, kernels_on=False)]
    if cuda:
        found = {op: kernel_impl(op, config, dtype) is not None for op in REFERENCE_OPS}
        bench.say("Triton kernels importable: " + ", ".join(f"{op} {'yes' if ok else 'NO'}" for op, ok in found.items())
                  + "; attention runs its kernel in fp16/bf16 where kernels.attention.supports() accepts the shapes")
        verdicts = Ops("auto").self_check(device, dtype if dtype != torch.float32 else torch.bfloat16)
        bench.say("kernel self-check (what training under 'auto' would use): "
                  + "; ".join(str(v) for v in verdicts.values()))
        steps.append(bench_step(run, config, kernels_on=True))
        off, on = steps
        bench.say(f"kernels on vs off: {off.ms / on.ms:.2f}x faster; loss differs by {abs(on.loss - off.loss):.2e}")
    reference = steps[-1]
    # One layer fewer, same mode: the difference is one layer's cost (see extrapolate_depth).
    shallow = bench_step(run, replace(config, num_hidden_layers=dims.layers - 1), kernels_on=cuda)
    depth = extrapolate_depth((shallow.layers, shallow.ms), (dims.layers, reference.ms), preset.full_layers)
    run.results += steps + [shallow] + depth_rows(depth, shallow, reference, dims.tokens)
    bench.say(f"WARNING: {depth.problem}" if depth.problem else
              f"full depth ({depth.full_layers} layers, {reference.impl}): per layer {depth.per_layer_ms:.3f} ms, "
              f"outside the layers {depth.outside_ms:.3f} ms, estimated step {depth.step_ms:.3f} ms; an "
              f"extrapolation linear in depth on one device (no pipeline or tensor-parallel effects)")
    if cuda:
        torch.cuda.empty_cache()  # the step's models are gone; give the per-op buffers room
    measured = f"the measured {dims.layers}-layer step ({reference.ms:.3f} ms)"
    bench.say(f"op shares are of {measured} " + ("only (no full-depth estimate)" if depth.problem else
              f"and of the estimated {depth.layers}-layer step ({depth.step_ms:.3f} ms), verdicts on the latter")
              + f"; floors at {copy_gbps:.1f} GB/s copy, {mm_tflops:.2f} TFLOP/s matmul")
    op_rows = bench_ops(run, config, reference.ms, depth, copy_gbps, mm_tflops)
    run.results += op_rows
    eager = [r for r in op_rows if r.impl == "eager"]
    estimated = "" if depth.problem else f", {100 * sum(r.step_share for r in eager):.1f}% of the estimated one"
    bench.say(f"the five ops eager sum to {100 * sum(r.measured_step_share for r in eager):.1f}% of the measured "
              f"step{estimated}; the rest is matmuls, embedding, residual adds, casts and autograd bookkeeping")
    table = format_table(run.results, depth, verdicts=cuda)
    print(table)
    write_outputs(args.out, run.results, header + bench.messages, table)
    print(f"wrote {args.out}/results.csv, table.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
