"""Bytes per GPU of a layout, by the rules the engine allocates with.

Model state (exact). A rank's parameters are laid out by :func:`engine.train.grads.bucket_layout`
over the names and local shapes its model chunks would register (the chunks are built on the meta
device, in the order :class:`engine.parallel.layout.PipelineLayout` gives them, and cut by
:func:`engine.parallel.layout.local_shape`), so the planner counts exactly what ``GradBuffer`` and
``MixedPrecisionAdamW`` allocate:

    parameters   buffer elements x dtype bytes (bf16 2, fp32 4); padding of each bucket to DP included
    gradients    buffer elements x 4 (fp32, whatever the model dtype)
    optimizer    owned elements x 12: fp32 master, exp_avg and exp_avg_sq of the pieces this DP rank
                 owns (all of the buffer without ZeRO-1, 1/DP of every bucket with it); the master
                 exists in fp32 runs too. AdamW's step counters (one fp32 scalar per piece) live on
                 the host and are counted apart.

Activations (by analysis of what autograd keeps, checked against measured runs). Per microbatch of
``T = micro_batch x seq`` tokens, a decoder layer keeps, with e the dtype's bytes, h the hidden size,
q / kv the local query and key/value widths (heads / TP x head_dim), I the local MLP width and
``T_sp`` the tokens of the sequence-parallel region (T / TP under SP, else T):

    each RMSNorm   T_sp x (stat + 4 + normed) + T x e h     stat: its fp32 input (PyTorch ops) or
                                                            its input (kernel); normed: e h (PyTorch)
                                                            or 0 (kernel); + the output the next
                                                            linears save (gathered: T tokens)
    attention      T x (e (2 q + 2 kv) + 4 heads/TP)        rotated q, k, v, output; fp32 log-sum-exp
    MLP            T x 4 e I                                gate, silu(gate), up, their product

and, with recomputation, only its input (T_sp x e h). The embedding stage adds its local token ids
(8 T, plus a 1-byte mask under TP), the head stage its final norm, the fp32 softmax of its vocabulary
slice (4 T V/TP), targets, masks and loss mask (14 T); a stage after the first holds the activation
it received (T_sp x e h) unless the first layer already keeps it. Each layer's rotary tables (cos
and sin, s x head_dim each) are a cache that stays. How many microbatches a rank holds at once
comes from the engine's own schedule tables (``engine.train.schedules``): the order is walked,
forward passes adding their chunk's bytes and backward passes releasing them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.model.config import LlamaConfig
from engine.model.llama import Llama, expected_shapes
from engine.parallel.layout import PipelineLayout, local_shape, padded_vocab_size
from engine.train.grads import bucket_layout, owned_param_pieces
from engine.train.schedules import Tick, interleaved_order, one_f_one_b_order, plan_ticks

DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPS = ("kernels", "torch")  # Triton RMSNorm / flash attention on CUDA, or PyTorch's ops
GRAD_BYTES = 4               # GradBuffer's fp32 gradients
OPTIMIZER_BYTES = 12         # fp32 master + exp_avg + exp_avg_sq per owned element
STEP_COUNTER_BYTES = 4       # torch AdamW's fp32 step scalar per piece, on the host


@dataclass(frozen=True)
class Layout:
    """One way to run a step: the parallel sizes and the options that change memory and time."""
    tp: int
    pp: int
    dp: int
    virtual_stages: int = 1
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (it does nothing at TP 1)."""
        return self.sequence_parallel and self.tp > 1

    def describe(self) -> str:
        parts = [f"tp {self.tp}", f"pp {self.pp}", f"dp {self.dp}"]
        if self.virtual_stages > 1:
            parts.append(f"vp {self.virtual_stages}")
        parts.append(f"mb {self.micro_batch_size}")
        parts += [name for name, on in (("sp", self.sp), ("zero1", self.distributed_optimizer),
                                        ("recompute", self.recompute)) if on]
        return " ".join(parts)


@dataclass(frozen=True)
class Workload:
    """What a step processes and in what numerics."""
    seq_length: int
    global_batch_size: int
    dtype: str = "bf16"
    ops: str = "kernels"
    bucket_size: int = 40_000_000

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.ops not in OPS:
            raise ValueError(f"ops must be one of {OPS}, got {self.ops!r}")
        for name in ("seq_length", "global_batch_size", "bucket_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class StateBytes:
    """Model state of one rank: what GradBuffer and MixedPrecisionAdamW allocate."""
    buffer_elements: int   # parameters (with bucket padding) in the flat buffers
    owned_elements: int    # elements whose optimizer state this rank keeps
    pieces: int            # (parameter, owned range) pieces: one AdamW step counter each
    params: int
    grads: int
    optimizer: int
    bucket_elements: tuple[int, ...]  # each bucket's size, in the order the backward fills them
    largest_param: int     # elements of the largest local parameter (its .grad lives briefly)

    @property
    def host_step_counters(self) -> int:
        return STEP_COUNTER_BYTES * self.pieces

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class ChunkActivations:
    """Bytes one microbatch leaves held on one model chunk until its backward."""
    layers: int
    per_layer: int
    embedding: int
    head: int
    received_input: int

    @property
    def total(self) -> int:
        return self.layers * self.per_layer + self.embedding + self.head + self.received_input


@dataclass(frozen=True)
class RankMemory:
    """Everything the planner counts on one rank, in bytes."""
    pp_rank: int
    state: StateBytes
    activations: int       # peak of the held activations over the schedule
    in_flight: int         # most (microbatch, chunk) pairs held at once
    rotary_tables: int
    working: int           # transient: recomputed layer, loss buffers, a parameter's .grad, p2p

    @property
    def total(self) -> int:
        return self.state.total + self.activations + self.rotary_tables + self.working


class PipelinePlans:
    """The engine's pipeline plans (``engine.train.schedules.plan_ticks`` over every
    rank's 1F1B or interleaved table), computed once per (pp, microbatches, virtual stages)."""

    def __init__(self):
        self._ticks: dict[tuple, object] = {}

    def ticks(self, pp: int, microbatches: int, virtual_stages: int) -> list[list[Tick]]:
        key = (pp, microbatches, virtual_stages)
        if key not in self._ticks:
            if virtual_stages == 1:
                orders = [one_f_one_b_order(pp, r, microbatches) for r in range(pp)]
            else:
                orders = [interleaved_order(pp, r, microbatches, virtual_stages) for r in range(pp)]
            self._ticks[key] = plan_ticks(orders, virtual_stages)
        return self._ticks[key]

    def arrays(self, pp: int, microbatches: int, virtual_stages: int) -> PlanArrays:
        """The plan as arrays [pp, ticks] (see :class:`PlanArrays`)."""
        key = ("arrays", pp, microbatches, virtual_stages)
        if key not in self._ticks:
            ticks = self.ticks(pp, microbatches, virtual_stages)
            length = max(map(len, ticks))
            slot, needs_tick = (np.full((pp, length), -1, dtype=np.int64) for _ in range(2))
            needs_next, send_next, send_prev, recv_prev, recv_next = (
                np.zeros((pp, length), dtype=bool) for _ in range(5))
            for r, rank_ticks in enumerate(ticks):
                received_at = {}  # consumer action -> (tick of its exchange, from the next rank)
                for t, tick in enumerate(rank_ticks):
                    if tick.recv_prev is not None:
                        received_at[tick.recv_prev] = (t, False)
                    if tick.recv_next is not None:
                        received_at[tick.recv_next] = (t, True)
                for t, tick in enumerate(rank_ticks):
                    a = tick.action
                    if a is not None:
                        slot[r, t] = 2 * a.chunk + (0 if a.kind == "F" else 1)
                        if a in received_at:
                            needs_tick[r, t], needs_next[r, t] = received_at[a]
                    send_next[r, t], send_prev[r, t] = tick.send == "next", tick.send == "prev"
                    recv_prev[r, t], recv_next[r, t] = tick.recv_prev is not None, tick.recv_next is not None
            self._ticks[key] = PlanArrays(slot, needs_tick, needs_next, send_next, send_prev, recv_prev, recv_next)
        return self._ticks[key]


@dataclass(frozen=True)
class PlanArrays:
    """A pipeline plan as arrays [pp, ticks]. ``slot``: 2 x chunk + (0 forward, 1 backward), -1 when
    idle; ``needs_tick``: the tick whose exchange brought the tensor the action reads (-1: none),
    ``needs_next``: from the next rank (a gradient) rather than the previous (an activation); then
    what each tick's exchange sends and receives."""
    slot: np.ndarray
    needs_tick: np.ndarray
    needs_next: np.ndarray
    send_next: np.ndarray
    send_prev: np.ndarray
    recv_prev: np.ndarray
    recv_next: np.ndarray


class MemoryModel:
    """Per-rank bytes of ``config`` under any layout; parameter orders are built once per pipeline."""

    def __init__(self, config: LlamaConfig, workload: Workload, plans: PipelinePlans | None = None):
        self.config, self.workload = config, workload
        self.plans = plans if plans is not None else PipelinePlans()
        self.full_shapes = expected_shapes(config)
        self._orders: dict[tuple[int, int, int], list[str]] = {}
        self._states: dict[tuple, StateBytes] = {}

    # ------------------------------------------------------------------------------ model state
    def pipeline(self, layout: Layout) -> PipelineLayout:
        return PipelineLayout(self.config.num_hidden_layers, layout.pp, layout.virtual_stages,
                              self.config.tie_word_embeddings)

    def parameter_order(self, layout: Layout, pp_rank: int) -> list[str]:
        """Names of the parameters rank ``pp_rank``'s chunks register, in registration order (what
        GradBuffer reverses into its backward order)."""
        key = (layout.pp, layout.virtual_stages, pp_rank)
        if key not in self._orders:
            pipeline = self.pipeline(layout)
            names: list[str] = []
            with torch.device("meta"):
                for chunk in range(layout.virtual_stages):
                    model = Llama(self.config, **pipeline.chunk_spec(pp_rank, chunk))
                    names += [n for n, _ in model.named_parameters() if n not in names]
            self._orders[key] = names
        return self._orders[key]

    def state_bytes(self, layout: Layout, pp_rank: int, dp_rank: int = 0) -> StateBytes:
        """Parameter, gradient and optimizer bytes of (``pp_rank``, ``dp_rank``), any TP rank."""
        key = (layout.tp, layout.pp, layout.dp, layout.virtual_stages, layout.distributed_optimizer, pp_rank, dp_rank)
        if key not in self._states:
            self._states[key] = self._state_bytes(layout, pp_rank, dp_rank)
        return self._states[key]

    def _state_bytes(self, layout: Layout, pp_rank: int, dp_rank: int) -> StateBytes:
        config, w = self.config, self.workload
        named = [(name, math.prod(local_shape(name, self.full_shapes[name], config.vocab_size, layout.tp)))
                 for name in self.parameter_order(layout, pp_rank)]
        tied = "embed_tokens.weight" if layout.pp > 1 and config.tie_word_embeddings else None
        spans = bucket_layout(named, layout.dp, w.bucket_size, tied)
        pieces = owned_param_pieces(spans, layout.dp, dp_rank, layout.distributed_optimizer)
        elements = spans[-1].end
        owned = sum(end - start for _, start, end in pieces)
        return StateBytes(buffer_elements=elements, owned_elements=owned, pieces=len(pieces),
                          params=elements * w.element_bytes, grads=elements * GRAD_BYTES,
                          optimizer=owned * OPTIMIZER_BYTES,
                          bucket_elements=tuple(s.end - s.start for s in spans),
                          largest_param=max(n for _, n in named))

    # ------------------------------------------------------------------------------ activations
    def _widths(self, layout: Layout) -> dict[str, int]:
        c = self.config
        return {"h": c.hidden_size, "q": c.num_attention_heads * c.head_dim // layout.tp,
                "kv": c.num_key_value_heads * c.head_dim // layout.tp, "heads": c.num_attention_heads // layout.tp,
                "mlp": c.intermediate_size // layout.tp,
                "vocab": padded_vocab_size(c.vocab_size, layout.tp) // layout.tp}

    def _tokens(self, layout: Layout) -> tuple[int, int]:
        tokens = layout.micro_batch_size * self.workload.seq_length
        return tokens, tokens // layout.tp if layout.sp else tokens

    def _norm(self, layout: Layout) -> int:
        """Bytes an RMSNorm and the linears reading it keep per microbatch."""
        e, (tokens, region), h = self.workload.element_bytes, self._tokens(layout), self.config.hidden_size
        if self.workload.ops == "torch":
            per_token = 4 * h + 4 + e * h      # fp32 input (x itself in fp32), rstd, normed
        else:
            per_token = e * h + 4              # input, rstd
        return region * per_token + tokens * e * h

    def layer_bytes(self, layout: Layout) -> int:
        """Held bytes of one decoder layer for one microbatch."""
        e, (tokens, region), w = self.workload.element_bytes, self._tokens(layout), self._widths(layout)
        if layout.recompute:
            return region * e * w["h"]
        attention = tokens * (e * (2 * w["q"] + 2 * w["kv"]) + 4 * w["heads"])
        return 2 * self._norm(layout) + attention + tokens * 4 * e * w["mlp"]

    def chunk_activations(self, layout: Layout, pp_rank: int, chunk: int) -> ChunkActivations:
        pipeline = self.pipeline(layout)
        e, (tokens, region), w = self.workload.element_bytes, self._tokens(layout), self._widths(layout)
        first = pipeline.holds_embedding(pp_rank, chunk)
        embedding = tokens * (8 + (1 if layout.tp > 1 else 0)) if first else 0
        head = self._norm(layout) + tokens * (4 * w["vocab"] + 14) if pipeline.holds_head(pp_rank, chunk) else 0
        # A received activation is kept for its gradient; the first layer keeps it anyway when its
        # norm saves its input (the kernel, fp32 PyTorch ops) or when it is the checkpoint's input.
        keeps_input = layout.recompute or self.workload.ops == "kernels" or self.workload.element_bytes == 4
        received = 0 if first or keeps_input else region * e * w["h"]
        return ChunkActivations(layers=pipeline.layers_per_chunk, per_layer=self.layer_bytes(layout),
                                embedding=embedding, head=head, received_input=received)

    def peak_activations(self, layout: Layout, pp_rank: int) -> tuple[int, int]:
        """(peak held bytes, most microbatch-chunks held) over the rank's part of the engine's plan.

        Tick by tick as ``run_pipeline`` runs it: a forward adds its chunk's bytes, a backward
        releases them, and an activation received for a later forward is held from the exchange
        that posts its receive (the chunk's bytes include it once its forward has run)."""
        m = layout.microbatches(self.workload.global_batch_size)
        chunks = [self.chunk_activations(layout, pp_rank, c) for c in range(layout.virtual_stages)]
        if layout.pp == 1:
            return chunks[0].total, 1
        e, (_, region) = self.workload.element_bytes, self._tokens(layout)
        received = region * e * self.config.hidden_size
        plan = self.plans.arrays(layout.pp, m, layout.virtual_stages)
        slot, recv = plan.slot[pp_rank], plan.recv_prev[pp_rank]
        active = slot >= 0
        chunk, backward = np.where(active, slot // 2, 0), slot % 2 == 1
        # A stage's received input is part of its chunk's bytes once its forward ran; its backward
        # gives the buffer back before the tick's exchange posts the next receive.
        own = np.where(chunk * layout.pp + pp_rank == 0, 0, received)
        totals = np.array([c.total for c in chunks])[chunk]
        action = np.where(active, np.where(backward, -totals, totals - own), 0)
        deltas = np.stack([action, np.where(recv, received, 0)], axis=1)
        count = np.cumsum(np.where(active, np.where(backward, -1, 1), 0))
        return int(max(0, np.cumsum(deltas.reshape(-1)).max())), int(count.max())

    def rotary_bytes(self, layout: Layout) -> int:
        layers = self.pipeline(layout).layers_per_chunk * layout.virtual_stages
        return layers * 2 * self.workload.seq_length * self.config.head_dim * self.workload.element_bytes

    def working_bytes(self, layout: Layout, pp_rank: int, state: StateBytes) -> int:
        """Transient memory at the busiest moment: a recomputed layer during its backward, the head's
        logits and their fp32 copy, one parameter's gradient before it joins the buffer, and on a
        pipeline stage a received gradient and an output whose send has not completed."""
        e, (tokens, region), w = self.workload.element_bytes, self._tokens(layout), self._widths(layout)
        pipeline = self.pipeline(layout)
        working = state.largest_param * e
        if layout.recompute:
            working += self.layer_bytes(replace(layout, recompute=False))
        if pipeline.holds_head(pp_rank, layout.virtual_stages - 1):
            working += tokens * w["vocab"] * (e + (4 if e != 4 else 0))
        if layout.pp > 1:
            working += 2 * region * e * w["h"]
        return working

    def rank_memory(self, layout: Layout, pp_rank: int, dp_rank: int = 0) -> RankMemory:
        state = self.state_bytes(layout, pp_rank, dp_rank)
        peak, in_flight = self.peak_activations(layout, pp_rank)
        return RankMemory(pp_rank, state, peak, in_flight, self.rotary_bytes(layout),
                          self.working_bytes(layout, pp_rank, state))

    def worst_rank(self, layout: Layout) -> RankMemory:
        """The pipeline rank needing the most memory (DP rank 0, which owns no fewer elements)."""
        return max((self.rank_memory(layout, r) for r in range(layout.pp)), key=lambda m: m.total)
