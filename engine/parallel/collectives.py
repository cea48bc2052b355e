"""Autograd-aware collectives over the tensor-parallel group.

Each function is the identity in one direction and a collective in the other, so that a forward
pass through the tensor-parallel layers yields exactly the gradients a single process would get:

    copy_to_tp                   forward: identity               backward: all-reduce
    reduce_from_tp               forward: all-reduce             backward: identity
    scatter_to_sequence          forward: keep own seq. slice    backward: all-gather along seq.
    gather_from_sequence         forward: all-gather along seq.  backward: reduce-scatter along seq.
    reduce_scatter_to_sequence   forward: reduce-scatter seq.    backward: all-gather along seq.

Activations are [batch, seq, hidden]; the sequence dimension is 1. A group of None (no
``torch.distributed``) or of one rank makes every function the identity.

The raw collectives (``all_reduce``, ``all_gather_along``, ``reduce_scatter_along``) are the only
place the engine's tensor-parallel code talks to ``torch.distributed``; backend differences are
handled there once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ------------------------------------------------------------------------- raw collectives
def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) of ``x`` over the group, as a new tensor (``x`` is never modified: autograd
    may hand the same gradient tensor to several consumers)."""
    out = x.clone(memory_format=torch.contiguous_format)
    if group_size(group) > 1:
        dist.all_reduce(out, op=op, group=group)
    return out


def _gather_dim0(out: torch.Tensor, x: torch.Tensor, group) -> None:
    if hasattr(dist, "all_gather_single"):  # torch >= 2.13 name; the older one is deprecated there
        dist.all_gather_single(out, x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)


def _reduce_scatter_dim0(out: torch.Tensor, x: torch.Tensor, group) -> None:
    if hasattr(dist, "reduce_scatter_single"):  # torch >= 2.13: gloo and NCCL both implement it
        dist.reduce_scatter_single(out, x, group=group)
    elif dist.get_backend(group) == "gloo":
        # Older gloo builds have no reduce-scatter: all-reduce the whole tensor, keep our slice.
        full = x.clone()
        dist.all_reduce(full, group=group)
        out.copy_(full.chunk(dist.get_world_size(group))[dist.get_rank(group)])
    else:
        dist.reduce_scatter_tensor(out, x, group=group)


def all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenation along ``dim`` of every rank's ``x`` (equal shapes), in group-rank order."""
    world = group_size(group)
    if world == 1:
        return x
    # The backends gather along dim 0 only: move ``dim`` to the front and back again.
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((world * front.shape[0],) + front.shape[1:], dtype=x.dtype, device=x.device)
    _gather_dim0(out, front, group)
    return out.movedim(0, dim).contiguous()


def reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's slice along ``dim`` of the sum of every rank's ``x``."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"reduce-scatter: dimension {dim} of size {x.shape[dim]} is not divisible "
                         f"by the {world} ranks of the group")
    front = x.movedim(dim, 0).contiguous()
    out = torch.empty((front.shape[0] // world,) + front.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter_dim0(out, front, group)
    return out.movedim(0, dim).contiguous()


def split_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (no communication)."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} over the {world} "
                         "tensor-parallel ranks (sequence parallelism needs the sequence length "
                         "to be a multiple of the tensor-parallel size)")
    return x.chunk(world, dim)[group_rank(group)].contiguous()


# ------------------------------------------------------------------ autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's gradient covers the whole sequence but only its share of the next layer's
        # outputs: sum over ranks, and keep the slice of the sequence this rank owns.
        return reduce_scatter_along(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, SEQ_DIM, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated input: identity, gradients all-reduced."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing the ranks' partial results."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence of a replicated activation."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region from sequence-parallel activations: whole sequence on every rank."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region into sequence-parallel activations: sum, keep own slice."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
