#!/usr/bin/env python
"""Write the Open Bandit Dataset's logs as SAR logs: one domain per logging policy and campaign,
each log split by time.

    python tools/make_obd_logs.py --source ../shared/data/obd --output-dir runs/obd/logs
    python tools/make_obd_logs.py --source ../shared/data/obd --output-dir runs/obd/logs \\
        --ood-domains random/all --valid-fraction 0.1 --test-fraction 0.2

Reads <source>/<policy>/<campaign>/<campaign>.csv (with item_context.csv beside it) and writes
<output-dir>/<split>/<domain>.jsonl for the train, valid and test splits and <output-dir>/manifest.json
(files, in- and out-of-domain logs, each log's time cut, records and click rates), the layout of
tools/make_synthetic_logs.py; prints records and the click rate per split and domain.
How records and the split are defined: engine/data/obd.py and engine/data/obd_logs.py.
"""
import argparse
import os
import sys

from engine.cli import HelpFormatter, int_at_least, split_fraction
from engine.data.obd_logs import ObdLogsConfig, format_logs_summary, write_logs

PROG = os.path.basename(__file__)
DEFAULTS = ObdLogsConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--source", required=True, help="the OBD folder (<policy>/<campaign>/<campaign>.csv)")
    p.add_argument("--output-dir", required=True, help="folder for <split>/<domain>.jsonl and manifest.json")
    p.add_argument("--ood-domains", nargs="*", default=list(DEFAULTS.ood_domains), metavar="DOMAIN",
                   help="logs marked out-of-domain in the manifest, held out of continued pre-training "
                   "(obd/<policy>/<campaign> or <policy>/<campaign>; none: give the flag alone)")
    p.add_argument("--valid-fraction", type=split_fraction, default=DEFAULTS.valid_fraction,
                   help="share of each log's rows, by time, in the valid split (before the test split)")
    p.add_argument("--test-fraction", type=split_fraction, default=DEFAULTS.test_fraction,
                   help="share of each log's rows, by time, in the test split (the latest)")
    p.add_argument("--seed", type=int_at_least(0), default=DEFAULTS.seed, help="the order of records within each file")
    p.add_argument("--hash-chars", type=int_at_least(0), default=DEFAULTS.hash_chars,
                   help="leading characters kept of each hashed feature (0: all)")
    p.add_argument("--top-affinities", type=int_at_least(0), default=DEFAULTS.top_affinities,
                   help="item ids of the user's highest affinities listed in the state")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ObdLogsConfig(valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                               ood_domains=tuple(args.ood_domains), seed=args.seed, hash_chars=args.hash_chars,
                               top_affinities=args.top_affinities)
    except ValueError as exc:  # fractions that leave no training split
        parser.error(str(exc))
    try:
        manifest = write_logs(args.source, args.output_dir, config)
    except (OSError, ValueError) as exc:  # a missing folder, a malformed row (RecordError), an unknown domain
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(format_logs_summary(manifest, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
