"""benchmarks/bench_train.py: a tiny run of every section writes results.json and tables.md whose
numbers are consistent with hand-computed sizes (parameter counts, optimizer bytes per rank, ZeRO's
1/DP split) and with each other (the engine and transformers train the same weights to the same
losses); its helpers and argument checks against hand-computed values."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")
H, LAYERS, HEADS, INTER, VOCAB, SEQ, BATCH, REPEATS = 32, 1, 2, 64, 64, 16, 4, 2
PADDED_VOCAB = 128  # the engine pads the vocabulary to a multiple of 128
LAYOUT_SIZES = [[1, 8, 16], [2, 8, 16]]


def _load():
    if os.path.dirname(SCRIPT) not in sys.path:
        sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_train
    return bench_train


def _elements(vocab_rows: int) -> int:
    per_layer = 4 * H * H + 3 * H * INTER + 2 * H  # q, k, v, o; gate, up, down; two norms
    return 2 * vocab_rows * H + LAYERS * per_layer + H  # embedding, head, final norm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every section at tiny sizes, through the script's own main() (the workers are subprocesses)."""
    out = tmp_path_factory.mktemp("bench_train")
    argv = ["--out", str(out), "--hidden", str(H), "--layers", str(LAYERS), "--heads", str(HEADS),
            "--intermediate", str(INTER), "--vocab", str(VOCAB), "--seq", str(SEQ), "--batch", str(BATCH),
            "--threads", "1", "--repeats", str(REPEATS), "--warmup", "1", "--phase-repeats", "1",
            "--profile-steps", "1", "--profile-top", "4", "--dp-sizes", "2", "--zero-modes", "on", "--zero-micro", "1",
            "--overlap-micro", "1", "--overlap-bucket-size", "2000",
            "--layout-sizes", ",".join("x".join(map(str, s)) for s in LAYOUT_SIZES), "--layout-repeats", "2",
            "--worker-timeout", "120"]
    returned = _load().main(argv)
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results.keys() == returned.keys()
    return results, (out / "tables.md").read_text()


def _timing(stats, n):
    assert stats["n"] == n
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]


def test_run_records_machine_command_and_tables(run):
    results, tables = run
    m = results["machine"]
    assert m["cores"] >= 1 and m["cpu"] and len(m["commit"]) == 40 and m["date"].endswith("UTC")
    assert "--out" in results["command"] and results["model"]["hidden"] == H
    for heading in ("### Step", "### Optimizer state", "### DP=2 bucketed", "### Sequence-parallel"):
        assert heading in tables


def test_step_engine_and_transformers_train_the_same_model(run):
    step = run[0]["step"]
    assert step["parameters"] == _elements(VOCAB)  # transformers' model: the unpadded vocabulary
    assert step["tokens_per_step"] == BATCH * SEQ
    for impl in ("engine", "transformers"):
        s = step["impls"][impl]
        _timing(s, REPEATS)
        _timing(s["cpu"], REPEATS)
        assert s["tokens_per_s"] == pytest.approx(BATCH * SEQ / (s["median_ms"] / 1e3))
        assert set(s["phases_ms"]) == {"forward + loss", "backward", "grad norm + clip", "optimizer", "zero grads"}
        assert len(step["losses"][impl]) == 1 + REPEATS and step["profile"][impl]
    # Same weights, data and AdamW settings: the two loss curves agree to float32 rounding, and the
    # loss changes from step to step (the optimizer really updates both models).
    assert step["max_loss_difference"] < 1e-4
    losses = step["losses"]["engine"]
    assert losses[0] == pytest.approx(step["losses"]["transformers"][0], abs=1e-5)
    assert len(set(losses)) == len(losses)
    ratio = step["engine_over_transformers"]
    assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]


def test_zero_holds_one_dp_share_of_the_optimizer_state(run):
    rows = run[0]["zero"]
    assert [(r["dp"], r["distributed_optimizer"]) for r in rows] == [(2, True)]
    shards = rows[0]["ranks"]
    full_kind = 4 * _elements(PADDED_VOCAB)  # one fp32 copy of every (padded) parameter
    for rank in shards:
        assert rank["model_elements"] == _elements(PADDED_VOCAB)
        assert 0 < rank["rss_after_import_mib"] <= rank["rss_after_build_mib"] <= rank["peak_rss_mib"]
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        # The ranks' slices partition the parameters; each holds half, up to the bucket padding.
        assert sum(r["bytes"][kind] for r in shards) == full_kind
        assert all(abs(r["bytes"][kind] - full_kind / 2) <= 4 * 2 * r["buckets"] for r in shards)
    assert rows[0]["max_optimizer_bytes"] == max(sum(r["bytes"].values()) for r in shards)
    assert rows[0]["share_of_full"] == pytest.approx(0.5, abs=1e-3)


def test_overlap_runs_several_buckets_both_ways(run):
    ov = run[0]["overlap"]
    assert ov["buckets"] >= 2 and len(ov["bucket_elements"]) == ov["buckets"]
    assert sum(ov["bucket_elements"]) >= _elements(PADDED_VOCAB) and all(n % 2 == 0 for n in ov["bucket_elements"])
    assert ov["microbatches_per_rank"] == BATCH // 2
    _timing(ov["reduction_alone"], REPEATS)
    for mode in ("on", "off"):
        for key in ("last_backward", "finalize", "train_step"):
            _timing(ov["modes"][mode][key], REPEATS)
        assert ov["modes"][mode]["last_backward"]["median_ms"] <= ov["modes"][mode]["train_step"]["max_ms"]


def test_layout_rows_compare_both_layouts(run):
    rows = run[0]["layout"]
    assert [[r["b"], r["s"], r["h"]] for r in rows] == LAYOUT_SIZES
    for r in rows:
        assert r["gathered_mib"] == pytest.approx(r["b"] * r["s"] * r["h"] * 4 / 2**20)
        for name, stats in r["times"].items():
            _timing(stats, 2)
        for op in ("gather", "reduce-scatter"):
            assert r[f"{op} copy share"] == pytest.approx(
                r["times"][f"{op} copies"]["median_ms"] / r["times"][f"{op} [b,s,h] dim 1"]["median_ms"])


def test_median_spread_and_slowest_rank_against_hand_values():
    bt = _load()
    stats = bt.median_spread([0.004, 0.001, 0.003, 0.002])
    assert stats["median_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["max_ms"] == pytest.approx(4.0) and stats["n"] == 4
    assert stats["iqr_ms"] == pytest.approx(3.75 - 1.25)  # exclusive quartiles of 1, 2, 3, 4
    assert bt.slowest_rank([[1.0, 5.0], [2.0, 3.0]]) == [2.0, 5.0]


def test_split_microbatches_gives_each_rank_its_rows():
    torch = pytest.importorskip("torch")
    bt = _load()
    batch = {"tokens": torch.arange(8)[:, None]}
    # microbatch j of rank r takes rows (j * dp + r) * micro ...: rank-major blocks, as the loader deals them
    rank1 = bt.split_microbatches(batch, micro=2, dp=2, dp_rank=1)
    assert [mb["tokens"].flatten().tolist() for mb in rank1] == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match="not divisible by micro batch 3 x DP 2"):
        bt.split_microbatches(batch, micro=3, dp=2, dp_rank=0)


@pytest.mark.parametrize("argv, message", [
    (["--sections", "step,bogus"], "unknown \\['bogus'\\]"),
    (["--layout-sizes", "1x2"], "expected BxSxH"),
    (["--dp-sizes", "0,2"], "expected comma-separated positive integers"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--zero-modes", "yes"], "expected off, on or off,on"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    bt = _load()
    with pytest.raises(SystemExit):
        bt.parse_args(["--out", "x", *argv])
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
