#!/usr/bin/env python
"""Write synthetic SAR logs with known reward distributions (and their Bayes ceilings).

    python tools/make_synthetic_logs.py --output-dir data/synthetic --seed 0 --train 4000
"""
import argparse
import json
import sys

from engine.data.synthetic import DEFAULT_DOMAINS, DOMAIN_REWARDS, SyntheticConfig, write_logs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000, help="training records per domain")
    p.add_argument("--valid", type=int, default=500, help="validation records per domain")
    p.add_argument("--test", type=int, default=500, help="test records per domain")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_DOMAINS), choices=list(DOMAIN_REWARDS),
                   help="feed/session (episodes) is available but not in the default set")
    p.add_argument("--ood-domains", nargs="*", default=["shop/purchase"], choices=list(DOMAIN_REWARDS))
    args = p.parse_args(argv)
    config = SyntheticConfig(seed=args.seed, train_per_domain=args.train, valid_per_domain=args.valid,
                             test_per_domain=args.test, domains=tuple(args.domains),
                             ood_domains=tuple(args.ood_domains))
    manifest = write_logs(config, args.output_dir)
    print(f"wrote {args.output_dir}/manifest.json")
    print(json.dumps(manifest["bayes_ceiling"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
