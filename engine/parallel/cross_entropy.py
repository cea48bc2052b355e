"""Cross entropy over logits split along the vocabulary, without gathering them.

Each tensor-parallel rank holds the logits of a contiguous slice of the (padded) vocabulary. The
loss per token is ``log(sum_v exp(z_v)) - z_target``; with ``m = max_v z_v`` it is computed from
three reductions over the group, each of one number per token:

    m            all-reduce (max) of the local maxima
    sum exp      all-reduce (sum) of the local sums of exp(z - m)      } one all-reduce
    z_target     all-reduce (sum): only the rank owning the target     } for both
                 contributes it, the others contribute 0

Columns at or beyond the true vocabulary size (padding added so the vocabulary divides evenly)
take no part. The gradient ``softmax(z) - onehot(target)`` is computed locally in the backward.
Math is in float32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.collectives import group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, targets, vocab_start, true_vocab_size, group, ignore_index):
        logits = local_logits.float()
        local_vocab = logits.shape[-1]
        distributed = group_size(group) > 1
        # Local columns [0, real) are tokens; [real, local_vocab) are padding (possibly all of them).
        real = min(local_vocab, max(0, true_vocab_size - vocab_start))
        if real > 0:
            logits_max = logits[..., :real].max(dim=-1).values
        else:
            logits_max = logits.new_full(logits.shape[:-1], float("-inf"))
        if distributed:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        shifted[..., real:] = float("-inf")

        ignored = targets == ignore_index
        local_target = targets - vocab_start
        owned = (local_target >= 0) & (local_target < local_vocab) & ~ignored
        local_target = torch.where(owned, local_target, torch.zeros_like(local_target))
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
        exp = shifted.exp_()  # in place: one logits-sized buffer; padding gives exp(-inf) = 0

        sums = torch.stack((exp.sum(dim=-1), target_logit))
        if distributed:
            dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums[0], sums[1]
        loss = torch.where(ignored, torch.zeros_like(sum_exp), sum_exp.log() - target_logit)

        # Keep the softmax (the gradient up to the one-hot term) rather than the logits.
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local_target, owned, ignored)
        ctx.logits_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, owned, ignored = ctx.saved_tensors
        grad = softmax  # saved for this one use: modify in place
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        scale = torch.where(ignored, torch.zeros_like(grad_loss), grad_loss.float())
        grad.mul_(scale.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 true_vocab_size: int, group=None, ignore_index: int = -100) -> torch.Tensor:
    """Cross entropy per token (float32, shape of ``targets``; 0 where ``targets == ignore_index``).

    ``local_logits`` [..., local_vocab] are this rank's columns ``vocab_start ..
    vocab_start + local_vocab`` of the padded vocabulary; ``group`` is the tensor-parallel group
    (None in one process, where the logits are the whole, possibly padded, vocabulary). Targets must
    lie in ``0 .. true_vocab_size - 1`` or equal ``ignore_index``; they are not checked here (that would
    synchronise the GPU on every microbatch): the batch loader validates them where data enters.
    """
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(f"vocab-parallel cross entropy: logits {tuple(local_logits.shape)} do not "
                         f"match targets {tuple(targets.shape)} (expected logits [..., vocab] for "
                         "targets [...])")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vocab-parallel cross entropy: targets must be integer token ids, got {targets.dtype}")
    return _VocabParallelCrossEntropy.apply(local_logits, targets.long(), int(vocab_start),
                                            int(true_vocab_size), group, ignore_index)
