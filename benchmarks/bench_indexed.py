"""Indexed dataset benchmarks: GPT-sample read rate and writer peak memory.

1. Random reads of 4097-token samples assembled across sequence boundaries (documents in a shuffled
   order, as a GPT sample index walks them), with our reader (``ds.get``) against a plain
   ``numpy.memmap`` reader and a ``numpy.frombuffer``-over-``mmap`` reader of the same files.
2. Writer peak RSS (``VmHWM`` of a fresh subprocess) for 1M and 10M documents, against a
   minimal writer that keeps lengths and document indices in Python lists.

Files live under a temporary directory in /tmp and are deleted afterwards.

    python benchmarks/bench_indexed.py [--tokens 100000000] [--samples 20000] [--documents 1000000 10000000]
"""
from __future__ import annotations

import argparse
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder  # noqa: E402

SAMPLE_TOKENS = 4097


def build_corpus(prefix: str, num_tokens: int, seed: int) -> None:
    """Documents of one sequence each, lengths log-normal around ~300 tokens (short SAR records)."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 32000, size=1 << 20, dtype=np.uint16)
    written = 0
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        while written < num_tokens:
            length = int(min(max(rng.lognormal(5.5, 0.8), 8), 8192))
            start = int(rng.integers(0, len(pool) - length))
            builder.add_item(pool[start:start + length])
            builder.end_document()
            written += length


def sample_plan(lengths: np.ndarray, num_samples: int, seed: int) -> list[list[tuple[int, int, int]]]:
    """For each sample, the (sequence, offset, length) pieces it reads, walking a shuffled order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    plans = []
    for _ in range(num_samples):
        position = int(rng.integers(0, len(order)))
        offset = int(rng.integers(0, lengths[order[position]]))
        pieces, needed = [], SAMPLE_TOKENS
        while needed:
            sequence = int(order[position % len(order)])
            take = min(needed, int(lengths[sequence]) - offset)
            if take > 0:
                pieces.append((sequence, offset, take))
                needed -= take
            position, offset = position + 1, 0
        plans.append(pieces)
    return plans


def read_ours(ds: IndexedDataset, plans) -> int:
    checksum = 0
    for pieces in plans:
        sample = np.concatenate([ds.get(s, o, n) for s, o, n in pieces])
        checksum += int(sample[-1])
    return checksum


def read_memmap(tokens: np.memmap, starts: np.ndarray, plans) -> int:
    checksum = 0
    for pieces in plans:
        sample = np.concatenate([tokens[starts[s] + o:starts[s] + o + n] for s, o, n in pieces])
        checksum += int(sample[-1])
    return checksum


def read_frombuffer(buffer, pointers: np.ndarray, itemsize: int, dtype, plans) -> int:
    checksum = 0
    for pieces in plans:
        sample = np.concatenate([np.frombuffer(buffer, dtype=dtype, count=n, offset=int(pointers[s]) + o * itemsize)
                                 for s, o, n in pieces])
        checksum += int(sample[-1])
    return checksum


def bench_reads(directory: str, num_tokens: int, num_samples: int, repeats: int) -> None:
    prefix = os.path.join(directory, "corpus")
    start = time.perf_counter()
    build_corpus(prefix, num_tokens, seed=1)
    build_s = time.perf_counter() - start
    ds = IndexedDataset(prefix)
    bin_mb = os.path.getsize(prefix + ".bin") / 2 ** 20
    print(f"corpus: {len(ds)} documents, {ds.num_tokens} uint16 tokens ({bin_mb:.0f} MiB), "
          f"built in {build_s:.1f} s ({ds.num_tokens / build_s / 1e6:.1f} M tokens/s)")

    # Plain-numpy readers of the same files: the index arrays parsed with numpy from the spec.
    idx = np.fromfile(prefix + ".idx", dtype=np.uint8)
    n = int(idx[18:26].view("<u8")[0])
    pointers = idx[34 + 4 * n:34 + 12 * n].view("<i8").astype(np.int64)
    starts = pointers // 2
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
    with open(prefix + ".bin", "rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    plans = sample_plan(ds.sequence_lengths, num_samples, seed=2)
    pieces = sum(len(p) for p in plans) / len(plans)
    print(f"{num_samples} samples of {SAMPLE_TOKENS} tokens, {pieces:.1f} pieces per sample on average")
    readers = {
        "IndexedDataset.get (C++ mmap)": lambda: read_ours(ds, plans),
        "numpy.memmap slices": lambda: read_memmap(tokens, starts, plans),
        "numpy.frombuffer over mmap": lambda: read_frombuffer(buffer, pointers, 2, np.uint16, plans),
    }
    checksums = {name: fn() for name, fn in readers.items()}  # warm page cache, same data read
    assert len(set(checksums.values())) == 1, checksums
    # Round-robin repeats, so that load from other jobs on the machine hits every reader alike.
    rates: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(num_samples / (time.perf_counter() - t0))
    print("| reader | samples/s (best of %d) | median |" % repeats)
    print("|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {max(values):,.0f} | {float(np.median(values)):,.0f} |")
    del tokens
    buffer.close()


# ------------------------------------------------------------------ writer memory (subprocess)

def proc_status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak of this process image; ru_maxrss can carry the parent's peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def write_documents(mode: str, bin_path: str, num_documents: int) -> None:
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 32000, size=1 << 16, dtype=np.uint16)
    lengths = rng.integers(1, 17, size=1 << 16)
    baseline = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "ours":
        builder = IndexedDatasetBuilder(bin_path, np.uint16)
        for k in range(num_documents):
            length = int(lengths[k & 0xFFFF])
            builder.add_item(pool[k & 0x7FFF:(k & 0x7FFF) + length])
            builder.end_document()
        builder.finalize(bin_path[:-4] + ".idx")
    else:  # lists of every length and document index, written at the end
        sequence_lengths, document_indices = [], [0]
        with open(bin_path, "wb") as f:
            for k in range(num_documents):
                length = int(lengths[k & 0xFFFF])
                pool[k & 0x7FFF:(k & 0x7FFF) + length].tofile(f)
                sequence_lengths.append(length)
                document_indices.append(len(sequence_lengths))
        np.asarray(sequence_lengths, dtype=np.int32).tofile(bin_path[:-4] + ".lengths")
        np.asarray(document_indices, dtype=np.int64).tofile(bin_path[:-4] + ".docs")
    elapsed = time.perf_counter() - t0
    peak = proc_status_kib("VmHWM")
    print(f"{baseline} {peak} {elapsed:.2f}")


def bench_writer_memory(directory: str, counts: list[int]) -> None:
    print("| writer | documents | RSS before writing (MiB) | peak RSS (MiB) | growth (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for mode in ("ours", "python-lists"):
        for count in counts:
            bin_path = os.path.join(directory, f"mem_{mode}_{count}.bin")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--write-child", mode, bin_path, str(count)],
                                 capture_output=True, text=True, check=True).stdout.split()
            before, peak, seconds = int(out[0]) / 1024, int(out[1]) / 1024, float(out[2])
            name = "IndexedDatasetBuilder" if mode == "ours" else "lists in memory (reference)"
            print(f"| {name} | {count:,} | {before:.0f} | {peak:.0f} | {peak - before:.1f} | {seconds:.1f} |")
            for name in os.listdir(directory):
                if name.startswith(f"mem_{mode}_{count}"):
                    os.remove(os.path.join(directory, name))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--write-child":
        write_documents(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--documents", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--skip-reads", action="store_true")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench_indexed_", dir="/tmp")
    try:
        if not args.skip_reads:
            bench_reads(directory, args.tokens, args.samples, args.repeats)
        if args.documents:
            bench_writer_memory(directory, args.documents)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
