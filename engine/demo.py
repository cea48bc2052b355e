"""The end-to-end demo: synthetic decision logs -> tokenizer -> indexed datasets -> training samples.

It grows with the engine (CT -> SFT -> evaluate); today it runs the whole data path a training run
reads, up to the first CT and SFT batches, and checks on the way what later stages rely on: that the
reward tokens of each sample are exactly where the reward mask says.

The continued pre-training (CT) data holds only the in-domain records the manifest lists: the
out-of-domain task (``shop/purchase``) is held out, so that evaluating on it later measures transfer
to a domain the model never trained on. Its logs stay under ``logs/<split>/`` for that evaluation.
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

DEMO_STEPS = ("synthetic logs", "tokenizer", "CT data", "CT samples", "SFT samples")
INDENT = "      "  # continuation lines sit under the text after "[k/n] "
SAMPLE_PREVIEW_TOKENS = 48


class DemoError(ValueError):
    """The demo cannot run with these settings; the message says which and what to change."""


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

    def __post_init__(self):
        if not self.workdir:
            raise DemoError("workdir must be a folder name, got an empty string")
        for name, minimum in (("records_per_domain", 1), ("vocab_size", 1), ("workers", 1),
                              ("seq_length", 1), ("micro_batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DemoError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _Steps:
    """Numbers the demo's steps once each: ``[k/n] text``."""

    def __init__(self, log):
        self.log = log
        self.done = 0

    def __call__(self, name: str, text: str) -> None:
        if self.done >= len(DEMO_STEPS) or DEMO_STEPS[self.done] != name:
            raise RuntimeError(f"demo step {name!r} out of order after {self.done} steps")
        self.done += 1
        self.log(f"[{self.done}/{len(DEMO_STEPS)}] {text}")


def run_data_demo(cfg: DemoConfig, log=print) -> dict:
    """Run the data pipeline end to end under ``cfg.workdir``; returns a summary dict.

    Writes ``logs/`` (synthetic logs and ``manifest.json``), ``data/`` (tokenizer, ``sar_train`` and
    ``sar_valid`` datasets, ``index_cache/``) and ``demo_summary.json``.
    """
    if cfg.obd_dir and not os.path.exists(cfg.obd_dir):
        raise DemoError(f"Open Bandit Dataset folder not found: {cfg.obd_dir}")
    step = _Steps(log)
    os.makedirs(cfg.workdir, exist_ok=True)
    logs = os.path.join(cfg.workdir, "logs")
    data = os.path.join(cfg.workdir, "data")
    os.makedirs(data, exist_ok=True)

    synthetic = SyntheticConfig(seed=cfg.seed, train_per_domain=cfg.records_per_domain,
                                valid_per_domain=max(cfg.records_per_domain // 8, 1),
                                test_per_domain=max(cfg.records_per_domain // 8, 1))
    manifest = write_logs(synthetic, logs)
    ct_domains, held_out = manifest["in_domain"], manifest["out_of_domain"]
    manifest_path = os.path.join(logs, "manifest.json")
    step("synthetic logs", f"synthetic logs in {logs}: in-domain {', '.join(ct_domains)}; "
         f"out-of-domain, held out of CT: {', '.join(held_out) or 'none'}")

    def in_domain_files(split: str) -> list[str]:
        return [os.path.join(logs, manifest["files"][split][d]) for d in ct_domains]

    # The tokenizer reads every domain's training text, the held-out one too: it fixes the vocabulary
    # before CT, as a pretrained Llama's tokenizer would, so the held-out domain's names and values
    # get whole pieces and its later evaluation measures the model, not a tokenizer that never saw
    # its text. The tokenizer learns which strings are frequent, nothing about rewards (every reward
    # is a fixed label symbol), and the model never trains on the held-out records.
    tokenizer_path = os.path.join(data, "tokenizer.model")
    train_tokenizer_on_logs([os.path.join(logs, "train")], tokenizer_path, vocab_size=cfg.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    step("tokenizer", f"tokenizer {tokenizer_path}: vocabulary {tokenizer.vocab_size}, trained on the "
         "training logs of every domain (held-out ones too)")

    train_prefix = os.path.join(data, "sar_train")
    valid_prefix = os.path.join(data, "sar_valid")
    summaries = {"train": preprocess(PreprocessConfig(
        inputs=in_domain_files("train"), output_prefix=train_prefix, tokenizer_model=tokenizer_path,
        workers=cfg.workers, append_eod=True, progress=cfg.progress))}
    summaries["valid"] = preprocess(PreprocessConfig(
        inputs=in_domain_files("valid"), output_prefix=valid_prefix,
        tokenizer_model=tokenizer_path, workers=cfg.workers, append_eod=True, progress=cfg.progress,
        reward_bins=train_prefix + ".reward_bins.json"))
    if cfg.obd_dir:
        summaries["obd"] = preprocess(PreprocessConfig(
            inputs=[cfg.obd_dir], output_prefix=os.path.join(data, "obd"), tokenizer_model=tokenizer_path,
            workers=cfg.workers, append_eod=True, progress=cfg.progress))
    step("CT data", f"CT data: the in-domain records ({', '.join(held_out) or 'nothing'} held out)")
    for name, s in summaries.items():
        log(INDENT + f"{name}: " + s.format().replace("\n", "\n" + INDENT))

    mbs = cfg.micro_batch_size
    # One epoch of GPT packing gives (tokens - 1) // seq_length samples (they overlap by one token).
    if (summaries["train"].tokens - 1) // cfg.seq_length < mbs:
        raise DemoError(f"the CT data holds {summaries['train'].tokens} tokens, fewer than one batch of "
                        f"{mbs} samples of {cfg.seq_length + 1} tokens; use more records per domain or a "
                        "shorter sequence length")
    tokens = IndexedDataset(train_prefix)
    mask = IndexedDataset(train_prefix + MASK_SUFFIX)
    cache_dir = os.path.join(data, "index_cache")
    samples = GPTSampleDataset(tokens, cfg.seq_length, seed=cfg.seed, num_epochs=1, cache_dir=cache_dir)
    masks = SampleMasks(samples, mask)
    vocab = tokenizer.vocab_size
    ct_batch = BatchLoader(CTSamples(samples, vocab), mbs, mbs, dp_rank=0, dp_size=1,
                           vocab_size=vocab).next_step()[0]
    reward_share = float(np.mean([masks[k].mean() for k in range(min(len(samples), 64))]))
    step("CT samples", f"CT samples: {len(samples)} of {cfg.seq_length + 1} tokens; first batch "
         f"{tuple(ct_batch['tokens'].shape)} inputs; {reward_share:.1%} of tokens are reward tokens")
    for line in describe_sample_start(samples, tokens, tokenizer, 0):
        log(INDENT + line)
    first = samples[0]
    log(INDENT + "its reward tokens: "
        + repr(tokenizer.decode(first[masks[0].astype(bool)][:8].tolist())))

    # SFT holds one whole record per sample: the sequence fits the longest record.
    longest = int(document_token_counts(tokens.sequence_lengths, tokens.document_indices).max())
    sft_seq_length = max(cfg.seq_length, longest - 1)
    sft = build_dataset(train_prefix, "sft", sft_seq_length, num_samples=mbs, seed=cfg.seed)
    sft_batch = BatchLoader(sft, mbs, mbs, dp_rank=0, dp_size=1, vocab_size=vocab).next_step()[0]
    predicted = sft_batch["loss_mask"].bool()
    step("SFT samples", f"SFT samples: {sft.num_records} records ({sft.skipped_records} without a reward "
         f"token) of up to {longest} tokens, seq_length {sft_seq_length}; first batch "
         f"{tuple(sft_batch['tokens'].shape)} predicts {int(predicted.sum())} reward tokens: "
         + repr(tokenizer.decode(sft_batch["labels"][predicted][:8].tolist())))

    summary_path = os.path.join(cfg.workdir, "demo_summary.json")
    held_out_logs = {d: [os.path.join(logs, manifest["files"][split][d]) for split in manifest["files"]]
                     for d in held_out}
    paths = {"summary": summary_path, "manifest": manifest_path, "logs": logs, "tokenizer": tokenizer_path,
             "train": train_prefix, "valid": valid_prefix, "index_cache": cache_dir,
             "held_out_logs": held_out_logs}
    result = {"samples": len(samples), "batch_shape": list(ct_batch["tokens"].shape),
              "reward_token_share": reward_share,
              "sft": {"records": sft.num_records, "skipped_records": sft.skipped_records,
                      "seq_length": sft_seq_length, "batch_reward_tokens": int(predicted.sum())},
              "records": {k: s.records for k, s in summaries.items()},
              "tokens": {k: s.tokens for k, s in summaries.items()},
              "ct_domains": ct_domains, "held_out_domains": held_out,
              "bayes_ceiling_valid": manifest["bayes_ceiling"].get("valid", {}),
              "paths": paths}
    write_json_atomic(summary_path, result)
    where = [("summary of this run", summary_path),
             ("Bayes ceilings per domain and split", f"{manifest_path} (the logs' manifest)"),
             ("CT datasets", f"{train_prefix}, {valid_prefix} (each with {MASK_SUFFIX}, .meta.json "
                             "and .reward_bins.json files)"),
             ("tokenizer", tokenizer_path),
             ("sample-index cache", cache_dir)]
    where += [(f"held-out {domain} logs", ", ".join(files)) for domain, files in held_out_logs.items()]
    width = max(len(label) for label, _ in where) + 1
    log("done; where everything went:")
    for label, value in where:
        log(INDENT + f"{label + ':':{width}} {value}")
    return result


def describe_sample_start(samples: GPTSampleDataset, tokens: IndexedDataset, tokenizer: Tokenizer,
                          k: int) -> list[str]:
    """Lines showing how sample ``k`` begins: at a record start, or inside a record cut by GPT packing
    (then the sample is shown from the first record that starts in it, if one does)."""
    sequence, offset, length = (int(v) for v in samples.sample_span(k)[0])
    sample = samples[k]
    if offset == 0:
        return [f"sample {k} begins at the start of a record: "
                + repr(tokenizer.decode(sample[:SAMPLE_PREVIEW_TOKENS].tolist()))[:160]]
    record_length = int(tokens.sequence_lengths[sequence])
    lines = [f"sample {k} begins in the middle of a record (at its token {offset} of {record_length}: "
             "GPT packing cuts records at sample boundaries)"]
    if length < len(sample):
        lines.append(f"the next record starts at token {length}: "
                     + repr(tokenizer.decode(sample[length:length + SAMPLE_PREVIEW_TOKENS].tolist()))[:160])
    else:
        lines.append("no record starts in it; it begins: "
                     + repr(tokenizer.decode(sample[:SAMPLE_PREVIEW_TOKENS].tolist()))[:160])
    return lines
