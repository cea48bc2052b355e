#!/usr/bin/env python
"""Preprocessing throughput (records/s, tokens/s) on synthetic SAR logs for several worker counts.

    python benchmarks/bench_preprocess.py --records 100000 --workers 1 2

Writes the logs and a tokenizer under --workdir (kept between runs, reused when present), then runs
the preprocessing once per worker count with the reward bins fitted on the input (a scan pass plus
the encoding pass) and once with them given (encoding pass only, as for a validation split), and
checks that every worker count wrote byte-identical files.
"""
import argparse
import filecmp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.preprocess import PreprocessConfig, preprocess, train_tokenizer_on_logs  # noqa: E402
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, write_logs  # noqa: E402
from engine.data.tokenizer import Tokenizer  # noqa: E402


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the workers, once their pool has shut down)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000, help="total training records (split over domains)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration; best and median reported")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ltu_bench_preprocess"))
    args = p.parse_args()

    per_domain = args.records // len(DOMAIN_REWARDS)
    logs = os.path.join(args.workdir, f"logs_{per_domain}")
    if not os.path.exists(os.path.join(logs, "manifest.json")):
        t = time.perf_counter()
        config = SyntheticConfig(seed=0, train_per_domain=per_domain, valid_per_domain=0, test_per_domain=0,
                                 domains=tuple(DOMAIN_REWARDS))  # every domain, episodes included
        write_logs(config, logs)
        print(f"generated {per_domain * len(DOMAIN_REWARDS)} records in {time.perf_counter() - t:.1f} s")
    model = os.path.join(args.workdir, f"tok{args.vocab_size}.model")
    if not os.path.exists(model):
        t = time.perf_counter()
        train_tokenizer_on_logs([os.path.join(logs, "train")], model, vocab_size=args.vocab_size, max_records=20000)
        print(f"trained tokenizer in {time.perf_counter() - t:.1f} s")
    # SentencePiece may stop below the requested size (no hard limit): report what was built.
    print(f"tokenizer {model}: {Tokenizer(model).vocab_size} pieces (requested {args.vocab_size})")

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs visible")
    print(f"best and median of {args.repeat} runs")
    print("| workers | reward bins | records | tokens | best s | median s | records/s (best) | tokens/s (best) "
          "| CPU s main + workers (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    prefixes = []
    bins_path = os.path.join(args.workdir, "bins.json")
    for given_bins in (False, True):
        for workers in args.workers:
            prefix = os.path.join(args.workdir, f"out_w{workers}_{'given' if given_bins else 'fit'}", "data")
            config = PreprocessConfig(inputs=[os.path.join(logs, "train")], output_prefix=prefix,
                                      tokenizer_model=model, workers=workers, append_eod=True,
                                      chunk_size=args.chunk_size, progress=False,
                                      reward_bins=bins_path if given_bins else None)
            times, main_cpu, worker_cpu = [], [], []
            for _ in range(args.repeat):
                c, w, t = time.process_time(), _children_cpu(), time.perf_counter()
                summary = preprocess(config)
                times.append(time.perf_counter() - t)
                main_cpu.append(time.process_time() - c)
                worker_cpu.append(_children_cpu() - w)
            best, median = min(times), statistics.median(times)
            mode = "given (one pass)" if given_bins else "fitted (two passes)"
            print(f"| {workers} | {mode} | {summary.records} | {summary.tokens} | {best:.2f} | {median:.2f} "
                  f"| {summary.records / best:.0f} | {summary.tokens / best:.0f} "
                  f"| {statistics.median(main_cpu):.2f} + {statistics.median(worker_cpu):.2f} |", flush=True)
            prefixes.append(prefix)
            if not given_bins:
                shutil.copy(prefix + ".reward_bins.json", bins_path)
    for other in prefixes[1:]:
        for suffix in (".bin", ".idx", "_reward_mask.bin", "_reward_mask.idx"):
            assert filecmp.cmp(prefixes[0] + suffix, other + suffix, shallow=False), f"{other}{suffix} differs"
    print("outputs identical across worker counts")


if __name__ == "__main__":
    main()
