"""Forward-backward schedules: one function per schedule behind :func:`forward_backward`.

A schedule runs the ``num_microbatches`` forward and backward passes of one optimizer step over this
rank's model chunks and returns the per-microbatch loss sums (on the stage that computes the loss).
It turns the data-parallel gradient reduction on for the last microbatch's backward only, so the
reduction overlaps that backward and earlier microbatches only accumulate.

    losses = forward_backward(chunks, microbatches, loss_fn, state=state, grads=buffer)

``loss_fn(output, microbatch) -> (loss_for_backward, loss_sum)``: the scalar to differentiate (already
normalised by the global number of loss tokens) and the detached, unnormalised sum for the log.

Today: no pipelining (one stage). The pipeline schedules (1F1B, interleaved) plug in here, chosen by
the layout, with the same signature.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.parallel.state import ParallelState
from engine.train.grads import GradBuffer

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def forward_backward_no_pipelining(chunks: list[nn.Module], microbatches: list[dict], loss_fn: LossFn, *,
                                   state: ParallelState, grads: GradBuffer | None,
                                   forward_only: bool = False) -> list[torch.Tensor]:
    """Each microbatch forward then backward through the one chunk; DP sync on the last backward."""
    if len(chunks) != 1:
        raise ValueError(f"no-pipelining schedule runs one model chunk, got {len(chunks)}")
    model = chunks[0]
    losses = []
    for i, microbatch in enumerate(microbatches):
        if grads is not None:
            grads.sync = i == len(microbatches) - 1
        with torch.set_grad_enabled(not forward_only):
            output = model(microbatch["tokens"])
            loss, loss_sum = loss_fn(output, microbatch)
        if not forward_only:
            loss.backward()
        losses.append(loss_sum.detach())
    if grads is not None:
        grads.sync = True
    return losses


def get_forward_backward(state: ParallelState, virtual_stages: int = 1):
    """The schedule for this layout."""
    if state.pp_size == 1 and virtual_stages == 1:
        return forward_backward_no_pipelining
    raise NotImplementedError(f"pipeline parallelism (pp={state.pp_size}, virtual_stages={virtual_stages}) "
                              "has no schedule yet; run with parallel.pp 1")


def forward_backward(chunks: list[nn.Module], microbatches: list[dict], loss_fn: LossFn, *,
                     state: ParallelState, grads: GradBuffer | None, forward_only: bool = False,
                     virtual_stages: int = 1) -> list[torch.Tensor]:
    """Run one step's microbatches with the schedule the layout calls for."""
    schedule = get_forward_backward(state, virtual_stages)
    return schedule(chunks, microbatches, loss_fn, state=state, grads=grads, forward_only=forward_only)
