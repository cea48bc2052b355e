"""tools/bench_step.py: the CPU smoke run writes the expected rows, its byte counts are right, and
the full-depth extrapolation follows its formulas (and refuses noisy inputs)."""
import csv
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_step.py")
OPS = {"rope": 2, "swiglu": 2, "cross_entropy": 1, "rmsnorm": 5, "attention": 2}  # calls per step, tiny (2 layers)
FULL_OPS = {"rope": 4, "swiglu": 4, "cross_entropy": 1, "rmsnorm": 9, "attention": 4}  # at its full 4 layers


def _load_tool():
    if os.path.dirname(TOOL) not in sys.path:
        sys.path.insert(0, os.path.dirname(TOOL))
    return importlib.import_module("bench_step")


def _positive(row: dict, *names: str) -> None:
    for name in names:
        value = float(row[name])
        assert math.isfinite(value) and value > 0, f"{row['name']} {row['impl']}: {name} = {row[name]!r}"


def test_tiny_cpu_run_writes_csv_and_table(tmp_path):
    out = tmp_path / "step"
    cmd = [sys.executable, TOOL, "--preset", "tiny", "--out", str(out), "--steps", "2", "--warmup", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not speed measurements" in proc.stdout and "kernels-on step is skipped" in proc.stdout

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["section"], r["name"], r["impl"]): r for r in rows}
    _positive(by[("ceiling", "device copy", "")], "gbps")
    _positive(by[("ceiling", "matmul", "")], "tflops")

    steps = [r for r in rows if r["section"] == "step"]
    assert [(r["impl"], r["layers"]) for r in steps] == [("kernels off", "2"), ("kernels off", "1")]
    for r in steps:
        _positive(r, "ms", "tokens_per_s", "tflops", "loss")
        assert float(r["tokens_per_s"]) == pytest.approx(2 * 32 / (float(r["ms"]) * 1e-3), rel=1e-4)
        # Small random weights give near-uniform predictions: the loss is close to log(vocab).
        assert float(r["loss"]) == pytest.approx(math.log(256), abs=0.05)
    step, shallow = steps
    # The 1-layer model has one layer's matmul parameters and attention fewer: fewer model FLOPs.
    flops = [float(r["tflops"]) * float(r["ms"]) for r in (step, shallow)]
    assert flops[1] < flops[0]

    # The depth rows follow the formulas from the two measured steps; shared CPUs can make the
    # difference noise, and then the tool must refuse the estimate and say why.
    depth = {r["name"]: r for r in rows if r["section"] == "depth"}
    per_layer = float(step["ms"]) - float(shallow["ms"])
    outside = float(step["ms"]) - 2 * per_layer
    if per_layer > 0 and outside >= 0:
        assert float(depth["per layer"]["ms"]) == pytest.approx(per_layer, rel=1e-3, abs=1e-4)
        assert float(depth["outside the layers"]["ms"]) == pytest.approx(outside, rel=1e-3, abs=1e-4)
        full = depth["full-depth step"]
        assert full["layers"] == "4" and "extrapolated: linear in depth" in full["note"]
        assert float(full["ms"]) == pytest.approx(outside + 4 * per_layer, rel=1e-3)
        _positive(full, "tokens_per_s", "tflops")
        # Model FLOPs are linear in depth: 4 layers = 2 layers + 2 * (2 layers - 1 layer).
        assert float(full["tflops"]) * float(full["ms"]) == pytest.approx(3 * flops[0] - 2 * flops[1], rel=1e-3)
        full_ms, layers = float(full["ms"]), 4
        assert "per layer" in proc.stdout and "extrapolation linear in depth" in proc.stdout
    else:
        assert list(depth) == ["full-depth step"] and depth["full-depth step"]["ms"] == ""
        assert "timing noise" in depth["full-depth step"]["note"] and "WARNING" in proc.stdout
        full_ms, layers = float(step["ms"]), 2

    tool = _load_tool()
    dims = tool.StepDims(batch=2, seq=32, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                         vocab=256, layers=2)
    ops = [r for r in rows if r["section"] == "op"]
    assert sorted((r["name"], r["impl"]) for r in ops) == sorted((op, "eager") for op in OPS)
    for r in ops:
        _positive(r, "ms", "ms_per_step", "step_share", "measured_step_share", "bytes_per_call", "gbps",
                  "floor_ms_per_step")
        calls = (FULL_OPS if layers == 4 else OPS)[r["name"]]
        assert int(r["layers"]) == layers and int(r["calls_per_step"]) == calls
        assert float(r["ms_per_step"]) == pytest.approx(float(r["ms"]) * calls, rel=1e-4)
        assert float(r["step_share"]) == pytest.approx(float(r["ms_per_step"]) / full_ms, rel=1e-3)
        assert float(r["measured_step_share"]) == pytest.approx(
            float(r["ms"]) * OPS[r["name"]] / float(step["ms"]), rel=1e-3)
        assert int(r["bytes_per_call"]) == tool.min_bytes(r["name"], dims, 4)
        assert 0 <= float(r["max_saving_share"]) <= float(r["step_share"])

    table = (out / "table.txt").read_text()
    for text in ("command: python tools/bench_step.py --preset tiny", "date: ", "device: CPU", "torch ",
                 "triton ", "ceilings: copy", "vocab_parallel_cross_entropy", "model FLOPs = 6 * P",
                 "layers 2 of 4", "of L2 step", f"max saving L{layers}", "n/a (CPU)"):
        assert text in table, text


def test_depth_extrapolation_by_hand():
    tool = _load_tool()
    # 1 layer 30 ms, 2 layers 50 ms: 20 ms per layer, 10 ms outside; 32 layers: 10 + 32 * 20 = 650 ms.
    est = tool.extrapolate_depth((1, 30.0), (2, 50.0), 32)
    assert (est.per_layer_ms, est.outside_ms, est.layers, est.step_ms, est.problem) == (20.0, 10.0, 32, 650.0, "")
    # Any two depths: 4 layers 100 ms, 6 layers 130 ms -> 15 ms per layer, 40 ms outside; 40 layers 640 ms.
    est = tool.extrapolate_depth((4, 100.0), (6, 130.0), 40)
    assert (est.per_layer_ms, est.outside_ms, est.step_ms) == (15.0, 40.0, 640.0)
    # Noise: a 1-layer step slower than the 2-layer one, or more than half of it, is refused and the
    # measured 2-layer step stands in at its own depth.
    for shallow, reason in [((1, 52.0), "per-layer time -2 ms <= 0"), ((1, 50.0), "per-layer time 0 ms <= 0"),
                            ((1, 20.0), "time outside the layers -10 ms < 0")]:
        est = tool.extrapolate_depth(shallow, (2, 50.0), 32)
        assert (est.layers, est.step_ms) == (2, 50.0)
        assert est.problem.startswith(reason) and "timing noise" in est.problem, est.problem
    with pytest.raises(ValueError, match="need 0 < shallow < deep layers, got 2 and 2"):
        tool.extrapolate_depth((2, 10.0), (2, 20.0), 32)


class _FixedTimes:
    """Stands in for bench_kernels.Bench: every op takes ``ms`` (run once, so its code is exercised)."""
    def __init__(self, ms: float):
        self.ms, self.messages = ms, []

    def time_ms(self, fn) -> float:
        fn()
        return self.ms

    def say(self, message: str) -> None:
        self.messages.append(message)


def test_full_depth_shares_and_verdicts_by_hand():
    """Op rows at full depth (per-layer ops x 32, cross entropy x 1), shares of the estimated step,
    and the verdict from the full-depth share, not from the share of the measured 2-layer step."""
    tool = _load_tool()
    config = tool.LlamaConfig(**tool.PRESETS["tiny"].config)
    run = tool.Run(_FixedTimes(2.0), torch.float32, tool.StepDims.of(config, 2, 32), torch.device("cpu"))
    full = tool.extrapolate_depth((1, 30.0), (2, 50.0), 32)  # 650 ms at 32 layers
    huge = 1e9  # ceilings so high that every floor is ~0 and the saving equals the share
    rows = {r.name: r for r in tool.bench_ops(run, config, 50.0, full, huge, huge)}
    expected_calls = {"rope": 32, "swiglu": 32, "cross_entropy": 1, "rmsnorm": 65, "attention": 32}
    assert {name: r.calls_per_step for name, r in rows.items()} == expected_calls
    for name, r in rows.items():
        assert r.layers == 32 and r.ms_per_step == 2.0 * expected_calls[name]
        assert r.step_share == pytest.approx(2.0 * expected_calls[name] / 650.0)
        assert r.measured_step_share == pytest.approx(2.0 * OPS[name] / 50.0)
        assert r.max_saving_share == pytest.approx(r.step_share, rel=1e-6)
    # Cross entropy: 4% of the 2-layer step but 0.31% at full depth -> no; RoPE 8% and 9.8% -> yes.
    assert rows["cross_entropy"].measured_step_share == pytest.approx(0.04)
    table = tool.format_table(list(rows.values()), full, verdicts=True)
    verdicts = {line.split()[0]: line.split()[-1] for line in table.splitlines()[-5:]}
    assert verdicts == {"rope": "yes", "swiglu": "yes", "cross_entropy": "no", "rmsnorm": "yes", "attention": "yes"}
    assert "of L2 step" in table and "of L32 step (est.)" in table and "max saving L32" in table

    # A refused estimate keeps everything at the measured 2 layers.
    noisy = tool.extrapolate_depth((1, 60.0), (2, 50.0), 32)
    rows = {r.name: r for r in tool.bench_ops(run, config, 50.0, noisy, huge, huge)}
    for name, r in rows.items():
        assert (r.layers, r.calls_per_step) == (2, OPS[name])
        assert r.step_share == pytest.approx(r.measured_step_share)
    assert "of L2 step (est.)" not in tool.format_table(list(rows.values()), noisy, verdicts=True)


def test_min_bytes_against_a_hand_count():
    tool = _load_tool()
    d = tool.StepDims(batch=1, seq=4, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=6, vocab=10,
                      layers=1)
    # SwiGLU on [4, 6] bf16: forward gate, up, h; backward dh, gate, up, dgate, dup -> 8 tensors of 24.
    assert tool.min_bytes("swiglu", d, 2) == (3 + 5) * 24 * 2
    # RoPE fp32: q 4*2*4 = 32, k 4*1*4 = 16, cos = sin = 4*4 = 16 elements.
    # forward reads q, k, cos, sin and writes q', k'; the backward moves the same amounts.
    one_pass = (32 + 16 + 16 + 16) + (32 + 16)
    assert tool.min_bytes("rope", d, 4) == 2 * one_pass * 4
    # Cross entropy, bf16 logits [4, 10] = 80 bytes; int64 targets 32 bytes; fp32 loss, lse, dloss 16 each.
    forward = 80 + 32 + 16 + 16  # logits, targets in; loss, lse out
    backward = 16 + 80 + 32 + 16 + 80  # dloss, logits, targets, lse in; dlogits out
    assert tool.min_bytes("cross_entropy", d, 2) == forward + backward == 368
    # RMSNorm fp32 on [4, 8], weight 8, rstd 4: fwd x, w -> y, rstd; bwd dy, x, w, rstd -> dx, dw.
    assert tool.min_bytes("rmsnorm", d, 4) == 4 * ((32 + 8 + 32 + 4) + (32 + 32 + 8 + 4 + 32 + 8))
    # Attention bf16: q, o, do, dq 32 elements each; k, v, dk, dv 16 each; fp32 lse 4 * 2 heads.
    # fwd reads q, k, v and writes o, lse; bwd reads q, k, v, o, do, lse and writes dq, dk, dv.
    lse = 4 * 2 * 4
    forward = 2 * (32 + 16 + 16 + 32) + lse
    backward = 2 * (32 + 16 + 16 + 32 + 32 + 32 + 16 + 16) + lse
    assert tool.min_bytes("attention", d, 2) == forward + backward
    with pytest.raises(ValueError, match="unknown op 'gelu'"):
        tool.min_bytes("gelu", d, 2)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "llama9-1t", "--out", "x"], "unknown preset 'llama9-1t'"),
    (["--preset", "tiny", "--seq", "0", "--out", "x"], "--seq: must be at least 1, got 0"),
    (["--preset", "tiny", "--batch", "two", "--out", "x"], "--batch: expected an integer, got 'two'"),
])
def test_bad_flags_are_named(argv, message, capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(argv)
    assert message in capsys.readouterr().err


def test_noisy_depth_falls_back_to_the_measured_step(tmp_path, monkeypatch, capsys):
    """A 1-layer step timed slower than the 2-layer one (noise) gives a warning, no estimate, and
    shares at the measured 2 layers, through the whole run."""
    tool = _load_tool()
    measured = tool.bench_step

    def noisy_bench_step(run, config, kernels_on):
        result = measured(run, config, kernels_on)
        if config.num_hidden_layers == 1:
            result.ms *= 100.0
        return result

    monkeypatch.setattr(tool, "bench_step", noisy_bench_step)
    monkeypatch.setattr(tool.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "noisy"
    assert tool.main(["--preset", "tiny", "--out", str(out), "--steps", "1", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: per-layer time -" in printed and "no full-depth estimate" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    depth = [r for r in rows if r["section"] == "depth"]
    assert [(r["name"], r["ms"], r["layers"]) for r in depth] == [("full-depth step", "", "")]
    step = next(r for r in rows if r["section"] == "step" and r["layers"] == "2")
    for r in (r for r in rows if r["section"] == "op"):
        assert (r["layers"], int(r["calls_per_step"])) == ("2", OPS[r["name"]])
        assert float(r["step_share"]) == pytest.approx(float(r["ms_per_step"]) / float(step["ms"]), rel=1e-3)
    table = (out / "table.txt").read_text()
    assert "(est.)" not in table and "of L2 step (no estimate)" in table
