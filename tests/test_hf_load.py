"""Reading Hugging Face directories written by transformers' save_pretrained: load_hf_model gives
transformers' logits; broken directories (missing, mis-shaped, unexpected tensors, broken shard index)
are errors naming the tensor or file."""
import json
import os
import re
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from engine.model.hf import (INDEX_FILE, SINGLE_FILE, engine_to_hf_name, hf_to_engine_name, hf_weight_files,
                               iter_hf_rank_shards, iter_hf_tensors, load_hf_model)
from engine.model.config import LlamaConfig
from engine.model.llama import expected_shapes
from test_checkpoint import ref_shard, ref_stage_names

TINY = dict(vocab_size=250, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
VARIANTS = {
    "untied_llama2": dict(TINY),
    "tied_mha": dict(TINY, num_key_value_heads=4, tie_word_embeddings=True, vocab_size=203),
    "llama3_kv1": dict(TINY, num_key_value_heads=1, rope_theta=500000.0, max_position_embeddings=1024,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
}


def hf_model(kwargs, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**json.loads(json.dumps(kwargs)), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (transformers model, single-file dir, sharded dir)."""
    out = {}
    for name, kwargs in VARIANTS.items():
        model = hf_model(kwargs)
        single = tmp_path_factory.mktemp(name + "_single")
        model.save_pretrained(single, safe_serialization=True)
        sharded = tmp_path_factory.mktemp(name + "_sharded")
        model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
        out[name] = (model, single, sharded)
    return out


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_hf_model_gives_transformers_logits(saved, variant, layout):
    hf, single, sharded = saved[variant]
    directory = single if layout == "single" else sharded
    if layout == "sharded":
        shards = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
        assert os.path.isfile(directory / INDEX_FILE) and len(shards) > 2
    else:
        assert os.path.isfile(directory / SINGLE_FILE)
    model = load_hf_model(directory)
    assert not model.training
    ids = torch.randint(0, hf.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
        expected = hf(ids).logits
    assert logits.shape == (3, 21, hf.config.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_load_hf_model_in_bfloat16(saved):
    hf, single, _ = saved["untied_llama2"]
    model = load_hf_model(single, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.layers["1"].mlp.up_proj.weight,
                       hf.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), hf(ids).logits, rtol=0.1, atol=0.1)
    # Against transformers itself in bfloat16 (its SDPA attention, as the engine's CPU path): the same
    # operations in the same order and dtypes, so the same bits. The fp32 comparison above only
    # bounds the bf16 rounding; this one catches a wrong cast order (norm, rotary, head) in bf16.
    hf_bf16 = transformers.LlamaForCausalLM.from_pretrained(
        single, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(logits, hf_bf16(ids).logits)


def test_iter_hf_tensors_streams_every_tensor_once(saved):
    hf, _, sharded = saved["untied_llama2"]
    reference = hf.state_dict()
    seen = {}
    for name, tensor in iter_hf_tensors(sharded):
        assert name not in seen
        seen[name] = tensor
    assert seen.keys() == reference.keys()
    for name, tensor in seen.items():
        assert torch.equal(tensor, reference[name]), name


def test_names_and_shapes(saved):
    hf, single, _ = saved["untied_llama2"]
    config = LlamaConfig.from_hf_dir(single)
    shapes = expected_shapes(config)
    assert {engine_to_hf_name(n): s for n, s in shapes.items()} == \
        {n: tuple(t.shape) for n, t in hf.state_dict().items()}
    for name in hf.state_dict():
        assert engine_to_hf_name(hf_to_engine_name(name)) == name
    assert hf_to_engine_name("lm_head.weight") == "lm_head.weight"
    assert hf_to_engine_name("model.norm.weight") == "norm.weight"
    with pytest.raises(ValueError, match="transformer.wte.weight"):
        hf_to_engine_name("transformer.wte.weight")
    tied = LlamaConfig.from_hf_dir(saved["tied_mha"][1])
    assert "lm_head.weight" not in expected_shapes(tied)


@pytest.mark.parametrize("variant,layout", [("untied_llama2", "sharded"), ("tied_mha", "single")])
def test_rank_shards_of_a_hf_directory_equal_slicing_its_tensors(saved, variant, layout):
    hf, single, sharded = saved[variant]
    directory = single if layout == "single" else sharded
    config = LlamaConfig.from_hf_dir(directory)
    reference = {hf_to_engine_name(n): t for n, t in hf.state_dict().items()}
    for tp, pp in [(2, 2), (1, 1)]:
        for t in range(tp):
            for p in range(pp):
                shards = dict(iter_hf_rank_shards(directory, config, tp, t, pp, p))
                assert set(shards) == ref_stage_names(config, pp, p)
                for n, v in shards.items():
                    assert torch.equal(v, ref_shard(n, reference[n], config.vocab_size, tp, t)), (tp, pp, t, p, n)
    other = LlamaConfig.from_hf_dict({**config.to_hf_dict(), "num_hidden_layers": 4})
    with pytest.raises(ValueError, match="weights of another model; config differs: num_hidden_layers: 2 != 4"):
        next(iter_hf_rank_shards(directory, other, 1, 0))
    with pytest.raises(ValueError, match="tensor-parallel size 8 does not divide the number of attention heads"):
        next(iter_hf_rank_shards(directory, config, 8, 0))


def rewrite_single(directory, edit):
    """Apply edit(dict of tensors) to model.safetensors in place."""
    path = os.path.join(directory, SINGLE_FILE)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), "model.layers.1.self_attn.k_proj.weight"),
    (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(160, 63)}),
     "model.layers.0.mlp.up_proj.weight"),
    (lambda t: t.update({"model.embed_tokens.weight": torch.zeros(251, 64)}), "model.embed_tokens.weight"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(160, 64)}),
     "model.layers.2.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "model.layers.0.self_attn.q_proj.bias"),
    (lambda t: t.update({"score.weight": torch.zeros(2, 64)}), "score.weight"),
])
def test_broken_tensors_are_named(saved, tmp_path, edit, expected):
    directory = copy_dir(saved["untied_llama2"][1], tmp_path / "hf")
    rewrite_single(directory, edit)
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_hf_model(directory)


def test_tied_checkpoint_with_or_without_lm_head(saved, tmp_path):
    hf, single, _ = saved["tied_mha"]
    with safe_open(os.path.join(single, SINGLE_FILE), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers omits the tied copy
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = hf(ids).logits
    with_head = copy_dir(single, tmp_path / "with_head")
    rewrite_single(with_head, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(with_head)(ids), expected, rtol=1e-5, atol=1e-5)
    differing = copy_dir(single, tmp_path / "differing")
    rewrite_single(differing, lambda t: t.update({"lm_head.weight": torch.zeros_like(t["model.embed_tokens.weight"])}))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf_model(differing)


def test_old_rotary_buffers_are_ignored(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][1], tmp_path / "hf")
    rewrite_single(directory, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in dict(iter_hf_tensors(directory))
    load_hf_model(directory)


def _index(directory):
    with open(directory / INDEX_FILE) as f:
        return json.load(f)


def test_missing_shard_file_is_named(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][2], tmp_path / "hf")
    shard = sorted(set(_index(directory)["weight_map"].values()))[1]
    os.remove(directory / shard)
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        load_hf_model(directory)


def test_tensor_listed_in_index_but_absent_is_named(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][2], tmp_path / "hf")
    index = _index(directory)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = next(iter(index["weight_map"].values()))
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.extra.weight")):
        hf_weight_files(directory)


def test_tensor_missing_from_index_is_named(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][2], tmp_path / "hf")
    index = _index(directory)
    del index["weight_map"]["model.norm.weight"]
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape("model.norm.weight")):
        hf_weight_files(directory)


def test_directory_without_safetensors_is_an_error(tmp_path, saved):
    shutil.copy(saved["untied_llama2"][1] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(SINGLE_FILE)):
        load_hf_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_hf_model(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[]")
    with pytest.raises(ValueError, match=re.escape(INDEX_FILE)):
        load_hf_model(tmp_path)


def test_corrupt_safetensors_file_is_named(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][1], tmp_path / "hf")
    (directory / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ValueError, match=re.escape(SINGLE_FILE)):
        load_hf_model(directory)


def test_unsupported_config_is_refused_before_reading_weights(saved, tmp_path):
    directory = copy_dir(saved["untied_llama2"][1], tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["attention_bias"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="attention_bias"):
        load_hf_model(directory)
