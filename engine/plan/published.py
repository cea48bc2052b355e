"""Published Megatron-LM throughputs, and the fit of a device's two time-model constants to them.

Megatron-LM's A100 table is Table 1 of Narayanan et al., "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM" (SC'21, arXiv:2104.04473), also shown in the Megatron-LM
README of 2021: GPT models of vocabulary 51,200 and sequence 2,048 in mixed precision on DGX A100
servers (8 x A100 80GB, NVLink, 8 x 200 Gb/s InfiniBand), teraFLOP/s per GPU counted with the
paper's Eq. 3 (which includes full activation recomputation). The rows below were taken from two
text transcriptions of that table that agree on every value (found with the reference search tool
as documents 55320678230 and 66766946069 of its code corpus). The H100 table of the current
Megatron-LM README (GPT 2B to 462B on up to 6144 H100s) exists only as an image
(``images/model_table.png``); no text copy of its rows was found, so nothing here validates H100.

Not given in the table, and assumed: micro batch 1, the plain 1F1B schedule, full recomputation
(Eq. 3), no sequence parallelism or distributed optimizer (2021), fp16 gradients all-reduced after
the backward, and stage outputs scattered over the TP ranks between stages (the paper's
scatter/gather optimisation): :data:`engine.plan.timing.MEGATRON_2021`.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from engine.plan.devices import Device, get_device
from engine.plan.memory import Layout, PipelinePlans, StateBytes
from engine.plan.timing import MEGATRON_2021, ModelShape, TimeModel

SOURCE_A100 = ("Narayanan et al. 2021, arXiv:2104.04473, Table 1 (Megatron-LM README, 2021); "
               "text transcriptions: search-tool documents 55320678230 and 66766946069")
GPT_VOCAB, GPT_SEQ = 51200, 2048


@dataclass(frozen=True)
class PublishedRun:
    """One row of a published throughput table."""
    row: int
    params_billion: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    tflops_per_gpu: float
    source: str = SOURCE_A100

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def shape(self) -> ModelShape:
        """The GPT of this row as Megatron-LM counts it (Eq. 2 and 3 of the paper)."""
        h = self.hidden
        return ModelShape(f"GPT {self.params_billion}B", h, self.layers, self.heads, self.heads, h // self.heads,
                          4 * h, GPT_VOCAB, True, layer_weight_flops=24 * h * h,
                          attention_flops_per_position=4 * h, head_flops=2 * GPT_VOCAB * h,
                          layer_sharded_params=12 * h * h + 7 * h, layer_replicated_params=6 * h,
                          extra_first_stage_params=GPT_SEQ * h)

    def layout(self) -> Layout:
        return Layout(self.tp, self.pp, self.dp, micro_batch_size=1, recompute=True)


A100_TABLE: tuple[PublishedRun, ...] = tuple(PublishedRun(*row) for row in (
    (1, 1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (2, 3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (3, 7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (4, 18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (5, 39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (6, 76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (7, 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (8, 310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (9, 529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (10, 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
))
FIT_ROWS = (1, 6, 10)  # a third of the table, spread over its sizes; the other rows check the fit


def estimated_states(shape: ModelShape, layout: Layout) -> list[StateBytes]:
    """Buffer and owned elements per pipeline rank of a GPT as Megatron-LM lays it out (one
    all-reduced buffer; the tied embedding on the first and, as a copy, the last stage)."""
    vocab_rows = shape.vocab * shape.hidden // layout.tp
    per_layer = shape.layer_sharded_params // layout.tp + shape.layer_replicated_params
    states = []
    for r in range(layout.pp):
        n = shape.layers // layout.pp * per_layer
        if r == 0:
            n += vocab_rows + shape.extra_first_stage_params
        if r == layout.pp - 1:
            n += 2 * shape.hidden + (vocab_rows if layout.pp > 1 else 0)
        states.append(StateBytes(buffer_elements=n, owned_elements=n, pieces=0, params=0, grads=0, optimizer=0,
                                 bucket_elements=(n,), largest_param=vocab_rows))
    return states


def predict(run: PublishedRun, device: Device, plans: PipelinePlans | None = None) -> float:
    """Predicted teraFLOP/s per GPU of a published run, counted as the table counts them."""
    shape = run.shape()
    model = TimeModel(shape, device, gpus_per_node=8, seq_length=GPT_SEQ, global_batch_size=run.global_batch,
                      dtype="bf16", implementation=MEGATRON_2021, plans=plans)
    layout = run.layout()
    return model.step_time(layout, estimated_states(shape, layout)).hardware_tflops_per_gpu


def relative_errors(device: Device, runs=A100_TABLE, plans: PipelinePlans | None = None) -> dict[int, tuple[float, float]]:
    """{row: (predicted TFLOP/s per GPU, (predicted - published) / published)}."""
    plans = plans if plans is not None else PipelinePlans()
    out = {}
    for run in runs:
        got = predict(run, device, plans)
        out[run.row] = (got, (got - run.tflops_per_gpu) / run.tflops_per_gpu)
    return out


def fit_objective(device: Device, fit_rows=FIT_ROWS, runs=A100_TABLE, plans: PipelinePlans | None = None) -> float:
    """Sum of squared relative errors on the fit rows."""
    fit = [r for r in runs if r.row in fit_rows]
    return sum(e * e for _, e in relative_errors(device, fit, plans).values())


def fit_device(device_name: str = "A100-80GB", fit_rows=FIT_ROWS, runs=A100_TABLE) -> tuple[float, float]:
    """(matmul efficiency, bandwidth efficiency) with the least squared relative error on
    ``fit_rows`` only: a grid in steps of 0.05 and 0.1, then 0.01 and 0.02 around its best point."""
    if len([r for r in runs if r.row in fit_rows]) * 3 > len(runs):
        raise ValueError(f"fitting on {len(fit_rows)} of {len(runs)} rows: at most a third may be used")
    plans = PipelinePlans()

    def best(matmuls, bandwidths):
        scored = [(fit_objective(get_device(device_name, matmul_efficiency=a, bandwidth_efficiency=b),
                                 fit_rows, runs, plans), a, b)
                  for a, b in itertools.product(matmuls, bandwidths) if 0 < a <= 1 and 0 < b <= 1]
        return min(scored)[1:]

    coarse_m, coarse_b = best([x / 20 for x in range(10, 21)], [x / 10 for x in range(2, 11)])
    return best([round(coarse_m + x / 100, 2) for x in range(-5, 6)],
                [round(coarse_b + x / 50, 2) for x in range(-5, 6)])


def device_with(device: Device, matmul: float, bandwidth: float) -> Device:
    return dataclasses.replace(device, matmul_efficiency=matmul, bandwidth_efficiency=bandwidth)


def validation_table(device: Device, runs=A100_TABLE, fit_rows=FIT_ROWS) -> str:
    """Markdown: each published row, the prediction, the error, and whether the row was fitted."""
    errors = relative_errors(device, runs)
    lines = ["| row | model | heads | hidden | layers | TP | PP | GPUs | batch | published TFLOP/s | predicted | error | used for |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        got, error = errors[run.row]
        lines.append(f"| {run.row} | {run.params_billion}B | {run.heads} | {run.hidden} | {run.layers} | {run.tp} | "
                     f"{run.pp} | {run.gpus} | {run.global_batch} | {run.tflops_per_gpu:g} | {got:.1f} | "
                     f"{100 * error:+.1f}% | {'fit' if run.row in fit_rows else 'check'} |")
    held = [abs(errors[r.row][1]) for r in runs if r.row not in fit_rows]
    lines.append(f"\nHeld-out rows: mean |error| {100 * sum(held) / len(held):.1f}%, worst {100 * max(held):.1f}% "
                 f"({len(held)} rows; fitted on {len(runs) - len(held)}). Constants: matmul efficiency "
                 f"{device.matmul_efficiency:g}, bandwidth efficiency {device.bandwidth_efficiency:g}. Source: {SOURCE_A100}.")
    return "\n".join(lines)
