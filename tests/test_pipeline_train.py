"""Training steps over pipeline stages give the one-process loss curve, for every layout.

``train_step`` over ``build_model_chunks`` chunks, with TP x PP x DP in gloo processes, sequence
parallelism, virtual stages, the distributed optimizer, tied and untied embeddings, CT (every token)
and SFT-like masks (a few loss tokens per sample), fp32. References: the one-process engine (the same
step code at PP 1, itself checked against plain PyTorch in tests/test_train_step.py) and plain
PyTorch here (the whole engine Llama, torch's cross entropy, ``clip_grad_norm_``, ``torch.optim.AdamW``).

Tolerances. Against the one-process engine a pipeline sums the same numbers in another order (the
tied embedding's two gradient halves, TP partial sums, microbatches): the first step's loss is the
same forward on the same weights (measured within 2 float32 ulps of a loss near 5: 2e-6) and its
gradient norm agrees to rounding (measured 1e-7 relative: 1e-6). Over ten steps Adam amplifies
rounding differences, measured up to 6.5e-6 in loss and 1.1e-5 relative in gradient norm (TP 2 + SP
with an SFT mask, where few tokens carry the loss), so the curve is held to 2e-5 and 5e-5. Against
plain PyTorch, whose loss and optimizer reduce in yet another order, measured 1.5e-5 and 3.7e-5:
held to 5e-5 and 1e-4. Real bugs are far outside these: at PP 2 with tied embeddings, leaving out
the sum of the embedding's gradient over the first and last stage moves the first step's gradient
norm by 16% and later losses by 0.2; counting the last stage's copy in the norm too moves the norm by
27% and the losses by 1e-2.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from engine.model.config import LlamaConfig
from engine.model.llama import Llama
from engine.parallel.p2p import PipelineComm
from engine.parallel.state import init_parallel, single_process_state
from engine.parallel.tensor_parallel import build_model_chunks, pipeline_layout, sequence_parallel_names
from engine.train.grads import GradBuffer
from engine.train.optimizer import MixedPrecisionAdamW, no_weight_decay
from engine.train.step import train_step
from test_train_step import ADAM, CLIP, LR, SEED, STEPS

SEQ, GLOBAL_BATCH, VOCAB, BUCKET = 16, 8, 200, 2000
FIRST_LOSS_TOL, FIRST_NORM_RTOL = 2e-6, 1e-6    # first step, against the one-process engine
LOSS_TOL, NORM_RTOL = 2e-5, 5e-5                 # ten steps, against the one-process engine
TORCH_LOSS_TOL, TORCH_NORM_RTOL = 5e-5, 1e-4     # ten steps, against plain PyTorch


def config(tied):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=tied)


def global_batch(step, mode):
    """CT: loss on every token. SFT: loss on 1 to 3 tokens at the end of each sample (the reward
    tokens). Two batches alternate, so that the loss falls within a few steps."""
    g = torch.Generator().manual_seed(2000 + step % 2)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    if mode == "ct":
        mask = torch.ones(GLOBAL_BATCH, SEQ)
    elif mode == "sft":
        reward_tokens = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
        mask = (torch.arange(SEQ) >= SEQ - reward_tokens).float()
    else:
        raise ValueError(f"unknown batch mode {mode!r}")
    labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    return tokens, labels, mask


def microbatches(step, mode, micro, dp, dp_rank):
    tokens, labels, mask = global_batch(step, mode)
    out = []
    for j in range(GLOBAL_BATCH // (micro * dp)):
        first = (j * dp + dp_rank) * micro
        rows = slice(first, first + micro)
        out.append({"tokens": tokens[rows], "labels": labels[rows], "loss_mask": mask[rows]})
    return out


def torch_reference(tied, mode, steps=STEPS):
    """Plain PyTorch: the whole model, mean token loss over the global batch, clip, AdamW."""
    model = Llama(config(tied))
    model.init_weights(seed=SEED)
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if not no_weight_decay(n)], "weight_decay": ADAM.weight_decay},
              {"params": [p for n, p in params.items() if no_weight_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps)
    losses, norms = [], []
    for step in range(steps):
        tokens, labels, _ = global_batch(step, mode)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms}


class Trainer:
    """One rank's model chunks, gradient buffer, optimizer and pipeline neighbours."""

    def __init__(self, state, tied, *, v=1, sp=False, zero=False):
        self.state, self.cfg = state, config(tied)
        self.chunks = build_model_chunks(self.cfg, state, v, sequence_parallel=sp, seed=SEED)
        names = set().union(*(sequence_parallel_names(c) for c in self.chunks))
        self.buffer = GradBuffer(self.chunks, state, bucket_size=BUCKET, distributed_optimizer=zero,
                                 sequence_parallel_names=names, pipeline=pipeline_layout(self.cfg, state, v))
        self.optimizer = MixedPrecisionAdamW(self.buffer, ADAM, use_apex=False)
        self.comm = PipelineComm(state) if state.pp_size > 1 else None

    def step(self, step, mode, micro):
        mbs = microbatches(step, mode, micro, self.state.dp_size, self.state.dp_rank)
        return train_step(self.chunks, mbs, self.buffer, self.optimizer, self.state, lr=LR, clip_grad=CLIP,
                          comm=self.comm)

    def embedding_copies(self):
        """This rank's (local shard of the) embedding and of the last stage's tied copy."""
        out = {}
        first, last = self.chunks[0], self.chunks[-1]
        if first.has_embedding:
            out["embedding"] = first.embed_tokens.weight.detach().numpy().copy()
        if last.has_head and last.embed_tokens is not None and self.state.pp_size > 1:
            out["head_copy"] = last.embed_tokens.weight.detach().numpy().copy()
        return out


def run_layout(state, *, tied, mode, micro=1, v=1, sp=False, zero=False, steps=STEPS):
    trainer = Trainer(state, tied, v=v, sp=sp, zero=zero)
    results = [trainer.step(step, mode, micro) for step in range(steps)]
    return {"losses": [r.loss for r in results], "norms": [r.grad_norm for r in results],
            "skipped": [r.skipped for r in results], "buckets": len(trainer.buffer.buckets),
            "coords": (state.tp_rank, state.pp_rank, state.dp_rank), **trainer.embedding_copies()}


# (name, tp, pp, options); DP is what the world size leaves.
WORLD2 = [("pp2-ct-untied", 1, 2, dict(tied=False, mode="ct")),
          ("pp2-sft-tied-micro2", 1, 2, dict(tied=True, mode="sft", micro=2)),
          ("pp2-v2-ct-tied-micro2", 1, 2, dict(tied=True, mode="ct", micro=2, v=2)),
          ("pp2-v2-sft-untied", 1, 2, dict(tied=False, mode="sft", v=2))]
WORLD4 = [("pp4-ct-tied", 1, 4, dict(tied=True, mode="ct")),
          ("pp4-sft-untied-micro2", 1, 4, dict(tied=False, mode="sft", micro=2)),
          ("tp2-pp2-sp-sft-tied", 2, 2, dict(tied=True, mode="sft", sp=True)),
          ("tp2-pp2-v2-sp-ct-untied", 2, 2, dict(tied=False, mode="ct", sp=True, v=2)),
          ("pp2-dp2-zero-ct-tied", 1, 2, dict(tied=True, mode="ct", zero=True)),
          ("pp2-dp2-sft-untied", 1, 2, dict(tied=False, mode="sft"))]
WORLD8 = [("tp2-pp2-dp2-v2-sp-zero-sft-tied", 2, 2, dict(tied=True, mode="sft", sp=True, zero=True, v=2))]
LAYOUTS = {name: options for name, _, _, options in WORLD2 + WORLD4 + WORLD8}


def _layouts_worker(rank, world, layouts, with_nan_step=False):
    out = {name: run_layout(init_parallel(tp, pp), **options) for name, tp, pp, options in layouts}
    if with_nan_step:
        out["nan"] = nan_step_run()
    return out


def nan_step_run():
    """PP 2, tied: step 0, then a step whose second microbatch has a NaN loss on the last stage, then
    steps 1 and 2. Reports what each step returned and whether the NaN step left the weights alone."""
    state = init_parallel(1, 2)
    trainer = Trainer(state, tied=True)
    poison = {"armed": False, "calls": 0}

    def nan_logits(module, args, output):
        if poison["armed"]:
            poison["calls"] += 1
            if poison["calls"] == 2:
                return output * float("nan")
        return output

    if state.is_last_stage:
        trainer.chunks[-1].register_forward_hook(nan_logits)
    first = trainer.step(0, "sft", 2)
    params, master = trainer.buffer.params.clone(), trainer.optimizer.master.clone()
    adam_steps = trainer.optimizer.steps
    poison["armed"] = True
    bad = trainer.step(1, "sft", 2)
    poison["armed"] = False
    unchanged = (torch.equal(params, trainer.buffer.params) and torch.equal(master, trainer.optimizer.master)
                 and trainer.optimizer.steps == adam_steps and not trainer.buffer.grads.any())
    later = [trainer.step(step, "sft", 2) for step in (1, 2)]
    return {"first": first, "bad": bad, "unchanged": unchanged, "later": later,
            "hook_fired": poison["calls"] if state.is_last_stage else None}


@pytest.fixture(scope="module")
def one_thread():
    """The references run on one thread, as the ranks do: on a loaded machine, intra-op threads of
    tiny matrices mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine_curves(one_thread):
    """The one-process engine, by (tied, mode), and the first steps of the NaN test's run."""
    curves = {(tied, mode): run_layout(single_process_state(), tied=tied, mode=mode)
              for tied in (False, True) for mode in ("ct", "sft")}
    curves["sft-tied-micro2"] = run_layout(single_process_state(), tied=True, mode="sft", micro=2, steps=3)
    return curves


@pytest.fixture(scope="module")
def torch_curves(one_thread):
    return {(tied, mode): torch_reference(tied, mode) for tied in (False, True) for mode in ("ct", "sft")}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_layouts_worker, 2, args=(WORLD2, True), timeout=240)


def assert_close_curves(label, got, want, reference, loss_tol, norm_rtol):
    """Every step's loss within ``loss_tol`` and gradient norm within ``norm_rtol`` of ``want``'s."""
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(got["losses"], want["losses"])) if not abs(a - b) <= loss_tol]
    assert not bad, f"{label}: loss differs from {reference} at (step, got, {reference}) {bad}"
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(got["norms"], want["norms"]))
           if not math.isclose(a, b, rel_tol=norm_rtol)]
    assert not bad, f"{label}: gradient norm differs from {reference} at (step, got, {reference}) {bad}"


def assert_same_curve(label, got, engine, plain):
    losses, norms = got["losses"], got["norms"]
    assert len(losses) == STEPS and not any(got["skipped"]), f"{label}: a step was skipped"
    assert abs(losses[0] - engine["losses"][0]) <= FIRST_LOSS_TOL, f"{label}: first loss {losses[0]} vs {engine['losses'][0]}"
    assert math.isclose(norms[0], engine["norms"][0], rel_tol=FIRST_NORM_RTOL), \
        f"{label}: first gradient norm {norms[0]} vs {engine['norms'][0]}"
    assert_close_curves(label, got, engine, "the one-process engine", LOSS_TOL, NORM_RTOL)
    assert_close_curves(label, got, plain, "plain PyTorch", TORCH_LOSS_TOL, TORCH_NORM_RTOL)


def _check_world(results, layouts, engine_curves, torch_curves):
    for name, _, _, options in layouts:
        key = (options["tied"], options["mode"])
        by_coords = {}
        for rank, by_layout in enumerate(results):
            got = by_layout[name]
            assert got["buckets"] > 1, f"{name}: rank {rank} should have several gradient buckets"
            assert_same_curve(f"{name} rank {rank}", got, engine_curves[key], torch_curves[key])
            by_coords[got["coords"]] = got
        if options["tied"]:
            # The first stage's embedding and the last stage's copy stay bit-identical, shard by shard.
            last = max(pp for _, pp, _ in by_coords)
            for (tp, pp, dp), got in by_coords.items():
                if pp == 0:
                    copy = by_coords[(tp, last, dp)]["head_copy"]
                    assert (got["embedding"].tobytes() == copy.tobytes()), \
                        f"{name}: tied embedding differs between first and last stage (tp {tp}, dp {dp})"


def test_one_process_engine_follows_plain_pytorch_and_learns(engine_curves, torch_curves):
    for key, got in engine_curves.items():
        if key not in torch_curves:
            continue
        assert got["buckets"] > 1 and not any(got["skipped"])
        assert_close_curves(f"one process {key}", got, torch_curves[key], "plain PyTorch", TORCH_LOSS_TOL,
                            TORCH_NORM_RTOL)
        assert got["losses"][-1] < got["losses"][0] - 0.05, f"{key}: the loss should fall over the steps"


@pytest.mark.distributed
def test_pipeline_layouts_of_two_ranks_give_the_one_process_curve(world2, engine_curves, torch_curves):
    _check_world(world2, WORLD2, engine_curves, torch_curves)


@pytest.mark.distributed
def test_pipeline_layouts_of_four_ranks_give_the_one_process_curve(engine_curves, torch_curves):
    _check_world(run_distributed(_layouts_worker, 4, args=(WORLD4,), timeout=240), WORLD4, engine_curves, torch_curves)


@pytest.mark.distributed
def test_pipeline_layouts_of_eight_ranks_give_the_one_process_curve(engine_curves, torch_curves):
    _check_world(run_distributed(_layouts_worker, 8, args=(WORLD8,), timeout=300), WORLD8, engine_curves, torch_curves)


@pytest.mark.distributed
def test_a_nan_loss_on_the_last_stage_makes_every_stage_skip(world2, engine_curves):
    engine = engine_curves["sft-tied-micro2"]
    results = [by_layout["nan"] for by_layout in world2]
    assert results[1]["hook_fired"] == 4, "the last stage should have run the poisoned step's 4 microbatches"
    for rank, got in enumerate(results):
        assert not got["first"].skipped
        assert got["bad"].skipped, f"rank {rank} did not skip the step with a NaN loss"
        assert math.isnan(got["bad"].loss) and not math.isfinite(got["bad"].grad_norm)
        assert got["unchanged"], f"rank {rank}: the skipped step changed parameters, optimizer state or left gradients"
        # The run goes on as if the bad step had never been: steps 0, 1, 2 of the clean curve.
        steps = [got["first"]] + got["later"]
        assert not any(r.skipped for r in steps)
        assert_close_curves(f"rank {rank} around a skipped step", {"losses": [r.loss for r in steps],
                            "norms": [r.grad_norm for r in steps]}, engine, "the one-process engine",
                            LOSS_TOL, NORM_RTOL)
