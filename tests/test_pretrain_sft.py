"""Supervised fine-tuning (SFT) through the training loop, against references built by hand.

- The loss covers exactly the reward tokens: labels of a global batch against the raw records and
  reward masks read with IndexedDataset.
- The loss and gradient norm the loop reports for one step equal those of the unsharded engine Llama
  and F.cross_entropy: the mean over every reward token of the global batch, with microbatches (and
  DP ranks) holding different numbers of reward tokens.
- The normalisation is global: one step over 4 microbatches of 1 updates the parameters as one
  microbatch of 4 does, and as AdamW's first step computed by hand from the reference gradient.
- SFT starts from a CT checkpoint with checkpoint.init: iteration 0, a fresh optimizer, the CT weights.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from run_utils import (make_trainer, tiny_data, tiny_run_config, train_in_process, training_records,  # noqa: F401
                       with_updates)

GLOBAL_BATCH = 4


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared cores
    yield
    torch.set_num_threads(threads)


def sft_config(data, save, **sections):
    cfg = tiny_run_config(data, save, stage="sft",
                          train={"iters": 1, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": 1})
    return with_updates(cfg, **sections)


def sft_samples(data, cfg, count):
    """The first ``count`` samples of the run's SFT data set (the first global batches, in order)."""
    from engine.data.batches import build_dataset

    t = cfg["train"]
    ds = build_dataset(data["train"], "sft", cfg["data"]["seq_length"], t["iters"] * t["global_batch_size"],
                       t["seed"])
    return ds, [ds[k] for k in range(count)]


def raw_record(prefix: str, document: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and reward mask of one document, concatenated from its sequences as stored."""
    from engine.data.indexed import IndexedDataset

    tokens, mask = IndexedDataset(prefix), IndexedDataset(prefix + "_reward_mask")
    first, end = int(tokens.document_indices[document]), int(tokens.document_indices[document + 1])
    return (np.concatenate([np.asarray(tokens[s], dtype=np.int64) for s in range(first, end)]),
            np.concatenate([np.asarray(mask[s], dtype=np.int64) for s in range(first, end)]))


def reference_model(data, cfg):
    """The unsharded engine Llama with the run's initial weights, fp32."""
    from engine.config import MODEL_PRESETS
    from engine.model.config import LlamaConfig
    from engine.model.llama import Llama

    model = Llama(LlamaConfig(**{**MODEL_PRESETS["tiny"], "vocab_size": data["vocab_size"]}))
    model.init_weights(cfg["train"]["seed"])
    return model


def reference_step(data, cfg):
    """(loss, gradient norm, gradients by name, reward tokens per sample) of the first global batch:
    the mean of -log softmax(label) over all its reward tokens, from the reference model."""
    _, samples = sft_samples(data, cfg, cfg["train"]["global_batch_size"])
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    labels = torch.from_numpy(np.stack([s["labels"] for s in samples]))
    model = reference_model(data, cfg)
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    per_sample = [F.cross_entropy(logits[i], labels[i], ignore_index=-100).item() for i in range(len(samples))]
    counts = [int((labels[i] != -100).sum()) for i in range(len(samples))]
    return loss.item(), norm, grads, counts, per_sample


@pytest.fixture(scope="module")
def reference(tiny_data):
    cfg = sft_config(tiny_data, None)
    loss, norm, grads, counts, per_sample = reference_step(tiny_data, cfg)
    # The batch must tell a global mean from a mean of per-microbatch means (at initial weights every
    # token's loss is near log(vocab), yet they differ by far more than the tests' 1e-5 tolerance).
    assert len(set(counts)) > 1, counts
    assert abs(np.mean(per_sample) - loss) > 1e-4 * loss
    return {"loss": loss, "grad_norm": norm, "grads": grads, "counts": counts}


# --------------------------------------------------------------------- which tokens have loss
def test_sft_labels_are_exactly_the_reward_tokens_of_whole_records(tiny_data):
    from engine.data.batches import BatchLoader

    cfg = sft_config(tiny_data, None, train={"iters": 2, "global_batch_size": 8, "micro_batch_size": 2})
    ds, _ = sft_samples(tiny_data, cfg, 0)
    microbatches = BatchLoader(ds, 8, 2, dp_rank=0, dp_size=1, vocab_size=tiny_data["vocab_size"]).next_step()
    seq = cfg["data"]["seq_length"]
    predicted = 0
    for j, mb in enumerate(microbatches):
        for row in range(2):
            record, mask = raw_record(tiny_data["train"], ds.record(j * 2 + row))
            n = record.size
            assert n <= seq + 1
            tokens, labels = mb["tokens"][row].numpy(), mb["labels"][row].numpy()
            np.testing.assert_array_equal(tokens[:n - 1], record[:-1])  # one whole record, then padding
            # Position i predicts record[i + 1]: it has a loss exactly where that token is a reward token.
            np.testing.assert_array_equal(labels[:n - 1] != -100, mask[1:] == 1)
            np.testing.assert_array_equal(labels[:n - 1][mask[1:] == 1], record[1:][mask[1:] == 1])
            assert (labels[n - 1:] == -100).all()
            np.testing.assert_array_equal(mb["loss_mask"][row].numpy(), (labels != -100).astype(np.float32))
            predicted += int(mask[1:].sum())
    assert predicted == sum(int(mb["loss_mask"].sum()) for mb in microbatches) > 8  # episodes: several each


# ------------------------------------------------------------- the loss and its normalisation
def test_sft_step_loss_and_grad_norm_equal_the_global_mean_over_reward_tokens(tiny_data, tmp_path, reference):
    save = str(tmp_path / "run")
    train_in_process(sft_config(tiny_data, save))
    [record] = training_records(save)
    assert record["loss_tokens"] == sum(reference["counts"])
    assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)


def _dp2_sft_job(rank, world_size, data, root):
    from engine.data.batches import BatchLoader

    results = {}
    for name, parallel in (("dp2", {}), ("dp2_zero", {"distributed_optimizer": True, "bucket_size": 30000})):
        save = os.path.join(root, name)
        trainer = train_in_process(sft_config(data, save, parallel=parallel))
        first_step = BatchLoader(trainer.train_data, GLOBAL_BATCH, 1, trainer.state.dp_rank, 2,
                                 trainer.config.vocab_size).next_step()
        local = sum(int(mb["loss_mask"].sum()) for mb in first_step)
        results[name] = {"local_tokens": local, "dp": trainer.state.dp_size,
                         "record": training_records(save)[0] if rank == 0 else None}
    return results


@pytest.mark.distributed
def test_sft_step_loss_with_dp2_counts_reward_tokens_of_every_rank(tiny_data, tmp_path, reference):
    ranks = run_distributed(_dp2_sft_job, 2, args=(tiny_data, str(tmp_path)), timeout=240)
    for name in ("dp2", "dp2_zero"):
        local = [r[name]["local_tokens"] for r in ranks]
        assert [r[name]["dp"] for r in ranks] == [2, 2]
        assert local[0] != local[1] and sum(local) == sum(reference["counts"])  # ranks hold different counts
        record = ranks[0][name]["record"]
        assert record["loss_tokens"] == sum(reference["counts"])
        assert record["loss"] == pytest.approx(reference["loss"], rel=1e-5), name
        assert record["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), name


def test_sft_update_over_4_microbatches_equals_one_microbatch_of_4_and_adamw_by_hand(tiny_data, tmp_path, reference):
    # Adam's eps at 1 makes its first update lr * g / (|g| + 1), nearly proportional to the gradient,
    # so a gradient scaled wrongly (per microbatch instead of per global batch) changes the update;
    # no clipping and no weight decay, for the same reason.
    lr, eps = 0.5, 1.0
    train = {"lr": lr, "min_lr": lr, "warmup_iters": 0, "lr_decay": "constant", "adam_eps": eps,
             "clip_grad": 0.0, "weight_decay": 0.0}
    updates = {}
    for mbs in (1, GLOBAL_BATCH):
        cfg = sft_config(tiny_data, str(tmp_path / f"mbs{mbs}"), train={**train, "micro_batch_size": mbs})
        trainer = make_trainer(cfg)
        assert trainer.loader.num_microbatches == GLOBAL_BATCH // mbs
        before = {n: p.detach().clone() for n, p in trainer.named_parameters().items()}
        trainer.run()
        updates[mbs] = {n: p.detach() - before[n] for n, p in trainer.named_parameters().items()}
    by_hand = {n: -lr * g / (g.abs() + eps) for n, g in reference["grads"].items()}
    scale = max(float(u.abs().max()) for u in by_hand.values())
    assert scale > 1e-3
    for name, expected in by_hand.items():
        rows = tuple(slice(0, size) for size in expected.shape)  # the vocabulary padding is not compared
        for mbs in (1, GLOBAL_BATCH):
            torch.testing.assert_close(updates[mbs][name][rows], expected, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{name}, micro_batch_size {mbs}: {m}")
        torch.testing.assert_close(updates[1][name], updates[GLOBAL_BATCH][name], rtol=1e-4, atol=1e-6 * scale)


# -------------------------------------------------------------------- SFT from a CT checkpoint
def test_sft_starts_from_a_ct_checkpoint_with_checkpoint_init(tiny_data, tmp_path):
    from engine.train import checkpoint as ckpt_io

    ct_save = str(tmp_path / "ct")
    ct = train_in_process(tiny_run_config(tiny_data, ct_save, train={"iters": 2}))
    ct_weights = {n: p.detach().clone() for n, p in ct.named_parameters().items()}
    assert ct.optimizer.steps == 2

    sft_save = str(tmp_path / "sft")
    cfg = sft_config(tiny_data, sft_save, train={"iters": 2, "warmup_iters": 2}, checkpoint={"init": ct_save})
    sft = make_trainer(cfg)
    assert sft.run_state.iteration == 0 and sft.run_state.consumed_samples == 0
    assert sft.loader.consumed_samples == 0
    assert sft.optimizer.steps == 0 and len(sft.optimizer.inner.state) == 0  # fresh moments
    weights = sft.named_parameters()
    assert sorted(weights) == sorted(ct_weights)
    for name, value in ct_weights.items():
        assert torch.equal(weights[name].detach(), value), name
    assert torch.equal(sft.optimizer.master, torch.cat([sft.grads.params[s:e] for _, s, e in sft.grads.owned_pieces()]))
    assert any("initialised weights from" in line for line in sft.lines)

    sft.run()
    records = training_records(sft_save)
    assert [r["iteration"] for r in records] == [1, 2]
    # The schedule starts over: the first step's learning rate is warmup's first, as in a new run.
    assert records[0]["lr"] == pytest.approx(cfg["train"]["lr"] / 2)
    assert all(math.isfinite(r["loss"]) for r in records)
    saved = ckpt_io.open_checkpoint(sft_save)
    assert saved.iteration == 2 and saved.extra["run"]["train"]["stage"] == "sft"
    assert ckpt_io.open_checkpoint(ct_save).iteration == 2  # the CT checkpoint is left as it was
