"""tools/bench_kernels.py runs end to end where there is no GPU (interpreter, tiniest sweep)."""
import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bench_kernels.py")


def _load_tool():
    name = "bench_kernels_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def _attention_kernel_importable() -> bool:
    try:
        importlib.import_module("kernels.attention")
        return True
    except Exception:
        return False


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU mode")
def test_cpu_run_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, TOOL, "--out", str(out), "--rmsnorm-shapes", "12x48", "--attention-shapes",
           "1,2,1,20,16", "--warmup", "0", "--reps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "CPU (Triton interpreter)" in text and "no CUDA device" in text
    assert "apex and liger-kernel need CUDA" in text

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["kernel"], r["impl"], r["pass"]): r for r in rows}
    copy_gbps = float(by[("ceiling", "device copy", "")]["gbps"])
    matmul_tflops = float(by[("ceiling", "matmul", "")]["tflops"])
    assert copy_gbps > 0 and matmul_tflops > 0
    assert by[("ceiling", "device copy", "")]["note"] == "CPU (Triton interpreter)"

    expected = [("rmsnorm", impl, p) for impl in ("triton", "torch eager") for p in ("fwd", "bwd")]
    expected += [("attention", "torch SDPA", p) for p in ("fwd", "bwd")]
    if _attention_kernel_importable():
        expected += [("attention", "triton", p) for p in ("fwd", "bwd")]
    else:
        assert "kernels.attention unavailable" in text
    for key in expected:
        assert key in by, f"missing row {key}; rows: {sorted(by)}"
        row = by[key]
        ms = float(row["ms"])
        assert ms > 0 and float(row["rel_err"]) < 1e-4, row  # fp32: the kernels agree with the reference
        if key[0] == "rmsnorm":
            assert row["shape"] == "12x48"
            # GB/s is the byte floor over the time: fwd reads x, writes y, reads the weight.
            n_bytes = (2 * 12 * 48 + 48) * 4 if key[2] == "fwd" else (3 * 12 * 48 + 2 * 48) * 4
            assert float(row["gbps"]) == pytest.approx(n_bytes / (ms * 1e-3) / 1e9, rel=1e-3)
            assert float(row["ceiling_share"]) == pytest.approx(float(row["gbps"]) / copy_gbps, rel=1e-3)
        else:
            assert row["shape"] == "b1 h2 kv1 s20 d16" and row["causal"] == "True"
            flops = 4 * 1 * 2 * 20 * 20 * 16 / 2 * (1 if key[2] == "fwd" else 2.5)
            assert float(row["tflops"]) == pytest.approx(flops / (ms * 1e-3) / 1e12, rel=1e-3)
            assert float(row["ceiling_share"]) == pytest.approx(float(row["tflops"]) / matmul_tflops, rel=1e-3)
    assert by[("rmsnorm", "torch eager", "fwd")]["vs_baseline"] == "1"

    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = (out / "table.txt").read_text()
    assert "CPU (Triton interpreter)" in table and "command: python tools/bench_kernels.py --out" in table
    for line in ("rmsnorm    triton", "attention  torch SDPA"):
        assert line in table and line in text
    assert not any(name.endswith(".tmp") or ".tmp." in name for name in os.listdir(out))


def test_missing_attention_kernel_is_skipped_with_a_message(monkeypatch):
    tool = _load_tool()
    monkeypatch.setitem(sys.modules, "kernels.attention", None)  # import now raises ImportError
    bench = tool.Bench(torch.device("cpu"), warmup=0, reps=1)
    impls = tool.attention_impls(bench)
    assert "triton" not in impls and "torch SDPA" in impls
    assert any("kernels.attention unavailable" in m and "skipped" in m for m in bench.messages)


def test_shape_arguments_are_validated():
    tool = _load_tool()
    assert tool._parse_shapes("8192x4096 16x48", 2, "x") == [(8192, 4096), (16, 48)]
    assert tool._parse_shapes("2,32,8,8192,128", 5, ",") == [(2, 32, 8, 8192, 128)]
    with pytest.raises(Exception, match="bad shape '8192x'"):
        tool._parse_shapes("8192x", 2, "x")
    with pytest.raises(Exception, match="5 positive integers"):
        tool._parse_shapes("2,32,8,0,128", 5, ",")
