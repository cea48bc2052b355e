"""Checkpoints and converters place parameters by the pipeline layout (interleaved virtual stages).

References are plain computations written here: the layers of a (rank, chunk) from the formula
``c*L/v + p*L/(P*v)``, the shards of a rank by slicing the full tensors (tests/test_checkpoint.py's
helpers), files read back with the safetensors library.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist_utils import run_distributed
from engine.convert import sharded
from engine.model.hf import engine_to_hf_name, iter_hf_rank_shards
from engine.model.llama import expected_shapes
from engine.parallel.layout import PipelineLayout
from engine.train import checkpoint as ck
from test_checkpoint import (KINDS, random_full, random_optimizer_full, ref_optimizer_states, ref_rank_states,
                             ref_shard, ref_stage_names, tiny_config)

LAYERS = 8


def config8(tied=False):
    return tiny_config(tied, num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2)


# ---------------------------------------------------------------------------------- the layout table
def test_layout_record_of_8_layers_over_2_ranks_2_chunks_is_the_hand_written_placement():
    assert PipelineLayout(8, 2, 2).to_dict() == {
        "pp": 2, "virtual_stages": 2,
        "layers": [[0, 0], [0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1]]}
    assert PipelineLayout(4, 2, 1).to_dict()["layers"] == [[0, 0], [0, 0], [1, 0], [1, 0]]


@pytest.mark.parametrize("L,P,v", [(8, 2, 2), (8, 2, 4), (12, 3, 2), (8, 4, 1), (16, 4, 2), (6, 1, 1)])
def test_chunk_layers_follow_the_interleaved_formula_and_cover_every_layer_once(L, P, v):
    layout = PipelineLayout(L, P, v)
    seen = []
    for p in range(P):
        for c in range(v):
            start = c * L // v + p * L // (P * v)
            want = list(range(start, start + L // (P * v)))
            assert list(layout.chunk_layers(p, c)) == want, (p, c)
            assert all(layout.layer_place(i) == (p, c) for i in want)
            seen += want
        assert layout.rank_layers(p) == sorted(i for c in range(v) for i in layout.chunk_layers(p, c))
    assert sorted(seen) == list(range(L))


@pytest.mark.parametrize("args,pattern", [
    ((6, 4, 1), r"pipeline-parallel size 4 does not divide the number of layers \(num_hidden_layers=6\)"),
    ((8, 2, 3), r"parallel.virtual_stages 3 x pipeline-parallel size 2 does not divide the number of layers"),
    ((8, 1, 2), r"parallel.virtual_stages 2 needs pipeline parallelism"),
    ((8, 2, 0), r"parallel.virtual_stages must be a positive integer, got 0"),
    ((0, 1, 1), r"number of layers must be a positive integer, got 0"),
    ((8, 0, 1), r"pipeline-parallel size must be a positive integer, got 0"),
])
def test_impossible_layouts_are_refused_naming_the_field(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        PipelineLayout(*args)


# ---------------------------------------------------------------------------- save, record, reshard
@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def saved_interleaved(request, tmp_path):
    """A random model saved at TP 2 x PP 2 x virtual stages 2, with optimizer tensors."""
    config = config8(request.param)
    full, opt_full = random_full(config, seed=3), random_optimizer_full(config, seed=20)
    ck.save_checkpoint(tmp_path / "ck", 4, config, 2, 2, ref_rank_states(config, full, 2, 2, 2),
                       optimizer_tensors=ref_optimizer_states(config, opt_full, 2, 2, virtual_stages=2),
                       optimizer_state={"step": 4}, layout={"dp": 1, "virtual_stages": 2}, virtual_stages=2)
    return tmp_path / "ck", config, full, opt_full


def test_interleaved_save_records_the_pipeline_and_each_file_set_holds_all_its_chunks(saved_interleaved):
    root, config, full, _ = saved_interleaved
    path = root / "iter_0000004"
    info = json.loads((path / "checkpoint.json").read_text())
    assert info["pipeline"] == {"pp": 2, "virtual_stages": 2,
                                "layers": [[0, 0], [0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, 1]]}
    for t in range(2):
        for p in range(2):
            with safe_open(path / f"mp_rank_{t:02d}_{p:03d}" / "model.safetensors", "pt") as f:
                assert set(f.keys()) == ref_stage_names(config, 2, p, 2)
                for n in f.keys():
                    assert torch.equal(f.get_tensor(n), ref_shard(n, full[n], config.vocab_size, 2, t)), n
    layers_of_rank_0 = {int(n.split(".")[1]) for n in ref_stage_names(config, 2, 0, 2) if n.startswith("layers.")}
    assert layers_of_rank_0 == {0, 1, 4, 5}
    ckpt = ck.open_checkpoint(root)
    assert ckpt.pipeline == PipelineLayout(LAYERS, 2, 2, config.tie_word_embeddings)
    assert ckpt.source_stage("layers.4.mlp.up_proj.weight") == 0 and ckpt.source_stage("layers.3.mlp.up_proj.weight") == 1
    assert all(torch.equal(v, full[n]) for n, v in ck.load_full_tensors(ckpt).items())


@pytest.mark.parametrize("dst", [(1, 1, 1), (1, 2, 1), (2, 4, 1), (1, 2, 2), (2, 2, 2), (2, 4, 2)])
def test_interleaved_checkpoint_loads_onto_any_layout_like_slicing(saved_interleaved, dst):
    root, config, full, opt_full = saved_interleaved
    ckpt = ck.open_checkpoint(root)
    tp, pp, v = dst
    expected_optimizer = ref_optimizer_states(config, opt_full, tp, pp, virtual_stages=v)
    for t in range(tp):
        for p in range(pp):
            names = ref_stage_names(config, pp, p, v)
            shards = ck.load_rank_shard(ckpt, t, p, tp, pp, virtual_stages=v)
            assert list(shards) == ck.canonical_order(names)
            for n, value in shards.items():
                assert torch.equal(value, ref_shard(n, full[n], config.vocab_size, tp, t)), (dst, t, p, n)
            tensors, state = ck.load_rank_optimizer(ckpt, t, p, tp, pp, virtual_stages=v)
            assert state == {"step": 4} and list(tensors) == ck.canonical_order(names)
            for n, by_kind in tensors.items():
                assert sorted(by_kind) == list(KINDS)
                for k, value in by_kind.items():
                    assert torch.equal(value, expected_optimizer[(t, p)][n][k]), (dst, t, p, n, k)


def test_contiguous_checkpoint_loads_onto_virtual_stages(tmp_path):
    config = config8(tied=True)
    full = random_full(config, seed=5)
    ck.save_checkpoint(tmp_path, 0, config, 1, 4, ref_rank_states(config, full, 1, 4))
    for p in range(2):
        shards = ck.load_rank_shard(tmp_path, 1, p, 2, 2, virtual_stages=4)
        assert set(shards) == ref_stage_names(config, 2, p, 4)
        assert all(torch.equal(v, ref_shard(n, full[n], config.vocab_size, 2, 1)) for n, v in shards.items())
    with pytest.raises(ValueError, match="parallel.virtual_stages 3 x pipeline-parallel size 2 does not divide"):
        ck.load_rank_shard(tmp_path, 0, 0, 1, 2, virtual_stages=3)


def test_save_refuses_states_of_another_pipeline_layout_by_name(tmp_path):
    config = config8()
    contiguous = ref_rank_states(config, random_full(config), 1, 2)
    with pytest.raises(ck.CheckpointError, match=r"PP rank 0: missing tensor\(s\) \['layers.4.*unexpected tensor\(s\) "
                                                 r"\['layers.2"):
        ck.save_checkpoint(tmp_path, 1, config, 1, 2, contiguous, virtual_stages=2)
    with pytest.raises(ck.CheckpointError, match="layout says virtual_stages=1 but the checkpoint is written for virtual_stages=2"):
        ck.save_checkpoint(tmp_path, 1, config, 1, 2, ref_rank_states(config, random_full(config), 1, 2, 2),
                           layout={"virtual_stages": 1}, virtual_stages=2)
    with pytest.raises(ValueError, match="parallel.virtual_stages 2 needs pipeline parallelism"):
        ck.CheckpointWriter(tmp_path, 1, config, 1, 1, virtual_stages=2)
    assert not (tmp_path / "latest").exists()


def _rewrite_info(root, edit):
    path = root / "iter_0000004" / "checkpoint.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize("edit,pattern", [
    (lambda p: p["layers"].reverse(), r"'pipeline' record: pipeline layout: the recorded placement of layers"),
    (lambda p: p.update(pp=4), r"'pipeline' record says pp=4 but the checkpoint has pp=2"),
    (lambda p: p.update(virtual_stages=3), r"'pipeline' record: parallel.virtual_stages 3 x pipeline-parallel size 2"),
    (lambda p: p.update(virtual_stages="2"), r"'pipeline' record: virtual_stages must be an integer, got '2'"),
    (lambda p: p.pop("pp"), r"'pipeline' record: pipeline layout: missing field 'pp'"),
    (lambda p: p.update(virtual_stages=1), r"'pipeline' record: pipeline layout: the recorded placement"),
])
def test_corrupted_pipeline_record_is_refused_by_name(saved_interleaved, edit, pattern):
    root = saved_interleaved[0]
    _rewrite_info(root, lambda info: edit(info["pipeline"]))
    with pytest.raises(ck.CheckpointError, match=r"checkpoint.json: " + pattern):
        ck.open_checkpoint(root)


def test_pipeline_record_that_is_not_a_mapping_or_disagrees_with_the_layout_is_refused(saved_interleaved):
    root = saved_interleaved[0]
    _rewrite_info(root, lambda info: info.update(pipeline=[2, 2]))
    with pytest.raises(ck.CheckpointError, match=r"'pipeline' record: pipeline layout must be a mapping, got \[2, 2\]"):
        ck.open_checkpoint(root)
    _rewrite_info(root, lambda info: info.update(pipeline=PipelineLayout(LAYERS, 2, 2).to_dict(),
                                                 layout={"tp": 2, "pp": 2, "virtual_stages": 1}))
    with pytest.raises(ck.CheckpointError, match="layout says virtual_stages=1 but the checkpoint is written for virtual_stages=2"):
        ck.open_checkpoint(root)


def test_checkpoint_without_pipeline_record_is_contiguous(tmp_path, saved_interleaved):
    config = tiny_config()
    full = random_full(config, seed=8)
    ck.save_checkpoint(tmp_path / "old", 4, config, 2, 2, ref_rank_states(config, full, 2, 2))
    _rewrite_info(tmp_path / "old", lambda info: info.pop("pipeline"))
    old = ck.open_checkpoint(tmp_path / "old")
    assert old.pipeline == PipelineLayout(4, 2, 1, False)
    for p in range(2):
        shards = ck.load_rank_shard(old, 0, p, 1, 2, virtual_stages=2)
        assert set(shards) == ref_stage_names(config, 2, p, 2)
        assert all(torch.equal(v, ref_shard(n, full[n], 250, 1, 0)) for n, v in shards.items())
    # An interleaved checkpoint stripped of its record does not pass as contiguous: its files disagree.
    root = saved_interleaved[0]
    _rewrite_info(root, lambda info: info.pop("pipeline"))
    with pytest.raises(ck.CheckpointError, match="layout says virtual_stages=2 but the checkpoint is written for virtual_stages=1"):
        ck.open_checkpoint(root)
    _rewrite_info(root, lambda info: info.pop("layout"))
    with pytest.raises(ck.CheckpointError, match=r"mp_rank_00_000/model.safetensors: missing tensor\(s\) \['layers.2"):
        ck.open_checkpoint(root)


# ------------------------------------------------------------------------------- Hugging Face weights
def write_hf_dir(path, config, full):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file({engine_to_hf_name(n): t.contiguous() for n, t in full.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_import_at_pp2_loads_onto_virtual_stages_and_hf_shards_follow_them(tmp_path, tied):
    config = config8(tied)
    full = random_full(config, seed=9)
    hf_dir = write_hf_dir(tmp_path / "hf", config, full)
    sharded.import_hf(hf_dir, tmp_path / "ck", tp=2, pp=2, progress=False)
    ckpt = ck.open_checkpoint(tmp_path / "ck")
    assert ckpt.pipeline == PipelineLayout(LAYERS, 2, 1, tied)
    assert json.loads((ckpt.path / "checkpoint.json").read_text())["pipeline"]["virtual_stages"] == 1
    for t in range(2):
        for p in range(2):
            want = ref_stage_names(config, 2, p, 2)
            loaded = ck.load_rank_shard(ckpt, t, p, 2, 2, virtual_stages=2)
            from_hf = list(iter_hf_rank_shards(hf_dir, config, 2, t, 2, p, virtual_stages=2))
            assert [n for n, _ in from_hf] == ck.canonical_order(want) == list(loaded)
            for n, v in from_hf:
                ref = ref_shard(n, full[n], config.vocab_size, 2, t)
                assert torch.equal(v, ref) and torch.equal(loaded[n], ref), (t, p, n)
    with pytest.raises(ValueError, match="parallel.virtual_stages 3 x pipeline-parallel size 2 does not divide"):
        next(iter_hf_rank_shards(hf_dir, config, 1, 0, 2, 0, virtual_stages=3))


def test_export_of_an_interleaved_checkpoint_gives_the_full_tensors(saved_interleaved, tmp_path):
    root, config, full, _ = saved_interleaved
    out = sharded.export_hf(root, tmp_path / "hf", progress=False)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {engine_to_hf_name(n) for n in expected_shapes(config)}
        for n, v in full.items():
            assert torch.equal(f.get_tensor(engine_to_hf_name(n)), v), n
    assert "TP=2 x PP=2 x 2 virtual stages" in sharded.describe(root)


# ------------------------------------------------------------------------------------ distributed save
def _interleaved_distributed_save(rank, world_size, root):
    """PP 2 x virtual stages 2: each rank saves the parameters of both its chunks."""
    config = config8(tied=True)
    full = random_full(config, seed=11)
    mine = ref_rank_states(config, full, 1, 2, 2)[(0, rank)]
    ck.save_checkpoint_distributed(root, 2, config, 1, 2, 0, rank, mine, virtual_stages=2,
                                   layout={"tp": 1, "pp": 2, "dp": 1, "virtual_stages": 2})
    again = ck.load_rank_shard(root, 0, rank, 1, 2, virtual_stages=2)
    return list(again) == ck.canonical_order(mine) and all(torch.equal(again[n], v) for n, v in mine.items())


@pytest.mark.distributed
def test_distributed_save_with_virtual_stages_reloads_onto_one_process(tmp_path):
    assert all(run_distributed(_interleaved_distributed_save, 2, args=(str(tmp_path),), timeout=120))
    config = config8(tied=True)
    full = random_full(config, seed=11)
    ckpt = ck.open_checkpoint(tmp_path)
    assert ckpt.pipeline.virtual_stages == 2 and ckpt.layout["virtual_stages"] == 2
    whole = ck.load_rank_shard(ckpt, 0, 0, 1, 1)
    assert set(whole) == set(full)
    assert all(torch.equal(whole[n], ref_shard(n, full[n], config.vocab_size, 1, 0)) for n in full)
