#!/usr/bin/env python
"""Hugging Face Llama <-> engine checkpoint conversion.

    python tools/convert_hf.py import --hf-dir llama-hf --save ckpt --tp 2 --pp 2 [--dtype bf16]
    python tools/convert_hf.py export --load ckpt --hf-dir llama-out [--iteration N] [--max-shard-size 5GB]
    python tools/convert_hf.py info --load ckpt

Exit status: 0 done, 1 the conversion failed (bad input, I/O error), 2 usage error, 130/143
interrupted by SIGINT/SIGTERM. A failed or interrupted conversion leaves the destination as it was.
"""
from __future__ import annotations

import argparse
import sys

from engine.cli import int_at_least
from engine.convert.sharded import OutputExistsError, describe, export_hf, import_hf
from engine.fileio import Interrupted, signals_raise_interrupted


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an iteration number >= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export,info}")

    imp = sub.add_parser("import", help="HF Llama directory -> engine checkpoint (iteration 0)",
                         description="Convert a Hugging Face Llama directory into an engine checkpoint "
                                     "(iteration 0, no optimizer state) sharded for TP x PP.")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors weights")
    imp.add_argument("--save", required=True, help="checkpoint directory to create")
    imp.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (default: %(default)s)")
    imp.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (default: %(default)s)")
    imp.add_argument("--dtype", default=None, help="cast floating tensors to bf16, fp16 or fp32 "
                     "(default: keep each tensor's dtype)")

    exp = sub.add_parser("export", help="engine checkpoint (any layout) -> HF Llama directory",
                         description="Write a Hugging Face Llama directory from an engine checkpoint of any "
                                     "TP x PP layout.")
    exp.add_argument("--load", required=True, help="checkpoint root (uses 'latest') or an iter_N directory")
    exp.add_argument("--hf-dir", required=True, help="directory to create")
    exp.add_argument("--iteration", type=non_negative_int, default=None,
                     help="iteration to export (default: the one 'latest' names)")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="split weights into files of at most this size (default: %(default)s)")
    exp.add_argument("--tokenizer-dir", default=None,
                     help="copy tokenizer files from here (default: those stored in the checkpoint)")
    exp.add_argument("--dtype", default=None, help="cast floating tensors to bf16, fp16 or fp32 "
                     "(default: keep each tensor's dtype)")

    info = sub.add_parser("info", help="describe a checkpoint after validating it",
                          description="Validate a checkpoint and describe it: iteration, layout, "
                                      "optimizer state, model size.")
    info.add_argument("--load", required=True, help="checkpoint root (uses 'latest') or an iter_N directory")

    for p in (imp, exp):
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with signals_raise_interrupted():
        try:
            if args.command == "import":
                out = import_hf(args.hf_dir, args.save, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                progress=not args.no_progress, force=args.force)
                print(f"wrote {out}")
                print(describe(args.save))
            elif args.command == "export":
                out = export_hf(args.load, args.hf_dir, iteration=args.iteration,
                                max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                                dtype=args.dtype, progress=not args.no_progress, force=args.force)
                print(f"wrote {out}")
            else:
                print(describe(args.load))
        except Interrupted as exc:
            print(f"convert_hf {args.command}: {exc}: stopped, partial output removed", file=sys.stderr)
            return exc.exit_status
        except OutputExistsError as exc:
            print(f"error: {exc.path}: already exists and is not empty (use --force to replace it)", file=sys.stderr)
            return 1
        except (ValueError, OSError) as exc:  # bad input or I/O: one clear line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
