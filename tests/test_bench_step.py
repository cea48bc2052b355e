"""tools/bench_step.py: the CPU smoke run writes the expected rows, and its byte counts are right."""
import csv
import importlib
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_step.py")
OPS = {"rope": 2, "swiglu": 2, "cross_entropy": 1, "rmsnorm": 5, "attention": 2}  # calls per step, tiny


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
    assert [r["impl"] for r in steps] == ["kernels off"]
    step = steps[0]
    _positive(step, "ms", "tokens_per_s", "tflops", "loss")
    assert float(step["tokens_per_s"]) == pytest.approx(2 * 32 / (float(step["ms"]) * 1e-3), rel=1e-4)
    # Small random weights give near-uniform predictions: the loss is close to log(vocab).
    assert float(step["loss"]) == pytest.approx(math.log(256), abs=0.05)

    tool = _load_tool()
    dims = tool.StepDims(batch=2, seq=32, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                         vocab=256, layers=2)
    ops = [r for r in rows if r["section"] == "op"]
    assert sorted((r["name"], r["impl"]) for r in ops) == sorted((op, "eager") for op in OPS)
    for r in ops:
        _positive(r, "ms", "ms_per_step", "step_share", "bytes_per_call", "gbps", "floor_ms_per_step")
        assert int(r["calls_per_step"]) == OPS[r["name"]]
        assert float(r["ms_per_step"]) == pytest.approx(float(r["ms"]) * OPS[r["name"]], rel=1e-4)
        assert float(r["step_share"]) == pytest.approx(float(r["ms_per_step"]) / float(step["ms"]), rel=1e-4)
        assert int(r["bytes_per_call"]) == tool.min_bytes(r["name"], dims, 4)
        assert 0 <= float(r["max_saving_share"]) <= float(r["step_share"])

    table = (out / "table.txt").read_text()
    for text in ("command: python tools/bench_step.py --preset tiny", "date: ", "device: CPU", "torch ",
                 "triton ", "ceilings: copy", "vocab_parallel_cross_entropy", "model FLOPs = 6 * P"):
        assert text in table, text


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
