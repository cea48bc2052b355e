"""Tensor-parallel layers: each holds its rank's shard of a weight and names its collectives.

    ColumnParallelLinear     weight [out / TP, in]   input: copy_to_tp, or gather_from_sequence (SP)
                                                     output: this rank's slice of the features
    RowParallelLinear        weight [out, in / TP]   input: this rank's slice of the features
                                                     output: reduce_from_tp, or reduce_scatter_to_sequence (SP)
    VocabParallelEmbedding   weight [V_pad / TP, h]  output: reduce_from_tp, or reduce_scatter_to_sequence (SP)
    VocabParallelLMHead      weight [V_pad / TP, h]  input as ColumnParallelLinear; output: logits of
                         (or the embedding's)        this rank's vocabulary slice (never gathered)

``V_pad`` is the vocabulary padded to a multiple of 128 x TP (:func:`layout.padded_vocab_size`).
Under sequence parallelism (SP) the activations between these layers (norms, residuals) are
[batch, seq / TP, hidden]; the replicated weights used there (RMSNorm) then see only a slice of
the sequence, so their gradients must be summed over TP once per step, after the backward
(:class:`engine.train.grads.GradBuffer` does it).

Token ids are not checked here (a check would synchronise the GPU on every microbatch): the batch
loader validates them where data enters.

Weights are created empty (on the given device, possibly ``meta``); the caller fills them, see
:mod:`engine.parallel.tensor_parallel`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel.collectives import (copy_to_tp, gather_from_sequence, group_rank,
                                         group_size, reduce_from_tp, reduce_scatter_to_sequence)
from engine.parallel.layout import padded_vocab_size, vocab_shard_range

def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {parts}")
    return total // parts


def enter_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Replicated (or sequence-sliced) activations into a tensor-parallel region."""
    return gather_from_sequence(x, group) if sequence_parallel else copy_to_tp(x, group)


def leave_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """Partial sums out of a tensor-parallel region, replicated (or sequence-sliced)."""
    return reduce_scatter_to_sequence(x, group) if sequence_parallel else reduce_from_tp(x, group)


class ColumnParallelLinear(nn.Module):
    """y[..., out / TP] = x W_shard^T, this rank's slice of the output features (no bias).

    ``input_in_tp_region=True``: the input already went through :func:`enter_tp_region` (once for all
    the layers reading it, e.g. q, k and v), so this layer adds no collective.
    """

    def __init__(self, in_features: int, out_features: int, group=None, sequence_parallel: bool = False,
                 input_in_tp_region: bool = False, device=None, dtype=None):
        super().__init__()
        self.group, self.sequence_parallel, self.input_in_tp_region = group, sequence_parallel, input_in_tp_region
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        local_out = _divide(out_features, self.tp_size, "output features of a column-parallel linear")
        self.weight = nn.Parameter(torch.empty(local_out, in_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_in_tp_region:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tp={self.tp_size}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[..., in / TP] W_shard^T: the input features are split (no bias)."""

    def __init__(self, in_features: int, out_features: int, group=None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        local_in = _divide(in_features, self.tp_size, "input features of a row-parallel linear")
        self.weight = nn.Parameter(torch.empty(out_features, local_in, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"row-parallel linear expects this rank's {self.weight.shape[1]} input "
                             f"features, got {x.shape[-1]}")
        return leave_tp_region(F.linear(x, self.weight), self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"tp={self.tp_size}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Token embeddings with the (padded) vocabulary split over TP ranks.

    A rank looks up the ids of its slice and writes zeros for the others; the sum over ranks is the
    embedding. Under SP the sum is reduce-scattered so each rank keeps its slice of the sequence
    (the sequence length must then be a multiple of TP).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, group=None, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_size, self.embedding_dim = vocab_size, embedding_dim
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.padded_vocab_size = padded_vocab_size(vocab_size, self.tp_size)
        self.vocab_start, vocab_end = vocab_shard_range(vocab_size, self.tp_size, self.tp_rank)
        self.local_vocab_size = vocab_end - self.vocab_start
        self.weight = nn.Parameter(torch.empty(self.local_vocab_size, embedding_dim, device=device, dtype=dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"embedding expects token ids [batch, seq], got shape {tuple(input_ids.shape)}")
        if self.sequence_parallel and input_ids.shape[1] % self.tp_size:
            raise ValueError(f"sequence parallelism: sequence length {input_ids.shape[1]} is not a "
                             f"multiple of the tensor-parallel size {self.tp_size}")
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.local_vocab_size)
        if self.tp_size > 1:
            local_ids = local_ids.masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)
        if self.tp_size > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp_region(out, self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, padded={self.padded_vocab_size}, "
                f"embedding_dim={self.embedding_dim}, tp={self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelLMHead(nn.Module):
    """Logits of this rank's vocabulary slice: [batch, seq, V_pad / TP] (padding columns included;
    :func:`engine.parallel.cross_entropy.vocab_parallel_cross_entropy` excludes them).

    ``input_in_tp_region`` as in :class:`ColumnParallelLinear`. With ``tied=True`` the head holds no
    weight: ``forward(hidden, embedding_weight)`` is given the
    :class:`VocabParallelEmbedding`'s shard, which then receives the gradients of both uses.
    """

    def __init__(self, hidden_size: int, vocab_size: int, group=None, sequence_parallel: bool = False,
                 tied: bool = False, input_in_tp_region: bool = False, device=None, dtype=None):
        super().__init__()
        self.group, self.sequence_parallel, self.tied = group, sequence_parallel, tied
        self.input_in_tp_region = input_in_tp_region
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.tp_size, self.tp_rank = group_size(group), group_rank(group)
        self.padded_vocab_size = padded_vocab_size(vocab_size, self.tp_size)
        self.vocab_start, vocab_end = vocab_shard_range(vocab_size, self.tp_size, self.tp_rank)
        self.local_vocab_size = vocab_end - self.vocab_start
        if not tied:
            self.weight = nn.Parameter(torch.empty(self.local_vocab_size, hidden_size, device=device, dtype=dtype))

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.tied == (embedding_weight is None):
            raise ValueError("a tied LM head takes the embedding's weight shard, an untied one its own "
                             f"(tied={self.tied}, embedding weight given: {embedding_weight is not None})")
        weight = embedding_weight if self.tied else self.weight
        if tuple(weight.shape) != (self.local_vocab_size, self.hidden_size):
            raise ValueError(f"LM head weight shard {tuple(weight.shape)} is not the expected "
                             f"[{self.local_vocab_size}, {self.hidden_size}] of vocabulary {self.vocab_size} "
                             f"padded to {self.padded_vocab_size} over {self.tp_size} ranks")
        if not self.input_in_tp_region:
            hidden = enter_tp_region(hidden, self.group, self.sequence_parallel)
        return F.linear(hidden, weight)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, "
                f"padded={self.padded_vocab_size}, tp={self.tp_size}, tied={self.tied}, "
                f"sequence_parallel={self.sequence_parallel}")
