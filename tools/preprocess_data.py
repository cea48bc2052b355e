#!/usr/bin/env python
"""SAR logs (JSON Lines or Open Bandit Dataset CSV) -> <prefix>.bin/.idx + reward mask + meta.

    python tools/preprocess_data.py --input logs/train/*.jsonl --output-prefix data/sar_train \
        --tokenizer-model tokenizer.model --workers 8 --append-eod
    python tools/preprocess_data.py --input logs/valid/*.jsonl --output-prefix data/sar_valid \
        --tokenizer-model tokenizer.model --reward-bins data/sar_train.reward_bins.json
"""
import argparse
import sys

from engine.data.obd import ObdOptions
from engine.data.preprocess import PreprocessConfig, preprocess
from engine.data.reward_bins import DEFAULT_NUM_BINS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (.jsonl, OBD log .csv)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx, <prefix>_reward_mask.bin/.idx, "
                   "<prefix>.reward_bins.json, <prefix>.meta.json")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece model (trained or Llama-2 tokenizer.model)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256, help="records per worker task")
    p.add_argument("--append-eod", action="store_true", help="append the EOS token to every record")
    p.add_argument("--add-bos", action="store_true", help="start every record with the BOS token")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (counted and listed) "
                   "instead of stopping at the first")
    p.add_argument("--reward-bins", nargs="+", default=None, help="use these reward bins (e.g. the training "
                   "split's; several files are merged) instead of fitting them on the input")
    p.add_argument("--num-bins", type=int, default=DEFAULT_NUM_BINS, help="quantile bins per numeric reward field")
    p.add_argument("--obd-hash-chars", type=int, default=8, help="keep this many characters of OBD hashed features")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        workers=args.workers, append_eod=args.append_eod, add_bos=args.add_bos, skip_bad_lines=args.skip_bad_lines,
        reward_bins=args.reward_bins, num_bins=args.num_bins, chunk_size=args.chunk_size,
        progress=not args.no_progress, obd=ObdOptions(hash_chars=args.obd_hash_chars))
    try:
        summary = preprocess(config)
    except (ValueError, FileNotFoundError) as exc:  # PreprocessError, RecordError, bad bins file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
