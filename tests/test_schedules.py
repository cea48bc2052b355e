"""Pipeline schedules against a plain-Python model of them, and the executor on real gloo ranks.

References written here, not the engine's tables:

- ``reference_order``: Megatron's 1F1B and interleaved 1F1B as a window rule. The forwards of a rank
  come in groups of ``pp`` microbatches chunk by chunk, the backwards in the same groups with the
  chunks reversed; a rank runs a forward while fewer than ``window`` microbatch-chunks are in flight,
  else a backward, where ``window`` is the warm-up plus one: ``pp - r`` for 1F1B,
  ``2 (pp - r - 1) + (v - 1) pp + 1`` interleaved (everything when ``m == pp``).
- ``simulate``: runs every rank's table with a clock (unit-time actions, a tensor made at tick t
  usable at t + 1), checking each dependency, and gives each action its earliest tick.
- the multi-process tests compare a pipeline's losses and gradients with the whole model in one
  process (``engine.model.llama.Llama`` and ``torch.nn.functional.cross_entropy``).
"""
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.model.llama import Llama
from engine.parallel.p2p import PipelineComm, backward_from, free_storage
from engine.parallel.state import ParallelState, init_parallel, rank_layout, single_process_state
from engine.parallel.tensor_parallel import build_model_chunks
from engine.train.schedules import (Action, ScheduleStats, check_microbatches, forward_backward,
                                    get_forward_backward, interleaved_order, one_f_one_b_order, plan_ticks)
from engine.train.step import evaluate_loss, make_loss_fn

SEED, SEQ, VOCAB = 5, 8, 96


# ------------------------------------------------------------------------- the plain-Python model
def megatron_warmup(pp, rank, m, v, interleaved=None):
    """Warm-up forwards of rank ``rank``: Megatron's numbers (interleaved: all forwards when m == pp,
    there is no steady state)."""
    total = m * v
    if not (v > 1 if interleaved is None else interleaved):
        return min(pp - rank - 1, m)
    return total if m == pp else min(2 * (pp - rank - 1) + (v - 1) * pp, total)


def reference_order(pp, rank, m, v=1, forward_only=False, interleaved=None):
    """Rank ``rank``'s table as (kind, microbatch, chunk) tuples, by the window rule; ``interleaved``
    (default: v > 1) takes the interleaved schedule's warm-up."""
    if v == 1:
        forwards = [(mb, 0) for mb in range(m)]
        backwards = list(forwards)
    else:
        assert m % pp == 0
        groups = [range(g * pp, (g + 1) * pp) for g in range(m // pp)]
        forwards = [(mb, c) for group in groups for c in range(v) for mb in group]
        backwards = [(mb, c) for group in groups for c in reversed(range(v)) for mb in group]
    if forward_only:
        return [("F",) + f for f in forwards]
    window = megatron_warmup(pp, rank, m, v, interleaved) + 1
    order, in_flight = [], 0
    while forwards or backwards:
        if forwards and in_flight < window:
            order.append(("F",) + forwards.pop(0))
            in_flight += 1
        else:
            order.append(("B",) + backwards.pop(0))
            in_flight -= 1
    return order


def as_tuples(actions):
    return [(a.kind, a.microbatch, a.chunk) for a in actions]


def dependencies(kind, mb, stage, stages):
    """What an action on virtual stage ``stage`` needs: the previous stage's forward; the next
    stage's backward and its own forward."""
    if kind == "F":
        return [("F", mb, stage - 1)] if stage > 0 else []
    return [("F", mb, stage)] + ([("B", mb, stage + 1)] if stage < stages - 1 else [])


class Deadlock(Exception):
    pass


def simulate(orders, v):
    """{(kind, microbatch, virtual stage): tick} of every rank's table run as early as it can."""
    pp = len(orders)
    stages = pp * v
    tick = {}
    position, free_at = [0] * pp, [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while position[r] < len(orders[r]):
                kind, mb, chunk = orders[r][position[r]]
                key = (kind, mb, chunk * pp + r)
                needs = dependencies(*key, stages)
                if any(n not in tick for n in needs):
                    break
                assert key not in tick, f"{key} runs twice"
                tick[key] = max([free_at[r]] + [tick[n] + 1 for n in needs])
                free_at[r] = tick[key] + 1
                position[r] += 1
                progress = True
    if any(position[r] < len(orders[r]) for r in range(pp)):
        raise Deadlock({r: orders[r][position[r]] for r in range(pp) if position[r] < len(orders[r])})
    return tick


def max_in_flight(order):
    most = held = 0
    for kind, _, _ in order:
        held += 1 if kind == "F" else -1
        most = max(most, held)
    return most


def engine_orders(pp, m, v, forward_only=False):
    if v == 1:
        return [as_tuples(one_f_one_b_order(pp, r, m, forward_only)) for r in range(pp)]
    return [as_tuples(interleaved_order(pp, r, m, v, forward_only)) for r in range(pp)]


CASES = [(pp, m, v) for pp in (2, 3, 4) for v in (1, 2, 3) for m in sorted({pp, pp + 1, 2 * pp, 3 * pp, 8})
         if v == 1 or m % pp == 0]


# ------------------------------------------------------------------------------------ the tables
def test_hand_written_tables():
    F_, B_ = "F", "B"
    assert engine_orders(2, 4, 1)[0] == [(F_, 0, 0), (F_, 1, 0), (B_, 0, 0), (F_, 2, 0), (B_, 1, 0),
                                         (F_, 3, 0), (B_, 2, 0), (B_, 3, 0)]
    assert engine_orders(2, 4, 1)[1] == [(k, i, 0) for i in range(4) for k in "FB"]
    # pp 2, v 2, m 4: rank 0 warms up with 2 * 1 + 1 * 2 = 4 forwards, rank 1 with 2.
    fwd = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    bwd = [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]
    f = [(F_,) + x for x in fwd]
    b = [(B_,) + x for x in bwd]
    assert engine_orders(2, 4, 2)[0] == f[:4] + [f[4], b[0], f[5], b[1], f[6], b[2], f[7], b[3]] + b[4:]
    assert engine_orders(2, 4, 2)[1] == f[:2] + [f[2], b[0], f[3], b[1], f[4], b[2], f[5], b[3],
                                                  f[6], b[4], f[7], b[5]] + b[6:]
    # m == pp: no steady state, every forward first.
    assert engine_orders(2, 2, 2)[1] == [(F_, 0, 0), (F_, 1, 0), (F_, 0, 1), (F_, 1, 1),
                                         (B_, 0, 1), (B_, 1, 1), (B_, 0, 0), (B_, 1, 0)]


@pytest.mark.parametrize("pp,m,v", CASES)
def test_engine_tables_equal_the_window_rule(pp, m, v):
    for forward_only in (False, True):
        want = [reference_order(pp, r, m, v, forward_only) for r in range(pp)]
        assert engine_orders(pp, m, v, forward_only) == want, (pp, m, v, forward_only)
    if v == 1 and m % pp == 0:  # the interleaved table with one chunk is Megatron's too
        want = [reference_order(pp, r, m, 1, interleaved=True) for r in range(pp)]
        assert [as_tuples(interleaved_order(pp, r, m, 1)) for r in range(pp)] == want


@pytest.mark.parametrize("pp,m,v", CASES)
def test_tables_run_every_action_once_in_dependency_order_with_bounded_memory(pp, m, v):
    orders = engine_orders(pp, m, v)
    stages = pp * v
    tick = simulate(orders, v)
    assert sorted(tick) == sorted((k, mb, s) for k in "FB" for mb in range(m) for s in range(stages))
    assert sum(map(len, orders)) == 2 * m * stages  # so no action ran twice
    for (kind, mb, s), t in tick.items():
        for need in dependencies(kind, mb, s, stages):
            assert tick[need] < t, f"{(kind, mb, s)} at tick {t} before {need} at {tick[need]}"
    for r, order in enumerate(orders):
        held = max_in_flight(order)
        if v == 1:
            assert held <= pp - r, f"rank {r} holds {held} microbatches, 1F1B promises {pp - r}"
        assert held <= megatron_warmup(pp, r, m, v) + 1
    # Unit-time ideal: 2mv actions per rank plus a fill and a drain of pp - 1 ticks each.
    assert max(tick.values()) + 1 == 2 * m * v + 2 * (pp - 1)


@pytest.mark.parametrize("pp,m,v", CASES)
def test_plan_ticks_is_the_clocked_simulation_with_matching_traffic(pp, m, v):
    orders = engine_orders(pp, m, v)
    stages = pp * v
    ticks = plan_ticks([[Action(*a) for a in o] for o in orders], v)
    assert max(map(len, ticks)) == 2 * m * v + 2 * (pp - 1)
    want = simulate(orders, v)
    got = {}
    for r, rank_ticks in enumerate(ticks):
        assert as_tuples(t.action for t in rank_ticks if t.action) == orders[r]
        for t, tk in enumerate(rank_ticks):
            if tk.action:
                got[(tk.action.kind, tk.action.microbatch, tk.action.chunk * pp + r)] = t
    assert got == want
    # Every message is posted by both ends in the same tick, towards the consumer's (rank, chunk).
    expected_recv = {}
    for r, rank_ticks in enumerate(ticks):
        for t, tk in enumerate(rank_ticks):
            a = tk.action
            s = a.chunk * pp + r if a else None
            if a and a.kind == "F" and s < stages - 1:
                assert tk.send == "next"
                expected_recv[((s + 1) % pp, t, "prev")] = Action("F", a.microbatch, (s + 1) // pp)
            elif a and a.kind == "B" and s > 0:
                assert tk.send == "prev"
                expected_recv[((s - 1) % pp, t, "next")] = Action("B", a.microbatch, (s - 1) // pp)
            else:
                assert tk.send is None
    seen = {}
    for r, rank_ticks in enumerate(ticks):
        for t, tk in enumerate(rank_ticks):
            if tk.recv_prev:
                seen[(r, t, "prev")] = tk.recv_prev
            if tk.recv_next:
                seen[(r, t, "next")] = tk.recv_next
    assert seen == expected_recv


@pytest.mark.parametrize("orders,v", [
    # rank 1 runs a backward before the forward that produces its output
    ([[("F", 0, 0), ("B", 0, 0)], [("B", 0, 0), ("F", 0, 0)]], 1),
    # rank 0 waits for microbatch 0's gradient, which rank 1 sends only after microbatch 1's forward,
    # which needs rank 0's forward of microbatch 1, queued after that backward
    ([[("F", 0, 0), ("B", 0, 0), ("F", 1, 0), ("B", 1, 0)],
      [("F", 1, 0), ("F", 0, 0), ("B", 0, 0), ("B", 1, 0)]], 1),
    # interleaved: rank 0 runs chunk 1 of microbatch 0 before rank 1 can have sent chunk 0's output
    ([[("F", 0, 1), ("F", 0, 0), ("B", 0, 0), ("B", 0, 1)], [("F", 0, 0), ("F", 0, 1), ("B", 0, 1), ("B", 0, 0)]], 2),
])
def test_a_table_that_cannot_complete_is_refused(orders, v):
    with pytest.raises(Deadlock):
        simulate(orders, v)
    with pytest.raises(RuntimeError, match="pipeline schedule cannot complete: every rank waits"):
        plan_ticks([[Action(*a) for a in o] for o in orders], v)


# ------------------------------------------------------------------------------------- the checks
def test_check_microbatches_refuses_by_name():
    check_microbatches(1, 1, 1)
    check_microbatches(4, 1, 5)
    check_microbatches(2, 3, 4)
    with pytest.raises(ValueError, match=r"parallel.pp 4 needs at least 4 microbatches per step, got 3"):
        check_microbatches(4, 1, 3)
    with pytest.raises(ValueError, match=r"parallel.pp 2 needs at least 2 microbatches per step, got 1"):
        check_microbatches(2, 2, 1)
    with pytest.raises(ValueError, match=r"interleaved schedule \(parallel.virtual_stages 2\) needs a number of "
                                         r"microbatches per step divisible by parallel.pp 2, got 5"):
        check_microbatches(2, 2, 5)
    with pytest.raises(ValueError, match="at least one microbatch, got 0"):
        check_microbatches(1, 1, 0)


def _tiny_config(tied=False):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=tied)


def test_forward_backward_refuses_before_any_work():
    """A pipeline rank's state without process groups: the checks fire before any communication."""
    state = ParallelState(layout=rank_layout(2, 1, 2), rank=0, tp_rank=0, dp_rank=0, pp_rank=0)
    chunk = Llama(_tiny_config(), layer_ids=range(2), has_head=False)
    mbs = _microbatches(1)
    with pytest.raises(ValueError, match="parallel.pp 2 needs at least 2 microbatches per step, got 1"):
        forward_backward([chunk], mbs, None, state=state, grads=None)
    with pytest.raises(ValueError, match="divisible by parallel.pp 2, got 3"):
        forward_backward([chunk, chunk], _microbatches(3), None, state=state, grads=None, virtual_stages=2)
    with pytest.raises(ValueError, match=r"1 model chunk\(s\) on this rank, but parallel.virtual_stages is 2"):
        forward_backward([chunk], mbs, None, state=state, grads=None, virtual_stages=2)
    with pytest.raises(ValueError, match="virtual_stages 2 needs parallel.pp >= 2"):
        get_forward_backward(single_process_state(), 2)
    with pytest.raises(ValueError, match="PipelineComm needs a pipeline of at least two stages"):
        PipelineComm(single_process_state())


# --------------------------------------------------------------------------------- p2p helpers
def test_free_storage_keeps_the_backward_and_backward_from_gives_torch_gradients():
    g = torch.Generator().manual_seed(0)
    x0, w0, grad = torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = torch.tanh(x @ w) + x  # ends with a residual add, as a stage does
    free_storage(y)
    assert y.untyped_storage().nbytes() == y.element_size()  # one element left
    backward_from(y, grad)
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    (torch.tanh(xr @ wr) + xr).backward(grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, wr.grad, rtol=0, atol=0)
    # A view shares its base's storage: left alone.
    base = torch.randn(2, 6)
    view = base[:, :3]
    free_storage(view)
    assert view.shape == (2, 3) and torch.equal(view, base[:, :3])
    # A loss backs up from 1.
    loss = (w * 2).sum()
    w.grad = None
    backward_from(loss, None)
    assert torch.equal(w.grad, torch.full_like(w, 2.0))


# ----------------------------------------------------------------------------- multi-process runs
def _microbatches(m, micro=1):
    g = torch.Generator().manual_seed(77)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, VOCAB, (micro, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (micro, SEQ), generator=g)
        mask = (torch.rand(micro, SEQ, generator=g) < 0.6).float()
        mask[:, -1] = 1.0
        out.append({"tokens": tokens, "labels": torch.where(mask.bool(), labels, -100), "loss_mask": mask})
    return out


def _reference(m):
    """Per-microbatch normalised losses and the gradients of the whole model in one process."""
    model = Llama(_tiny_config())
    model.init_weights(seed=SEED)
    mbs = _microbatches(m)
    tokens = sum(float(mb["loss_mask"].sum()) for mb in mbs)
    losses = []
    for mb in mbs:
        logits = model(mb["tokens"])
        loss_sum = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100, reduction="sum")
        (loss_sum / tokens).backward()
        losses.append(loss_sum.item())
    return losses, tokens, {n: p.grad.clone() for n, p in model.named_parameters()}


def _schedule_worker(rank, world, pp, v, m):
    state = init_parallel(1, pp)
    chunks = build_model_chunks(_tiny_config(), state, v, seed=SEED)
    comm = PipelineComm(state)
    mbs = _microbatches(m)
    tokens = sum(float(mb["loss_mask"].sum()) for mb in mbs)
    loss_fn = make_loss_fn(chunks[-1], state, tokens)
    stats = ScheduleStats()
    losses = forward_backward(chunks, mbs, loss_fn, state=state, grads=None, virtual_stages=v, comm=comm,
                              stats=stats)
    grads = {n: p.grad.numpy().copy() for c in chunks for n, p in c.named_parameters()}  # pickled by value
    fwd_stats = ScheduleStats()
    with torch.no_grad():
        fwd_losses = forward_backward(chunks, mbs, loss_fn, state=state, grads=None, virtual_stages=v, comm=comm,
                                      forward_only=True, stats=fwd_stats)
    mean_loss, count = evaluate_loss(chunks, mbs, state, state.device, comm)
    return {"trace": as_tuples(stats.trace), "max_in_flight": stats.max_in_flight,
            "losses": [float(x) for x in losses], "grads": grads,
            "fwd_trace": as_tuples(fwd_stats.trace), "fwd_max_in_flight": fwd_stats.max_in_flight,
            "fwd_losses": [float(x) for x in fwd_losses], "eval": (mean_loss, count)}


def _world2_worker(rank, world):
    out = {f"pp2-v{v}": _schedule_worker(rank, world, 2, v, 4) for v in (1, 2)}
    out["exchange"] = _exchange_worker(rank)
    return out


def _world4_worker(rank, world):
    return {"pp4-v1": _schedule_worker(rank, world, 4, 1, 6)}


def _exchange_worker(rank):
    """Two ranks swap tensors both ways in one exchange; released buffers come back from the pool."""
    state = init_parallel(1, 2)
    comm = PipelineComm(state)
    spec = ((2, 3), torch.float32)
    mine = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 100 * rank
    # The activation goes forward and the gradient back, in one batch on each side.
    if rank == 0:
        from_prev, from_next = comm.exchange(send_next=mine, recv_next=spec)
    else:
        from_prev, from_next = comm.exchange(send_prev=mine, recv_prev=spec)
    received = from_next if rank == 0 else from_prev
    unused = from_prev if rank == 0 else from_next
    # Both directions at once (a ring of two: next and prev are the same peer).
    ring_prev, ring_next = comm.exchange(send_next=mine + 0.5, send_prev=-mine, recv_prev=spec, recv_next=spec)
    received_values = received.tolist()
    storage = received.data_ptr()
    received.requires_grad_(True)
    received.grad = torch.ones(2, 3)
    comm.release(received)
    pooled = comm.buffer(*spec)
    reused = pooled.data_ptr() == storage and not pooled.requires_grad and pooled.grad is None
    comm.release(pooled)
    again_prev, again_next = comm.exchange(send_next=mine * 2, recv_prev=spec) if rank == 0 else \
        comm.exchange(send_prev=mine * 2, recv_next=spec)
    again = again_prev if rank == 0 else again_next
    other = comm.buffer((3, 2), torch.float32)
    return {"received": received_values, "unused": unused, "ring": (ring_prev.tolist(), ring_next.tolist()),
            "reused": reused, "exchange_reuses": again.data_ptr() == storage, "again": again.tolist(),
            "other_shape_new": other.data_ptr() != storage and other.shape == (3, 2)}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_world2_worker, 2, timeout=180)


@pytest.fixture(scope="module")
def world4():
    return run_distributed(_world4_worker, 4, timeout=180)


def _check_schedule_run(results, pp, v, m):
    ref_losses, tokens, ref_grads = _reference(m)
    orders = [reference_order(pp, r, m, v) for r in range(pp)]
    for r, got in enumerate(results):
        assert got["trace"] == orders[r], f"rank {r}: recorded order differs from the schedule's table"
        assert got["max_in_flight"] == max_in_flight(orders[r])
        if v == 1:
            assert got["max_in_flight"] <= pp - r
        assert got["fwd_trace"] == reference_order(pp, r, m, v, forward_only=True)
        assert got["fwd_max_in_flight"] == 0  # forward only keeps no activations
        last = r == pp - 1
        for key in ("losses", "fwd_losses"):
            if last:
                torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
            else:
                assert got[key] == []
        mean, count = got["eval"]
        assert count == tokens
        assert abs(mean - sum(ref_losses) / tokens) < 1e-5
        for name, grad in got["grads"].items():
            grad, want = torch.from_numpy(grad), ref_grads[name]
            if grad.shape != want.shape:  # vocabulary padded to a multiple of 128: padding rows get nothing
                assert torch.count_nonzero(grad[want.shape[0]:]) == 0
                grad = grad[:want.shape[0]]
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6, msg=lambda s: f"rank {r} {name}: {s}")
    held = sorted(n for got in results for n in got["grads"])
    assert held == sorted(ref_grads), "the ranks' chunks should hold every parameter once"


@pytest.mark.distributed
@pytest.mark.parametrize("v", [1, 2])
def test_pipeline_of_two_runs_its_tables_and_gives_one_process_losses_and_gradients(world2, v):
    _check_schedule_run([by[f"pp2-v{v}"] for by in world2], 2, v, 4)


@pytest.mark.distributed
def test_pipeline_of_four_runs_its_tables_and_gives_one_process_losses_and_gradients(world4):
    _check_schedule_run([by["pp4-v1"] for by in world4], 4, 1, 6)


@pytest.mark.distributed
def test_exchange_swaps_both_ways_and_reuses_released_buffers(world2):
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    for r, by in enumerate(world2):
        got = by["exchange"]
        peer = 1 - r
        assert got["received"] == (base + 100 * peer).tolist()
        assert got["unused"] is None
        # from prev: the peer's send_next; from next: the peer's send_prev
        assert got["ring"] == ((base + 100 * peer + 0.5).tolist(), (-(base + 100 * peer)).tolist())
        assert got["reused"], "a released buffer should come back from the pool"
        assert got["exchange_reuses"], "an exchange should receive into a released buffer"
        assert got["again"] == ((base + 100 * peer) * 2).tolist()
        assert got["other_shape_new"]
