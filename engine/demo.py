"""The end-to-end demo: synthetic decision logs -> tokenizer -> indexed datasets -> training samples.

It grows with the engine (CT -> SFT -> evaluate); today it runs the whole data path a training run
reads, and checks on the way what later stages rely on: that the reward tokens of each sample are
exactly where the reward mask says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from engine.data.indexed import IndexedDataset
from engine.data.loader import SampleLoader
from engine.data.preprocess import MASK_SUFFIX, PreprocessConfig, preprocess, train_tokenizer_on_logs
from engine.data.samples import GPTSampleDataset
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
    masks = _SampleMasks(samples, mask)
    loader = SampleLoader(samples, cfg.micro_batch_size, dp_rank=0, dp_size=1)
    batch = next(iter(loader))
    reward_share = float(np.mean([masks[k].mean() for k in range(min(len(samples), 64))]))
    first = samples[0]
    log(f"[4/4] {len(samples)} samples of {cfg.seq_length + 1} tokens; first batch {tuple(batch.shape)}; "
        f"{reward_share:.1%} of tokens are reward tokens")
    log("      sample 0 begins: " + repr(tokenizer.decode(first[:48].tolist()))[:160])
    log("      its reward tokens: " + repr(tokenizer.decode(first[masks[0].astype(bool)][:8].tolist())))

    result = {"samples": len(samples), "batch_shape": list(batch.shape), "reward_token_share": reward_share,
              "records": {k: s.records for k, s in summaries.items()},
              "tokens": {k: s.tokens for k, s in summaries.items()},
              "bayes_ceiling_valid": manifest["bayes_ceiling"].get("valid", {})}
    write_json_atomic(os.path.join(cfg.workdir, "demo_summary.json"), result)
    return result


class _SampleMasks:
    """The reward mask of each training sample, fetched with the same pieces as its tokens."""

    def __init__(self, samples: GPTSampleDataset, mask: IndexedDataset):
        if not np.array_equal(samples.indexed.sequence_lengths, mask.sequence_lengths):
            raise ValueError(f"{mask.prefix}: reward mask does not have the token dataset's sequence lengths")
        self.samples, self.mask = samples, mask

    def __getitem__(self, k: int) -> np.ndarray:
        pieces = self.samples.sample_span(k)
        return np.concatenate([self.mask.get(int(s), int(o), int(n)) for s, o, n in pieces])
