#!/usr/bin/env python
"""Hugging Face Llama <-> engine checkpoint conversion.

    python tools/convert_hf.py import --hf-dir llama-hf --save ckpt --tp 2 --pp 2 [--dtype bf16]
    python tools/convert_hf.py export --load ckpt --hf-dir llama-out [--iteration N] [--max-shard-size 5GB]
    python tools/convert_hf.py info --load ckpt
"""
from __future__ import annotations

import argparse
import sys

from engine.convert.sharded import describe, export_hf, import_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF Llama directory -> engine checkpoint (iteration 0)")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors weights")
    imp.add_argument("--save", required=True, help="checkpoint directory to create")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    imp.add_argument("--dtype", default=None, help="cast floating tensors (bf16, fp16, fp32); default: keep")

    exp = sub.add_parser("export", help="engine checkpoint (any layout) -> HF Llama directory")
    exp.add_argument("--load", required=True, help="checkpoint root (uses 'latest') or an iter_N directory")
    exp.add_argument("--hf-dir", required=True, help="directory to create")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    exp.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    exp.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    exp.add_argument("--dtype", default=None, help="cast floating tensors (bf16, fp16, fp32); default: keep")

    info = sub.add_parser("info", help="describe a checkpoint after validating it")
    info.add_argument("--load", required=True)

    for p in (imp, exp):
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.save, tp=args.tp, pp=args.pp, dtype=args.dtype,
                            progress=not args.no_progress, force=args.force)
            print(f"wrote {out}")
            print(describe(args.save))
        elif args.command == "export":
            out = export_hf(args.load, args.hf_dir, iteration=args.iteration, max_shard_size=args.max_shard_size,
                            tokenizer_dir=args.tokenizer_dir, dtype=args.dtype,
                            progress=not args.no_progress, force=args.force)
            print(f"wrote {out}")
        else:
            print(describe(args.load))
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
