"""A whole tiny Llama split over TP = 2 and 4 ranks (with and without sequence parallelism, tied and
untied embeddings) gives the loss, logits and, gathered, the gradients of every parameter that one
process computes with the same seed.

One spawn of 4 gloo processes runs every case (TP = 2 runs as two TP groups side by side) and
returns the largest error per parameter; the tests assert on them case by case.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.model.llama import Llama, expected_shapes
from engine.parallel import collectives as C
from engine.parallel.collectives import all_gather_along
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
import torch.distributed as dist

from engine.parallel.layers import VocabParallelEmbedding, VocabParallelLMHead
from engine.parallel.layout import is_vocab_parallel, tp_shard
from engine.parallel.state import ParallelState, init_parallel, rank_layout, single_process_state
from engine.parallel.tensor_parallel import (build_parallel_llama, gather_full_param, sequence_parallel_names,
                                             lm_head_vocab_range, parallelize_model)

SEED, IGNORE = 1234, -100
TP_SIZES = (4, 2)
# (TP, tied embeddings, sequence parallel, activation recomputation)
CASES = [(tp, tied, sp, False) for tp in TP_SIZES for tied in (False, True) for sp in (False, True)]
CASES += [(4, True, True, True), (2, False, False, True)]
TOL = 2e-5
# Besides TOL, each error relative to the largest reference value of its quantity: the smallest
# gradients (q/k at this init) are ~1e-3, so TOL alone would let a 1% error through there.
REL_TOL = 1e-5


def _config(tied):
    # 8 query heads over 4 KV heads (GQA) split over 4 ranks leaves 2 query heads and 1 KV head each.
    # The vocabulary (300) is not a multiple of 128: padded to 512 for TP 2 and 4.
    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=tied,
                       rope_theta=10000.0)


def _batch(vocab):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    targets = torch.randint(0, vocab, (2, 8), generator=gen)
    targets[0, 3] = targets[1, 0] = IGNORE
    targets[1, 1] = vocab - 1
    return ids, targets


def _reference(config):
    """One process, the whole model, torch's cross entropy on the unpadded logits."""
    model = Llama(config)
    model.init_weights(seed=SEED)
    ids, targets = _batch(config.vocab_size)
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _err(a, b):
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item()


@contextlib.contextmanager
def _count_sequence_collectives():
    """Count the all-gathers and reduce-scatters that reach the backend."""
    counts = {"all_gather": 0, "reduce_scatter": 0}
    originals = C._gather_dim0, C._reduce_scatter_dim0

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    C._gather_dim0, C._reduce_scatter_dim0 = counted("all_gather", originals[0]), counted("reduce_scatter", originals[1])
    try:
        yield counts
    finally:
        C._gather_dim0, C._reduce_scatter_dim0 = originals


def _run_case(state, tied, sp, recompute):
    config = _config(tied)
    ref_logits, ref_loss, ref_grads = _reference(config)
    model = build_parallel_llama(config, state, sequence_parallel=sp, seed=SEED)
    model.activation_checkpointing = recompute
    ids, targets = _batch(config.vocab_size)
    with _count_sequence_collectives() as counts:
        local_logits = model(ids)
        start, vocab = lm_head_vocab_range(model)
        per_token = vocab_parallel_cross_entropy(local_logits, targets, start, vocab, state.tp_group, IGNORE)
        loss = per_token.sum() / (targets != IGNORE).sum()
        loss.backward()
    # Sequence parallelism leaves partial gradients of the norms on each TP rank: sum them.
    params = dict(model.named_parameters())
    for name in sorted(sequence_parallel_names(model)):
        dist.all_reduce(params[name].grad, group=state.tp_group)

    full_logits = all_gather_along(local_logits.detach(), -1, state.tp_group)[..., :vocab]
    errors = {"loss": abs(loss.item() - ref_loss), "logits": _err(full_logits, ref_logits)}
    scales = {"loss": abs(ref_loss), "logits": ref_logits.abs().max().item()}
    names = []
    for name, param in model.named_parameters():
        names.append(name)
        errors[f"grad:{name}"] = _err(gather_full_param(name, param.grad, state, vocab), ref_grads[name])
        scales[f"grad:{name}"] = ref_grads[name].abs().max().item()
    # Rows of the padded vocabulary take no part in the loss: their gradients are exactly zero.
    padding_grad = 0.0
    for name, param in model.named_parameters():
        if is_vocab_parallel(name):
            padding_rows = param.grad[max(0, vocab - start):]  # empty on ranks without padding
            if padding_rows.numel():
                padding_grad = max(padding_grad, padding_rows.abs().max().item())
    expected_local = {n: tuple(tp_shard(n, torch.empty(shape, device="meta"), state.tp_size, state.tp_rank).shape)
                      for n, shape in expected_shapes(config).items()}
    return {
        "errors": errors,
        "scales": scales,
        "padding_grad": padding_grad,
        "names": sorted(names),
        "ref_names": sorted(ref_grads),
        "local_shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
        "expected_local_shapes": expected_local,
        "sequence_collectives": dict(counts),
        "sp_tagged": sorted(sequence_parallel_names(model)),
    }


def _run_all(rank, world_size):
    torch.manual_seed(0)
    out = {}
    for tp in TP_SIZES:
        state = init_parallel(tp, 1)
        for case in [c for c in CASES if c[0] == tp]:
            out[case] = _run_case(state, *case[1:])
    return out


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_run_all, 4, timeout=170)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,tied,sp,recompute", CASES, ids=[
    f"tp{t}-{'tied' if ti else 'untied'}-{'sp' if s else 'nosp'}{'-recompute' if r else ''}" for t, ti, s, r in CASES])
def test_tp_model_matches_single_process(distributed_results, tp, tied, sp, recompute):
    for rank, results in enumerate(distributed_results):
        result = results[(tp, tied, sp, recompute)]
        assert result["names"] == result["ref_names"], f"rank {rank}: parameter names differ"
        bad = {k: v for k, v in result["errors"].items() if not v < TOL}
        assert not bad, f"rank {rank}, TP={tp}, tied={tied}, SP={sp}: differs from one process: {bad}"
        assert result["padding_grad"] == 0.0, f"rank {rank}: vocabulary padding rows received gradients"
        scales = result["scales"]
        assert set(scales) == set(result["errors"]) and all(v > 0 for v in scales.values())
        relative = {k: v / scales[k] for k, v in result["errors"].items()}
        bad = {k: v for k, v in relative.items() if not v < REL_TOL}
        assert not bad, f"rank {rank}, TP={tp}, tied={tied}, SP={sp}: relative error too large: {bad}"
        # Every gradient was compared, and the rank holds only its shards of the model.
        assert len(result["errors"]) == 2 + len(result["ref_names"])
        assert result["local_shapes"] == result["expected_local_shapes"]
        norms = [n for n in result["names"] if n.endswith("norm.weight")]
        assert result["sp_tagged"] == (norms if sp else [])
        # One all-gather per norm (2 per layer + the final norm) forward, one reduce-scatter per
        # row-parallel layer and the embedding; the backward mirrors them. None without SP.
        # (Recomputation repeats some of them, as many as torch's checkpointing needs.)
        if not recompute:
            per_pass = 2 * _config(tied).num_hidden_layers + 1 if sp else 0
            assert result["sequence_collectives"] == {"all_gather": 2 * per_pass, "reduce_scatter": 2 * per_pass}


# ------------------------------------------------------------------ one process, no group needed
def test_parallelize_keeps_values_of_a_materialized_model():
    config = _config(tied=False)
    full = Llama(config)
    full.init_weights(seed=7)
    values = {n: p.detach().clone() for n, p in full.named_parameters()}
    ids, _ = _batch(config.vocab_size)
    ref_logits = full(ids).detach()
    model = parallelize_model(full, single_process_state(), seed=None)
    assert isinstance(model.embed_tokens, VocabParallelEmbedding)
    assert isinstance(model.lm_head, VocabParallelLMHead)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), tp_shard(name, values[name], 1, 0), rtol=0, atol=0)
    logits = model(ids)
    assert logits.shape[-1] == 384  # 300 padded to a multiple of 128
    torch.testing.assert_close(logits[..., :300], ref_logits, rtol=0, atol=1e-6)
    assert logits[..., 300:].abs().max() == 0  # padding rows are zero


def test_build_on_meta_allocates_local_shards_with_init_values():
    config = _config(tied=True)
    model = build_parallel_llama(config, single_process_state(), seed=SEED, dtype=torch.bfloat16)
    ref = Llama(config)
    ref.init_weights(seed=SEED)
    shapes = expected_shapes(config)
    for name, param in model.named_parameters():
        assert not param.is_meta and param.dtype == torch.bfloat16, name
        expected = tp_shard(name, dict(ref.named_parameters())[name].detach(), 1, 0).to(torch.bfloat16)
        assert param.shape == expected.shape and torch.equal(param.detach(), expected), name
    assert sorted(n for n, _ in model.named_parameters()) == sorted(shapes)


def test_impossible_layout_refused_before_building():
    # A 4-way TP state (no processes needed: validation comes first) on a model with 2 KV heads.
    layout = rank_layout(4, 4, 1)
    state = ParallelState(layout=layout, rank=0, tp_rank=0, dp_rank=0, pp_rank=0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"does not divide the number of key/value heads \(num_key_value_heads=2\)"):
        build_parallel_llama(config, state)
