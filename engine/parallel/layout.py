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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PipelineLayout:
    """Which pipeline rank and model chunk holds each layer: the one pipeline table.

    Layers are split evenly over ``pp`` ranks and, with ``virtual_stages`` v > 1, into v chunks per
    rank in the interleaved order: with P ranks, chunk c of rank p holds ``L/(P*v)`` layers starting
    at ``c*L/v + p*L/(P*v)``, so the virtual stages 0..P*v-1 run rank 0 chunk 0, rank 1 chunk 0, ...,
    rank P-1 chunk 0, rank 0 chunk 1, ... The first virtual stage (rank 0, chunk 0) holds the
    embedding, the last (rank P-1, chunk v-1) the final norm and the head, and with tied embeddings a
    copy of the embedding for the head (its gradient is summed with the first stage's).

    Model builders (:meth:`chunk_spec`), checkpoints (:meth:`ranks_of`, :meth:`rank_names`) and the
    converters read the placement from here only; checkpoint.json records :meth:`to_dict`.
    """

    num_layers: int
    pp: int = 1
    virtual_stages: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for what, value in (("number of layers", self.num_layers), ("pipeline-parallel size", self.pp),
                            ("parallel.virtual_stages", self.virtual_stages)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        if self.num_layers % self.pp:
            raise ValueError(f"pipeline-parallel size {self.pp} does not divide the number of layers "
                             f"(num_hidden_layers={self.num_layers})")
        if self.virtual_stages > 1 and self.pp == 1:
            raise ValueError(f"parallel.virtual_stages {self.virtual_stages} needs pipeline parallelism "
                             "(parallel.pp >= 2): interleaving splits each pipeline rank's layers")
        if self.num_layers % (self.pp * self.virtual_stages):
            raise ValueError(f"parallel.virtual_stages {self.virtual_stages} x pipeline-parallel size "
                             f"{self.pp} does not divide the number of layers "
                             f"(num_hidden_layers={self.num_layers})")

    @property
    def layers_per_chunk(self) -> int:
        return self.num_layers // (self.pp * self.virtual_stages)

    @property
    def num_virtual_stages(self) -> int:
        return self.pp * self.virtual_stages

    def _check_place(self, pp_rank: int, chunk: int) -> None:
        if not (0 <= pp_rank < self.pp and 0 <= chunk < self.virtual_stages):
            raise ValueError(f"(pipeline rank {pp_rank}, chunk {chunk}) outside the layout of "
                             f"{self.pp} rank(s) x {self.virtual_stages} chunk(s)")

    def chunk_layers(self, pp_rank: int, chunk: int = 0) -> range:
        """Global indices of the layers of ``chunk`` on pipeline rank ``pp_rank``."""
        self._check_place(pp_rank, chunk)
        start = (chunk * self.pp + pp_rank) * self.layers_per_chunk
        return range(start, start + self.layers_per_chunk)

    def rank_layers(self, pp_rank: int) -> list[int]:
        """Every layer pipeline rank ``pp_rank`` holds, over all its chunks, ascending."""
        return [i for c in range(self.virtual_stages) for i in self.chunk_layers(pp_rank, c)]

    def layer_place(self, layer: int) -> tuple[int, int]:
        """(pipeline rank, chunk) holding global layer ``layer``."""
        if not 0 <= layer < self.num_layers:
            raise KeyError(f"layer {layer} outside 0..{self.num_layers - 1}")
        stage = layer // self.layers_per_chunk  # virtual stage
        return stage % self.pp, stage // self.pp

    def holds_embedding(self, pp_rank: int, chunk: int = 0) -> bool:
        return pp_rank == 0 and chunk == 0

    def holds_head(self, pp_rank: int, chunk: int = 0) -> bool:
        return pp_rank == self.pp - 1 and chunk == self.virtual_stages - 1

    def chunk_spec(self, pp_rank: int, chunk: int = 0) -> dict:
        """Keyword arguments of :class:`engine.model.llama.Llama` that build this chunk."""
        return {"layer_ids": self.chunk_layers(pp_rank, chunk),
                "has_embedding": self.holds_embedding(pp_rank, chunk),
                "has_head": self.holds_head(pp_rank, chunk)}

    def ranks_of(self, name: str) -> list[int]:
        """Pipeline ranks that hold parameter ``name``: layers where the table puts them, the
        embedding on the first rank (and the last too with tied embeddings), norm and head on the last."""
        idx = layer_index(name)
        if idx is not None:
            return [self.layer_place(idx)[0]]
        if name == "embed_tokens.weight":
            return sorted({0, self.pp - 1}) if self.tie_word_embeddings else [0]
        if name in ("norm.weight", "lm_head.weight"):
            return [self.pp - 1]
        raise KeyError(f"unknown parameter name {name!r}: no pipeline stage for it")

    def rank_names(self, names, pp_rank: int) -> list[str]:
        """Those of ``names`` that pipeline rank ``pp_rank`` holds, in canonical order."""
        return [n for n in canonical_order(names) if pp_rank in self.ranks_of(n)]

    def is_tied_copy(self, name: str, pp_rank: int) -> bool:
        """True for the head's copy of a tied embedding on the last rank (PP > 1): the same tensor
        as the first rank's, so norms and checkpoints count it once."""
        return name == "embed_tokens.weight" and self.tie_word_embeddings and self.pp > 1 and pp_rank == self.pp - 1

    def to_dict(self) -> dict:
        """What checkpoint.json records: sizes and, per global layer, its [pipeline rank, chunk]."""
        return {"pp": self.pp, "virtual_stages": self.virtual_stages,
                "layers": [list(self.layer_place(i)) for i in range(self.num_layers)]}

    @classmethod
    def from_dict(cls, record, num_layers: int, tie_word_embeddings: bool) -> "PipelineLayout":
        """The layout a checkpoint recorded, refused by name when its placement is not this table's."""
        if not isinstance(record, dict):
            raise ValueError(f"pipeline layout must be a mapping, got {record!r}")
        try:
            layout = cls(num_layers, int(record["pp"]), int(record.get("virtual_stages", 1)), tie_word_embeddings)
        except KeyError as e:
            raise ValueError(f"pipeline layout: missing field {e}") from None
        if "layers" in record and record["layers"] != layout.to_dict()["layers"]:
            raise ValueError(f"pipeline layout: the recorded placement of layers {record['layers']!r} is not "
                             f"the even interleaved split of {num_layers} layers over pp {layout.pp} x "
                             f"virtual_stages {layout.virtual_stages}")
        return layout


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
