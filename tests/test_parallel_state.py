"""Process-group layout (Megatron order: TP fastest, then DP, then PP) and refusal of bad layouts."""
import itertools

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.parallel.state import init_parallel, rank_layout, single_process_state, validate_layout


def _enumerated_groups(world, tp, pp):
    """Independent reference: place every rank by the formula, then group by the other coordinates."""
    dp = world // (tp * pp)
    coords = {}
    for p, d, t in itertools.product(range(pp), range(dp), range(tp)):
        coords[t + tp * (d + dp * p)] = (t, d, p)
    assert sorted(coords) == list(range(world))

    def groups(key):
        out = {}
        for rank in range(world):
            out.setdefault(key(*coords[rank]), []).append(rank)
        return sorted(out.values())

    return {
        "tp": groups(lambda t, d, p: (d, p)),
        "dp": groups(lambda t, d, p: (t, p)),
        "pp": groups(lambda t, d, p: (t, d)),
        "model": groups(lambda t, d, p: d),
        "embedding": sorted([r for r in g if coords[r][2] in (0, pp - 1)]
                            for g in groups(lambda t, d, p: (t, d))),
        "coords": coords,
    }


@pytest.mark.parametrize("world,tp,pp", [
    (1, 1, 1), (8, 1, 1), (8, 8, 1), (8, 1, 8), (8, 2, 2), (16, 2, 4), (16, 4, 2), (24, 2, 3),
    (64, 8, 2), (12, 3, 1),
])
def test_rank_layout_matches_enumeration(world, tp, pp):
    layout = rank_layout(world, tp, pp)
    ref = _enumerated_groups(world, tp, pp)
    assert layout.dp_size == world // (tp * pp)
    for kind in ("tp", "dp", "pp", "model", "embedding"):
        assert sorted(getattr(layout, kind)) == ref[kind], kind
    for rank, (t, d, p) in ref["coords"].items():
        assert layout.coordinates(rank) == (t, d, p)


def test_tp_groups_are_consecutive_ranks_within_a_node():
    # 64 GPUs as 8 nodes x 8 with TP 8: every TP group is exactly one node.
    layout = rank_layout(64, 8, 2)
    assert layout.tp == [list(range(n * 8, n * 8 + 8)) for n in range(8)]


@pytest.mark.parametrize("world,tp,pp,dp,match", [
    (8, 3, 1, None, "not divisible by tensor-parallel size 3"),
    (8, 2, 3, None, "pipeline-parallel size 3"),
    (8, 2, 2, 3, r"world size 8 != tensor-parallel 2 x pipeline-parallel 2 x data-parallel 3"),
    (8, 0, 1, None, "tensor-parallel size must be a positive integer"),
    (0, 1, 1, None, "world size must be a positive integer"),
    (8, 2, 1, 0, "data-parallel size must be a positive integer"),
])
def test_rank_layout_refuses_impossible_sizes(world, tp, pp, dp, match):
    with pytest.raises(ValueError, match=match):
        rank_layout(world, tp, pp, dp)


def _config(heads=8, kv_heads=4, layers=6, intermediate=256):
    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)


def test_validate_layout_accepts_possible_layouts():
    validate_layout(_config(), tp=4, pp=3, dp=2, world_size=24)
    validate_layout(_config(), tp=1, pp=1)
    validate_layout(_config(heads=4, kv_heads=1), tp=1, pp=2)


@pytest.mark.parametrize("kwargs,config_kwargs,match", [
    (dict(tp=3), dict(heads=8, kv_heads=8), r"does not divide the number of attention heads \(num_attention_heads=8\)"),
    (dict(tp=8), dict(heads=8, kv_heads=4), r"does not divide the number of key/value heads \(num_key_value_heads=4\)"),
    (dict(tp=2), dict(heads=8, kv_heads=1), r"num_key_value_heads=1"),
    (dict(tp=1, pp=4), dict(layers=6), r"pipeline-parallel size 4 does not divide the number of layers \(num_hidden_layers=6\)"),
    (dict(tp=2, pp=2, dp=2, world_size=16), dict(), r"world size 16 != tensor-parallel 2 x pipeline-parallel 2 x data-parallel 2"),
    (dict(tp=2, world_size=5), dict(), r"world size 5 is not divisible"),
    (dict(tp=4), dict(intermediate=250), r"intermediate_size=250"),
])
def test_validate_layout_refuses_by_name(kwargs, config_kwargs, match):
    config = _config(**config_kwargs)
    with pytest.raises(ValueError, match=match):
        validate_layout(config, **kwargs)


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    state = init_parallel(1, 1)
    assert state == single_process_state()
    assert (state.tp_size, state.pp_size, state.dp_size, state.tp_group) == (1, 1, 1, None)
    with pytest.raises(RuntimeError, match="lacks RANK, WORLD_SIZE, LOCAL_RANK: launch with torchrun"):
        init_parallel(2, 1)


def test_wrong_world_size_fails_before_rendezvous(monkeypatch):
    # No MASTER_ADDR / store: reaching init_process_group would hang or fail differently.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="world size 6 is not divisible by tensor-parallel size 4"):
        init_parallel(4, 1)


def test_init_from_torchrun_environment(monkeypatch):
    from dist_utils import free_port
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not dist.is_initialized()
    state = init_parallel(1, 1, backend="gloo")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert (state.world_size, state.rank, state.tp_size, state.dp_size, state.pp_size) == (1, 0, 1, 1, 1)
        assert state.tp_group is not None and dist.get_world_size(state.tp_group) == 1
    finally:
        dist.destroy_process_group()


def _groups_by_collective(rank, world_size, layouts):
    """Each group's members, found by all-reducing one-hot rank vectors over it, for each layout."""
    out = []
    for tp, pp in layouts:
        state = init_parallel(tp, pp)
        found = {}
        for kind in ("tp", "dp", "pp", "model"):
            group = getattr(state, f"{kind}_group")
            onehot = torch.zeros(world_size)
            onehot[rank] = 1.0
            dist.all_reduce(onehot, group=group)
            found[kind] = onehot.nonzero().flatten().tolist()
            found[f"{kind}_rank"] = dist.get_rank(group)
        found["embedding"] = None
        if state.embedding_group is not None:
            onehot = torch.zeros(world_size)
            onehot[rank] = 1.0
            dist.all_reduce(onehot, group=state.embedding_group)
            found["embedding"] = onehot.nonzero().flatten().tolist()
        found["coords"] = (state.tp_rank, state.dp_rank, state.pp_rank)
        found["state_ranks"] = (state.tp_ranks, state.dp_ranks, state.pp_ranks)
        out.append(found)
    return out


@pytest.mark.distributed
def test_init_parallel_groups_communicate_as_laid_out():
    world, layouts = 4, [(2, 2), (2, 1), (1, 2)]
    results = run_distributed(_groups_by_collective, world, args=(layouts,), timeout=120)
    for i, (tp, pp) in enumerate(layouts):
        ref = _enumerated_groups(world, tp, pp)
        for rank in range(world):
            found = results[rank][i]
            t, d, p = ref["coords"][rank]
            assert found["coords"] == (t, d, p), (tp, pp, rank)
            for kind in ("tp", "dp", "pp", "model"):
                assert found[kind] == next(g for g in ref[kind] if rank in g), (tp, pp, rank, kind)
            assert (found["tp_rank"], found["dp_rank"], found["pp_rank"]) == (t, d, p)
            assert found["state_ranks"] == (found["tp"], found["dp"], found["pp"])
            # Every rank of these 1- and 2-stage layouts is a first or last stage.
            assert found["embedding"] == next(g for g in ref["embedding"] if rank in g), (tp, pp, rank)
