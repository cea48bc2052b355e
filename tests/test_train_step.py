"""The training step against a plain PyTorch reference, and the same loss curve for every layout.

Reference: the whole engine Llama in one process (itself checked against transformers), torch's
cross entropy, ``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW`` (no weight decay on norm
weights), on the same global batches. The engine runs the same steps with TP x DP in gloo processes,
with and without sequence parallelism and the distributed optimizer, fp32 throughout.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.model.llama import Llama
from engine.parallel.state import init_parallel, single_process_state
from engine.parallel.tensor_parallel import build_parallel_llama, sequence_parallel_names
from engine.train.grads import GradBuffer
from engine.train.optimizer import AdamWConfig, MixedPrecisionAdamW, no_weight_decay
from engine.train.step import train_step

SEED, STEPS, SEQ, GLOBAL_BATCH = 11, 10, 16, 8
LR, CLIP = 1e-2, 0.5
ADAM = AdamWConfig(lr=LR, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-5)
# Adam's eps is 1e-5 here: with 1e-8, gradient elements at rounding-noise level (|g| ~ 1e-7) move by
# +-lr in Adam's first steps whichever way rounding tips their sign, and the curves of two correct
# implementations drift apart by 1e-4 within a few steps. With 1e-5 the curves agree to float32
# rounding of the loss (~5e-7), so a tolerance of 5e-6 catches any real difference.
LOSS_TOL = 5e-6
NORM_RTOL = 1e-5


def _config():
    return LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _global_batch(step):
    """Tokens, labels and an uneven loss mask: samples hold very different numbers of loss tokens.
    Two batches alternate, so that the loss can fall within a few steps."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    tokens = torch.randint(0, 300, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, 300, (GLOBAL_BATCH, SEQ), generator=g)
    keep = torch.rand(GLOBAL_BATCH, SEQ, generator=g) < torch.linspace(0.05, 1.0, GLOBAL_BATCH)[:, None]
    keep[:, 0] = True  # at least one loss token per sample
    labels = torch.where(keep, labels, torch.full_like(labels, -100))
    return tokens, labels, keep.float()


def _microbatches(step, micro, dp, dp_rank):
    tokens, labels, mask = _global_batch(step)
    out = []
    for j in range(GLOBAL_BATCH // (micro * dp)):
        first = (j * dp + dp_rank) * micro
        sl = slice(first, first + micro)
        out.append({"tokens": tokens[sl], "labels": labels[sl], "loss_mask": mask[sl]})
    return out


def reference_losses(steps=STEPS):
    model = Llama(_config())
    model.init_weights(seed=SEED)
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if not no_weight_decay(n)], "weight_decay": ADAM.weight_decay},
              {"params": [p for n, p in params.items() if no_weight_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps)
    losses, norms = [], []
    for step in range(steps):
        tokens, labels, mask = _global_batch(step)
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    return losses, norms


def engine_losses(state, *, micro=1, sp=False, zero=False, bucket_size=2000, steps=STEPS, dtype=torch.float32):
    model = build_parallel_llama(_config(), state, sequence_parallel=sp, seed=SEED, dtype=dtype)
    buffer = GradBuffer([model], state, bucket_size=bucket_size, distributed_optimizer=zero,
                        sequence_parallel_names=sequence_parallel_names(model))
    opt = MixedPrecisionAdamW(buffer, ADAM, use_apex=False)
    losses, norms = [], []
    for step in range(steps):
        result = train_step([model], _microbatches(step, micro, state.dp_size, state.dp_rank), buffer, opt,
                            state, lr=LR, clip_grad=CLIP)
        assert not result.skipped
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return losses, norms, len(buffer.buckets)


def _layouts_world2(rank, world):
    out = {}
    for name, tp, kwargs in [("tp2", 2, {}), ("tp2-sp", 2, {"sp": True}), ("dp2", 1, {}),
                             ("dp2-zero", 1, {"zero": True}), ("dp2-zero-micro2", 1, {"zero": True, "micro": 2})]:
        out[name] = engine_losses(init_parallel(tp, 1), **kwargs)
    return out


def _layouts_world4(rank, world):
    out = {}
    for name, kwargs in [("tp2-dp2", {}), ("tp2-dp2-sp-zero", {"sp": True, "zero": True})]:
        out[name] = engine_losses(init_parallel(2, 1), **kwargs)
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


def _assert_same_curve(name, got, reference):
    losses, norms = got[0], got[1]
    ref_losses, ref_norms = reference
    assert len(losses) == len(ref_losses)
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(losses, ref_losses)) if not abs(a - b) <= LOSS_TOL]
    assert not bad, f"{name}: loss differs from the reference at (step, engine, reference) {bad}"
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(norms, ref_norms)) if not math.isclose(a, b, rel_tol=NORM_RTOL)]
    assert not bad, f"{name}: gradient norm differs at {bad}"


def test_one_process_equals_plain_pytorch(reference):
    got = engine_losses(single_process_state())
    assert got[2] > 1, "the test should exercise several buckets"
    _assert_same_curve("tp1-dp1", got, reference)
    assert reference[0][-1] < reference[0][0] - 0.05, "the reference loss should fall over the steps"


def test_gradient_accumulation_equals_one_large_microbatch(reference):
    _assert_same_curve("micro8", engine_losses(single_process_state(), micro=8), reference)
    _assert_same_curve("micro2", engine_losses(single_process_state(), micro=2), reference)


@pytest.mark.distributed
def test_tp_dp_layouts_give_the_reference_curve(reference):
    results = run_distributed(_layouts_world2, 2, timeout=240)
    for rank, by_layout in enumerate(results):
        for name, got in by_layout.items():
            _assert_same_curve(f"rank {rank} {name}", got, reference)
    results = run_distributed(_layouts_world4, 4, timeout=240)
    for rank, by_layout in enumerate(results):
        for name, got in by_layout.items():
            _assert_same_curve(f"rank {rank} {name}", got, reference)


def test_bf16_mixed_precision_keeps_fp32_masters_and_follows_the_curve(reference):
    """bf16 weights and activations, fp32 masters and gradients: the curve stays within bf16 noise of
    the fp32 reference, and the masters hold what bf16 weights cannot (they are not the weights)."""
    state = single_process_state()
    model = build_parallel_llama(_config(), state, seed=SEED, dtype=torch.bfloat16)
    buffer = GradBuffer([model], state, bucket_size=2000)
    assert buffer.params.dtype == torch.bfloat16 and buffer.grads.dtype == torch.float32
    opt = MixedPrecisionAdamW(buffer, ADAM, use_apex=False)
    losses = []
    for step in range(STEPS):
        result = train_step([model], _microbatches(step, 2, 1, 0), buffer, opt, state, lr=LR, clip_grad=CLIP)
        losses.append(result.loss)
    worst = max(abs(a - b) / b for a, b in zip(losses, reference[0]))
    assert worst < 0.03, f"bf16 curve {losses} strays from the fp32 reference {reference[0]}"
    assert opt.master.dtype == torch.float32
    assert not torch.equal(opt.master, opt.master.to(torch.bfloat16).float()), "masters hold only bf16 values"
    for (_, start, end), master in zip(opt.pieces, opt.master_views):  # weights = masters rounded
        assert torch.equal(buffer.params[start:end], master.to(torch.bfloat16))


def test_a_loss_mask_holding_nan_is_refused_by_name():
    from engine.train.step import global_loss_tokens
    with pytest.raises(ValueError, match="loss_mask holds NaN or Inf"):
        global_loss_tokens([{"loss_mask": torch.tensor([[1.0, float("nan")]])}], single_process_state(), "cpu")
