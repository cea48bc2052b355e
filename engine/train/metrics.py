"""What a training run reports: FLOPs, throughput and MFU, memory, the metrics file and log lines.

One JSON object per line goes to ``metrics.jsonl`` (and to TensorBoard when it is installed); the
same record becomes one human log line through :func:`format_log_line`. Keys the log line knows:
``iteration`` (required), ``iters`` (the run's total), ``loss``, ``lr``, ``grad_norm``, ``skipped``,
``tokens_per_s``, ``tflops`` (per device), ``mfu`` (a fraction; None when the device's peak is
unknown), ``device`` (its name, for the "MFU unknown" text), ``mem_gib`` and ``mem_label``; a
validation record carries ``valid_loss`` instead of ``loss``. Only one rank should write.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

from engine.fileio import atomic_open

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets.
DEVICE_PEAK_BF16_TFLOPS = {
    "A100": 312.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H200": 989.0,
}


# ------------------------------------------------------------------------------------ FLOPs
def model_flops_per_token(config, seq_length: int, recompute: bool = False) -> float:
    """Training FLOPs (forward and backward) per token of a Llama (:class:`LlamaConfig` fields).

    Matmuls: 2 FLOPs per weight per token in the forward, over q, k, v, o, gate, up and down of every
    layer and the output head (vocab x hidden, counted also when tied to the embedding; the embedding
    lookup itself is no matmul). Attention: scores (QK^T) and values (PV) cost
    ``2 * 2 * num_layers * seq_length * num_attention_heads * head_dim`` per token in the forward,
    the full, non-causal count that Megatron and PaLM's MFU use (a causal kernel does about half the
    work, so MFU stays comparable with theirs). Norms, rotary, softmax and activations are not counted.

    The backward costs twice the forward, so training is 3x the forward. ``recompute=True`` adds one
    more forward of the decoder layers (full activation recomputation; the head is not recomputed):
    hardware FLOPs, whereas MFU as PaLM defines it counts the model's FLOPs only (``recompute=False``).
    """
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model_flops_per_token: config.{name} must be a positive integer, got {value!r}")
    if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length <= 0:
        raise ValueError(f"model_flops_per_token: seq_length must be a positive integer, got {seq_length!r}")
    hidden, inner = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    layer_weights = (hidden * q_width + 2 * hidden * kv_width + q_width * hidden  # q, k, v, o
                     + 3 * hidden * inner)  # gate, up, down
    attention_forward = 2 * 2 * seq_length * q_width
    layers_forward = config.num_hidden_layers * (2 * layer_weights + attention_forward)
    head_forward = 2 * config.vocab_size * hidden
    return float((4 if recompute else 3) * layers_forward + 3 * head_forward)


# ------------------------------------------------------------------------------ the device
def _as_device(device: torch.device | str | int) -> torch.device:
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device)
    return torch.device(device)


def device_name(device: torch.device | str | int) -> str:
    """The GPU's marketing name on CUDA (e.g. "NVIDIA H100 80GB HBM3"), else the device type."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_bf16_tflops_for_name(name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``name`` (as CUDA reports it), None when not in the table.

    H100 means the SXM part unless the name says PCIe; H100/H200 NVL parts have other peaks and are
    unknown, as is every other device.
    """
    upper = name.upper()
    if "NVL" in upper:
        return None
    if "H200" in upper:
        return DEVICE_PEAK_BF16_TFLOPS["H200"]
    if "H100" in upper:
        return DEVICE_PEAK_BF16_TFLOPS["H100 PCIe" if "PCIE" in upper else "H100 SXM"]
    if "A100" in upper:
        return DEVICE_PEAK_BF16_TFLOPS["A100"]
    return None


def device_peak_tflops(device: torch.device | str | int) -> float | None:
    """Dense bf16 peak TFLOP/s of ``device``; None for CPU and GPUs not in the table."""
    device = _as_device(device)
    if device.type != "cuda":
        return None
    return peak_bf16_tflops_for_name(device_name(device))


def mfu_unknown_text(name: str | None) -> str:
    """What the log says instead of an MFU when the device called ``name`` (see :func:`device_name`)
    has no known peak."""
    return "MFU unknown" if name is None else f"MFU unknown (no bf16 peak for {name})"


def memory_gib(device: torch.device | str | int) -> tuple[float, str]:
    """Peak memory so far in GiB and what was measured: CUDA's peak allocated bytes on a GPU
    (``"cuda peak"``), the process's peak resident set size otherwise (``"rss peak"``)."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda peak"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024  # Linux reports KiB
    return rss_bytes / 2**30, "rss peak"


# ------------------------------------------------------------------------- step throughput
@dataclass(frozen=True)
class StepMetrics:
    """Throughput of one optimizer step from its wall time.

    ``tokens_per_step`` counts the global batch (every DP rank); ``world_size`` every device taking
    part (TP x PP x DP), so ``tflops`` is per device and ``mfu`` is the fraction of its peak.
    """

    step_time_s: float
    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        checks = (
            ("step_time_s", self.step_time_s, lambda v: v > 0, "a positive number"),
            ("tokens_per_step", self.tokens_per_step, lambda v: isinstance(v, int) and v >= 0,
             "a non-negative integer"),
            ("world_size", self.world_size, lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
            ("flops_per_token", self.flops_per_token, lambda v: v >= 0, "a non-negative number"),
        )
        for name, value, ok, what in checks:
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not ok(value)):
                raise ValueError(f"StepMetrics.{name} must be {what}, got {value!r}")
        peak = self.peak_tflops
        if peak is not None and (not isinstance(peak, (int, float)) or isinstance(peak, bool)
                                 or not math.isfinite(peak) or peak <= 0):
            raise ValueError(f"StepMetrics.peak_tflops must be a positive number or None, got {peak!r}")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s per device."""
        return self.flops_per_token * self.tokens_per_step / self.step_time_s / self.world_size / 1e12

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation as a fraction of the device peak; None when the peak is unknown."""
        return None if self.peak_tflops is None else self.tflops / self.peak_tflops

    def as_record(self) -> dict[str, float | None]:
        """The keys this contributes to a metrics record."""
        return {"tokens_per_s": self.tokens_per_s, "tflops": self.tflops, "mfu": self.mfu}


# ---------------------------------------------------------------------- the metrics file
_NON_FINITE_TEXT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _json_value(key: str, value: Any) -> Any:
    """A record value as JSON writes it: plain ints and floats, NaN/Inf as strings, None as null."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metrics record: {key!r} is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    raise TypeError(f"metrics record: {key!r} has a value of type {type(value).__name__}; "
                    "expected a number, a string, a bool or None")


def _from_json_value(value: Any) -> Any:
    return _NON_FINITE_TEXT[value] if isinstance(value, str) and value in _NON_FINITE_TEXT else value


def _parse_lines(path: str) -> list[tuple[str, dict]]:
    """Each complete line of a metrics file with its record. A last line without its newline is the
    remains of an interrupted write and is dropped; any other unreadable line is an error."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    complete = text.split("\n")[:-1]  # what follows the last newline is not a whole line
    parsed = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        parsed.append((line, {k: _from_json_value(v) for k, v in record.items()}))
    return parsed


def read_metrics(jsonl_path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics file, in order; "nan", "inf" and "-inf" read back as floats."""
    return [record for _, record in _parse_lines(os.fspath(jsonl_path))]


def _drop_interrupted_line(path: str) -> None:
    """Cut a last line left without its newline by an interrupted write, so appending continues on
    a line of its own."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def _open_summary_writer(log_dir: str, purge_step: int | None):
    """A TensorBoard SummaryWriter, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


class MetricsWriter:
    """Appends records to a JSON Lines file (one object a line, flushed each line) and, when
    ``tensorboard`` is importable and ``tensorboard_dir`` is given, logs their numbers as scalars
    (tag = key, step = the record's ``iteration``). Either destination may be None. An existing file
    is appended to, less a last line an interrupted write left unfinished."""

    def __init__(self, path_jsonl: str | os.PathLike | None, tensorboard_dir: str | os.PathLike | None = None):
        self.path = None if path_jsonl is None else os.fspath(path_jsonl)
        self.tensorboard_dir = None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        self._file = None
        self._tensorboard = None
        self._closed = False
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            _drop_interrupted_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        if self.tensorboard_dir is not None:
            self._tensorboard = _open_summary_writer(self.tensorboard_dir, purge_step=None)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tensorboard is not None

    def log(self, record: dict) -> None:
        """Write one record (a flat dict of numbers, strings, bools and None; 1-element tensors are
        read as numbers)."""
        if self._closed:
            raise ValueError("MetricsWriter.log: the writer is closed")
        if not isinstance(record, dict):
            raise TypeError(f"metrics record must be a dict, got {type(record).__name__}")
        for key in record:
            if not isinstance(key, str):
                raise TypeError(f"metrics record: key {key!r} is not a string")
        values = {key: _json_value(key, value) for key, value in record.items()}
        if self._file is not None:
            self._file.write(json.dumps(values, allow_nan=False) + "\n")
            self._file.flush()
        step = values.get("iteration")
        if self._tensorboard is not None and isinstance(step, int) and not isinstance(step, bool):
            for key, value in values.items():
                value = _from_json_value(value)
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()

    def truncate_after(self, iteration: int) -> int:
        """Drop the records with ``iteration`` greater than the one a resumed run starts from, so
        the file reads like one uninterrupted run; returns how many were dropped. Records without an
        iteration stay. The file is rewritten atomically, and TensorBoard events from
        ``iteration + 1`` on are purged."""
        if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
            raise ValueError(f"truncate_after: iteration must be a non-negative integer, got {iteration!r}")
        if self._closed:
            raise ValueError("MetricsWriter.truncate_after: the writer is closed")
        dropped = 0
        if self._file is not None:
            self._file.close()
            try:
                kept = []
                for line, record in _parse_lines(self.path):
                    step = record.get("iteration")
                    if isinstance(step, (int, float)) and not isinstance(step, bool) and step > iteration:
                        dropped += 1
                    else:
                        kept.append(line + "\n")
                with atomic_open(self.path) as f:
                    f.writelines(kept)
            finally:  # a file that cannot be read is reported and still appended to, never lost
                self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = _open_summary_writer(self.tensorboard_dir, purge_step=iteration + 1)
        return dropped

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- log lines
def _number(value: Any) -> float | None:
    return None if value is None or isinstance(value, bool) else float(value)


def _fixed(value: Any, spec: str) -> str:
    value = _number(value)
    return "n/a" if value is None else ("nan" if math.isnan(value) else format(value, spec))


def format_log_line(record: dict) -> str:
    """One human line for a record, e.g. ``iter 10/100 | loss 3.4521 | lr 3.00e-04 | grad norm 1.234 |
    skipped 0 | 12,345 tok/s | 1.2 TFLOP/s/device | MFU 3.1% | mem 1.23 GiB (rss peak)``, or for a
    validation record ``iter 50 | valid loss 3.2100 (ppl 24.8)``. Absent keys are left out."""
    if not isinstance(record, dict) or "iteration" not in record:
        raise ValueError(f"format_log_line: the record has no 'iteration': {record!r}")
    head = f"iter {record['iteration']}"
    if record.get("iters") is not None:
        head += f"/{record['iters']}"
    parts = [head]
    if "valid_loss" in record:
        loss = _number(record["valid_loss"])
        if loss is None or math.isnan(loss):
            ppl = "n/a" if loss is None else "nan"
        else:
            ppl = format(math.exp(loss) if loss < 709.0 else math.inf, ".1f")  # exp overflows past ~709.78
        parts.append(f"valid loss {_fixed(loss, '.4f')} (ppl {ppl})")
        return " | ".join(parts)
    if "loss" in record:
        parts.append(f"loss {_fixed(record['loss'], '.4f')}")
    if "lr" in record:
        parts.append(f"lr {_fixed(record['lr'], '.2e')}")
    if "grad_norm" in record:
        parts.append(f"grad norm {_fixed(record['grad_norm'], '.3f')}")
    if "skipped" in record:
        parts.append(f"skipped {record['skipped']}")
    if "tokens_per_s" in record:
        parts.append(f"{_fixed(record['tokens_per_s'], ',.0f')} tok/s")
    if "tflops" in record:
        tflops = _number(record["tflops"])
        spec = ".1f" if tflops is not None and abs(tflops) >= 1 else ".3g"
        parts.append(f"{_fixed(tflops, spec)} TFLOP/s/device")
    if "mfu" in record:
        mfu = _number(record["mfu"])
        parts.append(mfu_unknown_text(record.get("device")) if mfu is None else f"MFU {_fixed(100 * mfu, '.1f')}%")
    if "mem_gib" in record:
        label = record.get("mem_label")
        parts.append(f"mem {_fixed(record['mem_gib'], '.2f')} GiB" + (f" ({label})" if label else ""))
    return " | ".join(parts)


# ----------------------------------------------------------------------------- the plot
def plot_loss_curve(jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Draw training loss by iteration (a line) and validation loss (points) from a metrics file
    into a PNG, written atomically. Returns False, writing nothing, when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    records = read_metrics(jsonl_path)

    def points(key: str) -> tuple[list[float], list[float]]:
        pairs = [(r["iteration"], float(r[key])) for r in records
                 if isinstance(r.get("iteration"), (int, float)) and isinstance(r.get(key), (int, float))
                 and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    figure = Figure(figsize=(7, 4.5), dpi=100)  # no pyplot: no global figure state, no backend switch
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    train_x, train_y = points("loss")
    valid_x, valid_y = points("valid_loss")
    axes.plot(train_x, train_y, label="training loss", linewidth=1.2)
    if valid_x:
        axes.plot(valid_x, valid_y, "o", label="validation loss", markersize=5)
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    run_dir = os.path.dirname(os.path.abspath(os.fspath(jsonl_path)))
    axes.set_title(f"loss of the run in {os.path.basename(run_dir) or run_dir}")
    axes.grid(True, alpha=0.3)
    if train_x or valid_x:
        axes.legend()
    figure.tight_layout()
    with atomic_open(png_path, "wb") as f:
        figure.savefig(f, format="png")
    return True
