"""How the engine's parameters are laid out over tensor- and pipeline-parallel ranks.

One table, used by the TP layers (what a rank builds), by checkpoints and by the Hugging Face
converters (what a rank saves and loads), so the three can never disagree: :func:`tp_shard` cuts a
rank's slice of a tensor, :func:`local_shape` gives its shape without the tensor.

Parameter names are layout-independent and follow Hugging Face Llama without the ``model.`` prefix:
``embed_tokens.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.{input,post_attention}_layernorm.weight``,
``norm.weight``, ``lm_head.weight``. ``i`` is always the global layer index, on every stage.
"""
from __future__ import annotations

import re

# Output features split over TP ranks (column parallel): shard dim 0.
_COLUMN = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight$")
# Input features split over TP ranks (row parallel): shard dim 1.
_ROW = re.compile(r"layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")
# Vocabulary split over TP ranks after padding: shard dim 0.
_VOCAB = re.compile(r"(embed_tokens|lm_head)\.weight$")
_REPLICATED = re.compile(r"(layers\.\d+\.(input|post_attention)_layernorm|norm)\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.")

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of 128 * TP, so every TP rank holds an equal slice."""
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def tp_shard_dim(name: str) -> int | None:
    """The dimension a parameter is split along over TP ranks, or None when replicated."""
    if _COLUMN.search(name) or _VOCAB.search(name):
        return 0
    if _ROW.search(name):
        return 1
    if _REPLICATED.search(name):
        return None
    raise KeyError(f"unknown parameter name {name!r}: no tensor-parallel layout for it")


def is_vocab_parallel(name: str) -> bool:
    return bool(_VOCAB.search(name))


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def canonical_order(names) -> list[str]:
    """Embedding, layers by global index, final norm, head: the order files and iterations use."""
    def key(name: str):
        if name.startswith("layers."):
            return (1, int(name.split(".")[1]), name)
        return ({"embed_tokens.weight": 0, "norm.weight": 2}.get(name, 3), 0, name)
    return sorted(names, key=key)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Global layer indices held by each pipeline stage: contiguous, equal-sized."""
    if pp < 1 or num_layers % pp:
        raise ValueError(f"pipeline-parallel size {pp} must divide the number of layers {num_layers}")
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def stage_of(name: str, num_layers: int, pp: int, tie_word_embeddings: bool = False) -> list[int]:
    """Pipeline stages that hold a parameter: embeddings on the first, norm and head on the last.

    With tied embeddings the last stage also holds a copy of ``embed_tokens.weight`` for its head
    (gradients of the two copies are summed across the first and last stage, as in Megatron).
    """
    idx = layer_index(name)
    if idx is not None:
        if not 0 <= idx < num_layers:
            raise KeyError(f"{name!r}: layer {idx} outside 0..{num_layers - 1}")
        return [idx // (num_layers // pp)]
    if name == "embed_tokens.weight":
        return sorted({0, pp - 1}) if tie_word_embeddings else [0]
    if name in ("norm.weight", "lm_head.weight"):
        return [pp - 1]
    raise KeyError(f"unknown parameter name {name!r}: no pipeline stage for it")


def vocab_shard_range(vocab_size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """[start, end) of the padded vocabulary held by ``tp_rank``; rows from ``vocab_size`` on are padding."""
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tensor-parallel rank {tp_rank} outside 0..{tp - 1}")
    per = padded_vocab_size(vocab_size, tp) // tp
    return tp_rank * per, (tp_rank + 1) * per


def pad_rows(real, rows: int):
    """``real`` followed by zero rows up to ``rows`` rows (vocabulary padding); ``real`` itself when
    it already has them."""
    if real.shape[0] == rows:
        return real
    padded = real.new_zeros((rows,) + tuple(real.shape[1:]))
    padded[:real.shape[0]] = real
    return padded


def local_shape(name: str, full_shape: tuple[int, ...], vocab_size: int, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of parameter ``name`` whose full, unpadded shape is ``full_shape``:
    vocabulary rows padded to :func:`padded_vocab_size` then split, column- and row-parallel dimensions
    divided by ``tp``, replicated parameters whole. What :func:`tp_shard` returns, from shapes alone."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    shape = list(full_shape)
    dim = tp_shard_dim(name)
    if dim is None:
        return tuple(shape)
    if len(shape) <= dim:
        raise ValueError(f"{name}: a tensor of shape {tuple(shape)} has no dimension {dim} to split")
    if is_vocab_parallel(name):
        if shape[0] != vocab_size:
            raise ValueError(f"{name}: {shape[0]} rows but a vocabulary of {vocab_size}")
        shape[0] = padded_vocab_size(vocab_size, tp)
    elif shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of size {shape[dim]} is not divisible by "
                         f"the tensor-parallel size {tp}")
    shape[dim] //= tp
    return tuple(shape)


def tp_shard(name: str, full, tp: int, tp_rank: int):
    """``tp_rank``'s slice of the full (unpadded) tensor of parameter ``name`` (a view where possible).

    Vocabulary-parallel tensors are first padded with zero rows to :func:`padded_vocab_size`.
    Replicated tensors are returned whole. A dimension that does not divide is an error naming it.
    """
    dim = tp_shard_dim(name)
    if dim is None or tp == 1 and not is_vocab_parallel(name):
        return full
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tensor-parallel rank {tp_rank} outside 0..{tp - 1}")
    if full.dim() <= dim:
        raise ValueError(f"{name}: a tensor of shape {tuple(full.shape)} has no dimension {dim} to split")
    if is_vocab_parallel(name):
        start, end = vocab_shard_range(full.shape[0], tp, tp_rank)
        return pad_rows(full[start:end], end - start)
    if full.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} of size {full.shape[dim]} is not divisible by "
                         f"the tensor-parallel size {tp}")
    return full.chunk(tp, dim)[tp_rank]
