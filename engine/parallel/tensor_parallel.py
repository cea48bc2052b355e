"""Tensor and sequence parallelism applied to a Llama from one place.

    with torch.device("meta"):
        model = Llama(config)                       # no memory: shapes only
    parallelize_model(model, state, sequence_parallel=True, seed=1234)
    logits = model(input_ids)                       # [b, s, V_pad / TP]: this rank's vocabulary slice
    loss = vocab_parallel_cross_entropy(logits, targets, *lm_head_vocab_range(model), ...)

Which module becomes which parallel layer is read from the one layout table
(:mod:`engine.parallel.layout`), so the layers, checkpoints and converters always agree:

    nn.Linear with a column (dim 0) layout     -> ColumnParallelLinear   (q, k, v, gate, up)
    nn.Linear with a row (dim 1) layout        -> RowParallelLinear      (o, down)
    nn.Embedding / ``lm_head``                 -> VocabParallelEmbedding / VocabParallelLMHead
    the tied head (no parameters)              -> VocabParallelLMHead(tied=True)
    RMSNorm                                    -> RMSNormEnteringTP (same weight; under sequence
                                                  parallelism its gradient is summed over TP, see
                                                  :func:`sequence_parallel_names`)

In this Llama every column-parallel layer reads a norm's output (q, k, v read input_layernorm;
gate and up read post_attention_layernorm; the head reads norm), so the activation enters the
tensor-parallel region once, at the norm, for all its readers: one all-gather (SP) or one backward
all-reduce per norm instead of one per layer (2 instead of 5 per decoder layer), as Megatron gets
from its fused QKV and gate/up weights. The column layers are built with ``input_in_tp_region=True``.

The model file itself stays free of collectives.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.model.llama import Llama, RMSNorm, TiedHead, expected_shapes, init_parameter
from engine.parallel.collectives import all_gather_along, group_size
from engine.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelLMHead, enter_tp_region)
from engine.parallel.layout import PipelineLayout, is_vocab_parallel, tp_shard, tp_shard_dim
from engine.parallel.state import ParallelState, validate_layout

__all__ = ["parallelize_model", "build_parallel_llama", "build_model_chunks", "pipeline_layout", "gather_full_param", "lm_head_vocab_range",
           "sequence_parallel_names"]


class RMSNormEnteringTP(RMSNorm):
    """The model's RMSNorm (same ``weight``, same math) whose output enters the tensor-parallel
    region for all the column-parallel layers that read it."""

    def __init__(self, norm: RMSNorm, group, sequence_parallel: bool):
        nn.Module.__init__(self)
        self.weight, self.eps, self.ops = norm.weight, norm.eps, norm.ops
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return enter_tp_region(super().forward(x), self.group, self.sequence_parallel)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"


_PARALLEL_MODULES = (RMSNormEnteringTP, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelLMHead)


def _parallel_module(name: str, module: nn.Module, config, group, sequence_parallel: bool) -> nn.Module | None:
    """The parallel replacement for ``module`` (called ``name`` in the model), or None to keep it."""
    kwargs = dict(group=group, sequence_parallel=sequence_parallel, device="meta")
    if isinstance(module, RMSNorm):
        return RMSNormEnteringTP(module, group, sequence_parallel)
    if isinstance(module, TiedHead):
        return VocabParallelLMHead(config.hidden_size, config.vocab_size, tied=True, input_in_tp_region=True, **kwargs)
    if isinstance(module, nn.Embedding):
        return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, **kwargs)
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ValueError(f"{name}: tensor parallelism supports bias-free linears only")
        weight = f"{name}.weight"
        if is_vocab_parallel(weight):
            return VocabParallelLMHead(module.in_features, module.out_features, input_in_tp_region=True, **kwargs)
        dim = tp_shard_dim(weight)
        if dim == 0:
            return ColumnParallelLinear(module.in_features, module.out_features, input_in_tp_region=True, **kwargs)
        if dim == 1:
            return RowParallelLinear(module.in_features, module.out_features, **kwargs)
        raise ValueError(f"{weight}: a linear layer without a tensor-parallel layout")
    return None


@torch.no_grad()
def parallelize_model(model: Llama, state: ParallelState, sequence_parallel: bool = False,
                      seed: int | None = 0, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32) -> Llama:
    """Split ``model`` (in place) over ``state``'s TP group and materialise this rank's shards.

    Parameters still on the meta device are initialised from ``init_parameter(name, full_shape,
    config, seed)``: each rank builds the full tensor of one parameter at a time (never the whole
    model) and keeps its slice, so every layout starts from the same weights. Parameters that already
    hold values (a model loaded whole, in tests or small runs) are sliced instead. ``seed=None``
    leaves meta parameters uninitialised (allocated only), for a checkpoint load to fill.

    Returns the model, whose ``forward`` takes the whole [batch, seq] token ids on every TP rank and
    gives this rank's vocabulary slice of the logits for the whole sequence. Under sequence
    parallelism the embedding scatters the sequence (its length must be a multiple of TP), the
    residual stream between layers is [batch, seq / TP, hidden] (what pipeline stages exchange),
    and the gradients of :func:`sequence_parallel_names` must be summed over TP after the backward.
    """
    config = model.config
    if any(isinstance(m, _PARALLEL_MODULES) for m in model.modules()):
        raise ValueError("parallelize_model: this model is already parallelized")
    validate_layout(config, state.tp_size, state.pp_size, state.dp_size, state.world_size)
    group = state.tp_group if state.tp_size > 1 else None
    device = torch.device(device) if device is not None else state.device
    full_shapes = expected_shapes(config)
    # References to values to keep (no copies); everything else is allocated after the swap.
    existing = {name: p.detach() for name, p in model.named_parameters() if not p.is_meta}

    for name, module in list(model.named_modules()):
        if not name:
            continue
        replacement = _parallel_module(name, module, config, group, sequence_parallel)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)

    model.to(device="meta", dtype=dtype)  # shapes only, until this rank's tensors are allocated
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if name not in full_shapes:
            raise KeyError(f"{name}: parameter unknown to the model's layout")
        if name in existing:
            full = existing.pop(name)
            if tuple(full.shape) != full_shapes[name]:
                raise ValueError(f"{name}: shape {tuple(full.shape)} is not the full shape {full_shapes[name]}")
        elif seed is not None:
            full = init_parameter(name, full_shapes[name], config, seed)
        else:
            continue
        local = tp_shard(name, full, state.tp_size, state.tp_rank)
        if local.shape != param.shape:
            raise ValueError(f"{name}: slice {tuple(local.shape)} of rank {state.tp_rank} does not fit the "
                             f"parameter's local shape {tuple(param.shape)}")
        param.copy_(local)
        del full, local  # one full tensor at a time
    return model


def build_parallel_llama(config, state: ParallelState, sequence_parallel: bool = False, seed: int | None = 0,
                         device=None, dtype: torch.dtype = torch.float32, **llama_kwargs) -> Llama:
    """Build this rank's shard of a Llama without ever materialising the whole model.

    ``llama_kwargs`` (``layer_ids`` and which of embedding and head it holds) select a pipeline stage.
    """
    validate_layout(config, state.tp_size, state.pp_size, state.dp_size, state.world_size)
    with torch.device("meta"):
        model = Llama(config, **llama_kwargs)
    return parallelize_model(model, state, sequence_parallel, seed=seed, device=device, dtype=dtype)


def pipeline_layout(config, state: ParallelState, virtual_stages: int = 1) -> PipelineLayout:
    """The pipeline table of ``config`` over ``state``'s pipeline ranks."""
    return PipelineLayout(config.num_hidden_layers, state.pp_size, virtual_stages, config.tie_word_embeddings)


def build_model_chunks(config, state: ParallelState, virtual_stages: int = 1, sequence_parallel: bool = False,
                       seed: int | None = 0, device=None, dtype: torch.dtype = torch.float32) -> list[Llama]:
    """This rank's model chunks, in schedule order: one per virtual stage it runs, each a Llama of the
    layers :class:`PipelineLayout` gives it (the first holding the embedding on the first rank, the
    last the norm and head on the last rank), tensor-parallel over ``state``'s TP group."""
    layout = pipeline_layout(config, state, virtual_stages)
    validate_layout(config, state.tp_size, state.pp_size, state.dp_size, state.world_size, virtual_stages)
    return [build_parallel_llama(config, state, sequence_parallel, seed=seed, device=device, dtype=dtype,
                                 **layout.chunk_spec(state.pp_rank, c)) for c in range(virtual_stages)]


def lm_head_vocab_range(model: Llama) -> tuple[int, int]:
    """(vocab_start, true vocab size) for :func:`vocab_parallel_cross_entropy` on this model's logits."""
    head = model.lm_head if model.lm_head is not None else model.tied_head
    if head is None:
        raise ValueError("this model (pipeline stage) has no LM head: its output is hidden states, not logits")
    if isinstance(head, VocabParallelLMHead):
        return head.vocab_start, head.vocab_size
    return 0, model.config.vocab_size


def sequence_parallel_names(model: nn.Module) -> set[str]:
    """Names of the replicated weights that see only a slice of the sequence on each TP rank (the
    norms under sequence parallelism): their gradients are partial sums until summed over TP."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, RMSNormEnteringTP) and m.sequence_parallel and group_size(m.group) > 1}


def gather_full_param(name: str, local: torch.Tensor, state: ParallelState, vocab_size: int) -> torch.Tensor:
    """The full, unpadded tensor of parameter ``name`` from every TP rank's ``local`` slice.

    Collective over the TP group (every rank calls it, same order). For tests and checkpoints of
    small models; large checkpoints are written shard by shard instead.
    """
    dim = tp_shard_dim(name)
    if dim is None:
        return local
    full = all_gather_along(local.detach(), dim, state.tp_group if group_size(state.tp_group) > 1 else None)
    if is_vocab_parallel(name):
        full = full[:vocab_size]
    return full
