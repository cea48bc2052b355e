#!/usr/bin/env python
"""Preprocessing throughput against a Megatron-LM-shaped baseline, and where the time goes.

    python benchmarks/bench_preprocess.py --records 400000 --workers 1 2 --repeat 3
    python benchmarks/bench_preprocess.py --records 400000 --breakdown 50000

Writes synthetic logs (every domain, episodes included) and a tokenizer under --workdir (reused when
present), and the records' serialized text as JSON lines {"text": ...} (Megatron's input). Then, for
each worker count, runs interleaved: the baseline (the shape of Megatron-LM's
tools/preprocess_data.py: read a line, json.loads, one SentencePiece encode call per record text,
append EOD, add_item + end_document on an IndexedDatasetBuilder; multiprocessing.Pool.imap with
chunksize 32, as Megatron, for every worker count), ``preprocess`` with the reward bins fitted on
the input, and ``preprocess`` with them given. Checks that every run of ``preprocess`` wrote the
same bytes, and that the baseline wrote the same tokens. ``--breakdown N`` times the stages of the
encoding on the first N records in one process instead.
"""
import argparse
import filecmp
import gc
import glob
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import _C  # noqa: E402
from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype  # noqa: E402
from engine.data.preprocess import PreprocessConfig, preprocess, read_records, train_tokenizer_on_logs  # noqa: E402
from engine.data.reward_bins import RewardBins  # noqa: E402
from engine.data.sar import (_fast_loads, _reject_duplicates, parse_json_line, parse_record,  # noqa: E402
                             serialize_parts, serialize_text)
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, write_logs  # noqa: E402
from engine.data.tokenizer import RecordEncoder, Tokenizer  # noqa: E402


# --------------------------------------------------------------------------- the baseline


class MegatronShapedEncoder:
    """Megatron-LM's Encoder: the tokenizer loaded once per worker, one encode call per line."""

    def __init__(self, model: str):
        self.model = model

    def initializer(self):
        # On the class, as Megatron does: imap pickles the bound method's instance for every chunk.
        MegatronShapedEncoder.tokenizer = Tokenizer(self.model)
        MegatronShapedEncoder.eod = MegatronShapedEncoder.tokenizer.eos_id

    def encode(self, line: str):
        text = json.loads(line)["text"]
        ids = self.tokenizer.encode(text)
        ids.append(self.eod)
        return ids, len(line)


def run_baseline(text_path: str, model: str, prefix: str, workers: int) -> tuple[int, int]:
    encoder = MegatronShapedEncoder(model)
    dtype = best_dtype(Tokenizer(model).vocab_size)
    records = tokens = 0
    ctx = multiprocessing.get_context("fork")
    with open(text_path, encoding="utf-8") as fin, ctx.Pool(workers, initializer=encoder.initializer) as pool:
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_item(np.array(ids, dtype=dtype))
            builder.end_document()
            records += 1
            tokens += len(ids)
        builder.finalize(prefix + ".idx")
    return records, tokens


# --------------------------------------------------------------------------- setup


def prepare(args) -> tuple[str, str, str]:
    per_domain = args.records // len(DOMAIN_REWARDS)
    logs = os.path.join(args.workdir, f"logs_{per_domain}")
    if not os.path.exists(os.path.join(logs, "manifest.json")):
        t = time.perf_counter()
        write_logs(SyntheticConfig(seed=0, train_per_domain=per_domain, valid_per_domain=0, test_per_domain=0,
                                   domains=tuple(DOMAIN_REWARDS)), logs)
        print(f"generated {per_domain * len(DOMAIN_REWARDS)} records in {time.perf_counter() - t:.1f} s")
    model = os.path.join(args.workdir, f"tok{args.vocab_size}.model")
    if not os.path.exists(model):
        train_tokenizer_on_logs([os.path.join(logs, "train")], model, vocab_size=args.vocab_size, max_records=20000)
    texts = os.path.join(logs, "serialized.jsonl")
    bins_path = os.path.join(logs, "bins.json")
    if not os.path.exists(texts):
        records = list(read_records([os.path.join(logs, "train")]))
        bins = RewardBins.fit_records(records)
        bins.save(bins_path)
        with open(texts, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps({"text": serialize_text(record, bins.classify)}) + "\n")
    return os.path.join(logs, "train"), model, texts


# --------------------------------------------------------------------------- stage breakdown


def breakdown(train: str, model: str, limit: int) -> None:
    """Per-record time of each stage of the encoding, in one process, on the first ``limit`` records."""
    lines = []
    for path in sorted(glob.glob(os.path.join(train, "*.jsonl"))):
        with open(path, "rb") as fh:
            lines += [raw for _, raw in zip(range(limit // len(DOMAIN_REWARDS)), fh)]
    times = {}

    def timed(name, fn):
        # Without the cyclic garbage collector: its passes over the many objects kept here would
        # be charged to whichever stage triggers them (preprocess keeps few objects alive).
        # CPU time beside wall time: steadier when other jobs share the cores (a SentencePiece
        # call with 2 threads adds both threads' time).
        gc.collect()
        gc.disable()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        gc.enable()
        times[name] = ((time.perf_counter() - t) / len(lines) * 1e6, (time.process_time() - c) / len(lines) * 1e6)
        return out

    texts = timed("read: UTF-8 decode", lambda: [raw.decode("utf-8") for raw in lines])
    objs = timed("JSON parse (duplicate-key check)", lambda: [
        json.loads(t.rstrip("\r\n"), object_pairs_hook=_reject_duplicates, parse_constant=float) for t in texts])
    records = timed("validation", lambda: [parse_record(o, "x") for o in objs])
    timed("JSON parse as parse_json_line does (orjson when installed and the line allows)",
          lambda: [_fast_loads(t.rstrip("\r\n")) for t in texts])
    timed("parse_json_line: parse + validation", lambda: [parse_json_line(t, "x") for t in texts])
    encoder = RecordEncoder(Tokenizer(model), RewardBins.fit_records(records))
    parts = timed("serialization (texts and classes)", lambda: [serialize_parts(r, encoder.bins.classify)
                                                                  for r in records])
    flat = [t for texts_, _ in parts for t in texts_]
    timed("encode: one call per text segment", lambda: [encoder.tokenizer.encode(t) for t in flat])
    timed("encode: one batch call, 1 thread", lambda: encoder.tokenizer.encode_batch(flat, 1))
    timed("encode: one batch call, 2 threads", lambda: encoder.tokenizer.encode_batch(flat, 2))
    joined = ["".join(t) for t, _ in parts]
    timed("baseline: one encode call per record text", lambda: [encoder.tokenizer.encode(t) for t in joined])
    timed("RecordEncoder.encode + reward_mask (per record, per segment)",
          lambda: [e.reward_mask() for e in (encoder.encode(r) for r in records)])
    fresh = RecordEncoder(encoder.tokenizer, encoder.bins)
    chunks = [records[i:i + 256] for i in range(0, len(records), 256)]
    timed("encode_texts of parsed records: Python serialization, C++ words (chunks of 256)",
          lambda: [fresh.encode_texts(c, True, 1, np.uint16)[0] for c in chunks])
    items = [(f"x:{i}", t) for i, t in enumerate(texts)]
    item_chunks = [items[i:i + 256] for i in range(0, len(items), 256)]

    def read_in_cxx():
        for chunk in item_chunks:
            batch = _C.SarTextBatch(6)
            assert batch.add_json_lines([t for _, t in chunk], 0) == len(chunk)  # every line on the C++ path
    timed("C++ reading alone: parse + validation + serialization (SarTextBatch.add_json_lines)", read_in_cxx)
    lines_encoder = RecordEncoder(encoder.tokenizer, encoder.bins)
    encoded = timed("encode_lines: C++ reading + words + classes, from JSON lines (chunks of 256)",
                    lambda: [lines_encoder.encode_lines(c, True, 1, np.uint16)[0] for c in item_chunks])
    timed("assemble: labels, EOD, reward mask (numpy)", lambda: [fresh.assemble(t, t.classes, 2) for t in encoded])
    with tempfile.TemporaryDirectory() as tmp:
        builders = [IndexedDatasetBuilder(os.path.join(tmp, f"{n}.bin"), t)
                    for n, t in (("t", np.uint16), ("m", np.uint8))]
        sample = fresh.assemble(encoded[0], encoded[0].classes, 2)
        lengths = sample[2].tolist() * len(encoded)

        def write():
            for length in lengths:
                for builder, array in zip(builders, sample[:2]):
                    builder.add_item(array[:length])
                    builder.end_document()
        timed("write: two builders, add_item + end_document", write)
        for builder in builders:
            builder.abort()
    print(f"{len(lines)} records, {len(flat)} text segments; us per record, load average now "
          f"{os.getloadavg()[0]:.2f}:")
    print("| stage | wall us/record | CPU us/record |\n|---|---|---|")
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


# --------------------------------------------------------------------------- the comparison


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the workers of ended pools)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=400_000, help="total training records (split over domains)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs per configuration; medians reported")
    p.add_argument("--breakdown", type=int, default=0, metavar="N", help="time the stages on N records instead")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ltu_bench_preprocess"))
    args = p.parse_args()

    train, model, texts = prepare(args)
    print(f"tokenizer {model}: {Tokenizer(model).vocab_size} pieces (requested {args.vocab_size}); "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs visible")
    if args.breakdown:
        breakdown(train, model, args.breakdown)
        return
    bins_path = os.path.join(os.path.dirname(train), "bins.json")
    kinds = ("baseline", "fitted", "given")
    times = {(k, w): [] for k in kinds for w in args.workers}
    cpu = {(k, w): [] for k in kinds for w in args.workers}  # main + worker processes: steadier under load
    sizes, prefixes = {}, []
    for _ in range(args.repeat):
        for workers in args.workers:
            for kind in kinds:  # interleaved, so a change in the machine's load hits every kind alike
                prefix = os.path.join(args.workdir, f"out_{kind}_w{workers}", "data")
                os.makedirs(os.path.dirname(prefix), exist_ok=True)
                t, c = time.perf_counter(), _cpu_seconds()
                if kind == "baseline":
                    sizes[kind] = run_baseline(texts, model, prefix, workers)
                else:
                    summary = preprocess(PreprocessConfig(
                        inputs=[train], output_prefix=prefix, tokenizer_model=model, workers=workers,
                        append_eod=True, chunk_size=args.chunk_size, progress=False,
                        reward_bins=bins_path if kind == "given" else None))
                    sizes[kind] = (summary.records, summary.tokens)
                    prefixes.append(prefix)
                times[(kind, workers)].append(time.perf_counter() - t)
                cpu[(kind, workers)].append(_cpu_seconds() - c)
    print(f"medians of {args.repeat} interleaved runs; load average now {os.getloadavg()[0]:.2f}")
    print("| workers | run | records | tokens | median s | runs s | records/s | tokens/s | x baseline "
          "| CPU s (median) | x baseline CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        base = statistics.median(times[("baseline", workers)])
        base_cpu = statistics.median(cpu[("baseline", workers)])
        for kind in kinds:
            runs = times[(kind, workers)]
            median = statistics.median(runs)
            records, tokens = sizes[kind]
            print(f"| {workers} | {kind} | {records} | {tokens} | {median:.2f} | "
                  f"{' '.join(f'{r:.1f}' for r in runs)} | {records / median:.0f} | {tokens / median:.0f} | "
                  f"{base / median:.2f} | {statistics.median(cpu[(kind, workers)]):.1f} "
                  f"| {base_cpu / statistics.median(cpu[(kind, workers)]):.2f} |", flush=True)
    for other in prefixes[1:]:
        for suffix in (".bin", ".idx", "_reward_mask.bin", "_reward_mask.idx"):
            assert filecmp.cmp(prefixes[0] + suffix, other + suffix, shallow=False), f"{other}{suffix} differs"
    ours, theirs = IndexedDataset(prefixes[0]), IndexedDataset(os.path.join(args.workdir, "out_baseline_w1", "data"))
    same = len(ours) == len(theirs) and np.array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    print("preprocess outputs identical across runs; baseline tokens "
          + ("identical" if same and filecmp.cmp(prefixes[0] + ".bin", theirs.prefix + ".bin", shallow=False)
             else "DIFFER (expected when a label's tokens merge with the text around them)"))
    shutil.rmtree(os.path.join(args.workdir, "out_baseline_w1"), ignore_errors=True)


if __name__ == "__main__":
    main()
