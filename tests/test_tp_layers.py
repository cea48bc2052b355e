"""Collectives, tensor-parallel layers and vocab-parallel cross entropy against single-process math.

The distributed checks run once in 4 gloo processes, as TP=4 and as TP=2 (two TP groups side by
side), and return the largest error of each check; the tests below assert on them one by one.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_utils import run_distributed
from engine.parallel import collectives as C
from engine.parallel.cross_entropy import vocab_parallel_cross_entropy
from engine.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelLMHead)
from engine.parallel.layout import padded_vocab_size, tp_shard, vocab_shard_range
from engine.parallel.state import init_parallel

TP_SIZES = (4, 2)
VOCAB, HIDDEN, MID, BATCH, SEQ = 300, 8, 16, 2, 8
IGNORE = -100


def _randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _err(a, b):
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------ collectives
def _collective_cases(tp):
    """name -> (function, input shape, reference outputs per rank, reference input grads per rank)."""
    def chunk(t, j):
        return t.chunk(tp, dim=1)[j]

    def cat(ts):
        return torch.cat(ts, dim=1)

    return {
        # Each rank j holds x_j; the "single process" sees all of them and the summed loss.
        "copy_to_tp": (C.copy_to_tp, (2, 4, 3),
                       lambda xs: xs, lambda xs, gs: [sum(gs)] * tp),
        "reduce_from_tp": (C.reduce_from_tp, (2, 4, 3),
                           lambda xs: [sum(xs)] * tp, lambda xs, gs: gs),
        "scatter_to_sequence": (C.scatter_to_sequence, (2, 4 * tp, 3),
                                lambda xs: [chunk(x, j) for j, x in enumerate(xs)], lambda xs, gs: [cat(gs)] * tp),
        "gather_from_sequence": (C.gather_from_sequence, (2, 4, 3),
                                 lambda xs: [cat(xs)] * tp, lambda xs, gs: [chunk(sum(gs), j) for j in range(tp)]),
        "reduce_scatter_to_sequence": (C.reduce_scatter_to_sequence, (2, 4 * tp, 3),
                                       lambda xs: [chunk(sum(xs), j) for j in range(tp)],
                                       lambda xs, gs: [cat(gs)] * tp),
    }


def _check_collectives(tp, rank, group):
    errors = {}
    for i, (name, (fn, shape, ref_out, ref_grad)) in enumerate(_collective_cases(tp).items()):
        xs = [_randn(100 * i + j, shape) for j in range(tp)]
        x = xs[rank].clone().requires_grad_()
        y = fn(x, group)
        gs = [_randn(100 * i + 50 + j, y.shape) for j in range(tp)]
        (y * gs[rank]).sum().backward()
        errors[f"{name}/forward"] = _err(y, ref_out(xs)[rank])
        errors[f"{name}/backward"] = _err(x.grad, ref_grad(xs, gs)[rank])
    # The raw gather along another dimension (used to reassemble parameters).
    xs = [_randn(900 + j, (3, 2)) for j in range(tp)]
    errors["all_gather_along/dim0"] = _err(C.all_gather_along(xs[rank], 0, group), torch.cat(xs, 0))
    return errors


# ------------------------------------------------------------------------ column + row linear
def _check_linears(tp, rank, group, sequence_parallel):
    w1, w2 = _randn(1, (MID, HIDDEN)), _randn(2, (HIDDEN, MID))
    x_full, g_full = _randn(3, (BATCH, SEQ, HIDDEN)), _randn(4, (BATCH, SEQ, HIDDEN))
    ref_w1, ref_w2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    ref_x = x_full.clone().requires_grad_()
    ref_y = F.linear(F.silu(F.linear(ref_x, ref_w1)), ref_w2)
    (ref_y * g_full).sum().backward()

    col = ColumnParallelLinear(HIDDEN, MID, group, sequence_parallel)
    row = RowParallelLinear(MID, HIDDEN, group, sequence_parallel)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(tp, 0)[rank])
        row.weight.copy_(w2.chunk(tp, 1)[rank])

    def local(t):  # what this rank holds of a [b, s, h] activation
        return t.chunk(tp, 1)[rank] if sequence_parallel else t

    x = local(x_full).clone().requires_grad_()
    y = row(F.silu(col(x)))
    (y * local(g_full)).sum().backward()
    return {
        "output": _err(y, local(ref_y.detach())),
        "input_grad": _err(x.grad, local(ref_x.grad)),
        "column_weight_grad": _err(col.weight.grad, ref_w1.grad.chunk(tp, 0)[rank]),
        "row_weight_grad": _err(row.weight.grad, ref_w2.grad.chunk(tp, 1)[rank]),
    }


# ------------------------------------------------ embedding -> replicated scale -> head -> loss
class _TinyLM(nn.Module):
    """embedding, a replicated per-channel scale (as a norm weight), head: the sequence-parallel
    gradient rule of replicated weights is exercised by ``scale``."""

    def __init__(self, tp_group, sequence_parallel, tied):
        super().__init__()
        self.embed = VocabParallelEmbedding(VOCAB, HIDDEN, tp_group, sequence_parallel)
        self.scale = nn.Parameter(torch.empty(HIDDEN))
        self.head = VocabParallelLMHead(HIDDEN, VOCAB, tp_group, sequence_parallel, tied=tied)

    def forward(self, ids):
        hidden = self.embed(ids) * self.scale
        return self.head(hidden, self.embed.weight) if self.head.tied else self.head(hidden)


def _ids_and_targets():
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(8))
    # Shard edges for TP 2 and 4 (padded vocab 512: slices of 256 / 128) and both ends.
    ids[0, :4] = torch.tensor([0, 127, 128, VOCAB - 1])
    targets[0, :6] = torch.tensor([0, 127, 128, 255, 256, VOCAB - 1])
    targets[1, 0] = targets[1, 5] = IGNORE
    return ids, targets


def _check_vocab_parallel(tp, rank, group, sequence_parallel, tied):
    emb_full, head_full = _randn(11, (VOCAB, HIDDEN)), _randn(12, (VOCAB, HIDDEN))
    scale_full = 1.0 + 0.1 * _randn(13, (HIDDEN,))
    ids, targets = _ids_and_targets()

    ref_emb, ref_head = emb_full.clone().requires_grad_(), head_full.clone().requires_grad_()
    ref_scale = scale_full.clone().requires_grad_()
    ref_logits = F.linear(F.embedding(ids, ref_emb) * ref_scale, ref_emb if tied else ref_head)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    ref_loss.backward()

    model = _TinyLM(group, sequence_parallel, tied)
    with torch.no_grad():
        model.embed.weight.copy_(tp_shard("embed_tokens.weight", emb_full, tp, rank))
        model.scale.copy_(scale_full)
        if not tied:
            model.head.weight.copy_(tp_shard("lm_head.weight", head_full, tp, rank))
    logits = model(ids)
    start, end = vocab_shard_range(VOCAB, tp, rank)
    padded_ref_logits = F.pad(ref_logits.detach(), (0, padded_vocab_size(VOCAB, tp) - VOCAB))
    per_token = vocab_parallel_cross_entropy(logits, targets, model.head.vocab_start, VOCAB, group, IGNORE)
    loss = per_token.sum() / (targets != IGNORE).sum()
    loss.backward()
    if sequence_parallel:  # the scale saw only this rank's slice of the sequence
        torch.distributed.all_reduce(model.scale.grad, group=group)

    errors = {
        "logits": _err(logits, padded_ref_logits[..., start:end]),
        "loss": abs(loss.item() - ref_loss.item()),
        "ignored_tokens_zero": per_token[targets == IGNORE].abs().max().item(),
        "embedding_grad": _err(model.embed.weight.grad, tp_shard("embed_tokens.weight", ref_emb.grad, tp, rank)),
        "scale_grad": _err(model.scale.grad, ref_scale.grad),
    }
    if not tied:
        errors["head_grad"] = _err(model.head.weight.grad, tp_shard("lm_head.weight", ref_head.grad, tp, rank))
    return errors


def _sequence_not_divisible_message(group):
    embed = VocabParallelEmbedding(VOCAB, HIDDEN, group, sequence_parallel=True)
    try:
        embed(torch.zeros(1, 3, dtype=torch.long))
    except ValueError as e:
        return str(e)
    return None


def _run_all(rank, world_size):
    results = {}
    for tp in TP_SIZES:
        state = init_parallel(tp, 1)
        group, tp_rank = state.tp_group, state.tp_rank
        for key, err in _check_collectives(tp, tp_rank, group).items():
            results[(tp, "collectives", key)] = err
        for sp in (False, True):
            for key, err in _check_linears(tp, tp_rank, group, sp).items():
                results[(tp, f"linears/sp={sp}", key)] = err
            for tied in (False, True):
                for key, err in _check_vocab_parallel(tp, tp_rank, group, sp, tied).items():
                    results[(tp, f"vocab/sp={sp}/tied={tied}", key)] = err
        results[(tp, "errors", "seq_not_divisible")] = _sequence_not_divisible_message(group)
    return results


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_run_all, 4, timeout=150)


def _case_keys():
    keys = []
    for tp in TP_SIZES:
        keys.append((tp, "collectives"))
        for sp in (False, True):
            keys.append((tp, f"linears/sp={sp}"))
            for tied in (False, True):
                keys.append((tp, f"vocab/sp={sp}/tied={tied}"))
    return keys


@pytest.mark.distributed
@pytest.mark.parametrize("tp,case", _case_keys())
def test_parallel_matches_single_process(distributed_results, tp, case):
    checked = 0
    for rank, results in enumerate(distributed_results):
        for (res_tp, res_case, key), err in results.items():
            if (res_tp, res_case) == (tp, case):
                assert err < 1e-5, f"rank {rank}, TP={tp}, {case}: {key} differs by {err}"
                checked += 1
    assert checked >= 4 * 4, "expected at least four checks per rank"


@pytest.mark.distributed
@pytest.mark.parametrize("tp", TP_SIZES)
def test_sequence_parallel_refuses_indivisible_sequence(distributed_results, tp):
    for results in distributed_results:
        message = results[(tp, "errors", "seq_not_divisible")]
        assert message is not None and f"sequence length 3 is not a multiple of the tensor-parallel size {tp}" in message


# ---------------------------------------------------------------- single process (no group)
def test_cross_entropy_single_process_excludes_padding_and_ignored():
    logits_full = _randn(21, (2, 6, VOCAB))
    padded = torch.cat([logits_full, 50.0 + _randn(22, (2, 6, 84))], dim=-1)  # padding would dominate
    targets = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(23))
    targets[0, 1] = IGNORE
    x = padded.clone().requires_grad_()
    per_token = vocab_parallel_cross_entropy(x, targets, 0, VOCAB, None, IGNORE)
    ref_x = logits_full.clone().requires_grad_()
    ref = F.cross_entropy(ref_x.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(per_token.flatten(), ref, rtol=0, atol=1e-5)
    weights = _randn(24, (2, 6))
    (per_token * weights).sum().backward()
    (ref * weights.flatten()).sum().backward()
    torch.testing.assert_close(x.grad[..., :VOCAB], ref_x.grad, rtol=0, atol=1e-6)
    assert x.grad[..., VOCAB:].abs().max() == 0
    assert x.grad[0, 1].abs().max() == 0


def test_cross_entropy_half_precision_logits_give_fp32_loss_and_grad_dtype():
    logits = _randn(31, (4, VOCAB)).to(torch.bfloat16).requires_grad_()
    targets = torch.tensor([0, 5, VOCAB - 1, 17])
    loss = vocab_parallel_cross_entropy(logits, targets, 0, VOCAB)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.detach().float(), targets, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_refuses_mismatched_shapes():
    logits = torch.zeros(2, 3, 384)
    with pytest.raises(ValueError, match="do not match targets"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long), 0, VOCAB)


def test_layers_without_group_are_plain_layers():
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(HIDDEN, MID), RowParallelLinear(MID, HIDDEN)
    nn.init.normal_(col.weight)
    nn.init.normal_(row.weight)
    x = torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(row(col(x)), x @ col.weight.T @ row.weight.T)
