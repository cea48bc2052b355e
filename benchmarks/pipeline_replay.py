"""What a pipeline step should cost and hold, from its schedule's plan, and the replays that re-time
recorded steps (used by bench_pipeline.py, which measures; this module only computes).

  theory     the bubble (p - 1) / (v m + p - 1); the forwards a rank keeps in flight; the sent outputs it
             holds (run_pipeline frees an output sent to rank q once it has read a tensor q posted at the
             send's tick or later: q has posted the matching receive by then).
  replays    a step re-timed in plain Python, one core per rank, from busy times between its events plus
             the cost of one exchange: in the engine's way (replay_posted: posts never block; a wait ends
             when its tensors arrived, the cost after both ends posted) and in lockstep (replay_step:
             every exchange waited for at once, as an engine blocking in each exchange would). Busy times
             come from a recorded step's thread CPU time, or are uniform (engine_events, uniform_busy):
             the bubble of the tables themselves. dataflow_idle runs the tables with no exchanges at all.
  summaries  the rows of bench_pipeline.py's tables from the records of its workers, and the report:
             its markdown tables and plot.
"""
from __future__ import annotations

import statistics

from engine.train.schedules import interleaved_order, one_f_one_b_order, plan_ticks


# ------------------------------------------------------------------------------ theory, replay
def theory_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a stage's step time: (p - 1) / (v m + p - 1)."""
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


def in_flight_promise(pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> int:
    """Most (microbatch, chunk) forwards the schedule keeps before their backward on ``rank``:
    p - rank under 1F1B; its warm-up forwards plus one under interleaving."""
    if virtual_stages == 1:
        return min(pp - rank, microbatches)
    total = microbatches * virtual_stages
    warmup = total if microbatches == pp else min(2 * (pp - rank - 1) + (virtual_stages - 1) * pp, total)
    return total if warmup == total else warmup + 1


def schedule_orders(pp: int, microbatches: int, virtual_stages: int) -> list[list]:
    """Every rank's table of actions, as the engine's schedule builds it."""
    if virtual_stages == 1:
        return [one_f_one_b_order(pp, r, microbatches) for r in range(pp)]
    return [interleaved_order(pp, r, microbatches, virtual_stages) for r in range(pp)]


def schedule_plan(pp: int, microbatches: int, virtual_stages: int) -> list[list]:
    """Every rank's ticks, as the engine plans them (which exchange of a rank meets which of a neighbour)."""
    return plan_ticks(schedule_orders(pp, microbatches, virtual_stages), virtual_stages)


def _peers(tick, rank: int, pp: int) -> set[int]:
    peers = set()
    if tick.send == "next" or tick.recv_next:
        peers.add((rank + 1) % pp)
    if tick.send == "prev" or tick.recv_prev:
        peers.add((rank - 1) % pp)
    return peers


def uniform_busy(plan: list[list], forward_s, backward_s) -> list[list[float]]:
    """Busy times for :func:`replay_step` when every forward takes ``forward_s`` and every backward
    ``backward_s`` (seconds, or one value per rank): the bubble of the tables themselves."""
    return [lockstep_busy(e, b) for e, b in zip(*engine_events(plan, forward_s, backward_s))]


def dataflow_idle(orders: list[list], virtual_stages: int, forward_s: float, backward_s: float) -> list[float]:
    """Idle share per rank of the same tables when each action starts as soon as its rank is free and
    its input has arrived (a send never waits for its receiver), forwards taking ``forward_s``,
    backwards ``backward_s``: what the order of actions allows, without the per-tick exchanges."""
    pp, stages = len(orders), len(orders) * virtual_stages
    done: dict[tuple[str, int, int], float] = {}
    clock, position = [0.0] * pp, [0] * pp
    while any(position[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                a = orders[r][position[r]]
                s = a.chunk * pp + r
                needs = ([("F", a.microbatch, s - 1)] if s > 0 else []) if a.kind == "F" else \
                    [("F", a.microbatch, s)] + ([("B", a.microbatch, s + 1)] if s < stages - 1 else [])
                if not all(n in done for n in needs):
                    break
                clock[r] = max([clock[r]] + [done[n] for n in needs]) + (forward_s if a.kind == "F" else backward_s)
                done[(a.kind, a.microbatch, s)] = clock[r]
                position[r] += 1
                progressed = True
        if not progressed:
            raise ValueError("the tables cannot complete: every rank waits")
    span = max(clock)
    return [1 - sum(forward_s if a.kind == "F" else backward_s for a in order) / span for order in orders]


def traffic_ticks(plan: list[list]) -> list[list[int]]:
    """Per rank, the ticks with traffic: its k-th post is the exchange of tick traffic_ticks[r][k]."""
    return [[t for t, tick in enumerate(ticks) if tick.send or tick.recv_prev or tick.recv_next] for ticks in plan]


def replay_step(plan: list[list], busy: list[list[float]], exchange_s: float) -> dict:
    """Re-time a step with one core per rank, exchanging in lockstep: each tick's exchange waits for
    all its sends and receives at once (a model of an engine that blocks in every exchange).

    ``busy[r]``: rank r's busy seconds before each of its exchanges, then after the last one
    (len = exchanges + 1). A rank posts its exchange of tick t when it is done with the busy time
    before it; the exchange ends ``exchange_s`` after the last of its two ends posted it.
    Returns the span and, per rank, the idle share 1 - busy / span.
    """
    pp, ticks = len(plan), traffic_ticks(plan)
    for r in range(pp):
        if len(busy[r]) != len(ticks[r]) + 1:
            raise ValueError(f"rank {r}: {len(busy[r])} busy times for {len(ticks[r])} exchanges (need one more)")
    clock, done = [0.0] * pp, [0] * pp
    for t in range(max(map(len, plan))):
        posted = {r: clock[r] + busy[r][done[r]] for r in range(pp) if done[r] < len(ticks[r]) and ticks[r][done[r]] == t}
        for r, at in posted.items():
            peers = _peers(plan[r][t], r, pp)
            if not peers <= posted.keys():
                raise ValueError(f"tick {t}: rank {r} exchanges with {sorted(peers)}, not all of which post")
            clock[r] = max([at] + [posted[q] for q in peers]) + exchange_s
            done[r] += 1
    finish = [clock[r] + busy[r][-1] for r in range(pp)]
    span = max(finish)
    return {"span_s": span, "idle": [1 - sum(b) / span for b in busy]}


def engine_events(plan: list[list], forward_s, backward_s) -> tuple[list[list], list[list[float]]]:
    """The events of a step as :func:`run_pipeline` executes ``plan``, every forward taking
    ``forward_s`` and every backward ``backward_s`` (seconds, or one value per rank): per rank the
    events ("post", k) after each tick with traffic; ("recv", k) before the action that reads what
    post k received, then ("sent", j) for each earlier post j still pending whose sends go to the
    same peer at a tick up to post k's (that peer has posted their receives); ("sent", j) at the end
    for the sends still pending. A send counts as pending until waited for, as on gloo. Also the busy
    seconds before each event, then after the last (the inputs of :func:`replay_posted`)."""
    pp = len(plan)
    events, busy = [], []
    for r, ticks in enumerate(plan):
        f = forward_s[r] if isinstance(forward_s, list) else forward_s
        b = backward_s[r] if isinstance(backward_s, list) else backward_s
        mine, segments, current, k = [], [], 0.0, 0
        received_by: dict = {}    # consumer action -> (post count, tick, peer) of what it reads
        pending: list[tuple] = []  # sends not yet waited for: (post count, tick, peer)
        for t, tick in enumerate(ticks):
            if tick.action is not None:
                if tick.action in received_by:
                    post, posted, peer = received_by.pop(tick.action)
                    mine.append(("recv", post))
                    segments.append(current)
                    current = 0.0
                    due = [e for e in pending if e[2] == peer and e[1] <= posted]
                    pending = [e for e in pending if e not in due]
                    mine += [("sent", e[0]) for e in due]
                    segments += [0.0] * len(due)
                current += f if tick.action.kind == "F" else b
            if tick.send or tick.recv_prev or tick.recv_next:
                mine.append(("post", k))
                segments.append(current)
                current = 0.0
                if tick.recv_prev:
                    received_by[tick.recv_prev] = (k, t, (r - 1) % pp)
                if tick.recv_next:
                    received_by[tick.recv_next] = (k, t, (r + 1) % pp)
                if tick.send:
                    pending.append((k, t, (r + 1) % pp if tick.send == "next" else (r - 1) % pp))
                k += 1
        for post, _, _ in pending:
            mine.append(("sent", post))
            segments.append(current)
            current = 0.0
        events.append(mine)
        busy.append(segments + [current])
    return events, busy


def sent_outputs_held(plan: list[list], free: bool = True) -> list[int]:
    """Per rank, the most activations it sent to the next rank whose storage is still held, at the
    moments bench_pipeline.py samples them: each forward (once the tensors it reads arrived) and each
    post (before its own send). With ``free``, as run_pipeline frees them on gloo: an output sent to
    rank q at tick t is freed when the rank reads a tensor q posted at a tick >= t (it waits for its
    sends to q there; a gloo send reports completion only once waited for). Without, an output lives
    until its backward and that wait, whichever is later (the engine's locals may keep a popped
    output a moment longer, so a measurement can exceed this by one)."""
    pp, peaks = len(plan), []
    for r, ticks in enumerate(plan):
        held: dict[int, list] = {}  # send tick -> [peer, (microbatch, chunk), waited, backward done]
        reads: dict = {}            # consumer action -> (tick posted, peer)
        peak = 0
        for t, tick in enumerate(ticks):
            a = tick.action
            if a is not None and a in reads:
                posted, peer = reads.pop(a)
                for sent_at, entry in held.items():
                    entry[2] = entry[2] or (entry[0] == peer and sent_at <= posted)
            if a is not None and a.kind == "B":
                for entry in held.values():
                    entry[3] = entry[3] or entry[1] == (a.microbatch, a.chunk)
            held = {s: e for s, e in held.items() if not (e[2] if free else e[2] and e[3])}
            traffic = tick.send or tick.recv_prev or tick.recv_next
            if traffic or (a is not None and a.kind == "F"):
                peak = max(peak, len(held))
            if tick.recv_prev:
                reads[tick.recv_prev] = (t, (r - 1) % pp)
            if tick.recv_next:
                reads[tick.recv_next] = (t, (r + 1) % pp)
            if tick.send == "next":
                held[t] = [(r + 1) % pp, (a.microbatch, a.chunk), False, False]
        peaks.append(peak)
    return peaks


def replay_posted(plan: list[list], events: list[list], busy: list[list[float]], exchange_s: float) -> dict:
    """Re-time a step with one core per rank as the engine exchanges: posts never block; a
    ("recv", k) wait ends when every tensor post k receives has arrived, and a ("sent", k) wait when
    every tensor it sends has; a tensor arrives ``exchange_s`` after the later of its two ends posted
    the tick's exchange (gloo moves a message once both ends posted it).

    ``events[r]``: rank r's events in order, ("post" | "recv" | "sent", k) with k its post count;
    ``busy[r]``: busy seconds before each event, then after the last. Returns the span and, per
    rank, the idle share 1 - busy / span.
    """
    pp, traffic = len(plan), traffic_ticks(plan)
    for r in range(pp):
        if len(busy[r]) != len(events[r]) + 1:
            raise ValueError(f"rank {r}: {len(busy[r])} busy times for {len(events[r])} events (need one more)")
        posts = [k for kind, k in events[r] if kind == "post"]
        if posts != list(range(len(traffic[r]))):
            raise ValueError(f"rank {r}: posts {posts[:8]}... are not its {len(traffic[r])} exchanges in order")
    posted: list[dict[int, float]] = [{} for _ in range(pp)]  # rank -> tick -> time of its post
    clock, position = [0.0] * pp, [0] * pp

    def peers(r: int, kind: str, tick) -> list[int]:
        if kind == "recv":
            found = [(r - 1) % pp] * bool(tick.recv_prev) + [(r + 1) % pp] * bool(tick.recv_next)
        else:
            found = [(r + 1) % pp if tick.send == "next" else (r - 1) % pp] if tick.send else []
        if not found:
            raise ValueError(f"rank {r}: a {kind!r} wait on tick {tick} that has no such traffic")
        return found

    while any(position[r] < len(events[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while position[r] < len(events[r]):
                kind, k = events[r][position[r]]
                if not 0 <= k < len(traffic[r]):
                    raise ValueError(f"rank {r}: event {kind!r} of post {k}; it has {len(traffic[r])} exchanges")
                t = traffic[r][k]
                ready = clock[r] + busy[r][position[r]]
                if kind == "post":
                    posted[r][t] = clock[r] = ready
                else:
                    if t not in posted[r]:
                        raise ValueError(f"rank {r}: waits on post {k} before making it")
                    ends = peers(r, kind, plan[r][t])
                    if not all(t in posted[q] for q in ends):
                        break
                    clock[r] = max([ready] + [max(posted[r][t], posted[q][t]) + exchange_s for q in ends])
                position[r] += 1
                progressed = True
        if not progressed:
            raise ValueError("the events cannot complete: every rank waits for a post that never comes")
    span = max(clock[r] + busy[r][-1] for r in range(pp))
    return {"span_s": span, "idle": [1 - sum(b) / span for b in busy]}


def lockstep_busy(events: list, busy: list[float]) -> list[float]:
    """The busy seconds of :func:`replay_step` from those of :func:`replay_posted`: the busy time
    between consecutive posts (waits put in no busy time of their own)."""
    segments, current = [], 0.0
    for (kind, _), seconds in zip(events, busy):
        current += seconds
        if kind == "post":
            segments.append(current)
            current = 0.0
    return segments + [current + busy[-1]]


def trace_peak(trace, units: list[int]) -> int:
    """Peak of the saved bytes if each forward's ``units`` (in forward order) lived until its backward."""
    saved, live, peak, forwards = {}, 0, 0, iter(units)
    for a in trace:
        key = (a.microbatch, a.chunk)
        if a.kind == "F":
            saved[key] = next(forwards)
            live += saved[key]
            peak = max(peak, live)
        else:
            live -= saved.pop(key)
    return peak


# ------------------------------------------------------------------------------ summaries
def schedule_name(virtual_stages: int) -> str:
    return "1F1B" if virtual_stages == 1 else f"interleaved v={virtual_stages}"


def summarize_bubble(ranks: list[dict], pp: int, exchange_s: float) -> list[dict]:
    rows, med, mean = [], statistics.median, statistics.fmean
    for i, first in enumerate(ranks[0]["bubble"]):
        v, m = first["virtual_stages"], first["microbatches"]
        per_rank = [r["bubble"][i]["steps"] for r in ranks]
        by_step = list(zip(*per_rank))
        orders = schedule_orders(pp, m, v)
        plan = plan_ticks(orders, v)
        spans = [max(s["end"] for s in steps) - min(s["start"] for s in steps) for steps in by_step]
        measured = [[1 - sum(s["busy_wall"]) / span for s in steps] for steps, span in zip(by_step, spans)]
        replays = [replay_posted(plan, [s["events"] for s in steps], [s["busy_cpu"] for s in steps], exchange_s)
                   for steps in by_step]
        lockstep = [replay_step(plan, [lockstep_busy(s["events"], s["busy_cpu"]) for s in steps], exchange_s)
                    for steps in by_step]
        # Per rank, mean forward and backward (with the loss and the schedule's own work) CPU time.
        forward = [med(s["forward_cpu"] for s in steps) / (m * v) for steps in per_rank]
        backward = [med(sum(s["busy_cpu"]) - s["forward_cpu"] for s in steps) / (m * v) for steps in per_rank]
        ratio = sum(backward) / sum(forward)
        own = replay_step(plan, uniform_busy(plan, 1.0 / v, ratio / v), 0.0)
        posted = replay_posted(plan, *engine_events(plan, 1.0 / v, ratio / v), 0.0)
        dataflow = dataflow_idle(orders, v, 1.0 / v, ratio / v)
        staged = replay_posted(plan, *engine_events(plan, forward, backward), exchange_s)
        idle = lambda runs: [med(x) for x in zip(*(r["idle"] for r in runs))]
        measured_idle, replay_idle, lockstep_idle = [med(x) for x in zip(*measured)], idle(replays), idle(lockstep)
        rows.append({
            "pp": pp, "schedule": schedule_name(v), "virtual_stages": v, "microbatches": m, "steps": len(spans),
            "theory": theory_bubble(pp, m, v), "backward_over_forward": ratio,
            "schedule_idle": own["idle"], "schedule_idle_mean": mean(own["idle"]),
            "posted_idle": posted["idle"], "posted_idle_mean": mean(posted["idle"]),
            "dataflow_idle": dataflow, "dataflow_idle_mean": mean(dataflow),
            "stage_mean_idle": staged["idle"], "stage_mean_idle_mean": mean(staged["idle"]),
            "replay_idle": replay_idle, "replay_idle_mean": mean(replay_idle),
            "lockstep_replay_idle": lockstep_idle, "lockstep_replay_idle_mean": mean(lockstep_idle),
            "measured_idle": measured_idle, "measured_idle_mean": mean(measured_idle),
            "span_ms": med(spans) * 1e3, "replay_span_ms": med(r["span_s"] for r in replays) * 1e3,
            "lockstep_replay_span_ms": med(r["span_s"] for r in lockstep) * 1e3,
            "forward_ms": [f * 1e3 for f in forward], "backward_ms": [b * 1e3 for b in backward],
            "busy_wall_ms": [med(sum(s["busy_wall"]) for s in steps) * 1e3 for steps in per_rank],
            "busy_cpu_ms": [med(sum(s["busy_cpu"]) for s in steps) * 1e3 for steps in per_rank],
            "schedule_compute_ms": [med(s["schedule_compute_s"] for s in steps) * 1e3 for steps in per_rank],
            "wait_wall_ms": [med(s["end"] - s["start"] - sum(s["busy_wall"]) for s in steps) * 1e3
                             for steps in per_rank],
            "max_in_flight": [steps[0]["max_in_flight"] for steps in per_rank],
            "in_flight_promise": [in_flight_promise(pp, r, m, v) for r in range(pp)],
            "event_counts": [{kind: sum(e[0] == kind for e in steps[0]["events"]) for kind in ("post", "recv", "sent")}
                             for steps in per_rank],
            "trace_matches_table": all([[a.kind, a.microbatch, a.chunk] for a in orders[r]] == ranks[r]["bubble"][i]["trace"]
                                       for r in range(pp))})
    return rows


def summarize_memory(ranks: list[dict], pp: int) -> list[dict]:
    rows = []
    for i, first in enumerate(ranks[0]["memory"]):
        v, m = first["virtual_stages"], first["microbatches"]
        per_rank = [r["memory"][i] for r in ranks]
        promise = [in_flight_promise(pp, r, m, v) for r in range(pp)]
        held_plan = sent_outputs_held(schedule_plan(pp, m, v), free=first["free_storage"])
        last = per_rank[-1]["peak_saved_bytes"]
        rows.append({"pp": pp, "schedule": schedule_name(v), "virtual_stages": v, "microbatches": m,
                     "free_storage": first["free_storage"], "ranks": [{
                         "rank": r, "max_in_flight": x["max_in_flight"], "in_flight_promise": promise[r],
                         "peak_saved_mib": x["peak_saved_bytes"] / 2**20,
                         "unit_saved_mib": statistics.median(x["unit_saved_bytes"]) / 2**20,
                         "peak_in_units": x["peak_saved_bytes"] / statistics.median(x["unit_saved_bytes"]),
                         # 1.0: the peak is exactly the forwards the schedule holds at its fullest moment
                         "peak_over_in_flight_forwards": x["peak_saved_bytes"] / x["trace_peak_bytes"],
                         "peak_over_last_rank": x["peak_saved_bytes"] / last,
                         "promise_over_last_rank": promise[r] / promise[-1],
                         "left_saved_bytes": x["left_saved_bytes"],
                         "peak_sent_held_mib": x["peak_sent_held_bytes"] / 2**20, "sent_outputs": x["sent_outputs"],
                         "sent_bytes": x["sent_bytes"],
                         # whole outputs: a freed one still alive keeps a one-element storage
                         "peak_sent_held_outputs": x["peak_sent_held_bytes"] // x["sent_bytes"] if x["sent_bytes"] else 0,
                         "sent_held_plan": held_plan[r],
                         "peak_total_mib": x["peak_total_bytes"] / 2**20} for r, x in enumerate(per_rank)]})
    return rows


def summarize_exchange(ranks: list[dict]) -> dict:
    trips = ranks[0]["exchange"]["round_trip_s"]
    return {"bytes": ranks[0]["exchange"]["bytes"], "round_trips": len(trips),
            "exchange_ms": statistics.median(trips) / 2 * 1e3,
            "exchange_ms_min": min(trips) / 2 * 1e3, "exchange_ms_max": max(trips) / 2 * 1e3}


# ------------------------------------------------------------------------------ report
def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def tables(results: dict) -> str:
    pct = lambda values: " / ".join(f"{x:.1%}" for x in values)
    out = ["### Cost of one exchange (one activation, PipelineComm.exchange, half the round trip)", ""]
    out += md_table(["pp launch", "bytes", "ms, median (min-max)", "round trips"],
                    [[pp, e["bytes"], f"{e['exchange_ms']:.3f} ({e['exchange_ms_min']:.3f}-{e['exchange_ms_max']:.3f})",
                      e["round_trips"]] for pp, e in results["exchange"].items()])
    out += ["### Pipeline bubble: idle share of the step, mean over ranks (medians over steps)", ""]
    out += md_table(["p", "schedule", "m", "theory", "tables, waits at use", "tables, lockstep",
                     "+ stage imbalance, exchanges", "replayed (CPU time)", "replayed in lockstep",
                     "measured (wall)", "span ms: measured / replayed", "tB/tF"],
                    [[r["pp"], r["schedule"], r["microbatches"], f"{r['theory']:.1%}",
                      f"{r['posted_idle_mean']:.1%}", f"{r['schedule_idle_mean']:.1%}", f"{r['stage_mean_idle_mean']:.1%}",
                      f"{r['replay_idle_mean']:.1%}", f"{r['lockstep_replay_idle_mean']:.1%}",
                      f"{r['measured_idle_mean']:.1%}", f"{r['span_ms']:.0f} / {r['replay_span_ms']:.0f}",
                      f"{r['backward_over_forward']:.2f}"] for r in results["bubble"]])
    if results.get("baseline"):
        base = results["baseline"]
        before = {(r["pp"], r["schedule"], r["microbatches"]): r for r in base["rows"]}
        out += [f"### Against the baseline run (commit {base['commit'][:7]}, {base['date']}, "
                "the engine waiting for each tick's exchange in lockstep)", ""]
        out += md_table(["p", "schedule", "m", "theory", "before: measured", "before: replayed",
                         "now: measured", "now: replayed", "now: replayed in lockstep", "span ms: before / now"],
                        [[r["pp"], r["schedule"], r["microbatches"], f"{r['theory']:.1%}",
                          f"{b['measured_idle_mean']:.1%}", f"{b['replay_idle_mean']:.1%}",
                          f"{r['measured_idle_mean']:.1%}", f"{r['replay_idle_mean']:.1%}",
                          f"{r['lockstep_replay_idle_mean']:.1%}", f"{b['span_ms']:.0f} / {r['span_ms']:.0f}"]
                         for r in results["bubble"]
                         if (b := before.get((r["pp"], r["schedule"], r["microbatches"]))) is not None])
    out += ["### Pipeline bubble per rank (0 / 1 / ...)", ""]
    out += md_table(["p", "schedule", "m", "measured (wall)", "replayed (CPU time)", "busy CPU ms",
                     "forward / backward CPU ms per (microbatch, chunk)", "max in flight (promise)"],
                    [[r["pp"], r["schedule"], r["microbatches"], pct(r["measured_idle"]), pct(r["replay_idle"]),
                      " / ".join(f"{x:.0f}" for x in r["busy_cpu_ms"]),
                      " / ".join(f"{f:.1f}, {b:.1f}" for f, b in zip(r["forward_ms"], r["backward_ms"])),
                      " / ".join(f"{x} ({y})" for x, y in zip(r["max_in_flight"], r["in_flight_promise"]))]
                     for r in results["bubble"]])
    if results.get("memory"):
        out += ["### Activation memory per rank: saved-for-backward bytes and in-flight microbatches", ""]
        rows = []
        for row in results["memory"]:
            for x in row["ranks"]:
                rows.append([row["pp"], row["schedule"], row["microbatches"], "on" if row["free_storage"] else "off",
                             x["rank"], f"{x['max_in_flight']} ({x['in_flight_promise']})",
                             f"{x['peak_saved_mib']:.2f}", f"{x['unit_saved_mib']:.3f}", f"{x['peak_in_units']:.2f}",
                             f"{x['peak_over_in_flight_forwards']:.3f}",
                             f"{x['peak_over_last_rank']:.2f} ({x['promise_over_last_rank']:.2f})",
                             f"{x.get('peak_sent_held_outputs', '-')} ({x.get('sent_held_plan', '-')})",
                             f"{x['peak_sent_held_mib']:.3f}", x["sent_outputs"], f"{x['peak_total_mib']:.2f}"])
        out += md_table(["p", "schedule", "m", "free sent", "rank", "max in flight (promise)", "peak saved MiB",
                         "one forward saves MiB", "peak / one forward", "peak / in-flight forwards' sum",
                         "peak / last rank's (promise)",
                         "sent outputs held at peak (plan; off: at least)", "held MiB", "outputs sent", "peak saved + held MiB"], rows)
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["pp"] for r in results["bubble"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 5.0), squeeze=False)
    for ax, pp in zip(axes[0], sizes):
        rows = [r for r in results["bubble"] if r["pp"] == pp]
        for v, color in zip(sorted({r["virtual_stages"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
            mine = sorted((r for r in rows if r["virtual_stages"] == v), key=lambda r: r["microbatches"])
            ms = [r["microbatches"] for r in mine]
            fine = [ms[0] + (ms[-1] - ms[0]) * k / 100 for k in range(101)]
            name = schedule_name(v)
            ax.plot(fine, [theory_bubble(pp, x, v) for x in fine], color=color, label=f"{name}: theory")
            ax.plot(ms, [r["measured_idle_mean"] for r in mine], "o--", color=color, label=f"{name}: measured (wall)")
            ax.plot(ms, [r["replay_idle_mean"] for r in mine], "s:", color=color, mfc="none",
                    label=f"{name}: replayed (CPU time, a core per rank)")
            before = {(b["pp"], b["schedule"], b["microbatches"]): b for b in results.get("baseline", {}).get("rows", [])}
            old = [(r["microbatches"], before[(pp, name, r["microbatches"])]["measured_idle_mean"])
                   for r in mine if (pp, name, r["microbatches"]) in before]
            if old:
                ax.plot(*zip(*old), "^", color=color, alpha=0.45, ms=8,
                        label=f"{name}: measured before (commit {results['baseline']['commit'][:7]}, lockstep waits)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(x) for x in ms])
        ax.set_xlabel("microbatches per step (m)")
        ax.set_ylabel("idle share of the step (mean over ranks)")
        ax.set_title(f"p = {pp} stages")
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
