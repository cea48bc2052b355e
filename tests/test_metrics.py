"""Run metrics: FLOP counts against hand formulas and torch's FLOP counter, throughput arithmetic by
hand, the JSONL file (round trip, NaN, truncation on resume), log lines and the loss-curve PNG."""
import json
import math
import resource
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.model.config import LlamaConfig
from engine.model.llama import Llama
from engine.train import metrics
from engine.train.metrics import (DEVICE_PEAK_BF16_TFLOPS, MetricsWriter, StepMetrics, device_peak_tflops,
                                  format_log_line, memory_gib, mfu_unknown_text, model_flops_per_token,
                                  peak_bf16_tflops_for_name, plot_loss_curve, read_metrics)
from run_utils import tiny_data, tiny_run_config, train_in_process  # noqa: F401

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32)


# ---------------------------------------------------------------------------------- FLOPs
def test_llama2_7b_flops_per_token_by_hand():
    # per layer: q, k, v, o are 4096 x 4096, gate, up, down 4096 x 11008; head 32000 x 4096
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert layer == 202_375_168
    matmul_weights = 32 * layer + 32000 * 4096
    assert matmul_weights == 6_607_077_376
    attention = 2 * 2 * 32 * 4096 * 4096  # per token forward, full (non-causal) count
    expected = 3 * (2 * matmul_weights + attention)
    assert expected == 46_084_915_200
    assert model_flops_per_token(LLAMA2_7B, 4096) == expected
    # the usual rule of thumb: 6 x 6.74e9 parameters (its embedding is no matmul) plus attention
    assert model_flops_per_token(LLAMA2_7B, 4096) == pytest.approx(6 * 6.74e9 + 3 * attention, rel=0.02)
    # recomputation adds one forward of the 32 layers, not of the head
    assert model_flops_per_token(LLAMA2_7B, 4096, recompute=True) == \
        expected + 2 * 32 * layer + 2 * 2 * 32 * 4096 * 4096


def _tiny(**overrides):
    fields = dict(vocab_size=48, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12)
    fields.update(overrides)
    return LlamaConfig(**fields)


def test_tiny_gqa_config_by_explicit_enumeration_of_matmuls():
    config = _tiny()  # q width 4 x 12 = 48, k/v width 2 x 12 = 24
    seq = 16
    matmuls = [  # (inputs, outputs) of each weight, per layer
        (32, 48), (32, 24), (32, 24), (48, 32),  # q, k, v, o
        (32, 40), (32, 40), (40, 32),  # gate, up, down
    ]
    per_layer = sum(2 * i * o for i, o in matmuls) + 2 * seq * 48 + 2 * seq * 48  # + QK^T and PV
    forward = 2 * per_layer + 2 * 32 * 48  # two layers and the head
    assert model_flops_per_token(config, seq) == 3 * forward
    assert model_flops_per_token(config, seq, recompute=True) == 3 * forward + 2 * per_layer
    # tied embeddings still run the head matmul
    assert model_flops_per_token(_tiny(tie_word_embeddings=True), seq) == 3 * forward


@pytest.mark.parametrize("kv_heads,tied,recompute", [(4, False, False), (2, True, False), (2, False, True)])
def test_flops_equal_torch_flop_counter_on_a_training_step(kv_heads, tied, recompute):
    """torch's FlopCounterMode counts every matmul the real model runs, forward and backward
    (attention in its math form, whose QK^T and PV are plain batched matmuls over all positions)."""
    config = _tiny(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = Llama(config)
    model.activation_checkpointing = recompute
    batch, seq = 2, 16
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), torch.utils.checkpoint.set_checkpoint_early_stop(False), \
            FlopCounterMode(display=False) as counter:
        model(ids).float().sum().backward()
    assert counter.get_total_flops() == model_flops_per_token(config, seq, recompute) * batch * seq


@pytest.mark.parametrize("bad", [0, -4, 2.0, None])
def test_flops_refuse_a_bad_sequence_length(bad):
    with pytest.raises(ValueError, match="seq_length"):
        model_flops_per_token(_tiny(), bad)


def test_flops_refuse_a_config_without_the_fields():
    with pytest.raises(ValueError, match="config.vocab_size"):
        model_flops_per_token(object(), 16)


# ------------------------------------------------------------------------- device and memory
@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 NVL", None),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-32GB", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_bf16_tflops_for_name(name) == peak


def test_peak_table_and_cpu():
    assert DEVICE_PEAK_BF16_TFLOPS == {"A100": 312.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H200": 989.0}
    assert device_peak_tflops("cpu") is None
    assert device_peak_tflops(torch.device("cpu")) is None
    assert mfu_unknown_text(metrics.device_name("cpu")) == "MFU unknown (no bf16 peak for cpu)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_and_memory_come_from_the_device():
    name = torch.cuda.get_device_name(0)
    assert device_peak_tflops(0) == peak_bf16_tflops_for_name(name)
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    gib, label = memory_gib("cuda")
    assert label == "cuda peak" and gib >= 0.25
    del x


def test_cpu_memory_is_the_peak_rss_in_gib():
    gib, label = memory_gib("cpu")
    assert label == "rss peak"
    assert gib == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rel=0.05)
    with open("/proc/self/status") as f:  # Linux's own report of the peak, VmHWM in kB
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert gib == pytest.approx(hwm_kib / 2**20, rel=0.05)


# ------------------------------------------------------------------------------ throughput
def test_step_metrics_arithmetic_by_hand():
    # 8 devices, 0.5 s per step, 4 x 1024 x 64 = 262,144 tokens, 1e9 FLOPs a token
    step = StepMetrics(step_time_s=0.5, tokens_per_step=262_144, world_size=8, flops_per_token=1e9,
                       peak_tflops=312.0)
    assert step.tokens_per_s == 524_288
    assert step.tflops == pytest.approx(65.536, rel=1e-12)  # 1e9 * 262144 / 0.5 / 8 / 1e12
    assert step.mfu == pytest.approx(65.536 / 312, rel=1e-12)
    assert step.as_record() == {"tokens_per_s": 524_288, "tflops": step.tflops, "mfu": step.mfu}
    assert StepMetrics(2.0, 1000, 1, 6e6).mfu is None  # 1000 tok in 2 s, 6e6 FLOP each -> 3e-3 TFLOP/s
    assert StepMetrics(2.0, 1000, 1, 6e6).tflops == pytest.approx(3e-3, rel=1e-12)


@pytest.mark.parametrize("kwargs,name", [
    (dict(step_time_s=0.0), "step_time_s"), (dict(step_time_s=float("nan")), "step_time_s"),
    (dict(tokens_per_step=-1), "tokens_per_step"), (dict(tokens_per_step=1.5), "tokens_per_step"),
    (dict(world_size=0), "world_size"), (dict(flops_per_token=-1.0), "flops_per_token"),
    (dict(peak_tflops=0.0), "peak_tflops"),
])
def test_step_metrics_refuse_bad_values_by_name(kwargs, name):
    args = dict(step_time_s=1.0, tokens_per_step=10, world_size=1, flops_per_token=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"StepMetrics.{name} "):
        StepMetrics(**args)


# ---------------------------------------------------------------------------- the JSONL file
def test_jsonl_round_trip_with_nan_inf_none_and_tensors(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    records = [
        {"iteration": 1, "loss": 3.5, "lr": 1e-4, "grad_norm": None, "stage": "ct", "skipped": 0},
        {"iteration": 2, "loss": float("nan"), "grad_norm": float("inf"), "mfu": None},
        {"iteration": 3, "loss": torch.tensor(2.25), "tokens": torch.tensor([7]), "scale": float("-inf")},
    ]
    with MetricsWriter(path) as writer:
        for record in records:
            writer.log(record)
        lines = path.read_text().splitlines()  # flushed each line, before close
        assert len(lines) == 3
    parsed = [json.loads(line) for line in lines]  # standard JSON: no bare NaN/Infinity
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed[1] == {"iteration": 2, "loss": "nan", "grad_norm": "inf", "mfu": None}
    assert parsed[2] == {"iteration": 3, "loss": 2.25, "tokens": 7, "scale": "-inf"}
    assert type(parsed[0]["iteration"]) is int and type(parsed[2]["loss"]) is float
    back = read_metrics(path)
    assert back[0] == records[0]
    assert math.isnan(back[1]["loss"]) and back[1]["grad_norm"] == math.inf and back[1]["mfu"] is None
    assert back[2] == {"iteration": 3, "loss": 2.25, "tokens": 7, "scale": -math.inf}
    # a second writer appends
    with MetricsWriter(path) as writer:
        writer.log({"iteration": 4, "loss": 1.0})
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_log_refuses_values_that_are_not_scalars(tmp_path):
    with MetricsWriter(tmp_path / "m.jsonl") as writer:
        with pytest.raises(TypeError, match="'layout'"):
            writer.log({"iteration": 1, "layout": {"tp": 2}})
        with pytest.raises(TypeError, match="'hist'"):
            writer.log({"iteration": 1, "hist": torch.zeros(3)})
    with pytest.raises(ValueError, match="closed"):
        writer.log({"iteration": 2})


def test_truncate_after_drops_later_iterations_and_an_interrupted_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.log({"event": "start"})  # no iteration: kept
        for i in range(1, 7):
            writer.log({"iteration": i, "loss": 10.0 - i})
        writer.log({"iteration": 4, "valid_loss": 5.5})
    with open(path, "a") as f:
        f.write('{"iteration": 7, "lo')  # a write cut short by a crash
    assert [r.get("iteration") for r in read_metrics(path)] == [None, 1, 2, 3, 4, 5, 6, 4]
    with MetricsWriter(path) as writer:
        assert writer.truncate_after(4) == 2  # iterations 5 and 6; the partial line is gone too
        writer.log({"iteration": 5, "loss": 4.75})
    records = read_metrics(path)
    assert records == [{"event": "start"}] + [{"iteration": i, "loss": 10.0 - i} for i in range(1, 5)] + [
        {"iteration": 4, "valid_loss": 5.5}, {"iteration": 5, "loss": 4.75}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left behind


def test_appending_after_an_interrupted_write_starts_a_fresh_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "lo')
    with MetricsWriter(path) as writer:
        writer.log({"iteration": 2, "loss": 1.5})
    assert path.read_text() == '{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "loss": 1.5}\n'


def test_truncate_after_names_a_corrupt_line_and_keeps_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    with MetricsWriter(path) as writer:
        with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
            writer.truncate_after(1)
        writer.log({"iteration": 3})  # still appending
    assert path.read_text() == '{"iteration": 1}\nnot json\n{"iteration": 2}\n{"iteration": 3}\n'


def test_tensorboard_gets_numeric_scalars_by_key(tmp_path, monkeypatch):
    class RecordingSummaryWriter:
        def __init__(self, log_dir, purge_step):
            self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
            opened.append(self)

        def add_scalar(self, tag, value, global_step):
            self.scalars.append((tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    opened = []
    monkeypatch.setattr(metrics, "_open_summary_writer", RecordingSummaryWriter)
    writer = MetricsWriter(None, tensorboard_dir=str(tmp_path / "tb"))
    assert writer.tensorboard_enabled
    writer.log({"iteration": 3, "loss": 2.5, "lr": 1e-4, "mfu": None, "stage": "ct", "grad_norm": float("nan")})
    writer.log({"event": "no iteration"})
    assert opened[0].scalars[:2] == [("loss", 2.5, 3), ("lr", 1e-4, 3)]
    assert opened[0].scalars[2][0] == "grad_norm" and math.isnan(opened[0].scalars[2][1])
    assert len(opened[0].scalars) == 3
    writer.truncate_after(2)  # a resume purges the later events
    assert opened[0].closed and opened[1].purge_step == 3 and opened[1].log_dir == str(tmp_path / "tb")
    writer.close()
    assert opened[1].closed


def test_without_tensorboard_only_the_file_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with MetricsWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb") as writer:
        assert not writer.tensorboard_enabled
        writer.log({"iteration": 1, "loss": 1.0})
    assert read_metrics(tmp_path / "m.jsonl") == [{"iteration": 1, "loss": 1.0}]
    assert not (tmp_path / "tb").exists()


# ------------------------------------------------------------------------------ log lines
def test_training_log_line():
    record = {"iteration": 10, "iters": 100, "loss": 3.45214, "lr": 3e-4, "grad_norm": 1.2344, "skipped": 0,
              "tokens_per_s": 12345.4, "tflops": 1.23, "mfu": 0.0314, "mem_gib": 1.234, "mem_label": "rss peak"}
    assert format_log_line(record) == ("iter 10/100 | loss 3.4521 | lr 3.00e-04 | grad norm 1.234 | skipped 0 | "
                                       "12,345 tok/s | 1.2 TFLOP/s/device | MFU 3.1% | mem 1.23 GiB (rss peak)")


def test_log_line_when_mfu_is_unknown_and_values_are_small_or_missing():
    record = {"iteration": 7, "loss": float("nan"), "tflops": 0.000123456, "mfu": None, "device": "cpu",
              "grad_norm": None}
    assert format_log_line(record) == \
        "iter 7 | loss nan | grad norm n/a | 0.000123 TFLOP/s/device | MFU unknown (no bf16 peak for cpu)"


def test_validation_log_line():
    assert format_log_line({"iteration": 50, "valid_loss": 3.21}) == "iter 50 | valid loss 3.2100 (ppl 24.8)"
    assert math.exp(3.21) == pytest.approx(24.78, abs=0.01)
    assert format_log_line({"iteration": 5, "valid_loss": 800.0}) == "iter 5 | valid loss 800.0000 (ppl inf)"
    with pytest.raises(ValueError, match="iteration"):
        format_log_line({"loss": 1.0})


# ------------------------------------------------------------------------------ the plot
def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        for i in range(1, 21):
            writer.log({"iteration": i, "loss": 5.0 / i, "lr": 1e-3})
            if i % 5 == 0:
                writer.log({"iteration": i, "valid_loss": 5.5 / i})
        writer.log({"iteration": 21, "loss": float("nan")})  # a skipped step is left out of the line
    png = tmp_path / "loss.png"
    assert plot_loss_curve(path, png) is True
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert (width, height) == (700, 450)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_loss_curve_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "loss": 2.0}\n')
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert plot_loss_curve(path, tmp_path / "loss.png") is False
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("draw", [True, False])
def test_a_run_draws_its_loss_curve_unless_told_not_to(tiny_data, tmp_path, draw):  # noqa: F811
    pytest.importorskip("matplotlib")
    save = tmp_path / "run"
    train_in_process(tiny_run_config(tiny_data, save, train={"iters": 2, "loss_curve": draw}))
    assert (save / "loss_curve.png").exists() is draw
    assert [r["iteration"] for r in read_metrics(save / "metrics.jsonl") if "loss" in r] == [1, 2]
