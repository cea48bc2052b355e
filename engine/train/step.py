"""One optimizer step, as Megatron structures it:

    count loss tokens of the global batch (all microbatches, all DP ranks)
    -> schedule: forward/backward of every microbatch (DP reduction during the last backward)
    -> finalize gradients -> global norm -> skip on NaN/Inf, else clip + AdamW -> zero gradients

The loss of a microbatch is ``sum(token losses * loss_mask) / global_loss_tokens``, so the summed
gradient over microbatches and DP ranks is the gradient of the mean token loss of the whole global
batch, whatever the split: CT counts every token, SFT only the reward tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.collectives import group_size
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.state import ParallelState
from engine.parallel.tensor_parallel import lm_head_vocab_range
from engine.train.grads import GradBuffer
from engine.train.optimizer import MixedPrecisionAdamW
from engine.parallel.p2p import PipelineComm
from engine.train.schedules import ScheduleStats, forward_backward


@dataclass
class StepResult:
    loss: float          # mean loss per loss token over the global batch (NaN/Inf when skipped for it)
    grad_norm: float     # global gradient norm before clipping
    skipped: bool        # no update: non-finite loss or gradients
    loss_tokens: int     # loss tokens in the global batch


def global_loss_tokens(microbatches: list[dict], state: ParallelState, device) -> int:
    """Loss tokens of the whole global batch: this rank's microbatches summed over DP. Counted on the
    host copies of the masks (before they move to the GPU), so no device sync per microbatch."""
    local = sum(float(mb["loss_mask"].sum()) for mb in microbatches)
    if not math.isfinite(local):
        raise ValueError(f"loss masks of this step sum to {local}: a loss_mask holds NaN or Inf "
                         "(it must be 0/1 per token)")
    count = torch.tensor([local], dtype=torch.float64, device=device)
    if group_size(state.dp_group) > 1:
        dist.all_reduce(count, group=state.dp_group)
    return int(count.item())


def make_loss_fn(model: nn.Module, state: ParallelState, loss_tokens: int):
    """``loss_fn(logits, microbatch)`` for the schedules: the normalised loss and its raw sum.
    ``model`` is the chunk holding the head; the schedules call it on the last pipeline stage only."""
    group = state.tp_group if state.tp_size > 1 else None
    denominator = max(loss_tokens, 1)

    def loss_fn(logits: torch.Tensor, microbatch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        vocab_start, vocab_size = lm_head_vocab_range(model)
        per_token = vocab_parallel_cross_entropy(logits, microbatch["labels"], vocab_start, vocab_size, group)
        loss_sum = (per_token * microbatch["loss_mask"]).sum()
        return loss_sum / denominator, loss_sum

    return loss_fn


def _global_loss_sum(losses: list[torch.Tensor], state: ParallelState, device) -> float:
    """The loss sum of the global batch on every rank: summed over DP, and over PP, where only the
    last stage has losses (so every stage sees the same value, NaN included, and skips alike)."""
    total = torch.stack(losses).sum().double().reshape(1) if losses else \
        torch.zeros(1, dtype=torch.float64, device=device)
    if group_size(state.dp_group) > 1:
        dist.all_reduce(total, group=state.dp_group)
    if group_size(state.pp_group) > 1:
        dist.all_reduce(total, group=state.pp_group)
    return float(total.item())


def _to_device(microbatches: list[dict], device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in microbatches]


def train_step(chunks: list[nn.Module], microbatches: list[dict], grads: GradBuffer,
               optimizer: MixedPrecisionAdamW, state: ParallelState, *, lr: float, clip_grad: float,
               comm: PipelineComm | None = None, stats: ScheduleStats | None = None) -> StepResult:
    """Forward, backward and update over one global batch (this rank's ``microbatches``)."""
    device = grads.grads.device
    tokens = global_loss_tokens(microbatches, state, device)
    microbatches = _to_device(microbatches, device)
    loss_fn = make_loss_fn(chunks[-1], state, tokens)
    losses = forward_backward(chunks, microbatches, loss_fn, state=state, grads=grads,
                              virtual_stages=len(chunks), comm=comm, stats=stats)
    grads.finalize()
    loss = _global_loss_sum(losses, state, device) / max(tokens, 1)
    norm = grads.grad_norm()
    skipped = not (math.isfinite(loss) and math.isfinite(norm))
    if not skipped:
        optimizer.step(lr, clip_grad, norm)
    grads.zero_grads()
    return StepResult(loss=loss, grad_norm=norm, skipped=skipped, loss_tokens=tokens)


@torch.no_grad()
def evaluate_loss(chunks: list[nn.Module], microbatches: list[dict], state: ParallelState,
                  device, comm: PipelineComm | None = None) -> tuple[float, int]:
    """(mean loss per loss token, loss tokens) of a global batch, forward only."""
    tokens = global_loss_tokens(microbatches, state, device)
    microbatches = _to_device(microbatches, device)
    loss_fn = make_loss_fn(chunks[-1], state, tokens)
    losses = forward_backward(chunks, microbatches, loss_fn, state=state, grads=None, forward_only=True,
                              virtual_stages=len(chunks), comm=comm)
    return _global_loss_sum(losses, state, device) / max(tokens, 1), tokens
