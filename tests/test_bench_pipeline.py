"""benchmarks/bench_pipeline.py: a tiny run (p = 2, m = 2 and 4, both schedules) writes pipeline.json,
tables.md and the plot, with idle shares in range, in-flight counts equal to the schedule's promise
(hand-computed) and saved-for-backward peaks equal to the in-flight forwards; its replay against the
bubble formulas, its saved-bytes counter against hand-counted bytes, and its argument checks."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_pipeline.py")
H, LAYERS, HEADS, INTER, VOCAB, SEQ = 32, 4, 2, 64, 64, 16
ACTIVATION_BYTES = 1 * SEQ * H * 4  # one sent output: [micro batch 1, seq, hidden], fp32


def _load():
    if os.path.dirname(SCRIPT) not in sys.path:
        sys.path.insert(0, os.path.dirname(SCRIPT))
    import bench_pipeline
    return bench_pipeline


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_pipeline")
    argv = ["--out", str(out), "--hidden", str(H), "--layers", str(LAYERS), "--heads", str(HEADS),
            "--intermediate", str(INTER), "--vocab", str(VOCAB), "--seq", str(SEQ), "--pp-sizes", "2",
            "--microbatches", "2,4", "--memory-microbatches", "4", "--warmup", "1", "--repeats", "2",
            "--exchange-repeats", "3", "--worker-timeout", "120"]
    _load().main(argv)
    with open(out / "pipeline.json") as f:
        results = json.load(f)
    return results, (out / "tables.md").read_text(), out


# Hand-computed for p = 2: 1F1B holds p - rank; interleaved v = 2 holds every forward when m == p, else
# its warm-up 2 (p - rank - 1) + (v - 1) p forwards plus one.
PROMISE = {("1F1B", 2): [2, 1], ("1F1B", 4): [2, 1], ("interleaved v=2", 2): [4, 4], ("interleaved v=2", 4): [5, 3]}
THEORY = {("1F1B", 2): 1 / 3, ("1F1B", 4): 1 / 5, ("interleaved v=2", 2): 1 / 5, ("interleaved v=2", 4): 1 / 9}


def test_run_writes_json_tables_and_plot(run):
    results, tables, out = run
    assert results["machine"]["cores"] >= 1 and len(results["machine"]["commit"]) == 40
    assert "--out" in results["command"] and results["model"]["hidden"] == H
    assert (out / "pipeline_bubble.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("### Cost of one exchange", "### Pipeline bubble", "### Activation memory"):
        assert heading in tables
    again = out / "again"  # tables and plot redrawn from the JSON alone
    _load().main(["--out", str(again), "--from-json", str(out / "pipeline.json")])
    assert (again / "tables.md").read_text() == tables and (again / "pipeline_bubble.png").exists()
    exchange = results["exchange"]["2"]
    assert exchange["bytes"] == ACTIVATION_BYTES and exchange["round_trips"] == 3
    assert 0 < exchange["exchange_ms_min"] <= exchange["exchange_ms"] <= exchange["exchange_ms_max"]


def test_bubble_rows_are_in_range_and_follow_the_tables(run):
    rows = run[0]["bubble"]
    assert sorted((r["schedule"], r["microbatches"]) for r in rows) == sorted(THEORY)
    for r in rows:
        key = (r["schedule"], r["microbatches"])
        assert r["theory"] == pytest.approx(THEORY[key]) and r["steps"] == 2
        assert r["trace_matches_table"]
        assert r["max_in_flight"] == r["in_flight_promise"] == PROMISE[key]
        for idle in r["measured_idle"] + r["replay_idle"] + r["schedule_idle"] + r["stage_mean_idle"] + \
                r["dataflow_idle"]:
            assert 0 <= idle < 1
        assert all(0 < busy <= r["span_ms"] for busy in r["busy_wall_ms"])
        assert all(b > 0 for b in r["busy_cpu_ms"]) and r["backward_over_forward"] > 0
        assert all(f > 0 and b > 0 for f, b in zip(r["forward_ms"], r["backward_ms"]))
        if r["schedule"] == "1F1B":  # uniform costs: the 1F1B tables give the formula exactly
            assert r["schedule_idle_mean"] == pytest.approx(r["theory"])


def test_memory_peaks_are_the_in_flight_forwards(run):
    rows = run[0]["memory"]
    assert sorted((r["schedule"], r["free_storage"]) for r in rows) == sorted(
        (s, f) for s in ("1F1B", "interleaved v=2") for f in (True, False))
    for row in rows:
        for x in row["ranks"]:
            assert x["max_in_flight"] == x["in_flight_promise"] == PROMISE[(row["schedule"], 4)][x["rank"]]
            assert x["peak_over_in_flight_forwards"] == pytest.approx(1.0, abs=1e-12)
            assert x["left_saved_bytes"] == 0  # every saved tensor is released by the step's backwards
            held = x["peak_sent_held_mib"] * 2**20
            if row["free_storage"]:
                assert held < ACTIVATION_BYTES  # freed outputs keep a one-element storage
            elif x["rank"] == 0 or row["schedule"] != "1F1B":  # ranks that send activations
                assert held % ACTIVATION_BYTES == 0 and 1 <= held // ACTIVATION_BYTES <= x["max_in_flight"]
        if row["schedule"] == "1F1B":  # every forward of a rank saves the same: peak = promise x one forward
            assert [x["peak_in_units"] for x in row["ranks"]] == pytest.approx([2.0, 1.0])


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("m", [4, 8])
def test_replay_of_uniform_costs_gives_the_bubble_formulas(pp, m):
    bp = _load()
    for v, backward in ((1, 2.0), (1, 1.0), (2, 1.0)):
        plan = bp.schedule_plan(pp, m, v)
        replay = bp.replay_step(plan, bp.uniform_busy(plan, 1.0 / v, backward / v), 0.0)
        idle = (pp - 1) / (v * m + pp - 1)
        assert replay["idle"] == pytest.approx([idle] * pp)
        assert replay["span_s"] == pytest.approx((v * m + pp - 1) * (1 + backward) / v)


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 16), (4, 8)])
def test_tables_without_waiting_sends_give_the_bubble_formulas(pp, m):
    """Executed as a dataflow (sends never wait), the engine's tables reach the formulas for any tB / tF."""
    bp = _load()
    for v in (1, 2):
        idle = bp.dataflow_idle(bp.schedule_orders(pp, m, v), v, 1.0 / v, 2.0 / v)
        assert idle == pytest.approx([(pp - 1) / (v * m + pp - 1)] * pp)


def test_replay_adds_the_exchange_cost_and_checks_its_input():
    bp = _load()
    plan = bp.schedule_plan(2, 2, 1)  # rank 0: F0 F1 . B0 . B1, exchanges after F0, F1, B0's grad, B1's grad
    busy = bp.uniform_busy(plan, 1.0, 2.0)
    # Rank 1 (one core each, exchanges free): F0 after 1, then F0 B0 F1 B1 back to back = 1 + 6; rank 0
    # ends with B1 after rank 1's B1: 7 + 2 = 9 = (m + p - 1)(tF + tB).
    assert bp.replay_step(plan, busy, 0.0)["span_s"] == pytest.approx(9.0)
    assert bp.replay_step(plan, busy, 0.5)["span_s"] > 9.0
    with pytest.raises(ValueError, match="busy times for"):
        bp.replay_step(plan, [busy[0][:-1], busy[1]], 0.0)


def test_in_flight_promise_against_walking_the_tables():
    bp = _load()
    from engine.train.schedules import interleaved_order, one_f_one_b_order
    for pp, m, v in ((2, 4, 1), (4, 8, 1), (4, 4, 1), (2, 4, 2), (4, 8, 2), (4, 4, 2), (2, 16, 2)):
        for rank in range(pp):
            order = one_f_one_b_order(pp, rank, m) if v == 1 else interleaved_order(pp, rank, m, v)
            live = peak = 0
            for a in order:
                live += 1 if a.kind == "F" else -1
                peak = max(peak, live)
            assert bp.in_flight_promise(pp, rank, m, v) == peak
    assert [bp.in_flight_promise(4, r, 8) for r in range(4)] == [4, 3, 2, 1]


def test_saved_tensor_bytes_against_hand_counts():
    bp = _load()
    w = torch.nn.Parameter(torch.randn(8, 4))
    tracker = bp.SavedTensorBytes([w])
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        h = x * x            # saves x twice: one storage, 3 * 8 * 4 bytes
        y = (h @ w).sum()    # saves h (3 * 8 * 4) and w (a parameter: not counted)
    assert tracker.current == tracker.peak == 2 * 3 * 8 * 4
    y.backward()
    assert tracker.current == 0 and tracker.peak == 2 * 3 * 8 * 4
    assert torch.allclose(x.grad, 2 * x.detach() * w.detach().sum(1))


def test_trace_peak_against_hand_sum():
    bp = _load()
    from engine.train.schedules import Action
    trace = [Action("F", 0, 0), Action("F", 1, 0), Action("B", 0, 0), Action("F", 2, 0), Action("B", 1, 0),
             Action("B", 2, 0)]
    assert bp.trace_peak(trace, [10, 20, 40]) == 60  # F2 (40) lives with F1 (20) after B0 freed F0


@pytest.mark.parametrize("argv, message", [
    (["--pp-sizes", "1"], "at least 2 stages"),
    (["--pp-sizes", "4", "--layers", "4"], "divisible by pp 4 x virtual stages 2"),
    (["--microbatches", "3"], "do not suit pp 2"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--virtual-stages", "1"], "at least 2"),
    (["--microbatches", "4,x"], "comma-separated positive integers"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    bp = _load()
    with pytest.raises(SystemExit):
        bp.parse_args(["--out", "x", "--pp-sizes", "2", *argv] if "--pp-sizes" not in argv else ["--out", "x", *argv])
    assert message in capsys.readouterr().err
