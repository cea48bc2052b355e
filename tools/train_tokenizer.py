#!/usr/bin/env python
"""Train a SentencePiece tokenizer on SAR logs; markers and reward labels become single tokens.

    python tools/train_tokenizer.py --input runs/sar/logs/train --model-prefix runs/sar/data/tokenizer --vocab-size 8000
"""
import argparse
import os
import re
import sys

from engine.data.preprocess import train_tokenizer_on_logs
from engine.cli import HelpFormatter, int_at_least

PROG = os.path.basename(__file__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories (.jsonl, OBD log .csv)")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model")
    p.add_argument("--vocab-size", type=int_at_least(1), default=8000,
                   help="an upper bound: small logs give fewer pieces")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="characters outside the vocabulary become <unk> instead of byte tokens")
    p.add_argument("--max-records", type=int_at_least(1), default=200_000,
                   help="train on at most this many records, taken from the input files in turn")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of stopping")
    p.add_argument("--threads", type=int_at_least(1), default=os.cpu_count() or 1, help="SentencePiece threads")
    return p


def _sentencepiece_reason(exc: RuntimeError) -> str:
    """SentencePiece's message without its source location (``INTERNAL: file.cc(638) [check] ``)."""
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", str(exc).strip())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tok, used = train_tokenizer_on_logs(
            args.input, args.model_prefix + ".model", vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback, max_records=args.max_records,
            skip_bad_lines=args.skip_bad_lines, num_threads=args.threads)
    except (ValueError, OSError) as exc:  # PreprocessError, RecordError, missing inputs, unwritable output
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # SentencePiece refused the training (e.g. a vocabulary too small)
        print(f"{PROG}: error: SentencePiece: {_sentencepiece_reason(exc)}", file=sys.stderr)
        return 1
    print(f"wrote {tok.model_path}: vocab {tok.vocab_size}, trained on {used} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
