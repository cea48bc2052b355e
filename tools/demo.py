#!/usr/bin/env python
"""The ltu-engine demo on CPU: synthetic decision logs through the whole data path.

    python tools/demo.py [--workdir runs/demo] [--records 2000] [--obd-dir ../shared/data/obd/random/all]

Writes the logs, the tokenizer, the CT datasets (in-domain records only; the out-of-domain domain is
held out for evaluation) and demo_summary.json under --workdir; configs/tiny.yaml trains on them.
"""
import argparse
import os
import sys

from engine.demo import DemoConfig, run_data_demo
from engine.cli import HelpFormatter, int_at_least

PROG = os.path.basename(__file__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="folder for everything the demo writes")
    p.add_argument("--records", type=int_at_least(1), default=2000,
                   help="training records per synthetic domain (validation and test: 1/8 of it)")
    p.add_argument("--workers", type=int_at_least(1), default=2, help="preprocessing worker processes")
    p.add_argument("--seq-length", type=int_at_least(1), default=256, help="tokens per CT training sample")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the logs and the sample shuffle")
    p.add_argument("--obd-dir", default=None, help="an Open Bandit Dataset folder to preprocess as well")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_data_demo(DemoConfig(workdir=args.workdir, records_per_domain=args.records, workers=args.workers,
                                 seq_length=args.seq_length, seed=args.seed, obd_dir=args.obd_dir,
                                 progress=not args.no_progress and sys.stderr.isatty()))
    except (ValueError, OSError) as exc:  # DemoError, PreprocessError, RecordError, unwritable folders
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
