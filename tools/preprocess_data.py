#!/usr/bin/env python
r"""SAR logs (JSON Lines or Open Bandit Dataset CSV) -> <prefix>.bin/.idx + reward mask + meta.

    python tools/preprocess_data.py --input logs/train/*.jsonl --output-prefix data/sar_train \
        --tokenizer-model tokenizer.model --workers 8 --append-eod
    python tools/preprocess_data.py --input logs/valid/*.jsonl --output-prefix data/sar_valid \
        --tokenizer-model tokenizer.model --reward-bins data/sar_train.reward_bins.json

Exit status: 0 done, 1 the work failed (bad input, I/O error), 2 usage error, 130/143 interrupted by
SIGINT/SIGTERM. A failed or interrupted run leaves the previous outputs as they were and no temporaries.
"""
import argparse
import sys
from concurrent.futures.process import BrokenProcessPool

from engine.cli import int_at_least
from engine.data.obd import ObdOptions
from engine.data.preprocess import PreprocessConfig, preprocess
from engine.data.reward_bins import DEFAULT_NUM_BINS
from engine.fileio import Interrupted, signals_raise_interrupted


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (.jsonl, OBD log .csv)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx, <prefix>_reward_mask.bin/.idx, "
                   "<prefix>.reward_bins.json, <prefix>.meta.json")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece model (trained or Llama-2 tokenizer.model)")
    p.add_argument("--workers", type=positive_int, default=1, help="encoding processes (default: %(default)s)")
    p.add_argument("--chunk-size", type=positive_int, default=256,
                   help="records per worker task (default: %(default)s)")
    p.add_argument("--append-eod", action="store_true", help="append the EOS token to every record")
    p.add_argument("--add-bos", action="store_true", help="start every record with the BOS token")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (counted and listed) "
                   "instead of stopping at the first")
    p.add_argument("--reward-bins", nargs="+", default=None, help="use these reward bins (e.g. the training "
                   "split's; several files are merged) instead of fitting them on the input")
    p.add_argument("--num-bins", type=positive_int, default=DEFAULT_NUM_BINS,
                   help="quantile bins per numeric reward field (default: %(default)s)")
    p.add_argument("--obd-hash-chars", type=non_negative_int, default=8,
                   help="keep this many characters of OBD hashed features, 0 keeps them whole (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        workers=args.workers, append_eod=args.append_eod, add_bos=args.add_bos, skip_bad_lines=args.skip_bad_lines,
        reward_bins=args.reward_bins, num_bins=args.num_bins, chunk_size=args.chunk_size,
        progress=not args.no_progress, obd=ObdOptions(hash_chars=args.obd_hash_chars))
    with signals_raise_interrupted():
        try:
            summary = preprocess(config)
        except Interrupted as exc:
            print(f"preprocess_data: {exc}: stopped, temporaries removed", file=sys.stderr)
            return exc.exit_status
        except (ValueError, OSError) as exc:  # PreprocessError, RecordError, bad bins file, I/O errors
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except BrokenProcessPool:
            print("error: a worker process died (out of memory, or killed); nothing was written", file=sys.stderr)
            return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
