#!/usr/bin/env python
"""Train a SentencePiece tokenizer on SAR logs; markers and reward labels become single tokens.

    python tools/train_tokenizer.py --input logs/train --model-prefix data/tokenizer --vocab-size 8000
"""
import argparse
import os
import sys

from engine.data.preprocess import train_tokenizer_on_logs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (.jsonl, OBD log .csv)")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true")
    p.add_argument("--max-records", type=int, default=200_000, help="train on at most this many records")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        tok, used = train_tokenizer_on_logs(
            args.input, args.model_prefix + ".model", vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback, max_records=args.max_records,
            skip_bad_lines=args.skip_bad_lines, num_threads=args.threads)
    except (ValueError, FileNotFoundError) as exc:  # PreprocessError, RecordError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {tok.model_path}: vocab {tok.vocab_size}, trained on {used} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
