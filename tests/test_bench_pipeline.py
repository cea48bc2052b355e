"""benchmarks/bench_pipeline.py and pipeline_replay.py: a tiny run (p = 2, m = 2 and 4, both schedules)
writes pipeline.json, tables.md and the plot, with idle shares in range, the stamped posts and waits
exactly those the engine's plan calls for, in-flight counts equal to the schedule's promise
(hand-computed), saved-for-backward peaks equal to the in-flight forwards, and sent outputs held
with freeing on equal to the count a plain-Python walk of the plan gives (fewer than with freeing off
under interleaving); the two replays (the engine's waits at the point of use, and lockstep) against
the bubble formulas and a hand-timed step, the saved-bytes counter against hand-counted bytes, and
the argument checks."""
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


def _replay():
    _load()
    import pipeline_replay
    return pipeline_replay


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_pipeline")
    baseline = out / "baseline.json"  # an earlier run's idle shares, to be shown beside this run's
    baseline.write_text(json.dumps({"machine": {"commit": "f" * 40, "date": "2026-01-01 00:00 UTC"}, "bubble": [
        {"pp": 2, "schedule": "1F1B", "microbatches": 4, "measured_idle_mean": 0.25, "replay_idle_mean": 0.125,
         "span_ms": 100.0, "replay_span_ms": 90.0}]}))
    argv = ["--out", str(out), "--baseline", str(baseline), "--hidden", str(H), "--layers", str(LAYERS), "--heads", str(HEADS),
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
    for heading in ("### Cost of one exchange", "### Pipeline bubble", "### Activation memory",
                    "### Against the baseline run (commit fffffff"):
        assert heading in tables
    assert "| 2 | 1F1B | 4 | 20.0% | 25.0% | 12.5% |" in tables  # the baseline's row, beside this run's
    assert results["baseline"]["rows"][0]["measured_idle_mean"] == 0.25
    again = out / "again"  # tables and plot redrawn from the JSON alone
    _load().main(["--out", str(again), "--from-json", str(out / "pipeline.json")])
    assert (again / "tables.md").read_text() == tables and (again / "pipeline_bubble.png").exists()
    exchange = results["exchange"]["2"]
    assert exchange["bytes"] == ACTIVATION_BYTES and exchange["round_trips"] == 3
    assert 0 < exchange["exchange_ms_min"] <= exchange["exchange_ms"] <= exchange["exchange_ms_max"]


def test_bubble_rows_are_in_range_and_follow_the_tables(run):
    rp, rows = _replay(), run[0]["bubble"]
    assert sorted((r["schedule"], r["microbatches"]) for r in rows) == sorted(THEORY)
    for r in rows:
        key = (r["schedule"], r["microbatches"])
        assert r["theory"] == pytest.approx(THEORY[key]) and r["steps"] == 2
        assert r["trace_matches_table"]
        assert r["max_in_flight"] == r["in_flight_promise"] == PROMISE[key]
        for idle in r["measured_idle"] + r["replay_idle"] + r["schedule_idle"] + r["stage_mean_idle"] + \
                r["dataflow_idle"] + r["posted_idle"] + r["lockstep_replay_idle"]:
            assert 0 <= idle < 1
        # Uniform costs and waits at the point of use: the engine's plan runs as the dataflow, the formula.
        assert r["posted_idle"] == pytest.approx(r["dataflow_idle"])
        assert r["posted_idle"] == pytest.approx([r["theory"]] * 2)
        assert all(0 < busy <= r["span_ms"] for busy in r["busy_wall_ms"])
        assert all(0 <= wait < r["span_ms"] for wait in r["wait_wall_ms"])
        # The schedule's compute time leaves out posts and polls, which the benchmark counts as busy.
        assert all(0 < c <= b for c, b in zip(r["schedule_compute_ms"], r["busy_wall_ms"]))
        # One post per tick with traffic, one wait per action that reads a received tensor, and one wait
        # per post with sends (hand-counted reads: F of a non-first and B of a non-last stage); a gloo
        # send completes only when waited for, so every send is waited for once.
        v, m, pp = r["virtual_stages"], r["microbatches"], 2
        plan = rp.schedule_plan(pp, m, v)
        for rank, counts in enumerate(r["event_counts"]):
            reads = 2 * m * v - m * (rank == 0) - m * (rank == pp - 1)  # stage 0's F, the last stage's B: none
            assert counts["post"] == len(rp.traffic_ticks(plan)[rank]) and counts["recv"] == reads
            assert counts["sent"] == sum(1 for t in plan[rank] if t.send)
        # The stamped order of posts and waits, sends waited for mid-step included, is the modelled one.
        expected, _ = rp.engine_events(plan, 1.0, 1.0)
        for rank in range(pp):
            record = next(x for x in run[0]["raw"]["2"][rank]["bubble"]
                          if (x["virtual_stages"], x["microbatches"]) == (v, m))
            assert all([tuple(e) for e in step["events"]] == expected[rank] for step in record["steps"])
        assert all(b > 0 for b in r["busy_cpu_ms"]) and r["backward_over_forward"] > 0
        assert all(f > 0 and b > 0 for f, b in zip(r["forward_ms"], r["backward_ms"]))
        if r["schedule"] == "1F1B":  # uniform costs: the 1F1B tables give the formula exactly
            assert r["schedule_idle_mean"] == pytest.approx(r["theory"])


def held_by_walking_the_plan(ticks, rank: int, pp: int) -> tuple[int, int]:
    """Peak count of sent activations still holding storage, sampled at every forward (after its
    inputs arrived) and every post (before its own send): (freed as the engine does, kept until the
    backward). An output sent to the next rank at tick i is freed at the first tick reading a tensor
    that rank posted at a tick >= i; kept, it lives at least until then and until its backward."""
    from engine.train.schedules import Action
    at = {t.action: i for i, t in enumerate(ticks) if t.action is not None}
    reads = [(at[t.recv_prev], i, (rank - 1) % pp) for i, t in enumerate(ticks) if t.recv_prev] + \
            [(at[t.recv_next], i, (rank + 1) % pp) for i, t in enumerate(ticks) if t.recv_next]
    freed, backward = {}, {}
    for i, t in enumerate(ticks):
        if t.send == "next":
            freed[i] = min([read for read, posted, peer in reads if peer == (rank + 1) % pp and posted >= i],
                           default=len(ticks))
            backward[i] = at[Action("B", t.action.microbatch, t.action.chunk)]
    samples = [s for s, t in enumerate(ticks) if (t.action is not None and t.action.kind == "F")
               or t.send or t.recv_prev or t.recv_next]
    on = max([sum(i < s < freed[i] for i in freed) for s in samples], default=0)
    off = max([sum(i < s < max(freed[i], backward[i]) for i in freed) for s in samples], default=0)
    return on, off


# Sent outputs held at peak at p = 2, m = 4 (freed, kept), walked by hand through the plan: 1F1B rank 0
# sends F0 and F1 before B0's gradient comes back, so both are held either way; interleaved, every
# tensor from rank 1 (activations of chunk 1 too) lets rank 0 free its sends, while kept ones wait
# for their backwards (4 of rank 0's 5 in-flight forwards were sent before the 5th's post).
HELD = {"1F1B": ([2, 0], [2, 0]), "interleaved v=2": ([1, 1], [4, 2])}


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 8), (4, 8), (4, 4)])
def test_sent_outputs_held_against_walking_the_plan(pp, m):
    rp = _replay()
    for v in (1, 2):
        plan = rp.schedule_plan(pp, m, v)
        walked = [held_by_walking_the_plan(ticks, r, pp) for r, ticks in enumerate(plan)]
        assert rp.sent_outputs_held(plan) == [on for on, _ in walked]
        assert rp.sent_outputs_held(plan, free=False) == [off for _, off in walked]
        if (pp, m) == (2, 4):
            assert tuple(map(list, zip(*walked))) == HELD[rp.schedule_name(v)]


def test_memory_peaks_are_the_in_flight_forwards(run):
    rp, rows = _replay(), run[0]["memory"]
    assert sorted((r["schedule"], r["free_storage"]) for r in rows) == sorted(
        (s, f) for s in ("1F1B", "interleaved v=2") for f in (True, False))
    held = {(r["schedule"], r["free_storage"]): [x["peak_sent_held_mib"] * 2**20 for x in r["ranks"]] for r in rows}
    for row in rows:
        plan = rp.schedule_plan(2, 4, row["virtual_stages"])
        walked = [held_by_walking_the_plan(ticks, r, 2) for r, ticks in enumerate(plan)]
        for x in row["ranks"]:
            assert x["max_in_flight"] == x["in_flight_promise"] == PROMISE[(row["schedule"], 4)][x["rank"]]
            assert x["peak_over_in_flight_forwards"] == pytest.approx(1.0, abs=1e-12)
            assert x["left_saved_bytes"] == 0  # every saved tensor is released by the step's backwards
            # Hand-counted sends of activations at p = 2, m = 4: 1F1B rank 0 all m forwards, the last rank
            # none; interleaved v = 2 rank 0 both chunks' (2 m), rank 1 its first chunk's (m).
            sends = {"1F1B": [4, 0], "interleaved v=2": [8, 4]}[row["schedule"]][x["rank"]]
            assert x["sent_outputs"] == sends and x["sent_bytes"] == ACTIVATION_BYTES * (sends > 0)
            on, off = walked[x["rank"]]
            # Whole outputs (a freed output still alive keeps a 4-byte storage: below one output's bytes).
            count = held[(row["schedule"], row["free_storage"])][x["rank"]] // ACTIVATION_BYTES
            assert x["peak_sent_held_outputs"] == count
            if row["free_storage"]:  # exactly what the plan promises (gloo: a send completes when waited for)
                assert count == on == x["sent_held_plan"]
            else:  # kept until the backward; the engine's locals may hold a popped output a moment longer
                assert x["sent_held_plan"] == off and off <= count <= off + 1
        if row["free_storage"]:
            kept = [h // ACTIVATION_BYTES for h in held[(row["schedule"], False)]]
            for (on, off), count, kept_count in zip(walked, (x["peak_sent_held_outputs"] for x in row["ranks"]), kept):
                assert count <= kept_count and (count < kept_count or on == off)
        if row["schedule"] == "1F1B":  # every forward of a rank saves the same: peak = promise x one forward
            assert [x["peak_in_units"] for x in row["ranks"]] == pytest.approx([2.0, 1.0])
    # Freeing sent outputs lowers what interleaving holds on both ranks (HELD: 1 against 4 and 2).
    kept = [h // ACTIVATION_BYTES for h in held[("interleaved v=2", False)]]
    freed = [h // ACTIVATION_BYTES for h in held[("interleaved v=2", True)]]
    assert freed == [1, 1] and all(f < k for f, k in zip(freed, kept))


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("m", [4, 8])
def test_lockstep_replay_of_uniform_costs_gives_the_bubble_formulas(pp, m):
    """In lockstep the tables reach the formulas at tB = tF (and 1F1B at any tB / tF)."""
    rp = _replay()
    for v, backward in ((1, 2.0), (1, 1.0), (2, 1.0)):
        plan = rp.schedule_plan(pp, m, v)
        replay = rp.replay_step(plan, rp.uniform_busy(plan, 1.0 / v, backward / v), 0.0)
        idle = (pp - 1) / (v * m + pp - 1)
        assert replay["idle"] == pytest.approx([idle] * pp)
        assert replay["span_s"] == pytest.approx((v * m + pp - 1) * (1 + backward) / v)


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 16), (4, 4), (4, 8)])
def test_posted_replay_of_uniform_costs_gives_the_bubble_formulas(pp, m):
    """With waits at the point of use the engine's plan reaches the formulas at any tB / tF, interleaved
    included, where lockstep exchanges stay above them (tB = 2 tF)."""
    rp = _replay()
    for v in (1, 2):
        for backward in (1.0, 2.0, 1.85):
            plan = rp.schedule_plan(pp, m, v)
            replay = rp.replay_posted(plan, *rp.engine_events(plan, 1.0 / v, backward / v), 0.0)
            idle = (pp - 1) / (v * m + pp - 1)
            assert replay["idle"] == pytest.approx([idle] * pp)
            assert replay["span_s"] == pytest.approx((v * m + pp - 1) * (1 + backward) / v)
    plan = rp.schedule_plan(pp, m, 2)
    lockstep = rp.replay_step(plan, rp.uniform_busy(plan, 0.5, 1.0), 0.0)
    if m > pp:  # with m == pp there is no steady state to hold in lockstep
        assert min(lockstep["idle"]) > (pp - 1) / (2 * m + pp - 1) + 0.05


@pytest.mark.parametrize("pp, m", [(2, 4), (2, 16), (4, 8)])
def test_tables_without_waiting_sends_give_the_bubble_formulas(pp, m):
    """Executed as a dataflow (sends never wait), the engine's tables reach the formulas for any tB / tF."""
    rp = _replay()
    for v in (1, 2):
        idle = rp.dataflow_idle(rp.schedule_orders(pp, m, v), v, 1.0 / v, 2.0 / v)
        assert idle == pytest.approx([(pp - 1) / (v * m + pp - 1)] * pp)


def test_engine_events_against_the_hand_written_step():
    rp = _replay()
    plan = rp.schedule_plan(2, 2, 1)  # rank 0: F0 F1 . B0 . B1; rank 1: . F0 B0 F1 B1
    events, busy = rp.engine_events(plan, 1.0, 2.0)
    # Rank 0 reads B0's gradient, which rank 1 posted at tick 2: its sends of ticks 0 and 1 to rank 1
    # are waited for (and freed) right there; rank 1's gradient sends have no later traffic from rank 0.
    assert events[0] == [("post", 0), ("post", 1), ("post", 2), ("recv", 2), ("sent", 0), ("sent", 1),
                         ("post", 3), ("recv", 3)]
    assert busy[0] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 2.0]
    assert events[1] == [("post", 0), ("recv", 0), ("post", 1), ("post", 2), ("recv", 1), ("post", 3),
                         ("sent", 2), ("sent", 3)]
    assert busy[1] == [0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert [rp.lockstep_busy(e, b) for e, b in zip(events, busy)] == rp.uniform_busy(plan, 1.0, 2.0)


def test_replays_add_the_exchange_cost_and_check_their_input():
    rp = _replay()
    plan = rp.schedule_plan(2, 2, 1)
    busy = rp.uniform_busy(plan, 1.0, 2.0)
    # Rank 1 (one core each, exchanges free): F0 after 1, then F0 B0 F1 B1 back to back = 1 + 6; rank 0
    # ends with B1 after rank 1's B1: 7 + 2 = 9 = (m + p - 1)(tF + tB).
    assert rp.replay_step(plan, busy, 0.0)["span_s"] == pytest.approx(9.0)
    with pytest.raises(ValueError, match="busy times for"):
        rp.replay_step(plan, [busy[0][:-1], busy[1]], 0.0)
    events, posted_busy = rp.engine_events(plan, 1.0, 2.0)
    # Exchanges of 0.5, by hand. Lockstep: each exchange ends 0.5 after both ends posted it: F0's at 1.5,
    # F1's at 3.0 (rank 1 posts after its F0, 1.5-2.5), B0's at 5.5 (rank 1's B0 to 5.0), B1's at 9.0
    # (rank 1's F1, B1 to 8.5, while rank 0's B0 ran 5.5-7.5); rank 0's B1 ends at 11. Waits at use:
    # rank 1 waits only for F0's input (1.5), runs F0 B0 F1 B1 to 7.5 (F1's input arrived at 3.0);
    # rank 0's B0 waits for its gradient (posted 4.5, arrived 5.0), ends at 7.0; B1's arrives at 8.0: 10.
    assert rp.replay_step(plan, busy, 0.5)["span_s"] == pytest.approx(11.0)
    assert rp.replay_posted(plan, events, posted_busy, 0.5)["span_s"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="busy times for"):
        rp.replay_posted(plan, events, [posted_busy[0][:-1], posted_busy[1]], 0.0)
    with pytest.raises(ValueError, match="not its 4 exchanges in order"):
        rp.replay_posted(plan, [events[0][1:], events[1]], [posted_busy[0][1:], posted_busy[1]], 0.0)
    with pytest.raises(ValueError, match="waits on post 2 before making it"):
        swapped = events[0][:2] + [("recv", 2), ("post", 2)] + events[0][4:]
        rp.replay_posted(plan, [swapped, events[1]], posted_busy, 0.0)
    with pytest.raises(ValueError, match="has no such traffic"):  # post 0 of rank 0 receives nothing
        rp.replay_posted(plan, [events[0][:1] + [("recv", 0)] + events[0][1:], events[1]],
                         [[0.0] + posted_busy[0], posted_busy[1]], 0.0)


def test_in_flight_promise_against_walking_the_tables():
    rp = _replay()
    from engine.train.schedules import interleaved_order, one_f_one_b_order
    for pp, m, v in ((2, 4, 1), (4, 8, 1), (4, 4, 1), (2, 4, 2), (4, 8, 2), (4, 4, 2), (2, 16, 2)):
        for rank in range(pp):
            order = one_f_one_b_order(pp, rank, m) if v == 1 else interleaved_order(pp, rank, m, v)
            live = peak = 0
            for a in order:
                live += 1 if a.kind == "F" else -1
                peak = max(peak, live)
            assert rp.in_flight_promise(pp, rank, m, v) == peak
    assert [rp.in_flight_promise(4, r, 8) for r in range(4)] == [4, 3, 2, 1]


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
    rp = _replay()
    from engine.train.schedules import Action
    trace = [Action("F", 0, 0), Action("F", 1, 0), Action("B", 0, 0), Action("F", 2, 0), Action("B", 1, 0),
             Action("B", 2, 0)]
    assert rp.trace_peak(trace, [10, 20, 40]) == 60  # F2 (40) lives with F1 (20) after B0 freed F0


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
