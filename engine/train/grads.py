"""Gradients of a step: contiguous buffers, data-parallel buckets fired from backward hooks, finalisation.

    buffer = GradBuffer(model_chunks, state, bucket_size=40_000_000, distributed_optimizer=False)
    for i, microbatch in enumerate(microbatches):
        buffer.sync = (i == len(microbatches) - 1)   # reduce over DP during the last backward only
        loss(microbatch).backward()
    buffer.finalize()                                # wait for DP, then TP sums of SP norm grads
    norm = buffer.grad_norm()                        # over the part this rank owns, all groups

Layout. Every trainable parameter of the chunks is laid out, in backward order (the reverse of the
order the model registers them, so the head's gradients come first), in two flat buffers with the same
offsets: ``params`` in the model's dtype (each parameter's ``.data`` becomes a view into it) and
``grads`` in fp32, where gradients of all microbatches accumulate (``main_grad`` of each parameter).
The buffers are cut into buckets of about ``bucket_size`` elements (a parameter never spans two
buckets), each padded to a multiple of the DP size. :func:`bucket_layout` computes this layout from
parameter names and sizes alone, and :func:`owned_param_pieces` what each DP rank owns in it, so a
layout planner counts the bytes this buffer and the optimizer allocate without building them.

Reduction. A hook on each parameter (``register_post_accumulate_grad_hook``) adds the fresh gradient
into ``main_grad`` and frees it. When ``sync`` is on and every parameter of a bucket has been added, the
bucket's reduction over the DP group is launched asynchronously, so it overlaps the rest of the
backward: an all-reduce (sum), or under the distributed optimizer (ZeRO-1) a reduce-scatter that
leaves DP rank r with the sum of slice r of each bucket, the slice it owns. Gradients are already
divided by the global number of loss tokens, hence a sum and not a mean.

Finalisation, after the last backward: launch any bucket not yet launched (parameters without a
gradient, ``overlap=False``), wait for all, then all-reduce over TP the gradients of the replicated
norm weights that saw only a slice of the sequence (sequence parallelism), on the region this rank
owns. With pipeline parallelism and tied embeddings, the first stage's embedding and the last
stage's copy of it for the head get the sum of both gradients: that parameter has a bucket of its own
which the hooks never launch; finalisation first all-reduces it over the embedding group (first and
last stage), then reduces it over DP like any bucket. (Launching it from a hook would make the last
stage wait, in the middle of its backward, for the first stage's backward, which waits for the last
stage's gradients.) The copy is left out of the global norm, which counts every weight once.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.collectives import group_size
from engine.parallel.layout import PipelineLayout, tp_shard_dim
from engine.parallel.state import ParallelState


@dataclass
class ParamSlot:
    """Where one parameter lives in the flat buffers: ``[start, end)``, in bucket ``bucket``."""
    name: str
    param: nn.Parameter
    start: int
    end: int
    bucket: int
    replicated_over_tp: bool  # identical on every TP rank: counted once in the global norm
    sequence_parallel: bool   # its gradient is partial on each TP rank until summed over TP
    in_norm: bool = True      # False for the last stage's copy of a tied embedding


@dataclass
class Bucket:
    index: int
    start: int
    end: int  # exclusive, padded: (end - start) % dp == 0
    slots: list[ParamSlot] = field(default_factory=list)
    ready: int = 0
    handle: object = None
    launched: bool = False
    tied: bool = False  # the tied embedding's own bucket: summed over the embedding group first

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketSpan:
    """One bucket of the flat buffers from shapes alone: ``[start, end)``, padded to a multiple of DP,
    and ``(name, start, end)`` of each parameter in it."""
    start: int
    end: int
    params: tuple[tuple[str, int, int], ...]
    tied: bool = False


def bucket_layout(named_numels: Sequence[tuple[str, int]], dp_size: int, bucket_size: int,
                  tied_name: str | None = None) -> list[BucketSpan]:
    """The buckets :class:`GradBuffer` lays out for parameters given as ``(name, numel)`` in the order
    the model chunks register them: offsets in backward order (the reverse), a bucket closed once it
    holds ``bucket_size`` elements (a parameter never spans two), each padded to a multiple of
    ``dp_size``; ``tied_name`` (the embedding shared by the first and last stage) gets a bucket of
    its own. GradBuffer builds from this, and so can a planner that has no tensors."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
    if dp_size < 1:
        raise ValueError(f"data-parallel size must be at least 1, got {dp_size}")
    spans: list[BucketSpan] = []
    start = offset = 0
    members: list[tuple[str, int, int]] = []

    def close(tied: bool) -> None:
        nonlocal start, members
        end = start + math.ceil((offset - start) / dp_size) * dp_size
        spans.append(BucketSpan(start, end, tuple(members), tied))
        start, members = end, []

    for name, numel in reversed(named_numels):
        tied = name == tied_name
        if tied and members:
            close(False)
            offset = start
        members.append((name, offset, offset + numel))
        offset += numel
        if tied or offset - start >= bucket_size:
            close(tied)
            offset = start
    if members:
        close(False)
    return spans


def owned_span(start: int, end: int, dp_size: int, dp_rank: int, distributed_optimizer: bool) -> tuple[int, int]:
    """``[start, end)`` of bucket ``[start, end)`` that DP rank ``dp_rank`` owns: all of it without
    the distributed optimizer, slice ``dp_rank`` of ``dp_size`` equal slices under ZeRO-1."""
    if not distributed_optimizer:
        return start, end
    shard = (end - start) // dp_size
    return start + dp_rank * shard, start + (dp_rank + 1) * shard


def owned_param_pieces(spans: Sequence[BucketSpan], dp_size: int, dp_rank: int,
                       distributed_optimizer: bool) -> list[tuple[str, int, int]]:
    """``(name, start, end)`` of each piece of a parameter inside the ranges DP rank ``dp_rank``
    owns, in buffer coordinates and bucket order: what the optimizer keeps state for."""
    pieces = []
    for span in spans:
        lo, hi = owned_span(span.start, span.end, dp_size, dp_rank, distributed_optimizer)
        for name, p_start, p_end in span.params:
            start, end = max(p_start, lo), min(p_end, hi)
            if start < end:
                pieces.append((name, start, end))
    return pieces


def _named_trainable(chunks: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    named, seen = [], set()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
    return named


class GradBuffer:
    """Flat parameter and fp32 gradient buffers of ``chunks`` on this rank, reduced over DP in buckets.

    ``sequence_parallel_names``: names of replicated parameters used on sequence slices (their
    gradients are summed over TP in :meth:`finalize`). ``pipeline``: the pipeline layout, for the
    tied embedding shared by the first and last stage (None: one stage).
    """

    def __init__(self, chunks: list[nn.Module], state: ParallelState, *, bucket_size: int = 40_000_000,
                 distributed_optimizer: bool = False, overlap: bool = True,
                 sequence_parallel_names: set[str] = frozenset(), grad_dtype: torch.dtype = torch.float32,
                 pipeline: PipelineLayout | None = None):
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
        self.state = state
        self.dp_size, self.dp_rank = state.dp_size, state.dp_rank
        self.dp_group = state.dp_group if state.dp_size > 1 else None
        self.distributed_optimizer = distributed_optimizer
        self.overlap = overlap
        self.sync = True
        named = _named_trainable(chunks)
        if not named:
            raise ValueError("GradBuffer: the model chunks have no trainable parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"GradBuffer: parameters of several dtypes {sorted(map(str, dtypes))}; "
                             "build the model in one dtype")
        self.param_dtype = dtypes.pop()
        device = named[0][1].device

        shared = pipeline is not None and pipeline.pp > 1 and pipeline.tie_word_embeddings
        self.embedding_group = state.embedding_group if shared else None
        # Offsets in backward order; buckets close once they hold bucket_size elements. The shared
        # embedding gets a bucket of its own.
        self.layout = bucket_layout([(name, p.numel()) for name, p in named], self.dp_size, bucket_size,
                                    "embed_tokens.weight" if shared else None)
        params = dict(named)
        self.slots: list[ParamSlot] = []
        self.buckets: list[Bucket] = []
        for index, span in enumerate(self.layout):
            bucket = Bucket(index, span.start, span.end, tied=span.tied)
            for name, start, end in span.params:
                slot = ParamSlot(name, params[name], start, end, index,
                                 replicated_over_tp=tp_shard_dim(name) is None,
                                 sequence_parallel=name in sequence_parallel_names,
                                 in_norm=not (pipeline is not None and pipeline.is_tied_copy(name, state.pp_rank)))
                bucket.slots.append(slot)
                self.slots.append(slot)
            self.buckets.append(bucket)
        self.numel = self.layout[-1].end
        self.params = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
        self.grads = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self._hooks = []
        for slot in self.slots:
            p = slot.param
            view = self.params[slot.start:slot.end].view_as(p)
            view.copy_(p.data)
            p.data = view
            p.main_grad = self.grads[slot.start:slot.end].view_as(p)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(slot)))
        self.by_name = {s.name: s for s in self.slots}

    # ----------------------------------------------------------------------------- accumulation
    def _make_hook(self, slot: ParamSlot):
        bucket = self.buckets[slot.bucket]

        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            param.main_grad.add_(param.grad)
            param.grad = None
            if not self.sync:
                return
            bucket.ready += 1
            if self.overlap and not bucket.tied and bucket.ready == len(bucket.slots):
                self._launch(bucket)

        return hook

    def _launch(self, bucket: Bucket) -> None:
        if bucket.launched:
            return
        bucket.launched = True
        if self.dp_size == 1:
            return
        grads = self.grads[bucket.start:bucket.end]
        if self.distributed_optimizer:
            # In place: the output is this rank's slice of the input (NCCL and gloo allow it), so no
            # staging copy of the bucket lives until finalize.
            bucket.handle = dist.reduce_scatter_single(self.owned_grad(bucket), grads,
                                                       group=self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(grads, group=self.dp_group, async_op=True)

    # ------------------------------------------------------------------------------ ownership
    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """``[start, end)`` of the buffers this DP rank owns in ``bucket`` (all of it without ZeRO)."""
        return owned_span(bucket.start, bucket.end, self.dp_size, self.dp_rank, self.distributed_optimizer)

    def owned_grad(self, bucket: Bucket) -> torch.Tensor:
        start, end = self.owned_range(bucket)
        return self.grads[start:end]

    def owned_pieces(self) -> list[tuple[ParamSlot, int, int]]:
        """(slot, start, end) for each piece of a parameter inside a range this rank owns, in
        buffer coordinates; under ZeRO a parameter may be cut mid-tensor."""
        return [(self.by_name[name], start, end) for name, start, end in
                owned_param_pieces(self.layout, self.dp_size, self.dp_rank, self.distributed_optimizer)]

    # ---------------------------------------------------------------------------- finalisation
    def finalize(self) -> None:
        """Complete the tied-embedding sum, the DP reduction and the TP sums of sequence-parallel
        gradients."""
        for bucket in self.buckets:
            if bucket.tied and group_size(self.embedding_group) > 1:
                dist.all_reduce(self.grads[bucket.start:bucket.end], group=self.embedding_group)
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.handle, bucket.launched, bucket.ready = None, False, 0
        self._sum_sequence_parallel_grads()

    def _sum_sequence_parallel_grads(self) -> None:
        group = self.state.tp_group
        if group_size(group) == 1:
            return
        views = [self.grads[s:e] for slot, s, e in self.owned_pieces() if slot.sequence_parallel]
        if not views:
            return
        flat = torch.cat(views)
        dist.all_reduce(flat, group=group)
        offset = 0
        for v in views:
            v.copy_(flat[offset:offset + v.numel()])
            offset += v.numel()

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient (after :meth:`finalize`), the same on every rank.

        Each rank sums squares over the pieces it owns; parameters replicated over TP count on TP
        rank 0 only, a tied embedding on the first stage only. The sum is all-reduced over the model-parallel group, and over DP too under ZeRO
        (where DP ranks own disjoint pieces).
        """
        pieces = [self.grads[s:e] for slot, s, e in self.owned_pieces()
                  if slot.in_norm and not (slot.replicated_over_tp and self.state.tp_rank != 0)]
        norms = torch._foreach_norm(pieces, 2.0) if pieces else []
        total = torch.stack([n.float() for n in norms]).square().sum() if norms else \
            torch.zeros((), device=self.grads.device)
        total = total.reshape(1).double()
        if group_size(self.state.model_group) > 1:
            dist.all_reduce(total, group=self.state.model_group)
        if self.distributed_optimizer and self.dp_size > 1:
            dist.all_reduce(total, group=self.dp_group)
        return float(total.sqrt())

    def scale_grads(self, factor: float) -> None:
        for bucket in self.buckets:
            self.owned_grad(bucket).mul_(factor)

    def zero_grads(self) -> None:
        self.grads.zero_()

    def gather_params(self) -> None:
        """Under ZeRO: every DP rank's updated slice of the parameters to all DP ranks."""
        if not self.distributed_optimizer or self.dp_size == 1:
            return
        handles = []
        for bucket in self.buckets:
            start, end = self.owned_range(bucket)
            handles.append(dist.all_gather_single(self.params[bucket.start:bucket.end],  # in place
                                                  self.params[start:end], group=self.dp_group, async_op=True))
        for h in handles:
            h.wait()

    def gather_owned(self, flat: torch.Tensor) -> torch.Tensor:
        """A full buffer-shaped tensor from every DP rank's owned slices of ``flat`` (same layout as
        the buffers, only the owned slices meaningful); without ZeRO, ``flat`` itself."""
        if not self.distributed_optimizer or self.dp_size == 1:
            return flat
        full = torch.empty_like(flat)
        for bucket in self.buckets:
            start, end = self.owned_range(bucket)
            dist.all_gather_single(full[bucket.start:bucket.end], flat[start:end].contiguous(),
                                   group=self.dp_group)
        return full

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
