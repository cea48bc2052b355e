#!/usr/bin/env python
"""Write synthetic SAR logs with known reward distributions (and their Bayes ceilings).

    python tools/make_synthetic_logs.py --output-dir runs/sar/logs --seed 0 --train 4000
    python tools/make_synthetic_logs.py --output-dir runs/sar/logs_half --shared-structure 0.5

Writes <output-dir>/<split>/<domain>.jsonl for the train, valid and test splits and
<output-dir>/manifest.json (the files, which domains are in- and out-of-domain, and the best accuracy,
log-loss and AUC any model can reach per domain and split); prints a short summary.
"""
import argparse
import os
import sys

from engine.data.synthetic import (DEFAULT_DOMAINS, DOMAIN_REWARDS, SyntheticConfig, check_shared_structure,
                                   format_logs_summary, write_logs)
from engine.cli import HelpFormatter, int_at_least

PROG = os.path.basename(__file__)


def shared_structure(text: str) -> float:
    try:
        return check_shared_structure(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder for <split>/<domain>.jsonl and manifest.json")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="every record is a deterministic function of it")
    p.add_argument("--train", type=int_at_least(1), default=4000, help="training records per domain")
    p.add_argument("--valid", type=int_at_least(0), default=500, help="validation records per domain")
    p.add_argument("--test", type=int_at_least(0), default=500, help="test records per domain")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS), choices=list(DOMAIN_REWARDS),
                   metavar="DOMAIN", help="domains to write (choices: %(choices)s; feed/session, episodes, "
                   "is available but not in the default set)")
    p.add_argument("--ood-domains", nargs="*", default=["shop/purchase"], choices=list(DOMAIN_REWARDS),
                   metavar="DOMAIN", help="domains marked out-of-domain in the manifest: written like the "
                   "others, meant to be held out of continued pre-training and used to evaluate transfer "
                   "(none: give the flag alone)")
    p.add_argument("--shared-structure", type=shared_structure, default=1.0, metavar="S",
                   help="how much of the user-item affinity the domains share: any two domains' affinities "
                   "have correlation S (1: one affinity for all; 0: each domain its own)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(seed=args.seed, train_per_domain=args.train, valid_per_domain=args.valid,
                                 test_per_domain=args.test, domains=tuple(args.domains),
                                 ood_domains=tuple(args.ood_domains), shared_structure=args.shared_structure)
    except ValueError as exc:  # a combination of options (e.g. every domain out-of-domain)
        parser.error(str(exc))
    try:
        manifest = write_logs(config, args.output_dir)
    except OSError as exc:
        print(f"{PROG}: error: cannot write {args.output_dir}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # logs whose ceilings cannot be computed (a training split too small)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(format_logs_summary(manifest, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
