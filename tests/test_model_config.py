"""LlamaConfig from and to Hugging Face config.json: real-world files load, unsupported fields are
refused by name, and what we write transformers reads back identically."""
import json
import re

import pytest
import transformers

from engine.model.config import REFUSED_HF_KEYS, LlamaConfig

# Published config.json files of two Llama generations (transformers 4.x layout).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
# An early (transformers 4.27) Llama-1 conversion: other metadata, pad id -1.
LLAMA1_7B = {
    "architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 11008, "initializer_range": 0.02, "max_sequence_length": 2048,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "pad_token_id": -1,
    "rms_norm_eps": 1e-06, "torch_dtype": "float16", "transformers_version": "4.27.0.dev0", "use_cache": True,
    "vocab_size": 32000,
}
TINY = dict(vocab_size=203, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, model_type="llama")


def test_llama1_llama2_and_llama31_configs_load():
    c1 = LlamaConfig.from_hf_dict(LLAMA1_7B)
    assert (c1.num_key_value_heads, c1.head_dim, c1.pad_token_id, c1.rope_scaling) == (32, 128, -1, None)
    c2 = LlamaConfig.from_hf_dict(LLAMA2_7B)
    assert (c2.num_key_value_heads, c2.head_dim, c2.rope_theta, c2.rope_scaling) == (32, 128, 10000.0, None)
    assert c2.max_position_embeddings == 4096 and c2.rms_norm_eps == 1e-5
    c3 = LlamaConfig.from_hf_dict(LLAMA31_8B)
    assert (c3.num_key_value_heads, c3.head_dim, c3.rope_theta, c3.vocab_size) == (8, 128, 500000.0, 128256)
    assert c3.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert c3.eos_token_id == [128001, 128008, 128009] and c3.num_query_groups == 4


@pytest.mark.parametrize("extra", [
    {},
    {"tie_word_embeddings": True, "head_dim": 32},
    {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
])
def test_transformers_5_save_pretrained_config_loads(tmp_path, extra):
    """transformers 5.x writes `rope_parameters`; the engine reads it back to the same numbers."""
    hf = transformers.LlamaConfig(**TINY, **json.loads(json.dumps(extra)))
    hf.save_pretrained(tmp_path)
    ours = LlamaConfig.from_hf_dir(tmp_path)
    assert ours.head_dim == hf.head_dim and ours.num_key_value_heads == 2
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings == hf.tie_word_embeddings
    if hf.rope_parameters["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        expected = {k: v for k, v in hf.rope_parameters.items() if k not in ("rope_theta", "type")}
        assert ours.rope_scaling == expected


@pytest.mark.parametrize("base", [LLAMA1_7B, LLAMA2_7B, LLAMA31_8B, {**TINY, "head_dim": 32, "tie_word_embeddings": True}])
def test_to_hf_dict_round_trips_and_transformers_reads_it(base):
    ours = LlamaConfig.from_hf_dict(base)
    d = ours.to_hf_dict()
    assert LlamaConfig.from_hf_dict(json.loads(json.dumps(d))) == ours
    hf = transformers.LlamaConfig.from_dict(d)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(hf, key) == getattr(ours, key), key
    assert hf.rope_parameters["rope_theta"] == ours.rope_theta
    assert hf.rope_parameters["rope_type"] == (ours.rope_scaling or {"rope_type": "default"})["rope_type"]


def test_harmless_metadata_and_neutral_values_are_accepted():
    d = {**TINY, "torch_dtype": "bfloat16", "dtype": "bfloat16", "_name_or_path": "x", "use_cache": False,
         "pad_token_id": 0, "sliding_window": None, "attention_bias": False, "mlp_bias": False,
         "pretraining_tp": 1, "attention_dropout": 0.0, "num_local_experts": None, "quantization_config": None,
         "rope_scaling": {"rope_type": "default"}, "head_dim": None, "num_key_value_heads": None}
    c = LlamaConfig.from_hf_dict(d)
    assert c.rope_scaling is None and c.pad_token_id == 0 and c.head_dim == 16 and c.num_key_value_heads == 4


REFUSED = [
    ("attention_bias", {"attention_bias": True}),
    ("mlp_bias", {"mlp_bias": True}),
    ("hidden_act", {"hidden_act": "gelu"}),
    ("model_type", {"model_type": "mistral"}),
    ("pretraining_tp", {"pretraining_tp": 2}),
    ("sliding_window", {"sliding_window": 4096}),
    ("use_sliding_window", {"use_sliding_window": True}),
    ("num_local_experts", {"num_local_experts": 8}),
    ("num_experts", {"num_experts": 4}),
    ("num_experts_per_tok", {"num_experts_per_tok": 2}),
    ("attention_dropout", {"attention_dropout": 0.1}),
    ("quantization_config", {"quantization_config": {"quant_method": "gptq"}}),
    ("partial_rotary_factor", {"partial_rotary_factor": 0.5}),
    ("auto_map", {"auto_map": {"AutoModel": "custom.Model"}}),
    ("'yarn'", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ("'dynamic'", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
    ("'longrope'", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}),
    ("beta_fast", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "beta_fast": 32}}),
    ("low_freq_factor", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}),
    ("per-layer-type", {"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
    ("rope_theta", {"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}),
    ("logit_scale_magic", {"logit_scale_magic": 3.0}),
]


@pytest.mark.parametrize("field,extra", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_fields_are_refused_by_name(field, extra, tmp_path):
    with pytest.raises(ValueError, match=re.escape(field)):
        LlamaConfig.from_hf_dict({**TINY, **extra})
    # From a directory the message also names the file.
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **extra}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):
        LlamaConfig.from_hf_dir(tmp_path)


def test_every_refused_key_is_refused_with_a_non_neutral_value():
    for key in REFUSED_HF_KEYS:
        with pytest.raises(ValueError, match=re.escape(key)):
            LlamaConfig.from_hf_dict({**TINY, key: 123456})


@pytest.mark.parametrize("field,kwargs", [
    ("num_key_value_heads", dict(num_key_value_heads=3)),
    ("head_dim", dict(head_dim=15)),
    ("vocab_size", dict(vocab_size=0)),
    ("hidden_size", dict(hidden_size=-64)),
    ("rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("factor", dict(rope_scaling={"rope_type": "linear", "factor": -1.0})),
    ("high_freq_factor", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                            "high_freq_factor": 1.0})),
])
def test_invalid_values_are_errors_naming_the_field(field, kwargs):
    d = {k: v for k, v in TINY.items() if k != "model_type"}
    with pytest.raises(ValueError, match=re.escape(field)):
        LlamaConfig(**{**d, **kwargs})


def test_llama3_original_context_defaults_to_max_positions():
    c = LlamaConfig.from_hf_dict({**TINY, "max_position_embeddings": 512, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert c.rope_scaling["original_max_position_embeddings"] == 512


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        LlamaConfig.from_hf_dir(tmp_path)
