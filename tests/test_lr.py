"""The learning-rate schedule against hand-computed values and torch.optim.lr_scheduler's own schedules."""
import math

import pytest
import torch

from engine.train.lr import LRSchedule, learning_rate

# lr 1.0 -> 0.1, warmup 4 steps, decay over iterations 4..8 (t = 0, 1/4, 1/2, 3/4, 1), then the floor.
HAND_TABLE = {
    "cosine": [0.25, 0.5, 0.75, 1.0, 1.0, 0.8681980515339464, 0.55, 0.2318019484660536, 0.1, 0.1, 0.1],
    "linear": [0.25, 0.5, 0.75, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1, 0.1],
    "constant": [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("decay", sorted(HAND_TABLE))
def test_schedule_matches_hand_computed_table(decay):
    got = [learning_rate(i, lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=8, decay=decay)
           for i in range(11)]
    assert got == pytest.approx(HAND_TABLE[decay], rel=1e-12, abs=0)
    schedule = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=8, decay=decay)
    assert [schedule(i) for i in range(11)] == got


def test_no_warmup_starts_at_full_rate_and_equal_bounds_drop_to_the_floor():
    assert learning_rate(0, lr=2.0, min_lr=0.5, warmup_iters=0, decay_iters=4, decay="cosine") == 2.0
    assert learning_rate(4, lr=2.0, min_lr=0.5, warmup_iters=0, decay_iters=4, decay="cosine") == 0.5
    # warmup_iters == decay_iters: t = 1 at that iteration, so the rate is min_lr from there on
    got = [learning_rate(i, lr=3.0, min_lr=0.3, warmup_iters=3, decay_iters=3, decay="linear") for i in range(5)]
    assert got == pytest.approx([1.0, 2.0, 3.0, 0.3, 0.3], rel=1e-15)
    assert learning_rate(0, lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=0, decay="cosine") == 0.0


def _torch_rates(scheduler_factory, base_lr, steps):
    """The rates a torch scheduler gives on `steps` consecutive optimizer steps."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = scheduler_factory(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("lr,min_lr,warmup,decay_iters", [(3e-4, 3e-5, 5, 37), (1.0, 0.0, 0, 10)])
def test_cosine_segment_equals_torch_cosine_annealing(lr, min_lr, warmup, decay_iters):
    span = decay_iters - warmup
    expected = _torch_rates(
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=span, eta_min=min_lr), lr, span + 1)
    got = [learning_rate(warmup + e, lr=lr, min_lr=min_lr, warmup_iters=warmup, decay_iters=decay_iters,
                         decay="cosine") for e in range(span + 1)]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_linear_segment_and_warmup_equal_torch_linear_lr():
    lr, min_lr, warmup, decay_iters = 6e-4, 6e-5, 7, 30
    span = decay_iters - warmup
    expected_decay = _torch_rates(
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=min_lr / lr,
                                                      total_iters=span), lr, span + 1)
    got_decay = [learning_rate(warmup + e, lr=lr, min_lr=min_lr, warmup_iters=warmup,
                               decay_iters=decay_iters, decay="linear") for e in range(span + 1)]
    assert got_decay == pytest.approx(expected_decay, rel=1e-9)
    # Warmup (every style): factor (i + 1) / W is LinearLR from 1/W to 1 over W - 1 steps.
    expected_warmup = _torch_rates(
        lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                                      total_iters=warmup - 1), lr, warmup)
    for decay in ("cosine", "linear", "constant"):
        got_warmup = [learning_rate(i, lr=lr, min_lr=min_lr, warmup_iters=warmup, decay_iters=decay_iters,
                                    decay=decay) for i in range(warmup)]
        assert got_warmup == pytest.approx(expected_warmup, rel=1e-9)


def test_cosine_is_monotone_and_bounded_over_a_long_run():
    rates = [learning_rate(i, lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=1000, decay="cosine")
             for i in range(1200)]
    assert max(rates) == 1e-3 and min(rates[100:]) == 1e-4 and rates[0] == 1e-5
    assert all(a <= b for a, b in zip(rates[:100], rates[1:100]))
    assert all(a >= b for a, b in zip(rates[99:], rates[100:]))
    assert math.isclose(rates[550], 1e-4 + 9e-4 * 0.5, rel_tol=1e-12)  # halfway through the decay


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(min_lr=-1e-5), "min_lr"),
    (dict(min_lr=2.0), "min_lr"),
    (dict(warmup_iters=-1), "warmup_iters"),
    (dict(warmup_iters=2.5), "warmup_iters"),
    (dict(decay_iters=-3), "decay_iters"),
    (dict(warmup_iters=20, decay_iters=10), "warmup_iters"),
    (dict(decay="exponential"), "decay"),
])
def test_bad_arguments_are_refused_by_name(kwargs, name):
    args = dict(lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=10, decay="cosine")
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{name} "):
        learning_rate(0, **args)
    with pytest.raises(ValueError, match=rf"^{name} "):
        LRSchedule(**args)


@pytest.mark.parametrize("iteration", [-1, 1.0, True])
def test_bad_iteration_is_refused_by_name(iteration):
    with pytest.raises(ValueError, match="^iteration "):
        learning_rate(iteration, lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=10, decay="cosine")
    with pytest.raises(ValueError, match="^iteration "):
        LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=10)(iteration)
