"""Step time of a layout: compute, tensor-parallel collectives, the pipeline's idle time and p2p,
data-parallel reduction with the overlap the engine does, the optimizer; then tokens/s and MFU.

Per microbatch and model chunk, a forward costs

    matmuls       T x FLOPs per token / TP  /  (peak x matmul_efficiency)
    memory-bound  T x elementwise bytes per token  /  (HBM bandwidth x bandwidth_efficiency)
    TP            each collective's bytes x its ring factor / (NVLink x bandwidth_efficiency) + latency

and a backward twice the matmuls and the elementwise traffic, the same collectives again, the
accumulation of every parameter's gradient into the fp32 buffer, and with recomputation one more
forward. FLOPs per token are the engine's own count (``engine.train.metrics.model_flops_per_token``);
the attention kernel's own work is its share of that count (the engine's causal kernel: half in the
forward, 3.5 x that in the backward). What is memory-bound is listed per implementation
(:class:`Implementation`) as passes over the activations.

The pipeline is the engine's own plan (``engine.train.schedules.plan_ticks``) run as an event
simulation of ``run_pipeline``: after each action a rank posts its tick's sends and receives and
goes on; a transfer ends its transfer time after both ends posted it; an action waits only for the
tensor it reads. Idle time in that simulation is the bubble (with p2p: the waits for transfers). After a rank's last backward comes the
part of its DP reduction the backward did not hide: buckets start as they fill during the last
microbatch's backward (``parallel.overlap_grad_reduce``), so what shows is the reduction time beyond
that backward, and at least the last bucket's. Then the optimizer (memory-bound over the owned
elements) and, under ZeRO-1, the all-gather of the updated parameters. Links: TP groups inside a
server (NVLink); DP and PP groups over NVLink when all their ranks share a server, over the network
otherwise, as ``engine.parallel.state.rank_layout`` places the ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from engine.model.config import LlamaConfig
from engine.parallel.layout import padded_vocab_size
from engine.parallel.state import rank_layout
from engine.plan.devices import Device
from engine.plan.memory import DTYPE_BYTES, Layout, PipelinePlans, StateBytes
from engine.train.metrics import model_flops_per_token


@dataclass(frozen=True)
class ModelShape:
    """What the time model needs of an architecture. FLOPs are forward FLOPs per token."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int
    vocab: int
    tied: bool
    layer_weight_flops: float        # the matmuls of one layer with weights
    attention_flops_per_position: float  # QK^T and PV of one layer, per position of the sequence
    head_flops: float
    layer_sharded_params: int        # per layer, split over TP
    layer_replicated_params: int     # per layer, whole on every TP rank (norms, some biases)
    extra_first_stage_params: int = 0  # replicated parameters of the embedding stage (positions)

    @classmethod
    def from_llama(cls, config: LlamaConfig, name: str = "llama") -> ModelShape:
        """The engine's Llama, its FLOPs split out of ``model_flops_per_token`` (linear in the
        number of layers and in the sequence length)."""
        def forward(layers: int, seq: int) -> float:
            return model_flops_per_token(dataclasses.replace(config, num_hidden_layers=layers), seq) / 3
        layer_1, layer_2 = forward(2, 1) - forward(1, 1), forward(2, 2) - forward(1, 2)
        attention = layer_2 - layer_1
        h, d = config.hidden_size, config.head_dim
        q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
        return cls(name, h, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
                   d, config.intermediate_size, config.vocab_size, config.tie_word_embeddings,
                   layer_weight_flops=layer_1 - attention, attention_flops_per_position=attention,
                   head_flops=forward(1, 1) - layer_1,
                   layer_sharded_params=h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size,
                   layer_replicated_params=2 * h)

    def model_flops_per_token(self, seq: int, recompute: bool = False) -> float:
        """Training FLOPs per token: 3x the forward, 4x for the layers under recomputation."""
        layers = self.layers * (self.layer_weight_flops + self.attention_flops_per_position * seq)
        return (4 if recompute else 3) * layers + 3 * self.head_flops


@dataclass(frozen=True)
class Implementation:
    """What a training code does beyond the matmuls, as the time model counts it."""
    name: str
    flash_attention: bool            # scores never in memory (a fused kernel)
    attention_forward_work: float    # attention FLOPs run in the forward / the counted forward FLOPs
    attention_backward_work: float   # ... in the backward
    grad_bytes: int                  # bytes per gradient element reduced over DP
    overlap_grad_reduce: bool        # DP buckets launched from the backward
    p2p_sliced: bool                 # stages exchange 1/TP of each activation
    optimizer_bytes: int             # HBM bytes per owned element of one optimizer step

    def layer_elementwise_bytes(self, shape: ModelShape, layout: Layout, seq: int, e: int) -> float:
        """Forward HBM bytes per token of one layer's memory-bound operations."""
        tp, h = layout.tp, shape.hidden
        q, kv = shape.heads * shape.head_dim / tp, shape.kv_heads * shape.head_dim / tp
        if self.flash_attention:
            # Engine: 2 RMSNorms (read, write) and 2 residual adds (2 reads, 1 write) on the
            # sequence-parallel region; RoPE on q and k (PyTorch: mul, rotate-half, mul, add: about
            # 8 passes); SwiGLU's silu and product (5 passes of the MLP width).
            region = 1 / tp if layout.sp else 1.0
            return e * (10 * h * region + 8 * (q + kv) + 5 * shape.mlp_width / tp)
        # Materialised attention with fused kernels (Megatron-LM 2021): 2 LayerNorms, 2 fused
        # bias-dropout-adds (+ 1-byte masks), fused bias-GeLU over 4h; the scores per head are
        # written by QK^T, read and written by softmax and by dropout (+ mask), read by PV.
        scores = shape.heads / tp * seq
        return e * (10 * h + 2 * shape.mlp_width / tp) + 2 * h + (6 * e + 1) * scores


# The engine's Triton kernel is causal (half the score tiles) and its backward runs seven matmuls
# where five are counted (benchmarks/results/kernels.md): 3.5 x its forward.
ENGINE = Implementation("ltu-engine", flash_attention=True, attention_forward_work=0.5, attention_backward_work=1.75,
                        grad_bytes=4, overlap_grad_reduce=True, p2p_sliced=False, optimizer_bytes=60)
# Megatron-LM as in its 2021 paper: fp16 gradients all-reduced after the backward (no overlap),
# scatter/gather of stage outputs over TP, apex's fused Adam.
MEGATRON_2021 = Implementation("megatron-lm-2021", flash_attention=False, attention_forward_work=1.0,
                               attention_backward_work=2.0, grad_bytes=2, overlap_grad_reduce=False,
                               p2p_sliced=True, optimizer_bytes=34)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one optimizer step, split by cause, on the rank that finishes last."""
    total: float
    compute: float        # matmuls and memory-bound kernels of every forward and backward
    tp_comm: float
    bubble: float         # idle waiting in the pipeline, less the transfers
    p2p: float            # time of the transfers the rank receives (they hide partly in its idle time)
    dp_comm: float        # DP reduction not hidden by the backward (+ ZeRO all-gather)
    optimizer: float
    tokens_per_s: float
    tflops_per_gpu: float  # model FLOPs (no recomputation) per second per GPU, in TFLOP/s
    mfu: float
    hardware_tflops_per_gpu: float  # FLOPs including recomputation, as Megatron-LM reports them


class TimeModel:
    """Step time of ``shape`` on ``device`` with ``gpus_per_node`` GPUs per server."""

    def __init__(self, shape: ModelShape, device: Device, gpus_per_node: int, seq_length: int,
                 global_batch_size: int, dtype: str = "bf16", implementation: Implementation = ENGINE,
                 plans: PipelinePlans | None = None):
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be at least 1, got {gpus_per_node}")
        self.shape, self.device, self.gpus_per_node = shape, device, gpus_per_node
        self.seq, self.gbs, self.e = seq_length, global_batch_size, DTYPE_BYTES[dtype]
        self.impl = implementation
        self.plans = plans if plans is not None else PipelinePlans()
        self._simulated: dict[tuple, tuple[list[float], list[float]]] = {}

    # ------------------------------------------------------------------------------ links
    def _spans_nodes(self, ranks: list[int]) -> bool:
        return len({r // self.gpus_per_node for r in ranks}) > 1

    def _link(self, across: bool) -> tuple[float, float]:
        """(bytes per second, latency) of a link inside a server or between servers."""
        d = self.device
        if across:
            return d.network_gbps * 1e9 * d.bandwidth_efficiency, d.network_latency_s
        return d.nvlink_gbps * 1e9 * d.bandwidth_efficiency, d.nvlink_latency_s

    def _hbm(self, nbytes: float) -> float:
        return nbytes / (self.device.hbm_gbps * 1e9 * self.device.bandwidth_efficiency)

    def _matmul(self, flops: float) -> float:
        return flops / (self.device.peak_flops * self.device.matmul_efficiency)

    def _collective(self, kind: str, nbytes: float, group: int, across: bool) -> float:
        """A ring all-reduce ("ar"), all-gather or reduce-scatter ("ag"/"rs") of ``nbytes`` (the full
        tensor) over ``group`` ranks."""
        if group == 1:
            return 0.0
        bandwidth, latency = self._link(across)
        factor = 2 * (group - 1) / group if kind == "ar" else (group - 1) / group
        return nbytes * factor / bandwidth + latency

    # ------------------------------------------------------------------------------ one chunk
    def chunk_times(self, layout: Layout, pp_rank: int, chunk: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """((forward compute, forward TP), (backward compute, backward TP)) seconds of one microbatch."""
        s, e, tp, shape = self.seq, self.e, layout.tp, self.shape
        tokens = layout.micro_batch_size * s
        region = tokens / tp if layout.sp else tokens
        stages = layout.pp * layout.virtual_stages
        stage = chunk * layout.pp + pp_rank
        layers = shape.layers // stages
        act = tokens * shape.hidden * e  # one [micro_batch, seq, hidden] activation

        def tp_collectives(count_pairs: int) -> float:
            # A pair: into the TP region and out of it; SP does an all-gather and a reduce-scatter,
            # without SP one all-reduce (forward: out of the region; backward: into it).
            if layout.sp:
                return count_pairs * (self._collective("ag", act, tp, False) + self._collective("rs", act, tp, False))
            return count_pairs * self._collective("ar", act, tp, False)

        attention = shape.attention_flops_per_position * s
        layers_mm = tokens * layers * (shape.layer_weight_flops + self.impl.attention_forward_work * attention) / tp
        layers_mem = tokens * layers * self.impl.layer_elementwise_bytes(shape, layout, s, e)
        layers_tp = tp_collectives(2 * layers)
        f_mm, f_mem, f_tp = layers_mm, layers_mem, layers_tp
        b_mm = tokens * layers * (2 * shape.layer_weight_flops + self.impl.attention_backward_work * attention) / tp
        b_mem, b_tp = 2 * layers_mem, layers_tp
        params = layers * (shape.layer_sharded_params / tp + shape.layer_replicated_params)
        vocab = padded_vocab_size(shape.vocab, tp) // tp
        if stage == 0:  # embedding: lookup (and masking under TP), its gradient scattered back
            f_mem += act * (2 if tp > 1 else 1)
            b_mem += act
            f_tp += self._collective("rs" if layout.sp else "ar", act, tp, False)
            b_tp += self._collective("ag", act, tp, False) if layout.sp else 0.0
            params += vocab * shape.hidden + shape.extra_first_stage_params
        if stage == stages - 1:  # final norm, head, fp32 vocab-parallel cross entropy
            f_mm += tokens * shape.head_flops / tp
            b_mm += 2 * tokens * shape.head_flops / tp
            f_mem += 2 * e * shape.hidden * region + tokens * vocab * (e + 36)
            b_mem += 4 * e * shape.hidden * region + tokens * vocab * (e + 12)
            f_tp += (self._collective("ag", act, tp, False) if layout.sp else 0.0) + \
                2 * self._collective("ar", tokens * 12, tp, False)
            b_tp += self._collective("rs" if layout.sp else "ar", act, tp, False)
            params += vocab * shape.hidden + shape.hidden
        b_mem += params * (2 * e + 2 * self.impl.grad_bytes)  # .grad written, added into the buffer
        if layout.recompute:
            b_mm, b_mem, b_tp = b_mm + layers_mm, b_mem + layers_mem, b_tp + layers_tp
        return ((self._matmul(f_mm) + self._hbm(f_mem), f_tp), (self._matmul(b_mm) + self._hbm(b_mem), b_tp))

    # ------------------------------------------------------------------------------ the step
    def _pipeline(self, pp: int, m: int, v: int, durations: tuple, exchange: float) -> tuple[list[float], list[float]]:
        """(finish time, seconds its received transfers take) of each rank running the plan.

        As ``run_pipeline`` runs it: after its action a rank posts the tick's sends and receives
        and goes on; a transfer completes ``exchange`` after both ends have posted it; an action
        waits only for the tensor it reads, and the step ends once every send has completed."""
        key = (pp, m, v, durations, exchange)
        if key not in self._simulated:
            plan = self.plans.arrays(pp, m, v)
            table = np.array([list(d) + [0.0] for d in durations])
            steps = np.take_along_axis(table, np.where(plan.slot < 0, table.shape[1] - 1, plan.slot), axis=1).T
            needs, needs_next = plan.needs_tick.T, plan.needs_next.T
            recv_prev, recv_next, send_next, send_prev = plan.recv_prev.T, plan.recv_next.T, plan.send_next.T, plan.send_prev.T
            ranks = np.arange(pp)
            nxt, prv = (ranks + 1) % pp, (ranks - 1) % pp
            arrival_prev, arrival_next = np.zeros(steps.shape), np.zeros(steps.shape)
            done, sends_done = np.zeros(pp), np.zeros(pp)
            for t in range(steps.shape[0]):
                need = needs[t]
                arrived = np.where(needs_next[t], arrival_next[np.maximum(need, 0), ranks],
                                   arrival_prev[np.maximum(need, 0), ranks])
                done = np.where(need >= 0, np.maximum(done, arrived), done) + steps[t]
                arrival_prev[t] = np.where(recv_prev[t], np.maximum(done, done[prv]) + exchange, 0.0)
                arrival_next[t] = np.where(recv_next[t], np.maximum(done, done[nxt]) + exchange, 0.0)
                sent = np.maximum(np.where(send_next[t], np.maximum(done, done[nxt]) + exchange, 0.0),
                                  np.where(send_prev[t], np.maximum(done, done[prv]) + exchange, 0.0))
                sends_done = np.maximum(sends_done, sent)
            finish = np.maximum(done, sends_done)
            transfers = (plan.recv_prev | plan.recv_next).sum(axis=1) * exchange
            self._simulated[key] = ([float(x) for x in finish], [float(x) for x in transfers])
        return self._simulated[key]

    def step_time(self, layout: Layout, states: list[StateBytes]) -> StepTime:
        """Seconds of one step; ``states[r]``: the model state of pipeline rank r (its buffer and
        bucket sizes, and what it owns)."""
        m = layout.microbatches(self.gbs)
        groups = rank_layout(layout.gpus, layout.tp, layout.pp)
        dp_across = any(self._spans_nodes(g) for g in groups.dp)
        pp_across = layout.pp > 1 and any(self._spans_nodes(g) for g in groups.pp)
        times = [[self.chunk_times(layout, r, c) for c in range(layout.virtual_stages)] for r in range(layout.pp)]
        tokens = layout.micro_batch_size * self.seq
        message = tokens * self.shape.hidden * self.e / (layout.tp if (layout.sp or self.impl.p2p_sliced) else 1)
        bandwidth, latency = self._link(pp_across)
        exchange = message / bandwidth + latency

        # Each rank runs every microbatch's forward and backward of each of its chunks once.
        compute = [m * sum(f[0] + b[0] for f, b in times[r]) for r in range(layout.pp)]
        tp_time = [m * sum(f[1] + b[1] for f, b in times[r]) for r in range(layout.pp)]
        if layout.pp == 1:
            finish, p2p = [compute[0] + tp_time[0]], [0.0]
        else:
            durations = tuple(tuple(c + t for f, b in chunks for c, t in (f, b)) for chunks in times)
            finish, p2p = self._pipeline(layout.pp, m, layout.virtual_stages, durations, exchange)

        # DP: reduction after (partly during) the last microbatch's backward, on each rank.
        dp_exposed = []
        for r in range(layout.pp):
            state = states[r]
            kind = "rs" if layout.distributed_optimizer else "ar"
            buckets = [self._collective(kind, n * self.impl.grad_bytes, layout.dp, dp_across)
                       for n in state.bucket_elements]
            reduce = sum(buckets)
            if self.impl.overlap_grad_reduce and buckets:
                window = sum(times[r][c][1][0] + times[r][c][1][1] for c in range(layout.virtual_stages))
                exposed = max(reduce - window, buckets[-1])
            else:
                exposed = reduce
            if layout.pp > 1 and self.shape.tied and r in (0, layout.pp - 1):
                vocab = padded_vocab_size(self.shape.vocab, layout.tp) // layout.tp
                exposed += self._collective("ar", vocab * self.shape.hidden * self.impl.grad_bytes, 2, pp_across)
            if layout.distributed_optimizer:
                exposed += self._collective("ag", state.buffer_elements * self.e, layout.dp, dp_across)
            dp_exposed.append(exposed)
        optimizer = [self._hbm(s.owned_elements * (self.impl.optimizer_bytes + self.e) + 8 * s.buffer_elements)
                     for s in states]
        end = [finish[r] + dp_exposed[r] + optimizer[r] for r in range(layout.pp)]
        last = max(range(layout.pp), key=lambda r: end[r])
        total = end[last] + 4 * self._link(True)[1]  # loss-token count, loss, norm: small collectives

        tokens_per_step = self.gbs * self.seq
        model_flops = self.shape.model_flops_per_token(self.seq) * tokens_per_step
        hardware_flops = self.shape.model_flops_per_token(self.seq, layout.recompute) * tokens_per_step
        per_gpu = model_flops / total / layout.gpus
        idle = max(0.0, finish[last] - compute[last] - tp_time[last])
        return StepTime(total=total, compute=compute[last], tp_comm=tp_time[last],
                        bubble=idle - min(idle, p2p[last]), p2p=min(idle, p2p[last]),
                        dp_comm=dp_exposed[last], optimizer=optimizer[last],
                        tokens_per_s=tokens_per_step / total, tflops_per_gpu=per_gpu / 1e12,
                        mfu=per_gpu / self.device.peak_flops,
                        hardware_tflops_per_gpu=hardware_flops / total / layout.gpus / 1e12)
