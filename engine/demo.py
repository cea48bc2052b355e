"""The end-to-end demo: synthetic decision logs -> tokenizer -> indexed datasets -> training samples.

It grows with the engine (CT -> SFT -> evaluate); today it runs the whole data path a training run
reads, up to the first CT and SFT batches, and checks on the way what later stages rely on: that the
reward tokens of each sample are exactly where the reward mask says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.data.batches import BatchLoader, CTSamples, SampleMasks, build_dataset
from engine.data.indexed import IndexedDataset
from engine.data.preprocess import MASK_SUFFIX, PreprocessConfig, preprocess, train_tokenizer_on_logs
from engine.data.samples import GPTSampleDataset, document_token_counts
from engine.data.synthetic import SyntheticConfig, write_logs
from engine.data.tokenizer import Tokenizer
from engine.fileio import write_json_atomic


@dataclass
class DemoConfig:
    workdir: str
    records_per_domain: int = 2000     # training records per synthetic domain
    vocab_size: int = 1000
    workers: int = 2
    seq_length: int = 256
    micro_batch_size: int = 4
    seed: int = 0
    obd_dir: str | None = None         # an Open Bandit Dataset folder to preprocess too, if given
    progress: bool = True


def run_data_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the data pipeline end to end under ``cfg.workdir``; returns a summary dict."""
    os.makedirs(cfg.workdir, exist_ok=True)
    logs = os.path.join(cfg.workdir, "logs")
    data = os.path.join(cfg.workdir, "data")
    os.makedirs(data, exist_ok=True)

    synthetic = SyntheticConfig(seed=cfg.seed, train_per_domain=cfg.records_per_domain,
                                valid_per_domain=max(cfg.records_per_domain // 8, 1),
                                test_per_domain=max(cfg.records_per_domain // 8, 1))
    manifest = write_logs(synthetic, logs)
    log(f"[1/4] synthetic logs in {logs}: in-domain {manifest['in_domain']}, "
        f"out-of-domain {manifest['out_of_domain']}")

    tokenizer_path = os.path.join(data, "tokenizer.model")
    train_tokenizer_on_logs([os.path.join(logs, "train")], tokenizer_path, vocab_size=cfg.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    log(f"[2/4] tokenizer {tokenizer_path}: vocabulary {tokenizer.vocab_size}")

    train_prefix = os.path.join(data, "sar_train")
    summaries = {"train": preprocess(PreprocessConfig(
        inputs=[os.path.join(logs, "train")], output_prefix=train_prefix, tokenizer_model=tokenizer_path,
        workers=cfg.workers, append_eod=True, progress=cfg.progress))}
    summaries["valid"] = preprocess(PreprocessConfig(
        inputs=[os.path.join(logs, "valid")], output_prefix=os.path.join(data, "sar_valid"),
        tokenizer_model=tokenizer_path, workers=cfg.workers, append_eod=True, progress=cfg.progress,
        reward_bins=train_prefix + ".reward_bins.json"))
    if cfg.obd_dir:
        summaries["obd"] = preprocess(PreprocessConfig(
            inputs=[cfg.obd_dir], output_prefix=os.path.join(data, "obd"), tokenizer_model=tokenizer_path,
            workers=cfg.workers, append_eod=True, progress=cfg.progress))
    for name, s in summaries.items():
        log(f"[3/4] {name}: " + s.format())

    tokens = IndexedDataset(train_prefix)
    mask = IndexedDataset(train_prefix + MASK_SUFFIX)
    samples = GPTSampleDataset(tokens, cfg.seq_length, seed=cfg.seed, num_epochs=1,
                               cache_dir=os.path.join(data, "index_cache"))
    masks = SampleMasks(samples, mask)
    vocab = tokenizer.vocab_size
    mbs = cfg.micro_batch_size
    ct_batch = BatchLoader(CTSamples(samples, vocab), mbs, mbs, dp_rank=0, dp_size=1,
                           vocab_size=vocab).next_step()[0]
    reward_share = float(np.mean([masks[k].mean() for k in range(min(len(samples), 64))]))
    first = samples[0]
    log(f"[4/4] CT: {len(samples)} samples of {cfg.seq_length + 1} tokens; first batch "
        f"{tuple(ct_batch['tokens'].shape)} inputs; {reward_share:.1%} of tokens are reward tokens")
    log("      sample 0 begins: " + repr(tokenizer.decode(first[:48].tolist()))[:160])
    log("      its reward tokens: " + repr(tokenizer.decode(first[masks[0].astype(bool)][:8].tolist())))

    # SFT holds one whole record per sample: the sequence fits the longest record.
    longest = int(document_token_counts(tokens.sequence_lengths, tokens.document_indices).max())
    sft_seq_length = max(cfg.seq_length, longest - 1)
    sft = build_dataset(train_prefix, "sft", sft_seq_length, num_samples=mbs, seed=cfg.seed)
    sft_batch = BatchLoader(sft, mbs, mbs, dp_rank=0, dp_size=1, vocab_size=vocab).next_step()[0]
    predicted = sft_batch["loss_mask"].bool()
    log(f"      SFT: {sft.num_records} records ({sft.skipped_records} without a reward token) of up to "
        f"{longest} tokens, seq_length {sft_seq_length}; first batch {tuple(sft_batch['tokens'].shape)} "
        f"predicts {int(predicted.sum())} reward tokens: "
        + repr(tokenizer.decode(sft_batch["labels"][predicted][:8].tolist())))

    result = {"samples": len(samples), "batch_shape": list(ct_batch["tokens"].shape),
              "reward_token_share": reward_share,
              "sft": {"records": sft.num_records, "skipped_records": sft.skipped_records,
                      "seq_length": sft_seq_length, "batch_reward_tokens": int(predicted.sum())},
              "records": {k: s.records for k, s in summaries.items()},
              "tokens": {k: s.tokens for k, s in summaries.items()},
              "bayes_ceiling_valid": manifest["bayes_ceiling"].get("valid", {})}
    write_json_atomic(os.path.join(cfg.workdir, "demo_summary.json"), result)
    return result

