#!/usr/bin/env python
"""Evaluate a model on held-out decision logs: the probability of each reward class of each record,
read from the model's next-token distribution at the reward, and the metrics of those predictions.

    python tools/evaluate.py --load runs/tiny-sft --data runs/demo/logs/test --out runs/tiny-sft/eval
    torchrun --nproc_per_node=4 tools/evaluate.py --load ckpt --data logs/test --tp 2 --pp 2
    python tools/evaluate.py --load llama-hf --data logs/test/*.jsonl --tokenizer llama-hf/tokenizer.model \\
        --reward-bins data/sar_train.reward_bins.json --in-domain ads/ctr ads/cpc

Prints one row per task (domain/reward field) and the in-domain / out-of-domain macro averages: AUC,
accuracy and balanced accuracy with their chance levels, log-loss, Brier, expected calibration error,
each with a bootstrap 95% interval in eval.json, and on synthetic logs the Bayes ceiling and the
model's KL divergence to the true distribution. Under --out DIR: eval.json (the metrics),
predictions.jsonl (per record and reward: domain, label, probs), roc.png and calibration.png.

--tokenizer, --reward-bins, --in-domain and BOS default to what the checkpoint's training run used
(its data.train datasets' .meta.json). Under torchrun the world is TP x PP x DP: each data-parallel
replica scores its share of the records. Exit status: 0 done, 1 the evaluation failed (the message
names why), 2 bad command line, 130/143 interrupted by SIGINT/SIGTERM (no output is left half-written).
"""
from __future__ import annotations

import argparse
import os
import sys

from engine.cli import HelpFormatter, int_at_least

PROG = os.path.basename(__file__)
positive_int = int_at_least(1, "a positive integer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--load", required=True, help="engine checkpoint (root with 'latest', or iter_N) or a "
                   "Hugging Face Llama directory")
    p.add_argument("--data", nargs="+", required=True, help="held-out logs: JSON Lines files, globs or "
                   "directories (OBD log .csv too), as preprocess_data.py reads them")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the one of the "
                   "checkpoint's training data, else tokenizer.model beside the checkpoint)")
    p.add_argument("--reward-bins", nargs="+", default=None, help="reward bins (several files are merged; "
                   "default: the training data's)")
    p.add_argument("--in-domain", nargs="*", default=None, metavar="DOMAIN", help="the domains the model "
                   "was fine-tuned on; the others are out-of-domain (default: the domains of the "
                   "checkpoint's training data)")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every record with BOS (default: as the training data was encoded)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (the rest of "
                   "torchrun's world is data-parallel)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward microbatch")
    p.add_argument("--max-records", type=positive_int, default=None, help="evaluate at most this many "
                   "records, taken from the input files in turn")
    p.add_argument("--out", default=None, help="folder for eval.json, predictions.jsonl, roc.png, calibration.png")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="draw roc.png and calibration.png under --out")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="model dtype")
    p.add_argument("--bootstrap", type=int_at_least(2, "an integer >= 2"), default=1000,
                   help="bootstrap resamples per interval")
    p.add_argument("--seed", type=int_at_least(0, "an integer >= 0"), default=0, help="bootstrap seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch comes after the command line is read, so a bad one (and --help) answers at once.
    import torch.distributed as dist

    from engine.eval.runner import EvalConfig, run_evaluation
    from engine.fileio import Interrupted, signals_raise_interrupted

    cfg = EvalConfig(load=args.load, data=args.data, tokenizer=args.tokenizer, reward_bins=args.reward_bins,
                     in_domain=args.in_domain, add_bos=args.add_bos, tp=args.tp, pp=args.pp,
                     batch_size=args.batch_size, max_records=args.max_records, out=args.out, plots=args.plots,
                     dtype=args.dtype, resamples=args.bootstrap, seed=args.seed, progress=not args.no_progress)
    try:
        with signals_raise_interrupted():  # torchrun stops ranks with SIGTERM: unwind, no traceback
            run_evaluation(cfg)
    except Interrupted as exc:
        print(f"{PROG}: interrupted by {exc.signal_name}", file=sys.stderr)
        return exc.exit_status
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        # RecordError, ScoringError, CheckpointError, a bad bins file, I/O: one line naming it.
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")
        where = f" (rank {rank})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{PROG}: error{where}: {message}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
