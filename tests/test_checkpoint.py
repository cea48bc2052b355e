"""Checkpoint format: file sets per (TP, PP) rank, atomic publish, validation, resharding on load.

The reference for every shard is a plain slicing computation written from the layout rules
(column-parallel split rows, row-parallel split columns, vocab padded to 128*TP then split rows),
independent of the engine's own sharding helpers; files are read back with the safetensors library.
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.model.llama import expected_shapes
from engine.train import checkpoint as ck
from engine import safetensors_io as sio

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def tiny_config(tied=False, **kw):
    base = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=tied)
    return LlamaConfig(**{**base, **kw})


def random_full(config, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in expected_shapes(config).items()}


def ref_shard(name, full, vocab, tp, r):
    if name in ("embed_tokens.weight", "lm_head.weight"):
        padded = -(-vocab // (128 * tp)) * 128 * tp
        x = torch.zeros((padded, full.shape[1]), dtype=full.dtype)
        x[:vocab] = full
        n = padded // tp
        return x[r * n:(r + 1) * n]
    if any(k in name for k in COLUMN):
        n = full.shape[0] // tp
        return full[r * n:(r + 1) * n]
    if any(k in name for k in ROW):
        n = full.shape[1] // tp
        return full[:, r * n:(r + 1) * n]
    return full


def ref_rank_layers(num_layers, pp, rank, virtual_stages=1):
    """Layers of pipeline rank ``rank``: chunk c holds L/(P*v) layers from c*L/v + rank*L/(P*v)."""
    per_chunk = num_layers // (pp * virtual_stages)
    return {c * num_layers // virtual_stages + rank * per_chunk + j
            for c in range(virtual_stages) for j in range(per_chunk)}


def ref_stage_names(config, pp, stage, virtual_stages=1):
    layers = ref_rank_layers(config.num_hidden_layers, pp, stage, virtual_stages)
    out = set()
    for name in expected_shapes(config):
        if name.startswith("layers."):
            if int(name.split(".")[1]) in layers:
                out.add(name)
        elif name == "embed_tokens.weight":
            if stage == 0 or (config.tie_word_embeddings and stage == pp - 1):
                out.add(name)
        elif stage == pp - 1:
            out.add(name)
    return out


def ref_rank_states(config, full, tp, pp, virtual_stages=1):
    return {(t, p): {n: ref_shard(n, full[n], config.vocab_size, tp, t).clone()
                     for n in ref_stage_names(config, pp, p, virtual_stages)}
            for t in range(tp) for p in range(pp)}


def test_local_shape_is_the_shape_of_the_sliced_shard():
    from engine.parallel.layout import local_shape

    config = tiny_config()
    for tp in (1, 2, 4):
        for name, shape in expected_shapes(config).items():
            want = tuple(ref_shard(name, torch.empty(shape), config.vocab_size, tp, tp - 1).shape)
            assert local_shape(name, shape, config.vocab_size, tp) == want, (name, tp)
    with pytest.raises(ValueError, match="dimension 1 of size 64 is not divisible by the tensor-parallel size 3"):
        local_shape("layers.0.mlp.down_proj.weight", (64, 64), 250, 3)
    with pytest.raises(ValueError, match="lm_head.weight: 300 rows but a vocabulary of 250"):
        local_shape("lm_head.weight", (300, 64), 250, 2)
    with pytest.raises(KeyError, match="unknown parameter name 'layers.0.extra.weight'"):
        local_shape("layers.0.extra.weight", (4,), 250, 1)


# --------------------------------------------------------------------------------- save and load
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (2, 4)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_save_writes_expected_shards_and_loads_back_bit_for_bit(tmp_path, tp, pp, tied):
    config = tiny_config(tied)
    full = random_full(config, dtype=torch.bfloat16)
    path = ck.save_checkpoint(tmp_path, 7, config, tp, pp, ref_rank_states(config, full, tp, pp),
                              meta={"consumed_samples": 99})
    assert path == tmp_path / "iter_0000007" and (tmp_path / "latest").read_text() == "7\n"
    info = json.loads((path / "checkpoint.json").read_text())
    assert (info["tp"], info["pp"], info["iteration"], info["padded_vocab_size"]) == (tp, pp, 7, 128 * tp * -(-250 // (128 * tp)))
    assert len(info["file_sets"]) == tp * pp and info["config"]["vocab_size"] == 250
    for t in range(tp):
        for p in range(pp):
            with safe_open(path / f"mp_rank_{t:02d}_{p:03d}" / "model.safetensors", "pt") as f:
                names = set(f.keys())
                assert names == ref_stage_names(config, pp, p)
                for n in names:
                    assert torch.equal(f.get_tensor(n), ref_shard(n, full[n], 250, tp, t)), n
            meta = json.loads((path / f"mp_rank_{t:02d}_{p:03d}" / "meta.json").read_text())
            assert (meta["tp_rank"], meta["pp_rank"], meta["dtype"]) == (t, p, "bfloat16")
    loaded = ck.load_full_tensors(tmp_path)
    assert list(loaded) == ck.canonical_order(full)
    for n, v in full.items():
        assert loaded[n].dtype == v.dtype and torch.equal(loaded[n], v), n
    ckpt = ck.open_checkpoint(tmp_path)
    assert ckpt.meta(tp - 1, pp - 1) == {"consumed_samples": 99}


@pytest.mark.parametrize("src,dst,tied", [((2, 2), (4, 1), False), ((1, 1), (2, 2), True),
                                           ((4, 1), (1, 4), True), ((2, 1), (2, 4), False),
                                           ((1, 4), (4, 2), False)])
def test_resharding_load_equals_slicing_the_full_tensors(tmp_path, src, dst, tied):
    config = tiny_config(tied)
    full = random_full(config, seed=1)
    ck.save_checkpoint(tmp_path, 0, config, *src, ref_rank_states(config, full, *src))
    ckpt = ck.open_checkpoint(tmp_path)
    tp, pp = dst
    for t in range(tp):
        for p in range(pp):
            got = ck.load_rank_shard(ckpt, t, p, tp, pp)
            assert set(got) == ref_stage_names(config, pp, p)
            for n, v in got.items():
                assert torch.equal(v, ref_shard(n, full[n], config.vocab_size, tp, t)), (t, p, n)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ck.load_rank_shard(ckpt, 0, 0, 8, 1)


def test_saving_an_existing_iteration_again_replaces_it_whole(tmp_path):
    config = tiny_config()
    first, second = random_full(config, seed=2), random_full(config, seed=3)
    ck.save_checkpoint(tmp_path, 3, config, 2, 2, ref_rank_states(config, first, 2, 2))
    ck.save_checkpoint(tmp_path, 3, config, 1, 1, ref_rank_states(config, second, 1, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "latest"]
    assert sorted(p.name for p in (tmp_path / "iter_0000003").iterdir()) == ["checkpoint.json", "mp_rank_00_000"]
    loaded = ck.load_full_tensors(tmp_path)
    for n, v in second.items():
        assert torch.equal(loaded[n], v), n


def test_adamw_state_stored_by_parameter_name_and_rng_meta_resume_exactly(tmp_path):
    config = tiny_config(num_hidden_layers=2)
    local = ref_rank_states(config, random_full(config), 1, 1)[(0, 0)]  # vocab padded to 256 rows
    params = {n: torch.nn.Parameter(v.clone()) for n, v in local.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.manual_seed(11)
    moments = {n: {k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")} for n, p in params.items()}
    step = int(opt.state[params["norm.weight"]]["step"])
    ck.save_checkpoint(tmp_path, 3, config, 1, 1, {(0, 0): {n: p.detach() for n, p in params.items()}},
                       meta={"rng": torch.get_rng_state()}, optimizer_tensors={(0, 0): moments},
                       optimizer_state={"step": step, "lr": 1e-2, "betas": (0.9, 0.999)})
    expected_next = torch.rand(4)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    for n, p in params.items():
        p.grad = grads[n].clone()
    opt.step()

    ckpt = ck.open_checkpoint(tmp_path)
    assert ckpt.has_optimizer and ckpt.optimizer_kinds == ["exp_avg", "exp_avg_sq"]
    restored = {n: torch.nn.Parameter(v) for n, v in ck.load_rank_shard(ckpt, 0, 0, 1, 1).items()}
    tensors, state = ck.load_rank_optimizer(ckpt, 0, 0, 1, 1)
    assert state == {"step": 1, "lr": 1e-2, "betas": (0.9, 0.999)}
    opt2 = torch.optim.AdamW([restored[n] for n in params], lr=state["lr"], betas=state["betas"])
    for n, p in restored.items():
        opt2.state[p] = {"step": torch.tensor(float(state["step"])), **tensors[n]}
        p.grad = grads[n].clone()
    opt2.step()
    for n in params:
        assert torch.equal(restored[n], params[n]), n
    torch.set_rng_state(ckpt.meta(0, 0)["rng"])
    assert torch.equal(torch.rand(4), expected_next)


# ---------------------------------------------------------------- optimizer state: layout and resharding
KINDS = ("exp_avg", "exp_avg_sq")


def random_optimizer_full(config, seed=10):
    return {k: random_full(config, seed=seed + i) for i, k in enumerate(KINDS)}


def ref_optimizer_states(config, full_by_kind, tp, pp, padding_value=0.0, virtual_stages=1):
    """{(t, p): {name: {kind: shard}}} by plain slicing; vocabulary padding rows set to padding_value."""
    out = {}
    for t in range(tp):
        for p in range(pp):
            out[(t, p)] = {}
            for n in ref_stage_names(config, pp, p, virtual_stages):
                out[(t, p)][n] = {}
                for k in KINDS:
                    shard = ref_shard(n, full_by_kind[k][n], config.vocab_size, tp, t).clone()
                    if n in ("embed_tokens.weight", "lm_head.weight"):
                        rows_before = t * shard.shape[0]
                        shard[max(0, config.vocab_size - rows_before):] = padding_value
                    out[(t, p)][n][k] = shard
    return out


LAYOUT_2X2 = {"tp": 2, "pp": 2, "dp": 4, "virtual_stages": 1, "sequence_parallel": True,
              "distributed_optimizer": True}


@pytest.fixture
def saved_with_optimizer(tmp_path):
    """TP=2 x PP=2, tied embeddings, a ZeRO-like state gathered per (TP, PP) rank; padding rows hold
    garbage (7.0) that a same-TP read keeps and a resharding read replaces with zeros."""
    config = tiny_config(tied=True)
    full, opt_full = random_full(config, seed=4), random_optimizer_full(config)
    ck.save_checkpoint(tmp_path / "ck", 12, config, 2, 2, ref_rank_states(config, full, 2, 2),
                       optimizer_tensors=ref_optimizer_states(config, opt_full, 2, 2, padding_value=7.0),
                       optimizer_state={"step": 12, "weight_decay": 0.1}, layout=LAYOUT_2X2,
                       extra={"consumed_samples": 384, "run": {"stage": "ct", "seq_length": (64, 2)}})
    return tmp_path / "ck", config, opt_full


@pytest.mark.parametrize("dst", [(2, 2), (2, 1), (1, 1), (4, 1), (4, 4)])
def test_optimizer_state_reads_back_at_same_tp_and_reshards_like_slicing(saved_with_optimizer, dst):
    root, config, opt_full = saved_with_optimizer
    ckpt = ck.open_checkpoint(root)
    tp, pp = dst
    same_tp = tp == 2
    expected = ref_optimizer_states(config, opt_full, tp, pp, padding_value=7.0 if same_tp else 0.0)
    for t in range(tp):
        for p in range(pp):
            tensors, state = ck.load_rank_optimizer(ckpt, t, p, tp, pp)
            assert state == {"step": 12, "weight_decay": 0.1}
            assert list(tensors) == ck.canonical_order(ref_stage_names(config, pp, p))
            for n, by_kind in tensors.items():
                assert sorted(by_kind) == list(KINDS), n
                for k, v in by_kind.items():
                    assert v.dtype == torch.float32 and torch.equal(v, expected[(t, p)][n][k]), (t, p, n, k)


def test_layout_and_extra_are_recorded_and_read(saved_with_optimizer):
    root, _, _ = saved_with_optimizer
    ckpt = ck.open_checkpoint(root)
    assert ckpt.layout == LAYOUT_2X2
    assert ckpt.extra == {"consumed_samples": 384, "run": {"stage": "ct", "seq_length": (64, 2)}}
    info = json.loads((ckpt.path / "checkpoint.json").read_text())
    assert info["layout"] == LAYOUT_2X2 and info["optimizer"] == {"kinds": list(KINDS)}
    # One optimizer file set per (TP, PP) rank, keys "{name}/{kind}", whatever the DP size.
    for t in range(2):
        for p in range(2):
            rdir = ckpt.path / f"mp_rank_{t:02d}_{p:03d}"
            assert sorted(f.name for f in rdir.iterdir()) == ["meta.json", "model.safetensors",
                                                             "optimizer.json", "optimizer.safetensors"]
            with safe_open(rdir / "optimizer.safetensors", "pt") as f:
                assert set(f.keys()) == {f"{n}/{k}" for n in ref_stage_names(ckpt.config, 2, p) for k in KINDS}
    # A checkpoint written before layouts were recorded: TP and PP from the file, DP unknown.
    del info["layout"], info["extra"]
    (ckpt.path / "checkpoint.json").write_text(json.dumps(info))
    old = ck.open_checkpoint(root)
    assert old.layout == {"tp": 2, "pp": 2, "dp": None} and old.extra == {}


def test_checkpoint_without_optimizer_says_so(saved):
    root, _, _ = saved
    ckpt = ck.open_checkpoint(root)
    assert not ckpt.has_optimizer and ckpt.optimizer_kinds == []
    assert ckpt.layout == {"tp": 2, "pp": 2, "dp": None}
    with pytest.raises(ck.CheckpointError, match="holds no optimizer state"):
        ck.load_rank_optimizer(ckpt, 0, 0, 2, 2)


def test_missing_or_wrong_optimizer_files_and_tensors_are_refused_by_name(saved_with_optimizer):
    root, _, _ = saved_with_optimizer
    it = root / "iter_0000012"
    (it / "mp_rank_01_001" / "optimizer.safetensors").unlink()

    def rewrite(rank_dir, edit):
        path = it / rank_dir / "optimizer.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    rewrite("mp_rank_00_000", lambda t: t.pop("layers.1.mlp.up_proj.weight/exp_avg_sq"))
    rewrite("mp_rank_01_000", lambda t: t.update({"layers.0.self_attn.k_proj.weight/exp_avg": torch.zeros(8, 64),
                                                  "layers.0.mlp.gate_proj.weight/momentum": torch.zeros(2)}))
    with pytest.raises(ck.CheckpointError) as err:
        ck.open_checkpoint(root)
    msg = str(err.value)
    assert "mp_rank_01_001 (TP rank 1, PP rank 1) is missing ['optimizer.safetensors']" in msg
    assert "mp_rank_00_000/optimizer.safetensors: missing tensor(s) ['layers.1.mlp.up_proj.weight/exp_avg_sq']" in msg
    assert "mp_rank_01_000/optimizer.safetensors: unexpected tensor(s) ['layers.0.mlp.gate_proj.weight/momentum']" in msg
    assert "layers.0.self_attn.k_proj.weight/exp_avg (8, 64) (expected (16, 64))" in msg


def test_save_refuses_wrong_optimizer_tensors_and_layouts_by_name(tmp_path):
    config = tiny_config()
    states = ref_rank_states(config, random_full(config), 2, 1)

    def optimizer(edit=None):
        tensors = ref_optimizer_states(config, random_optimizer_full(config), 2, 1)
        if edit:
            edit(tensors[(1, 0)])
        return tensors

    cases = [
        (lambda o: o.pop("norm.weight"), r"TP rank 1, PP rank 0: missing parameter\(s\) \['norm.weight'\]"),
        (lambda o: o.update({"layers.9.mlp.up_proj.weight": {}}), r"unexpected parameter\(s\) \['layers.9"),
        (lambda o: o["norm.weight"].pop("exp_avg"), r"tensor kinds are not \['exp_avg', 'exp_avg_sq'\].*\['norm.weight'\]"),
        (lambda o: o["lm_head.weight"].update(exp_avg=torch.zeros(250, 64)),
         r"lm_head.weight/exp_avg \(250, 64\) \(expected \(128, 64\)\)"),
        (lambda o: o["norm.weight"].update(exp_avg=[0.0] * 64), r"norm.weight/exp_avg list"),
    ]
    for edit, pattern in cases:
        with pytest.raises(ck.CheckpointError, match=pattern):
            ck.save_checkpoint(tmp_path, 1, config, 2, 1, states, optimizer_tensors=optimizer(edit))
    with pytest.raises(ck.CheckpointError, match=r"no optimizer tensors for \(tp_rank, pp_rank\) \[\(1, 0\)\]"):
        ck.save_checkpoint(tmp_path, 1, config, 2, 1, states, optimizer_tensors={(0, 0): optimizer()[(0, 0)]})
    with pytest.raises(ck.CheckpointError, match="optimizer_state given without optimizer_tensors"):
        ck.save_checkpoint(tmp_path, 1, config, 2, 1, states, optimizer_state={"step": 1})
    per_rank = {(0, 0): {"step": 1}, (1, 0): {"step": 2}}
    ck.save_checkpoint(tmp_path / "per_rank", 1, config, 2, 1, states, optimizer_tensors=optimizer(),
                       optimizer_state=per_rank)
    assert ck.open_checkpoint(tmp_path / "per_rank").optimizer_state(1, 0) == {"step": 2}
    with pytest.raises(ck.CheckpointError, match=r"no optimizer state for \(tp_rank, pp_rank\) \[\(1, 0\)\]"):
        ck.save_checkpoint(tmp_path, 1, config, 2, 1, states, optimizer_tensors=optimizer(),
                           optimizer_state={(0, 0): {"step": 1}})
    for layout, pattern in [({"tp": 4}, "layout says tp=4 but the checkpoint is written for tp=2"),
                            ({"dp": 0}, "dp must be a positive integer, got 0"),
                            ({"dp": 2, "device": torch.device("cpu")}, "not JSON values only")]:
        with pytest.raises(ck.CheckpointError, match=pattern):
            ck.save_checkpoint(tmp_path, 1, config, 2, 1, states, layout=layout)
    assert not (tmp_path / "latest").exists() and not (tmp_path / "iter_0000001").exists()


# --------------------------------------------------------------------------------- refused inputs
@pytest.fixture
def saved(tmp_path):
    config = tiny_config()
    full = random_full(config)
    ck.save_checkpoint(tmp_path / "ck", 5, config, 2, 2, ref_rank_states(config, full, 2, 2))
    return tmp_path / "ck", config, full


def test_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ck.CheckpointError, match="not an engine checkpoint"):
        ck.open_checkpoint(tmp_path)
    with pytest.raises(ck.CheckpointError, match="no such checkpoint directory"):
        ck.open_checkpoint(tmp_path / "absent")
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ck.CheckpointError, match="not an engine checkpoint"):
        ck.open_checkpoint(tmp_path)


def test_missing_rank_file_is_named(saved):
    root, _, _ = saved
    (root / "iter_0000005" / "mp_rank_01_001" / "model.safetensors").unlink()
    with pytest.raises(ck.CheckpointError, match=r"mp_rank_01_001 \(TP rank 1, PP rank 1\) is missing \['model.safetensors'\]"):
        ck.open_checkpoint(root)


def _rewrite_rank_file(root, rank_dir, edit):
    path = root / "iter_0000005" / rank_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_unexpected_and_misshaped_tensors_are_named(saved):
    root, _, _ = saved
    _rewrite_rank_file(root, "mp_rank_00_000", lambda t: t.pop("layers.1.mlp.up_proj.weight"))
    _rewrite_rank_file(root, "mp_rank_01_001", lambda t: t.update({"layers.3.mlp.extra.weight": torch.zeros(2)}))
    _rewrite_rank_file(root, "mp_rank_01_000", lambda t: t.update({"layers.0.self_attn.k_proj.weight": torch.zeros(8, 64),
                                                                    "layers.0.self_attn.q_proj.weight": torch.zeros(32, 64).half()}))
    with pytest.raises(ck.CheckpointError) as err:
        ck.open_checkpoint(root)
    msg = str(err.value)
    assert "mp_rank_00_000/model.safetensors: missing tensor(s) ['layers.1.mlp.up_proj.weight']" in msg
    assert "mp_rank_01_001/model.safetensors: unexpected tensor(s) ['layers.3.mlp.extra.weight']" in msg
    assert "layers.0.self_attn.k_proj.weight (8, 64) (expected (16, 64))" in msg
    assert "layers.0.self_attn.q_proj.weight is torch.float16 but torch.float32 on TP rank 0" in msg


def test_checkpoint_of_another_model_is_refused(saved, tmp_path):
    root, config, _ = saved
    other = tiny_config(hidden_size=32, intermediate_size=64)
    with pytest.raises(ck.CheckpointError, match=r"another model; config differs: .*hidden_size: 64 != 32"):
        ck.open_checkpoint(root, expect_config=other)
    # A rank's file set taken from a checkpoint of another model.
    ck.save_checkpoint(tmp_path / "other", 5, other, 2, 2, ref_rank_states(other, random_full(other), 2, 2))
    dst = root / "iter_0000005" / "mp_rank_00_001"
    shutil.rmtree(dst)
    shutil.copytree(tmp_path / "other" / "iter_0000005" / "mp_rank_00_001", dst)
    with pytest.raises(ck.CheckpointError, match=r"mp_rank_00_001/meta.json: config differs"):
        ck.open_checkpoint(root)


def test_save_refuses_wrong_states_by_name(tmp_path):
    config = tiny_config()
    states = ref_rank_states(config, random_full(config), 2, 1)
    states[(1, 0)].pop("norm.weight")
    with pytest.raises(ck.CheckpointError, match=r"TP rank 1, PP rank 0: missing tensor\(s\) \['norm.weight'\]"):
        ck.save_checkpoint(tmp_path, 1, config, 2, 1, states)
    with pytest.raises(ck.CheckpointError, match=r"no state for \(tp_rank, pp_rank\) \[\(1, 0\)\]"):
        ck.save_checkpoint(tmp_path, 1, config, 2, 1, {(0, 0): states[(0, 0)]})
    with pytest.raises(ValueError, match="does not divide the number of layers"):
        ck.save_checkpoint(tmp_path, 1, config, 1, 3, {})
    assert not (tmp_path / "latest").exists() and not (tmp_path / "iter_0000001").exists()


def _fail_after(monkeypatch, n):
    real = sio.SafetensorsWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError("disk full (simulated)")
        real(self, name, tensor)
    monkeypatch.setattr(sio.SafetensorsWriter, "write", write)


@pytest.mark.parametrize("killed", [False, True], ids=["exception", "killed"])
def test_interrupted_save_never_looks_complete(saved, monkeypatch, killed):
    root, config, full = saved
    new = {n: v + 1 for n, v in full.items()}
    if killed:  # the process dies: no clean-up code runs
        monkeypatch.setattr(ck.CheckpointWriter, "abort", lambda self: None)
    _fail_after(monkeypatch, 20)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(root, 6, config, 2, 2, ref_rank_states(config, new, 2, 2))
    assert not (root / "iter_0000006").exists() and (root / "latest").read_text() == "5\n"
    assert (root / "iter_0000006.saving").exists() == killed
    with pytest.raises(ck.CheckpointError, match="iteration 6 is missing or incomplete"):
        ck.open_checkpoint(root, iteration=6)
    assert all(torch.equal(v, full[n]) for n, v in ck.load_full_tensors(root).items())
    monkeypatch.undo()
    ck.save_checkpoint(root, 6, config, 2, 2, ref_rank_states(config, new, 2, 2))  # leftovers replaced
    assert not (root / "iter_0000006.saving").exists() and (root / "latest").read_text() == "6\n"
    assert all(torch.equal(v, new[n]) for n, v in ck.load_full_tensors(root).items())


def test_next_save_removes_leftovers_of_other_iterations(saved):
    """A crashed save of an iteration the resumed run never saves again must not stay forever."""
    root, config, full = saved
    (root / "iter_0000003.saving" / "mp_rank_00_000").mkdir(parents=True)
    ck.save_checkpoint(root, 7, config, 2, 2, ref_rank_states(config, full, 2, 2))
    assert not list(root.glob("*.saving")) and (root / "latest").read_text() == "7\n"


def test_crash_before_latest_keeps_previous_checkpoint_current(saved, monkeypatch):
    root, config, full = saved

    def crash(path, text):
        raise OSError("killed before latest (simulated)")
    monkeypatch.setattr(ck, "write_text_atomic", crash)
    with pytest.raises(OSError):
        ck.save_checkpoint(root, 8, config, 1, 1, ref_rank_states(config, full, 1, 1))
    assert ck.open_checkpoint(root).iteration == 5


def test_first_save_killed_leaves_no_checkpoint(tmp_path, monkeypatch):
    config = tiny_config()
    monkeypatch.setattr(ck.CheckpointWriter, "abort", lambda self: None)
    _fail_after(monkeypatch, 3)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 0, config, 1, 1, ref_rank_states(config, random_full(config), 1, 1))
    with pytest.raises(ck.CheckpointError, match="not an engine checkpoint.*unfinished save"):
        ck.open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------ distributed save
def _distributed_save(rank, world_size, root):
    """Each rank of a TP=2 x PP=2 engine model (tied embeddings) saves its own parameters."""
    from engine.parallel.layout import PipelineLayout
    from engine.parallel.state import init_parallel
    from engine.parallel.tensor_parallel import build_parallel_llama

    config = tiny_config(tied=True)
    state = init_parallel(tp=2, pp=2)
    t, p = state.tp_rank, state.pp_rank
    model = build_parallel_llama(config, state, seed=5, layer_ids=PipelineLayout(4, 2).chunk_layers(p),
                                 has_embedding=p == 0, has_head=p == 1)
    mine = {n: param.detach() for n, param in model.named_parameters()}
    moments = {n: {"master": v.float(), "exp_avg": 2 * v.float()} for n, v in mine.items()}
    path = ck.save_checkpoint_distributed(root, 10, config, 2, 2, t, p, mine, meta={"rank": rank},
                                          optimizer_tensors=moments, optimizer_state={"step": 10},
                                          layout={"tp": 2, "pp": 2, "dp": 1}, extra={"consumed_samples": 40})
    reloaded = ck.load_rank_shard(root, t, p, 2, 2)
    tensors, state = ck.load_rank_optimizer(root, t, p, 2, 2)
    same = set(reloaded) == set(mine) and all(torch.equal(reloaded[n], v) for n, v in mine.items())
    same = same and state == {"step": 10} and set(tensors) == set(mine) and all(
        torch.equal(tensors[n][k], moments[n][k]) for n in mine for k in ("master", "exp_avg"))
    # A second save where rank 3 hands a wrong state: every rank must fail, nothing published.
    bad = dict(mine)
    if rank == 3:
        bad.pop("norm.weight")
    try:
        ck.save_checkpoint_distributed(root, 11, config, 2, 2, t, p, bad)
        second = "saved"
    except ck.CheckpointError as e:
        second = str(e)
    return str(path), same, second


@pytest.mark.distributed
def test_distributed_save_of_a_tensor_parallel_model_each_rank_writes_its_file_set(tmp_path):
    from engine.model.llama import init_parameter

    results = run_distributed(_distributed_save, 4, args=(str(tmp_path),), timeout=180)
    assert all(r[0] == str(tmp_path / "iter_0000010") and r[1] for r in results)
    assert all("rank 3: CheckpointError" in r[2] and "norm.weight" in r[2] for r in results)
    assert (tmp_path / "latest").read_text() == "10\n" and not (tmp_path / "iter_0000011").exists()
    assert not (tmp_path / "iter_0000011.saving").exists()
    config = tiny_config(tied=True)
    loaded = ck.load_full_tensors(tmp_path)  # the full model equals the layout-independent init
    assert set(loaded) == set(expected_shapes(config))
    for n, shape in expected_shapes(config).items():
        assert torch.equal(loaded[n], init_parameter(n, shape, config, 5)), n
    ckpt = ck.open_checkpoint(tmp_path)
    assert ckpt.meta(1, 1) == {"rank": 3}
    assert ckpt.layout == {"tp": 2, "pp": 2, "dp": 1} and ckpt.extra == {"consumed_samples": 40}
    full_master, _ = ck.load_rank_optimizer(ckpt, 0, 0, 1, 1)  # resharded onto one process
    for n, by_kind in full_master.items():
        shape = expected_shapes(config)[n]
        assert torch.equal(by_kind["master"][:shape[0]], init_parameter(n, shape, config, 5)), n
        assert torch.equal(by_kind["exp_avg"][:shape[0]], 2 * by_kind["master"][:shape[0]]), n


def _data_parallel_save(rank, world_size, root):
    """TP=1 x DP=2: both DP ranks call the save; DP rank 0's optimizer tensors are written, DP rank
    1's (different, as an unsynchronised ZeRO slice would be) never reach the disk."""
    config = tiny_config(num_hidden_layers=2)
    full = random_full(config, seed=6)
    params = ref_rank_states(config, full, 1, 1)[(0, 0)]
    moments = {n: {k: v * (i + 1) + rank for i, k in enumerate(KINDS)} for n, v in params.items()}
    layout = {"tp": 1, "pp": 1, "dp": 2, "distributed_optimizer": True}
    ck.save_checkpoint_distributed(root, 4, config, 1, 1, 0, 0, params, optimizer_tensors=moments,
                                   optimizer_state={"step": 4}, layout=layout, dp_rank=rank)
    tensors, _ = ck.load_rank_optimizer(root, 0, 0, 1, 1)
    dp0 = {n: {k: v * (i + 1) for i, k in enumerate(KINDS)} for n, v in params.items()}
    same = all(torch.equal(tensors[n][k], dp0[n][k]) for n in params for k in KINDS)
    bad = dict(moments)
    if rank == 0:
        bad["norm.weight"] = {k: torch.zeros(3) for k in KINDS}
    try:
        ck.save_checkpoint_distributed(root, 5, config, 1, 1, 0, 0, params, optimizer_tensors=bad, dp_rank=rank)
        second = "saved"
    except ck.CheckpointError as e:
        second = str(e)
    return same, second


@pytest.mark.distributed
def test_data_parallel_save_writes_one_optimizer_file_set_from_dp_rank_0(tmp_path):
    results = run_distributed(_data_parallel_save, 2, args=(str(tmp_path),), timeout=120)
    assert all(r[0] for r in results)
    assert all("rank 0: CheckpointError" in r[1] and "norm.weight/exp_avg (3,) (expected (64,))" in r[1]
               for r in results)
    assert (tmp_path / "latest").read_text() == "4\n" and not (tmp_path / "iter_0000005").exists()
    ckpt = ck.open_checkpoint(tmp_path)
    assert ckpt.layout == {"tp": 1, "pp": 1, "dp": 2, "distributed_optimizer": True}
    assert sorted(f.name for f in (ckpt.path / "mp_rank_00_000").iterdir()) == [
        "meta.json", "model.safetensors", "optimizer.json", "optimizer.safetensors"]
