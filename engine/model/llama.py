"""Llama, written out: computes what Hugging Face ``LlamaForCausalLM`` computes, in one file.

    logits = lm_head(norm(layer_{L-1}(... layer_0(embed_tokens(ids)))))
    layer(x) = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rmsnorm(x)
             then x + down_proj(silu(gate_proj(n)) * up_proj(n)),                   n = rmsnorm(x)

Parameter names follow ``engine/parallel/layout.py`` (HF names without the ``model.`` prefix; layers
keyed by their global index, so a pipeline stage that holds layers 8..15 still calls them 8..15).

Tensor parallelism replaces the nn.Linear / nn.Embedding modules with parallel versions whose local
shapes differ (fewer heads per rank; with sequence parallelism a layer's input holds a slice of the
sequence while q/k/v come back for the full sequence). So heads, batch and sequence length are read
from the projections' outputs, never from the config or from the layer's input. The hot ops
(RMSNorm, RoPE, attention) go through the :class:`engine.ops.Ops` object the modules hold, which
chooses between the Triton kernels and PyTorch (``Llama(config, ops=Ops("auto"))``; without one,
PyTorch). No collectives here.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from engine.ops import TORCH_OPS, Ops
from engine.model.config import LlamaConfig


# ----------------------------------------------------------------------------- rotary embedding
def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with Llama-3 / linear scaling as HF computes them."""
    dim = config.head_dim
    # Explicit CPU device: the model may be built under `with torch.device("meta")`.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_context = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Holds no parameters or buffers (meta-device friendly)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.inv_freq_cpu = rope_inv_freq(config)
        self._inv_freq: dict = {}  # device -> inv_freq there (a plain attribute, not a buffer)
        self._cache: dict = {}  # (device, dtype, seq_len) -> (cos, sin) for default positions

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [b or 1, seq_len, head_dim], in ``dtype``."""
        key = (device, dtype, seq_len)
        if position_ids is None and key in self._cache:
            return self._cache[key]
        positions = torch.arange(seq_len, device=device)[None] if position_ids is None else position_ids
        if positions.dim() == 1:
            positions = positions[None]
        if positions.shape[-1] != seq_len:
            raise ValueError(f"position_ids cover {positions.shape[-1]} positions, the sequence has {seq_len}")
        if device not in self._inv_freq:
            self._inv_freq[device] = self.inv_freq_cpu.to(device)
        freqs = positions[..., None].float() * self._inv_freq[device]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        # One entry: sequence length rarely changes in training. Inference-mode tensors are not
        # cached, since autograd could not save them in a later training step.
        if position_ids is None and not torch.is_inference_mode_enabled():
            self._cache = {key: (cos, sin)}
        return cos, sin


# ----------------------------------------------------------------------------------- the blocks
class RMSNorm(nn.Module):
    # A class-level default, so that subclasses built without RMSNorm.__init__ (tensor parallelism's
    # replacement norms) compute too; Llama.set_ops gives every instance the model's object.
    ops: Ops = TORCH_OPS

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    ops: Ops = TORCH_OPS  # see RMSNorm.ops

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, h, kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        b, s, _ = q.shape  # the full sequence, even when x is a sequence-parallel slice
        q = q.view(b, s, -1, self.head_dim)  # local heads: however many this rank holds
        k = k.view(b, s, -1, self.head_dim)
        v = v.view(b, s, -1, self.head_dim)
        cos, sin = self.rotary(s, q.device, q.dtype, position_ids)
        q, k = self.ops.apply_rotary(q, k, cos, sin)
        out = self.ops.attention(q, k, v, causal=True)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), position_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class TiedHead(nn.Module):
    """Output projection by the input embedding matrix (tied embeddings). Holds no parameters, so
    tensor parallelism can swap in a vocab-parallel version without changing any parameter name."""

    def forward(self, x: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, embedding_weight)


# ------------------------------------------------------------------------------------ the model
def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding; on the meta device without its random init, whose meta version imports
    torch._dynamo (seconds and ~150 MiB per process) for values nobody reads: shapes only there."""
    weight = torch.empty(num, dim)
    return nn.Embedding(num, dim, _weight=weight) if weight.is_meta else nn.Embedding(num, dim)


class Llama(nn.Module):
    """Llama as HF ``LlamaForCausalLM``: ``model(input_ids) -> logits``.

    A pipeline stage builds only part of it: ``layer_ids`` (global indices, default all),
    ``has_embedding`` (holds the embedding; input is token ids, else hidden states) and
    ``has_head`` (holds the final norm and head; output is logits, else hidden states). With tied
    embeddings a last stage without ``has_embedding`` still holds ``embed_tokens`` for its head.

    ``ops`` computes RMSNorm, RoPE and attention (None: PyTorch, the exact reference). A model whose
    modules are replaced afterwards (tensor parallelism) takes it again with :meth:`set_ops`.
    ``activation_checkpointing = True`` recomputes each layer's activations in the backward pass.
    """

    def __init__(self, config: LlamaConfig, layer_ids: Iterable[int] | None = None,
                 has_embedding: bool = True, has_head: bool = True, ops: Ops | None = None):
        super().__init__()
        self.config = config
        self.has_embedding, self.has_head = has_embedding, has_head
        self.activation_checkpointing = False
        layer_ids = range(config.num_hidden_layers) if layer_ids is None else sorted(layer_ids)
        for i in layer_ids:
            if not 0 <= i < config.num_hidden_layers:
                raise ValueError(f"layer index {i} outside 0..{config.num_hidden_layers - 1}")
        holds_embedding = has_embedding or (has_head and config.tie_word_embeddings)
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size) if holds_embedding else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in layer_ids})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if has_head else None
        self.lm_head = None
        self.tied_head = None
        if has_head and config.tie_word_embeddings:
            self.tied_head = TiedHead()
        elif has_head:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_ops(ops)

    def set_ops(self, ops: Ops | None) -> None:
        """Point the model and every module computing a hot op at ``ops`` (None: PyTorch)."""
        ops = TORCH_OPS if ops is None else ops
        if not isinstance(ops, Ops):
            raise TypeError(f"set_ops: expected an engine.ops.Ops (e.g. Ops('auto')) or None, "
                            f"got {type(ops).__name__}")
        self.ops = ops
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention)):
                module.ops = ops

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [b, s] (or hidden states [b, s, hidden] on a later stage) -> logits [b, s, vocab]
        (or hidden states on an earlier stage). ``position_ids`` [b, s] or [s] default to 0..s-1."""
        x = self.embed_tokens(input_ids) if self.has_embedding else input_ids
        for layer in self.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, position_ids, use_reentrant=False)
            else:
                x = layer(x, position_ids)
        if not self.has_head:
            return x
        x = self.norm(x)
        if self.tied_head is not None:
            return self.tied_head(x, self.embed_tokens.weight)
        return self.lm_head(x)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill every parameter with ``init_parameter(name, full_shape, config, seed)``.

        For a model built on the meta device call ``model.to_empty(device=...)`` first. Parallel
        layouts slice the same full tensors, so every layout starts from identical weights.
        """
        expected = expected_shapes(self.config)
        for name, param in self.named_parameters():
            if tuple(param.shape) != expected[name]:
                raise ValueError(f"{name}: local shape {tuple(param.shape)} is not the full shape "
                                 f"{expected[name]}; slice init_parameter() for sharded parameters")
            param.copy_(init_parameter(name, param.shape, self.config, seed))


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Full (unsharded, unpadded) shape of every parameter of the whole model, by engine name."""
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (config.intermediate_size, h),
            p + "mlp.up_proj.weight": (config.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, config.intermediate_size),
        })
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_parameter(name: str, shape: Iterable[int], config: LlamaConfig, seed: int) -> torch.Tensor:
    """The full initial fp32 CPU tensor of parameter ``name``, a function of (seed, name) only.

    Norm weights are ones; linear and embedding weights are normal(0, initializer_range). Each rank
    of any TP/PP layout calls this with the full (unpadded) shape and keeps its slice.
    """
    shape = tuple(shape)
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return torch.ones(shape, device="cpu")
    generator = torch.Generator(device="cpu").manual_seed(_name_seed(seed, name))
    return torch.empty(shape, device="cpu").normal_(0.0, config.initializer_range, generator=generator)
