"""The Llama architecture's hyper-parameters, read from and written to Hugging Face ``config.json``.

Any ``config.json`` of the Llama family loads. Every key is classified: a field of :class:`LlamaConfig`,
known-harmless metadata (ignored), or a feature this engine does not implement (refused by name,
unless set to its neutral value). A key in none of these lists is an error naming it, because an
unknown key may change the math and silently computing something else is worse than stopping.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

# Keys that never change what the network computes: bookkeeping, tokens ids, generation defaults.
HARMLESS_HF_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "tokenizer_class", "max_sequence_length", "gradient_checkpointing", "_attn_implementation", "attn_implementation",
    "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "is_decoder", "is_encoder_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "prefix", "finetuning_task",
    "task_specific_params", "decoder_start_token_id", "sep_token_id", "bad_words_ids",
    "begin_suppress_tokens", "suppress_tokens", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "length_penalty", "max_length", "min_length", "no_repeat_ngram_size",
    "num_beam_groups", "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "temperature", "top_k", "top_p", "typical_p",
})

# Features outside plain Llama. Present with its neutral value (listed here) a key is accepted;
# with any other value it is refused, naming the key and the reason.
_NOT_SET = (None, False)
REFUSED_HF_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "attention_bias": ((None, False), "biases in the attention projections are not supported"),
    "mlp_bias": ((None, False), "biases in the MLP projections are not supported"),
    "pretraining_tp": ((None, 1), "pretraining_tp > 1 (sliced projections) is not supported"),
    "attention_dropout": ((None, 0, 0.0), "attention dropout is not supported"),
    "partial_rotary_factor": ((None, 1, 1.0), "partial rotary embeddings are not supported"),
    "sliding_window": (_NOT_SET, "sliding-window attention is not supported"),
    "use_sliding_window": (_NOT_SET, "sliding-window attention is not supported"),
    "max_window_layers": (_NOT_SET, "sliding-window attention is not supported"),
    "layer_types": (_NOT_SET, "per-layer attention types are not supported"),
    "num_local_experts": (_NOT_SET, "mixture of experts is not supported"),
    "num_experts": (_NOT_SET, "mixture of experts is not supported"),
    "num_experts_per_tok": (_NOT_SET, "mixture of experts is not supported"),
    "n_routed_experts": (_NOT_SET, "mixture of experts is not supported"),
    "n_shared_experts": (_NOT_SET, "mixture of experts is not supported"),
    "moe_intermediate_size": (_NOT_SET, "mixture of experts is not supported"),
    "router_aux_loss_coef": (_NOT_SET, "mixture of experts is not supported"),
    "output_router_logits": (_NOT_SET, "mixture of experts is not supported"),
    "quantization_config": (_NOT_SET, "quantized checkpoints are not supported"),
    "auto_map": (_NOT_SET, "custom modelling code (auto_map) is not supported"),
    "pruned_heads": ((None, {}), "pruned attention heads are not supported"),
    "qk_norm": (_NOT_SET, "query/key normalisation is not supported"),
    "use_qk_norm": (_NOT_SET, "query/key normalisation is not supported"),
    "no_rope_layers": (_NOT_SET, "layers without rotary embeddings are not supported"),
    "attn_logit_softcapping": (_NOT_SET, "attention logit soft-capping is not supported"),
    "final_logit_softcapping": (_NOT_SET, "final logit soft-capping is not supported"),
    "logits_scaling": ((None, 1, 1.0), "scaled logits are not supported"),
    "embedding_multiplier": ((None, 1, 1.0), "scaled embeddings are not supported"),
    "residual_multiplier": ((None, 1, 1.0), "scaled residuals are not supported"),
    "attention_multiplier": (_NOT_SET, "a custom attention scale is not supported"),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama model, named as in Hugging Face ``config.json``."""

    vocab_size: int = 32000
    """Number of tokens in the vocabulary (unpadded; tensor parallelism pads it separately)."""
    hidden_size: int = 4096
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Width of the SwiGLU MLP's hidden layer."""
    num_hidden_layers: int = 32
    """Number of decoder layers."""
    num_attention_heads: int = 32
    """Number of query heads."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means as many as query heads."""
    head_dim: int | None = None
    """Width of one attention head; None means hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon added to the mean square in RMSNorm."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies (10000 for Llama 2, 500000 for Llama 3)."""
    rope_scaling: dict | None = None
    """None for plain RoPE, or {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+), or
    {"rope_type": "linear", "factor"} (position interpolation)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model was trained for (metadata; also the llama3 default context)."""
    tie_word_embeddings: bool = False
    """True when the output head reuses the input embedding matrix."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    bos_token_id: int | None = 1
    """Beginning-of-sequence token id (metadata, kept for export)."""
    eos_token_id: int | list[int] | None = 2
    """End-of-sequence token id(s) (metadata, kept for export)."""
    pad_token_id: int | None = None
    """Padding token id (metadata: unlike HF's nn.Embedding(padding_idx), its embedding row still
    receives gradients)."""

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> "LlamaConfig":
        """Build from a parsed HF ``config.json``; ``source`` names it in error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (only 'llama')")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        field_names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in field_names:
                kwargs[key] = value
            elif key in REFUSED_HF_KEYS:
                neutral, reason = REFUSED_HF_KEYS[key]
                if value not in neutral:
                    raise ValueError(f"{source}: {key}={value!r}: {reason}")
            elif key in HARMLESS_HF_KEYS or key in ("hidden_act", "rope_parameters"):
                continue
            else:
                raise ValueError(
                    f"{source}: unknown field {key!r} = {value!r}; it may change the model's math, "
                    "so it is refused (supported fields: " + ", ".join(sorted(field_names)) + ")")
        for key in ("head_dim", "num_key_value_heads", "rope_theta"):
            if kwargs.get(key, 0) is None:  # HF writes null for "derive it"
                del kwargs[key]
        # transformers 5.x writes `rope_parameters` (with rope_theta inside); older files
        # `rope_theta` + `rope_scaling`; some carry rope_theta inside rope_scaling too.
        if isinstance(kwargs.get("rope_scaling"), dict) and "rope_theta" in kwargs["rope_scaling"]:
            _merge_rope_parameters(kwargs.pop("rope_scaling"), kwargs, source)
        _merge_rope_parameters(d.get("rope_parameters"), kwargs, source)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "LlamaConfig":
        """Read ``<path>/config.json``."""
        file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no config.json in the Hugging Face directory")
        try:
            with open(file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: invalid JSON: {e}") from None
        return cls.from_hf_dict(d, source=file)

    def to_hf_dict(self) -> dict:
        """A ``config.json`` that ``transformers`` (4.x and 5.x) loads as ``LlamaForCausalLM``.

        RoPE is written the classic way (``rope_theta`` + ``rope_scaling``), which both major
        versions of transformers read.
        """
        d = asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1)
        return dict(sorted(d.items()))

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


def config_differences(a: LlamaConfig, b: LlamaConfig) -> list[str]:
    """``"field: a != b"`` for every config.json field where two models differ (empty: the same model)."""
    da, db = a.to_hf_dict(), b.to_hf_dict()
    return [f"{k}: {da.get(k)!r} != {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


def _merge_rope_parameters(rope_parameters: Any, kwargs: dict, source: str) -> None:
    """Fold transformers 5.x ``rope_parameters`` ({"rope_type", "rope_theta", ...}) into kwargs."""
    if rope_parameters is None:
        return
    if not isinstance(rope_parameters, dict) or any(isinstance(v, dict) for v in rope_parameters.values()):
        raise ValueError(f"{source}: rope_parameters={rope_parameters!r}: per-layer-type RoPE is not supported")
    params = dict(rope_parameters)
    theta = params.pop("rope_theta", None)
    if theta is not None:
        if kwargs.get("rope_theta", theta) != theta:
            raise ValueError(f"{source}: rope_theta={kwargs['rope_theta']!r} disagrees with "
                             f"rope_parameters.rope_theta={theta!r}")
        kwargs["rope_theta"] = theta
    factor = params.pop("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ValueError(f"{source}: rope_parameters.partial_rotary_factor={factor!r}: "
                         "partial rotary embeddings are not supported")
    if params.get("rope_type", params.get("type", "default")) == "default" and len(params) <= 1:
        return
    previous = kwargs.get("rope_scaling")
    if previous is not None and (_normalise_rope_scaling(previous, 0) != _normalise_rope_scaling(params, 0)):
        raise ValueError(f"{source}: rope_scaling={previous!r} disagrees with rope_parameters={params!r}")
    kwargs["rope_scaling"] = params


def _normalise_rope_scaling(scaling: Any, max_position_embeddings: int) -> dict | None:
    """Validate a HF rope_scaling dict; return None for plain RoPE, else a canonical dict."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be null or an object, got {scaling!r}")
    params = dict(scaling)
    rope_type = params.pop("rope_type", None)
    legacy_type = params.pop("type", None)
    if rope_type is None:
        rope_type = legacy_type
    elif legacy_type is not None and legacy_type != rope_type:
        raise ValueError(f"rope_scaling: type={legacy_type!r} disagrees with rope_type={rope_type!r}")
    rope_type = rope_type or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    unknown = sorted(set(params) - _ROPE_KEYS[rope_type])
    if unknown:
        raise ValueError(f"rope_scaling: unknown field(s) {unknown} for rope type {rope_type!r}")
    missing = sorted(_ROPE_KEYS[rope_type] - set(params))
    if missing:
        raise ValueError(f"rope_scaling: missing field(s) {missing} for rope type {rope_type!r}")
    if rope_type == "default":
        return None
    for key, value in params.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"rope_scaling.{key} must be a positive number, got {value!r}")
    if rope_type == "llama3" and params["high_freq_factor"] <= params["low_freq_factor"]:
        raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")
    return {"rope_type": rope_type, **params}
