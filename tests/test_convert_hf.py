"""Hugging Face <-> engine checkpoint conversion against `transformers` and the safetensors library.

Reference models are `transformers.LlamaForCausalLM` with random weights saved by `save_pretrained`
(single file and sharded with an index). Import then export must give back the same tensors bit for
bit and a directory `transformers` loads to the same logits; every rank file must hold exactly the
slices a plain computation from the layout rules gives.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.convert import sharded
from engine.model import hf
from engine.model.llama import expected_shapes
from engine.parallel.layout import local_shape
from engine.train import checkpoint as ck
from engine import safetensors_io as sio
from test_checkpoint import ref_shard

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    # GQA, untied, vocab not a multiple of 128, fp32, one file.
    "gqa": (dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False), torch.float32, None),
    # MHA, tied embeddings, bf16, sharded with an index.
    "tied_bf16_sharded": (dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                               rope_theta=500000.0), torch.bfloat16, "40KB"),
    # Llama-3 style RoPE scaling, GQA 4:1, untied, fp16, sharded.
    "llama3_fp16": (dict(vocab_size=200, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                    torch.float16, "30KB"),
}
TOKENIZER_FILES = {"tokenizer.model": b"\x00\x01sentencepiece-bytes\xff",
                   "tokenizer_config.json": b'{"model_max_length": 64}\n'}


def make_hf_dir(path, variant, seed=0):
    kwargs, dtype, shard = VARIANTS[variant]
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).to(dtype)
    with torch.no_grad():  # norms start at 1: randomise them so that a swap would be visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    for name, data in TOKENIZER_FILES.items():
        (Path(path) / name).write_bytes(data)
    return Path(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {v: make_hf_dir(base / v, v) for v in VARIANTS}


def hf_tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(path, ids):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def assert_rank_files_match_slicing(ckpt_root, original, config, tp, pp):
    """Every rank file holds exactly its slices (plain computation from the layout rules)."""
    it_dir = ckpt_root / "iter_0000000"
    per = config["num_hidden_layers"] // pp
    for t in range(tp):
        for p in range(pp):
            expected = {}
            for hf_name, full in original.items():
                name = hf_name.removeprefix("model.")
                layer = int(name.split(".")[1]) if name.startswith("layers.") else None
                on_stage = (layer // per == p if layer is not None else
                            p == 0 or (config["tie_word_embeddings"] and p == pp - 1)
                            if name == "embed_tokens.weight" else p == pp - 1)
                if on_stage:
                    expected[name] = ref_shard(name, full, config["vocab_size"], tp, t)
            with safe_open(it_dir / f"mp_rank_{t:02d}_{p:03d}" / "model.safetensors", "pt") as f:
                assert set(f.keys()) == set(expected), (t, p)
                for name, want in expected.items():
                    got = f.get_tensor(name)
                    assert got.dtype == want.dtype and torch.equal(got, want), (t, p, name)


CASES = [("gqa", 1, 1, None), ("gqa", 2, 1, "20KB"), ("gqa", 1, 2, None), ("gqa", 2, 2, None),
         ("gqa", 4, 1, None), ("gqa", 2, 4, "50KB"), ("tied_bf16_sharded", 1, 1, None),
         ("tied_bf16_sharded", 2, 2, None), ("tied_bf16_sharded", 4, 1, "25KB"),
         ("tied_bf16_sharded", 1, 2, None), ("llama3_fp16", 2, 2, None), ("llama3_fp16", 2, 1, "40KB")]


@pytest.mark.parametrize("variant,tp,pp,max_shard", CASES)
def test_import_export_round_trip_is_bit_exact_and_loads_in_transformers(hf_dirs, tmp_path, variant, tp, pp,
                                                                          max_shard):
    src = hf_dirs[variant]
    config = json.loads((src / "config.json").read_text())
    original = hf_tensors(src)
    ckpt_root = tmp_path / "ckpt"
    assert sharded.import_hf(src, ckpt_root, tp=tp, pp=pp, progress=False) == ckpt_root / "iter_0000000"
    assert_rank_files_match_slicing(ckpt_root, original, config, tp, pp)
    assert (ckpt_root / "tokenizer" / "tokenizer.model").read_bytes() == TOKENIZER_FILES["tokenizer.model"]

    out = tmp_path / "out"
    sharded.export_hf(ckpt_root, out, progress=False, **({"max_shard_size": max_shard} if max_shard else {}))
    exported = hf_tensors(out)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    n_files = len(list(out.glob("*.safetensors")))
    assert (out / "model.safetensors.index.json").exists() == (n_files > 1)
    if max_shard:
        assert n_files > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(original)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for name, data in TOKENIZER_FILES.items():
        assert (out / name).read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind

    ids = torch.randint(0, config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(out, ids), logits(src, ids))


def test_exported_model_matches_transformers_after_training_like_update_and_reshard(hf_dirs, tmp_path):
    """A later iteration saved in another layout, with optimizer state, is what export picks up
    (latest, or by number)."""
    src = hf_dirs["gqa"]
    root = tmp_path / "ckpt"
    sharded.import_hf(src, root, tp=2, pp=2, progress=False)
    ckpt = ck.open_checkpoint(root)
    states = {}
    for t in range(4):
        for p in range(1):
            states[(t, p)] = {n: (v * 0.5 if v.dim() == 2 else v) for n, v in ck.load_rank_shard(ckpt, t, p, 4, 1).items()}
    optimizer = {rank: {n: {"master": v.float(), "exp_avg": torch.zeros_like(v, dtype=torch.float32)}
                        for n, v in sd.items()} for rank, sd in states.items()}
    ck.save_checkpoint(root, 100, ckpt.config, 4, 1, states, optimizer_tensors=optimizer,
                       optimizer_state={"step": 100}, layout={"dp": 2, "distributed_optimizer": True})
    assert "TP=4 x PP=1 (saved at DP=2), optimizer state (exp_avg, master)" in sharded.describe(root)

    sharded.export_hf(root, tmp_path / "latest", progress=False)
    sharded.export_hf(root, tmp_path / "first", iteration=0, progress=False)
    original = hf_tensors(src)
    halved = hf_tensors(tmp_path / "latest")
    assert all(torch.equal(halved[n], v * 0.5 if v.dim() == 2 else v) for n, v in original.items())
    assert all(torch.equal(hf_tensors(tmp_path / "first")[n], v) for n, v in original.items())
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.5)
        ids = torch.randint(0, 250, (1, 6))
        assert torch.equal(logits(tmp_path / "latest", ids), model(ids).logits)


def test_import_dtype_cast_and_tokenizer_dir_option(hf_dirs, tmp_path):
    sharded.import_hf(hf_dirs["gqa"], tmp_path / "ck", tp=1, pp=1, dtype="bf16", progress=False)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    sharded.export_hf(tmp_path / "ck", tmp_path / "out", tokenizer_dir=tok, progress=False)
    exported = hf_tensors(tmp_path / "out")
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], v.to(torch.bfloat16))
               for n, v in hf_tensors(hf_dirs["gqa"]).items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").exists() and not (tmp_path / "out" / "tokenizer.model").exists()


def test_exported_sentencepiece_tokenizer_loads_in_transformers_and_encodes_as_the_engine(hf_dirs, tmp_path):
    from transformers import AutoTokenizer

    from engine.data.tokenizer import Tokenizer, train_tokenizer

    pytest.importorskip("google.protobuf")
    lines = [f"<|domain|>ads/ctr<|state|>user_age={20 + i % 40}; user_region=r{i % 7}<|action|>item_brand=brand{i % 20:02d}"
             f"<|reward|>click=<|r{i % 2}|>" for i in range(400)]
    tok = tmp_path / "tok"
    tok.mkdir()
    train_tokenizer(lines, str(tok / "tokenizer.model"), vocab_size=400)
    sharded.import_hf(hf_dirs["gqa"], tmp_path / "ck", tp=1, pp=1, progress=False)
    sharded.export_hf(tmp_path / "ck", tmp_path / "out", tokenizer_dir=tok, progress=False)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    engine_tok = Tokenizer(str(tok / "tokenizer.model"))
    for line in lines[:20] + ["user_age=99; brand77 unseen words"]:
        assert hf_tok.encode(line) == engine_tok.encode(line), line


def test_import_and_export_handle_column_and_vocabulary_shards_alone(hf_dirs, tmp_path, monkeypatch):
    """Peak memory near one shard: dimension-0 slices are read from the file without the whole tensor
    (row-parallel tensors, at most an MLP matrix, are read whole and sliced)."""
    reads = []
    real = sio.read_tensor

    def recording_read(path, info):
        reads.append(torch.Size(info.shape).numel())
        return real(path, info)
    monkeypatch.setattr(sio, "read_tensor", recording_read)
    monkeypatch.setattr(hf, "read_tensor", recording_read)
    src = hf_dirs["gqa"]
    sharded.import_hf(src, tmp_path / "ck", tp=2, pp=2, progress=False)
    config = ck.open_checkpoint(tmp_path / "ck").config
    shapes = expected_shapes(config)
    largest_shard = max(torch.Size(local_shape(n, s, config.vocab_size, 2)).numel() for n, s in shapes.items())
    largest_row_parallel = max(torch.Size(s).numel() for n, s in shapes.items() if n.endswith(("o_proj.weight",
                                                                                               "down_proj.weight")))
    assert max(reads) <= max(largest_shard, largest_row_parallel) < torch.Size(shapes["embed_tokens.weight"]).numel()
    # Export writes those shards at their rows of the output tensor without reassembling it: only
    # replicated and row-parallel tensors are reassembled whole.
    reassembled = []
    real_full = ck.read_full_tensor

    def recording_full(ckpt, name):
        reassembled.append(name)
        return real_full(ckpt, name)
    monkeypatch.setattr(sharded, "read_full_tensor", recording_full)
    sharded.export_hf(tmp_path / "ck", tmp_path / "out", progress=False)
    assert reassembled and all(ck.tp_shard_dim(n) != 0 for n in reassembled), reassembled
    monkeypatch.undo()
    original = hf_tensors(src)
    assert_rank_files_match_slicing(tmp_path / "ck", original, json.loads((src / "config.json").read_text()), 2, 2)
    exported = hf_tensors(tmp_path / "out")
    assert set(exported) == set(original) and all(torch.equal(exported[n], t) for n, t in original.items())


def test_exported_directory_imports_again_to_identical_rank_files(hf_dirs, tmp_path):
    sharded.import_hf(hf_dirs["llama3_fp16"], tmp_path / "a", tp=2, pp=2, progress=False)
    sharded.export_hf(tmp_path / "a", tmp_path / "hf", progress=False)
    sharded.import_hf(tmp_path / "hf", tmp_path / "b", tp=2, pp=2, progress=False)
    for rank_file in sorted((tmp_path / "a" / "iter_0000000").glob("mp_rank_*/model.safetensors")):
        again = tmp_path / "b" / rank_file.relative_to(tmp_path / "a")
        assert rank_file.read_bytes() == again.read_bytes(), rank_file


# ------------------------------------------------------------------------------------ refused inputs
def edited_copy(src, dst, edit_tensors=None, edit_config=None):
    """A single-file copy of a HF dir with its tensors or config edited."""
    dst.mkdir()
    tensors = hf_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(hf_dir, save, match, **kw):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sharded.import_hf(hf_dir, save, progress=False, **{"tp": 2, "pp": 2, **kw})
    assert not save.exists()
    assert not [p for p in save.parent.iterdir() if p.name.startswith(f".{save.name}.")]


def test_missing_unexpected_and_misshaped_hf_tensors_are_named(hf_dirs, tmp_path):
    src = hf_dirs["gqa"]
    missing = edited_copy(src, tmp_path / "missing", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    assert_refused(missing, tmp_path / "ck", r"missing tensor\(s\): \['model.layers.2.mlp.up_proj.weight'\]")
    extra = edited_copy(src, tmp_path / "extra",
                        lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    assert_refused(extra, tmp_path / "ck", r"unexpected tensor\(s\): \['model.layers.0.self_attn.q_proj.bias'\]")
    bad = edited_copy(src, tmp_path / "bad", lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    assert_refused(bad, tmp_path / "ck", r"mis-shaped tensor\(s\): \['model.layers.1.self_attn.k_proj.weight "
                                         r"\[64, 64\] \(config.json implies \[32, 64\]\)'\]")
    old_buffers = edited_copy(src, tmp_path / "inv_freq",
                              lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    sharded.import_hf(old_buffers, tmp_path / "ok", tp=1, pp=1, progress=False)  # saved buffers are skipped


def test_unsupported_config_fields_and_impossible_layouts_are_named(hf_dirs, tmp_path):
    src = hf_dirs["gqa"]
    bias = edited_copy(src, tmp_path / "bias", edit_config=lambda c: c.update(attention_bias=True))
    assert_refused(bias, tmp_path / "ck", "attention_bias=True: biases in the attention projections")
    unknown = edited_copy(src, tmp_path / "unknown", edit_config=lambda c: c.update(fancy_gate=3))
    assert_refused(unknown, tmp_path / "ck", "unknown field 'fancy_gate'")
    assert_refused(src, tmp_path / "ck", r"does not divide the number of key/value heads \(num_key_value_heads=4\)", tp=8, pp=1)
    assert_refused(src, tmp_path / "ck", r"does not divide the number of layers \(num_hidden_layers=4\)", tp=1, pp=3)
    assert_refused(tmp_path / "absent", tmp_path / "ck", "absent: no such Hugging Face directory")
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path / "empty", tmp_path / "ck", "no config.json")
    (tmp_path / "ck_busy").mkdir()
    (tmp_path / "ck_busy" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        sharded.import_hf(src, tmp_path / "ck_busy", progress=False)
    assert (tmp_path / "ck_busy" / "x").read_text() == "keep me"


def test_other_models_and_untied_heads_are_refused_on_import(hf_dirs, tmp_path):
    src = hf_dirs["gqa"]
    mistral = edited_copy(src, tmp_path / "mistral", edit_config=lambda c: c.update(model_type="mistral"))
    assert_refused(mistral, tmp_path / "ck", "model_type 'mistral' is not supported")
    gelu = edited_copy(src, tmp_path / "gelu", edit_config=lambda c: c.update(hidden_act="gelu"))
    assert_refused(gelu, tmp_path / "ck", "hidden_act 'gelu' is not supported")
    # Tensors of another architecture under a Llama config.
    gpt2 = edited_copy(src, tmp_path / "gpt2", lambda t: t.update(
        {"transformer.wte.weight": t.pop("model.embed_tokens.weight")}))
    assert_refused(gpt2, tmp_path / "ck", r"missing tensor\(s\): \['model.embed_tokens.weight'\]; "
                                          r"unexpected tensor\(s\): \['transformer.wte.weight'\]")
    # Tied embeddings with a saved head that is not the embedding: refused, nothing left behind.
    tied = hf_dirs["tied_bf16_sharded"]
    differing = edited_copy(tied, tmp_path / "differing", lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    assert_refused(differing, tmp_path / "ck", "tie_word_embeddings is true but 'lm_head.weight' differs", tp=2, pp=1)
    short_head = edited_copy(tied, tmp_path / "short_head", lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"][:-1].clone()}))
    assert_refused(short_head, tmp_path / "ck", r"mis-shaped tensor\(s\): \['lm_head.weight \[299, 64\] "
                                                r"\(tied to the embedding: \[300, 64\]\)'\]", tp=2, pp=1)
    # ...while an identical saved head is accepted and written once on export.
    same = edited_copy(tied, tmp_path / "same", lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    sharded.import_hf(same, tmp_path / "ck", tp=2, pp=2, progress=False)
    sharded.export_hf(tmp_path / "ck", tmp_path / "out", progress=False)
    assert set(hf_tensors(tmp_path / "out")) == set(hf_tensors(tied))


def test_export_refuses_broken_rank_files_and_unknown_config_fields(hf_dirs, tmp_path):
    root = tmp_path / "ck"
    sharded.import_hf(hf_dirs["gqa"], root, tp=2, pp=2, progress=False)
    rank_file = root / "iter_0000000" / "mp_rank_01_001" / "model.safetensors"
    tensors = load_file(rank_file)
    del tensors["layers.3.mlp.up_proj.weight"]
    tensors["layers.3.mlp.down_proj.weight"] = tensors["layers.3.mlp.down_proj.weight"][:, :8].contiguous()
    save_file(tensors, rank_file, metadata={"format": "pt"})
    expected = (r"mp_rank_01_001/model.safetensors: missing tensor\(s\) \['layers.3.mlp.up_proj.weight'\].*"
                r"mis-shaped tensor\(s\) \['layers.3.mlp.down_proj.weight \(64, 8\) \(expected \(64, 64\)\)'\]")
    with pytest.raises(ck.CheckpointError, match=expected):
        sharded.export_hf(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    other = tmp_path / "ck2"
    sharded.import_hf(hf_dirs["gqa"], other, tp=1, pp=1, progress=False)
    info_path = other / "iter_0000000" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    info["config"]["fancy_gate"] = 3
    info_path.write_text(json.dumps(info))
    with pytest.raises(ck.CheckpointError, match="unknown field 'fancy_gate'"):
        sharded.export_hf(other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_checkpoints_and_incomplete_checkpoints(hf_dirs, tmp_path):
    with pytest.raises(ck.CheckpointError, match="not an engine checkpoint"):
        sharded.export_hf(hf_dirs["gqa"], tmp_path / "out", progress=False)
    root = tmp_path / "ck"
    sharded.import_hf(hf_dirs["gqa"], root, tp=2, pp=2, progress=False)
    (root / "iter_0000000" / "mp_rank_01_000" / "model.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match=r"mp_rank_01_000 \(TP rank 1, PP rank 0\) is missing"):
        sharded.export_hf(root, tmp_path / "out", progress=False)
    with pytest.raises(ck.CheckpointError, match=r"iteration 3 is missing or incomplete; iterations saved in .*ck: 0$"):
        sharded.export_hf(root, tmp_path / "out", iteration=3, progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_model_is_refused_on_export(hf_dirs, tmp_path):
    sharded.import_hf(hf_dirs["gqa"], tmp_path / "a", tp=1, pp=2, progress=False)
    sharded.import_hf(hf_dirs["llama3_fp16"], tmp_path / "b", tp=1, pp=2, progress=False)
    # Stage 1 of checkpoint a replaced by stage 1 of a different model.
    import shutil
    stage = tmp_path / "a" / "iter_0000000" / "mp_rank_00_001"
    shutil.rmtree(stage)
    shutil.copytree(tmp_path / "b" / "iter_0000000" / "mp_rank_00_001", stage)
    with pytest.raises(ck.CheckpointError, match=r"mp_rank_00_001/model.safetensors: mis-shaped tensor\(s\).*"
                                                 r"mp_rank_00_001/meta.json: config differs"):
        sharded.export_hf(tmp_path / "a", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("direction", ["import", "export"])
def test_interrupted_conversion_leaves_no_output(hf_dirs, tmp_path, monkeypatch, direction):
    src = hf_dirs["tied_bf16_sharded"]
    if direction == "export":
        sharded.import_hf(src, tmp_path / "ck", tp=2, pp=1, progress=False)
    real = sio.SafetensorsWriter.write
    calls = {"n": 0}

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError("no space left on device (simulated)")
        real(self, name, tensor)
    monkeypatch.setattr(sio.SafetensorsWriter, "write", failing_write)
    dest = tmp_path / "dest"
    with pytest.raises(OSError, match="simulated"):
        if direction == "import":
            sharded.import_hf(src, dest, tp=2, pp=1, progress=False)
        else:
            sharded.export_hf(tmp_path / "ck", dest, progress=False)
    assert not dest.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_size_and_dtype_parsing():
    assert sharded.parse_size("5GB") == 5 * 10**9 and sharded.parse_size("2GiB") == 2 * 2**30
    assert sharded.parse_size("40KB") == 40_000 and sharded.parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read the size '5 parsecs'"):
        sharded.parse_size("5 parsecs")
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        sharded.parse_dtype("int3")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_import_export_and_error_exit(hf_dirs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tool = [sys.executable, str(REPO / "tools" / "convert_hf.py")]
    src = hf_dirs["tied_bf16_sharded"]
    run = subprocess.run(tool + ["import", "--hf-dir", str(src), "--save", str(tmp_path / "ck"), "--tp", "2",
                                 "--pp", "2", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TP=2 x PP=2" in run.stdout and "vocab 300 (padded 512)" in run.stdout
    run = subprocess.run(tool + ["export", "--load", str(tmp_path / "ck"), "--hf-dir", str(tmp_path / "out"),
                                 "--max-shard-size", "30KB"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "export" in run.stderr  # the progress bar
    original, exported = hf_tensors(src), hf_tensors(tmp_path / "out")
    assert set(original) == set(exported) and all(torch.equal(exported[n], v) for n, v in original.items())
    run = subprocess.run(tool + ["import", "--hf-dir", str(src), "--save", str(tmp_path / "ck3"), "--tp", "3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1 and "error: tensor-parallel size 3 does not divide" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "ck3").exists()


def test_cli_messages_exit_codes_and_help(hf_dirs, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "convert_hf.py")]
    ck, out = tmp_path / "ck", tmp_path / "out"
    sharded.import_hf(hf_dirs["gqa"], ck, tp=1, pp=2, progress=False)
    shutil.copytree(ck / "iter_0000000", ck / "iter_0000100")  # a second saved iteration
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(sharded.OutputExistsError, match=r"out: already exists and is not empty "
                                                        r"\(pass force=True to replace it\)$"):
        sharded.export_hf(ck, out, progress=False)
    run = subprocess.run(tool + ["export", "--load", str(ck), "--hf-dir", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and run.stderr == f"error: {out}: already exists and is not empty " \
                                                 "(use --force to replace it)\n"
    run = subprocess.run(tool + ["export", "--load", str(ck), "--hf-dir", str(tmp_path / "o2"), "--iteration", "5"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.endswith(f"iterations saved in {ck}: 0, 100\n"), run.stderr
    assert "iteration 5 is missing" in run.stderr and not (tmp_path / "o2").exists()
    run = subprocess.run(tool + ["import", "--hf-dir", str(hf_dirs["gqa"]), "--save", str(tmp_path / "c2"),
                                 "--tp", "0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--tp: expected a positive integer, got 0" in run.stderr  # usage: argparse's 2
    help_text = {c: subprocess.run(tool + [c, "--help"], capture_output=True, text=True, timeout=300).stdout
                 for c in ("import", "export")}
    assert re.search(r"--tp TP\s+tensor-parallel size \(default: 1\)", help_text["import"])
    assert re.search(r"--pp PP\s+pipeline-parallel size \(default: 1\)", help_text["import"])
    assert re.search(r"\(default:\s+5GB\)", help_text["export"]) and "default: the one 'latest'" in help_text["export"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_converted_files_get_the_permissions_of_the_umask(hf_dirs, tmp_path, umask):
    previous = os.umask(umask)
    try:
        sharded.import_hf(hf_dirs["tied_bf16_sharded"], tmp_path / "ck", tp=2, pp=1, progress=False)
        sharded.export_hf(tmp_path / "ck", tmp_path / "hf", max_shard_size="40KB", progress=False)
    finally:
        os.umask(previous)
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path) for f in names]
    dirs = [os.path.join(d, n) for d, names, _ in os.walk(tmp_path) for n in names]
    names = {os.path.basename(f) for f in files}
    assert {"checkpoint.json", "latest", "meta.json", "config.json", "model.safetensors.index.json"} <= names
    assert {f: oct(stat.S_IMODE(os.stat(f).st_mode)) for f in files} == {f: oct(0o666 & ~umask) for f in files}
    assert {d: oct(stat.S_IMODE(os.stat(d).st_mode)) for d in dirs} == {d: oct(0o777 & ~umask) for d in dirs}
