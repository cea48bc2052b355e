"""Sample-index build time: C++ (engine._C) against a plain-Python version of the same algorithm.

    python benchmarks/bench_sample_index.py [--num-docs 200000] [--mean-doc-tokens 500]

Documents get uniform random token counts in [0, 2 * mean]; the default is about 100M tokens. Reports
the C++ index build (document order, boundaries, sample shuffle) per seq_length, the plain-Python
build of the same arrays (checked equal), GPTSampleDataset construction with a cold and a warm disk
cache, the blending index, and sample reads from a real .bin/.idx file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # run from a checkout without installing
from engine import _C  # noqa: E402
from engine.data.samples import GPTSampleDataset, IndexPlan, build_gpt_sample_index  # noqa: E402
from test_sample_index import RefRng, ref_shuffle  # noqa: E402  (the tests' plain-Python PRNG)


def python_index(counts: list[int], seq_length: int, seed: int, num_epochs: int):
    """Plain-Python loops over documents (not tokens), same arrays as the C++ build."""
    ids = list(range(len(counts)))
    order = []
    for e in range(num_epochs):
        order += ref_shuffle(ids, RefRng(seed, 1, e))
    total = 0
    for d in order:
        total += counts[d]
    n = (total - 1) // seq_length
    boundaries = []
    pos, doc_start = 0, 0
    for k in range(n + 1):
        target = k * seq_length
        while doc_start + counts[order[pos]] <= target:
            doc_start += counts[order[pos]]
            pos += 1
        boundaries.append((pos, target - doc_start))
    shuffle = ref_shuffle(range(n), RefRng(seed, 2, 0))
    return order, boundaries, shuffle


class ArrayIndexed:
    """Just the arrays GPTSampleDataset reads to build its index (one sequence per document)."""

    def __init__(self, lengths: np.ndarray):
        self.sequence_lengths = lengths.astype(np.int32)
        self.document_indices = np.arange(lengths.size + 1, dtype=np.int64)
        self.prefix = "synthetic"


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=200_000)
    parser.add_argument("--mean-doc-tokens", type=int, default=500)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blend-size", type=int, default=10_000_000)
    parser.add_argument("--read-samples", type=int, default=2000)
    parser.add_argument("--skip-python", action="store_true", help="leave out the plain-Python build")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2 * args.mean_doc_tokens + 1, size=args.num_docs).astype(np.int64)
    ids = np.arange(args.num_docs, dtype=np.int64)
    print(f"{args.num_docs} documents, {int(counts.sum()):,} tokens")
    print("| seq_length | samples | C++ build (s) | plain Python (s) | speed-up | "
          "dataset, cold cache (s) | dataset, warm cache (s) |")
    print("|---|---|---|---|---|---|---|")
    for seq_length in args.seq_lengths:
        plan = IndexPlan.make(int(counts.sum()), seq_length, 1234, None, 1)
        t_cpp, index = best_of(lambda: build_gpt_sample_index(counts, ids, plan), args.repeats)
        t_py = float("nan")
        if not args.skip_python:
            t0 = time.perf_counter()
            order, boundaries, shuffle = python_index(counts.tolist(), seq_length, 1234, 1)
            t_py = time.perf_counter() - t0
            assert index.order.tolist() == order and index.shuffle.tolist() == shuffle
            assert [tuple(r) for r in index.boundaries.tolist()] == boundaries
        indexed = ArrayIndexed(counts)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            cold = GPTSampleDataset(indexed, seq_length, 1234, num_epochs=1, cache_dir=cache)
            t_cold = time.perf_counter() - t0
            t_warm, warm = best_of(
                lambda: GPTSampleDataset(indexed, seq_length, 1234, num_epochs=1, cache_dir=cache),
                args.repeats)
            assert not cold.loaded_from_cache and warm.loaded_from_cache
        python_cells = ("not run | -" if args.skip_python else f"{t_py:.2f} | {t_py / t_cpp:.0f}x")
        print(f"| {seq_length} | {index.shuffle.size:,} | {t_cpp:.4f} | {python_cells} | "
              f"{t_cold:.3f} | {t_warm:.3f} |")

    weights = np.array([0.6, 0.3, 0.1])
    t_blend, _ = best_of(lambda: _C.blending_indices(weights, args.blend_size), args.repeats)
    print(f"\nblending index, 3 datasets, {args.blend_size:,} samples: {t_blend:.3f} s "
          f"({args.blend_size / t_blend / 1e6:.1f} M samples/s)")

    from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder
    read_docs = min(args.num_docs, 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "bench")
        builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
        for d in range(read_docs):
            builder.add_item(rng.integers(0, 32000, size=int(counts[d]), dtype=np.uint16))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        ds = GPTSampleDataset(IndexedDataset(prefix), 4096, 1234, num_epochs=1)
        picks = rng.integers(0, len(ds), size=args.read_samples)
        t0 = time.perf_counter()
        for k in picks:
            ds[int(k)]
        t_read = time.perf_counter() - t0
        pieces = sum(ds.sample_span(int(k)).shape[0] for k in picks)
        print(f"random GPTSampleDataset reads, seq_length 4096, {int(counts[:read_docs].sum()):,}-token "
              f"file: {args.read_samples / t_read:,.0f} samples/s "
              f"({pieces / args.read_samples:.1f} pieces per sample)")


if __name__ == "__main__":
    main()
