#!/usr/bin/env python
"""The ltu-engine demo on CPU: synthetic decision logs through the whole data path.

    python tools/demo.py [--workdir runs/demo] [--records 2000] [--obd-dir ../shared/data/obd/random/all]
"""
import argparse
import sys

from engine.demo import DemoConfig, run_data_demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--records", type=int, default=2000, help="training records per synthetic domain")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--obd-dir", default=None, help="an Open Bandit Dataset folder to preprocess as well")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    run_data_demo(DemoConfig(workdir=args.workdir, records_per_domain=args.records, workers=args.workers,
                             seq_length=args.seq_length, seed=args.seed, obd_dir=args.obd_dir,
                             progress=not args.no_progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
