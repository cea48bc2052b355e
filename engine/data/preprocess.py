"""SAR logs (JSON Lines, Open Bandit Dataset CSV) -> tokens -> indexed datasets for training.

Outputs, for ``output_prefix`` P:

- ``P.bin`` / ``P.idx``: one document (one sequence) per record or episode, tokens as
  ``RecordEncoder`` builds them (plus EOS with ``append_eod``).
- ``P_reward_mask.bin`` / ``.idx``: uint8, same sequence lengths, 1 on reward-label tokens: what the
  SFT loss and the evaluation read.
- ``P.reward_bins.json``: the reward bins used (fitted on the input, or a copy of the ones given).
- ``P.meta.json``: tokenizer (path, vocab size, ids), counts, reward-label token ids, bad lines.

Records are encoded by worker processes, ``chunk_size`` records per task, results consumed in input
order, so the files are identical for any number of workers. A bad line stops the run with its
file:line unless ``skip_bad_lines`` (then each is counted and listed). Everything is written under
temporary names ``P.tmp-<pid>-<host>...`` and renamed at the end, the main ``.idx`` last: a failed
or interrupted run leaves no ``.idx``, no temporaries, and no output directory it created; what a
killed run left is removed by the next run of the same prefix. Workers end with the run, and die
with the main process if it is killed.
"""
from __future__ import annotations

import array
import collections
import contextlib
import ctypes
import glob
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from engine.fileio import (make_parent_dirs, progress_bar, remove_empty_dirs, remove_stale_temporaries,
                           signals_deferred, temporary_name)
from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype
from engine.data.obd import ObdOptions, is_obd_log, iter_obd_rows
from engine.data.reward_bins import DEFAULT_NUM_BINS, RewardBins
from engine.data.sar import REWARD_LABELS, RecordError, SARRecord, parse_item, serialize_text
from engine.data.tokenizer import RecordEncoder, Tokenizer, train_tokenizer

META_FORMAT = "ltu-sar-dataset"
MAX_LISTED_BAD_LINES = 10000
MASK_SUFFIX = "_reward_mask"
TMP_MASK_SUFFIX = ".reward_mask"  # after the owner tag of temporary names, which ends at a dot


class PreprocessError(ValueError):
    """A run that stopped: a bad line (with file:line) or unusable inputs."""


@dataclass
class PreprocessConfig:
    inputs: list[str]                 # files, globs or directories (.jsonl and OBD log .csv)
    output_prefix: str
    tokenizer_model: str
    workers: int = 1
    append_eod: bool = False
    add_bos: bool = False             # start every record with the tokenizer's BOS (as Llama pre-training did)
    skip_bad_lines: bool = False
    reward_bins: str | list[str] | None = None  # load (and merge) these bins instead of fitting on the input
    num_bins: int = DEFAULT_NUM_BINS
    chunk_size: int = 256
    progress: bool = True
    obd: ObdOptions = field(default_factory=ObdOptions)


@dataclass
class PreprocessSummary:
    output_prefix: str
    records: int = 0
    episodes: int = 0
    steps: int = 0
    tokens: int = 0
    reward_tokens: int = 0
    unknown_tokens: int = 0           # tokens the tokenizer could not represent (no byte fallback)
    blank_lines: int = 0
    bad_lines: list[dict] = field(default_factory=list)
    num_bad_lines: int = 0
    domains: dict[str, int] = field(default_factory=dict)
    ignored_files: list[str] = field(default_factory=list)  # under input directories, not record files
    seconds: float = 0.0

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        lines = [f"wrote {self.output_prefix}.bin/.idx and {self.output_prefix}{MASK_SUFFIX}.bin/.idx",
                 f"  records {self.records} (episodes {self.episodes}, steps {self.steps}), tokens {self.tokens} "
                 f"(reward tokens {self.reward_tokens})",
                 f"  {self.records / secs:.1f} records/s, {self.tokens / secs:.1f} tokens/s in {self.seconds:.2f} s",
                 "  domains: " + ", ".join(f"{d}={n}" for d, n in sorted(self.domains.items())),
                 f"  bad lines skipped: {self.num_bad_lines}, blank lines: {self.blank_lines}"
                 + (f", UNKNOWN TOKENS: {self.unknown_tokens}" if self.unknown_tokens else "")]
        if self.ignored_files:
            lines.append("  files under input directories that are not logs (not read): "
                         + ", ".join(self.ignored_files[:10])
                         + (f" and {len(self.ignored_files) - 10} more" if len(self.ignored_files) > 10 else ""))
        lines += [f"    {b['error']}" for b in self.bad_lines[:20]]  # each error starts with its file:line
        if self.num_bad_lines > 20:
            lines.append(f"    ... and {self.num_bad_lines - 20} more (listed in {self.output_prefix}.meta.json)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs


def expand_inputs(patterns: Iterable[str], ignored: list[str] | None = None) -> list[str]:
    """Files named, matched by globs, or found (sorted) under directories; each listed once.

    Files under a directory that are neither JSON Lines nor OBD logs (a manifest, item_context.csv)
    are not inputs; they are appended to ``ignored`` so the run can say which ones it passed over.
    """
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise PreprocessError(f"input not found: {pattern}")
        for match in matches:
            if os.path.isdir(match):
                files = sorted(p for p in glob.glob(os.path.join(match, "**", "*"), recursive=True)
                               if os.path.isfile(p))
                found = [p for p in files if p.endswith(".jsonl") or is_obd_log(p)]
                if ignored is not None:
                    ignored += [p for p in files if p not in found]
                if not found:
                    raise PreprocessError(f"no .jsonl or OBD log .csv under {match}")
                paths += found
            else:
                paths.append(match)
    for path in paths:
        if not (path.endswith(".jsonl") or path.endswith(".json") or is_obd_log(path)):
            raise PreprocessError(f"{path}: unsupported input (JSON Lines .jsonl or an OBD log .csv)")
    return list(dict.fromkeys(paths))


def iter_items(paths: list[str], obd: ObdOptions, blank_counter: list[int]) -> Iterator[tuple[str, object]]:
    """(file:line, JSON text | record dict | RecordError) for every record line of every input."""
    for path in paths:
        if path.endswith(".csv"):
            yield from iter_obd_rows(path, obd)
            continue
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield where, RecordError(where, None, f"invalid UTF-8 at byte {exc.start}")
                    continue
                if not line.strip():
                    blank_counter[0] += 1
                    continue
                yield where, line


def read_records(inputs: Iterable[str], skip_bad_lines: bool = False,
                 obd: ObdOptions = ObdOptions()) -> Iterator[SARRecord]:
    """Validated records of JSON Lines / OBD inputs in order (for evaluation and tools).

    A bad line raises RecordError naming file:line, or is skipped when ``skip_bad_lines``.
    """
    for where, payload in iter_items(expand_inputs(inputs), obd, [0]):
        try:
            yield parse_item(where, payload)
        except RecordError:
            if not skip_bad_lines:
                raise


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- work done in workers


class ChunkEncoder:
    """Parse, serialize and tokenize a chunk. With bins: the good records' tokens and masks
    concatenated, and an entry per item. Without (bins being fitted on the input): the tokens of
    the records' texts and their rewards, for ``RecordEncoder.assemble`` once the bins exist."""

    def __init__(self, tokenizer_model: str, bins_json: dict | None, append_eod: bool, add_bos: bool, dtype: str,
                 num_threads: int = 1):
        self.classify = bins_json is not None
        bins = RewardBins.from_json(bins_json) if self.classify else RewardBins({})
        self.encoder = RecordEncoder(Tokenizer(tokenizer_model), bins, add_bos=add_bos)
        self.eod = self.encoder.tokenizer.eos_id if append_eod else None
        self.dtype = np.dtype(dtype)
        self.num_threads = num_threads

    def __call__(self, chunk: list) -> tuple:
        texts, outcomes = self.encoder.encode_lines(chunk, self.classify, self.num_threads, self.dtype)
        entries = [("bad", where, str(outcome)) if isinstance(outcome, RecordError) else ("ok", *outcome)
                   for (where, _), outcome in zip(chunk, outcomes)]
        if not self.classify:
            return texts, entries
        tokens, masks, lengths = self.encoder.assemble(texts, texts.classes, self.eod)
        return tokens, masks, _with_lengths(entries, lengths)


def _with_lengths(entries: list, lengths: np.ndarray) -> list:
    """The entries of the good records with their numbers of tokens (in place of their rewards)."""
    found = iter(lengths.tolist())
    return [(e[0], next(found), *e[2:]) if e[0] == "ok" else e for e in entries]


_WORKER_TASK = None  # set once per worker process by _init_worker (the tokenizer is loaded there)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the main process ends, even by SIGKILL: the kernel's parent-death
    signal on Linux, a thread watching the parent elsewhere."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()


def _init_worker(task_factory, args, parent_pid: int) -> None:
    global _WORKER_TASK
    # The main process handles interrupts and ends the workers; a terminal's Ctrl-C reaches the
    # whole process group, and a worker must not print its own traceback for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    _WORKER_TASK = task_factory(*args) if task_factory is not None else None


def _run_task(chunk):
    return _WORKER_TASK(chunk)


def _ordered_map(fn, args, chunks: Iterator[list], workers: int) -> Iterator:
    """fn(*args)(chunk) (or fn(chunk) when args is None) over chunks, results in input order.

    At most 4 chunks per worker are in flight (Pool.imap would read the whole input ahead of the
    workers). A worker that dies or fails to start raises BrokenProcessPool instead of hanging.
    Workers are forked where possible: nothing is re-imported, and callers run from any script.
    Closing the generator early (an error, an interrupt) cancels the chunks not yet started and
    ends the workers.
    """
    if workers <= 1:
        task = fn(*args) if args is not None else fn
        yield from map(task, chunks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    init_args = (fn, args, os.getpid()) if args is not None else (None, (), os.getpid())
    call = _run_task if args is not None else fn
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init_worker, initargs=init_args)
    finished = False
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(call, chunk))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _stop_pool(pool)


def _stop_pool(pool: ProcessPoolExecutor, grace_s: float = 30.0) -> None:
    """Cancel the queued chunks and let the workers finish the few they hold, then exit. A worker
    killed while sending a result would leave half a message in the result pipe, and the pool's
    reader thread would wait for its end forever; only a worker stuck past ``grace_s`` is killed."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.0))
        if process.is_alive():
            process.kill()
            process.join()


# --------------------------------------------------------------------------- the run


def _bad_line(summary: PreprocessSummary, config: PreprocessConfig, where: str, error: str) -> None:
    if not config.skip_bad_lines:
        raise PreprocessError(f"{error} (use --skip-bad-lines to skip and count such lines)")
    summary.num_bad_lines += 1
    if len(summary.bad_lines) < MAX_LISTED_BAD_LINES:
        summary.bad_lines.append({"where": where, "error": error})


def _no_records_error(paths: list[str], blank: int, bad: int, purpose: str) -> PreprocessError:
    """Which inputs had nothing usable, and why."""
    named = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    if bad:
        cause = f"every record line is malformed ({bad} skipped by --skip-bad-lines)"
    elif blank:
        cause = f"no record lines, only {blank} blank line{'s' if blank != 1 else ''}"
    else:
        cause = "the file is empty" if len(paths) == 1 else "the files are empty"
        if any(p.endswith(".csv") for p in paths):
            cause += " or hold a CSV header only"
    return PreprocessError(f"no valid records in {named}: {cause}; nothing to {purpose}")


def preprocess(config: PreprocessConfig) -> PreprocessSummary:
    start = time.perf_counter()
    ignored: list[str] = []
    paths = expand_inputs(config.inputs, ignored)
    tokenizer = Tokenizer(config.tokenizer_model)
    if config.append_eod and tokenizer.eos_id is None:
        raise PreprocessError(f"--append-eod: {config.tokenizer_model} has no EOS token")
    prefix = config.output_prefix
    if not os.path.basename(prefix):
        raise PreprocessError(f"output prefix {prefix!r} names a directory; add a file name prefix "
                              "(e.g. data/sar_train)")
    bins = RewardBins.merge([RewardBins.load(p) for p in _bins_paths(config)]) if config.reward_bins else None
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    try:  # validates the labels (and BOS) before any worker starts
        encoder = RecordEncoder(tokenizer, bins or RewardBins({}), add_bos=config.add_bos)
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None

    created_dirs = make_parent_dirs(prefix)
    builder = mask_builder = progress = tmp_prefix = None
    try:
        remove_stale_temporaries(prefix)  # what killed runs of this prefix left
        # Every temporary of the run starts with P.tmp-<pid>-<host>. (a dot: the owner tag ends there),
        # the builders' own ones too.
        tmp_prefix = os.path.join(os.path.dirname(prefix), temporary_name(os.path.basename(prefix)))
        tmp_mask_prefix = tmp_prefix + TMP_MASK_SUFFIX
        tmp_bins, tmp_meta = tmp_prefix + ".reward_bins.json", tmp_prefix + ".meta.json"
        summary = PreprocessSummary(output_prefix=prefix, ignored_files=ignored)
        blank = [0]
        builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype)
        mask_builder = IndexedDatasetBuilder(tmp_mask_prefix + ".bin", np.uint8)
        progress = _progress(config.progress)
        if bins is None:
            bins = _encode_fitting_bins(config, paths, encoder, dtype, tmp_prefix + ".text_tokens", builder,
                                        mask_builder, summary, blank, progress)
            encoder.bins = bins
        else:
            _encode_and_write(config, paths, tokenizer, bins, dtype, builder, mask_builder, summary, blank, progress)
        if summary.records == 0:
            raise _no_records_error(paths, blank[0], summary.num_bad_lines, "write")
        summary.blank_lines = blank[0]
        builder.finalize(tmp_prefix + ".idx")
        mask_builder.finalize(tmp_mask_prefix + ".idx")
        bins.save(tmp_bins)
        _write_meta(tmp_meta, config, paths, tokenizer, encoder, dtype, summary)
        _publish(prefix, tmp_prefix)
    except BaseException:
        for b in (builder, mask_builder):
            if b is not None:
                b.abort()
        if tmp_prefix is not None:
            _remove_own_temporaries(tmp_prefix)
        remove_empty_dirs(created_dirs)
        raise
    finally:
        if progress is not None:
            progress.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _encode_and_write(config, paths, tokenizer, bins, dtype, builder, mask_builder, summary, blank, progress):
    """The encoding pass: every record's tokens and reward mask appended to the builders, in order."""
    chunks = _chunks(iter_items(paths, config.obd, blank), config.chunk_size)
    args = (config.tokenizer_model, bins.to_json(), config.append_eod, config.add_bos, dtype.name)
    with contextlib.closing(_ordered_map(ChunkEncoder, args, chunks, config.workers)) as encoded:
        for tokens, masks, entries in encoded:
            for entry in entries:
                if entry[0] == "bad":
                    _bad_line(summary, config, entry[1], entry[2])
            _write_chunk(tokens, masks, entries, tokenizer, builder, mask_builder, summary)
            _advance(progress, len(entries), summary)


def _encode_fitting_bins(config, paths, encoder, dtype, spill_path, builder, mask_builder, summary, blank,
                         progress) -> RewardBins:
    """One pass when the bins are fitted on the input: the records' texts are encoded while their
    rewards are collected (the text before a label does not depend on its class); the text tokens
    wait in ``spill_path`` until the bins are fitted, then get their labels and are written."""
    chunks = _chunks(iter_items(paths, config.obd, blank), config.chunk_size)
    args = (config.tokenizer_model, None, config.append_eod, config.add_bos, dtype.name)
    values: dict[tuple[str, str], array.array] = {}  # 8 bytes a value, not a Python float object
    stored = []  # per chunk: its texts without their tokens, and its entries
    with open(spill_path, "wb") as spill, \
            contextlib.closing(_ordered_map(ChunkEncoder, args, chunks, config.workers)) as encoded:
        for texts, entries in encoded:
            for entry in entries:
                if entry[0] == "bad":
                    _bad_line(summary, config, entry[1], entry[2])
            for index, key in enumerate(texts.keys):
                values.setdefault(key, array.array("d")).extend(texts.values[texts.key_index == index])
            spill.write(texts.tokens.tobytes())
            stored.append((len(texts.tokens), texts, entries))
            texts.tokens = None
            if progress is not None:
                progress.update(len(entries))
    if not values:  # every valid record has a reward field
        raise _no_records_error(paths, blank[0], summary.num_bad_lines, "fit reward bins on")
    bins = RewardBins.fit({k: np.frombuffer(v, dtype=np.float64) for k, v in values.items()}, config.num_bins)
    del values
    encoder = RecordEncoder(encoder.tokenizer, bins, add_bos=config.add_bos)
    eod = encoder.tokenizer.eos_id if config.append_eod else None
    spilled = np.memmap(spill_path, dtype=dtype, mode="r") if os.path.getsize(spill_path) else np.zeros(0, dtype)
    offset = 0
    for count, texts, entries in stored:
        texts.tokens = np.asarray(spilled[offset:offset + count])
        offset += count
        tokens, masks, lengths = encoder.assemble(
            texts, bins.classify_many(texts.keys, texts.key_index, texts.values), eod)
        _write_chunk(tokens, masks, _with_lengths(entries, lengths), encoder.tokenizer, builder, mask_builder, summary)
    del spilled
    os.remove(spill_path)
    return bins


def _write_chunk(tokens, masks, entries, tokenizer, builder, mask_builder, summary) -> None:
    """Appends the chunk's good records (``("ok", length, domain, steps, episode)`` entries) in order."""
    good = [entry for entry in entries if entry[0] == "ok"]
    add_tokens, end_tokens = builder.add_item, builder.end_document
    add_mask, end_mask = mask_builder.add_item, mask_builder.end_document
    offset = 0
    for _, length, _, _, _ in good:
        end = offset + length
        add_tokens(tokens[offset:end])
        end_tokens()
        add_mask(masks[offset:end])
        end_mask()
        offset = end
    summary.records += len(good)
    summary.episodes += sum(entry[4] for entry in good)
    summary.steps += sum(entry[3] for entry in good)
    summary.tokens += offset
    for domain, count in collections.Counter(entry[2] for entry in good).items():
        summary.domains[domain] = summary.domains.get(domain, 0) + count
    summary.reward_tokens += int(np.count_nonzero(masks))
    if tokenizer.unk_id is not None:
        summary.unknown_tokens += int(np.count_nonzero(tokens == tokenizer.unk_id))


def _advance(progress, items: int, summary: PreprocessSummary) -> None:
    if progress is not None:
        progress.update(items)
        progress.set_postfix(tok_s=f"{summary.tokens / max(progress.format_dict['elapsed'], 1e-9):.0f}",
                             refresh=False)


def _bins_paths(config: PreprocessConfig) -> list[str]:
    if not config.reward_bins:
        return []
    return [config.reward_bins] if isinstance(config.reward_bins, str) else list(config.reward_bins)


def _progress(enabled: bool):
    return progress_bar(unit=" records", smoothing=0.1) if enabled else None


def _write_meta(path, config, paths, tokenizer, encoder, dtype, summary) -> None:
    prefix = config.output_prefix
    meta = {
        "format": META_FORMAT, "version": 1,
        "tokenizer": {"model": os.path.abspath(config.tokenizer_model), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
        "dtype": dtype.name, "append_eod": config.append_eod, "add_bos": config.add_bos,
        "reward_bins": os.path.basename(prefix) + ".reward_bins.json",
        "reward_bins_source": [os.path.abspath(p) for p in _bins_paths(config)] or "fitted on the input",
        "reward_mask": os.path.basename(prefix) + MASK_SUFFIX,
        "reward_label_ids": {label: list(ids) for label, ids in zip(REWARD_LABELS, encoder.label_ids)},
        "inputs": [os.path.abspath(p) for p in paths],
        "ignored_files": [os.path.abspath(p) for p in summary.ignored_files],
        "counts": {"records": summary.records, "episodes": summary.episodes, "steps": summary.steps,
                   "documents": summary.records, "tokens": summary.tokens, "reward_tokens": summary.reward_tokens,
                   "unknown_tokens": summary.unknown_tokens, "bad_lines": summary.num_bad_lines,
                   "blank_lines": summary.blank_lines},
        "domains": dict(sorted(summary.domains.items())),
        "bad_lines": summary.bad_lines,
        "bad_lines_listed": len(summary.bad_lines),
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")


def _remove_own_temporaries(tmp_prefix: str) -> None:
    """Every file of this run: ``tmp_prefix.*`` and its hidden form."""
    directory, base = os.path.split(os.path.abspath(tmp_prefix))
    for entry in os.scandir(directory):
        name = entry.name[1:] if entry.name.startswith(".") else entry.name
        if name.startswith(base + ".") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _publish(prefix: str, tmp_prefix: str) -> None:
    """Old indexes go first, the new main .idx comes last: no moment shows a complete-looking mix.
    An interrupt waits until every file is in place (the run then ends as interrupted, published)."""
    mask_prefix, tmp_mask_prefix = prefix + MASK_SUFFIX, tmp_prefix + TMP_MASK_SUFFIX
    with signals_deferred():
        for old in (prefix + ".idx", mask_prefix + ".idx"):
            if os.path.exists(old):
                os.remove(old)
        os.replace(tmp_prefix + ".reward_bins.json", prefix + ".reward_bins.json")
        os.replace(tmp_prefix + ".meta.json", prefix + ".meta.json")
        os.replace(tmp_mask_prefix + ".bin", mask_prefix + ".bin")
        os.replace(tmp_mask_prefix + ".idx", mask_prefix + ".idx")
        os.replace(tmp_prefix + ".bin", prefix + ".bin")
        os.replace(tmp_prefix + ".idx", prefix + ".idx")


def train_tokenizer_on_logs(inputs: list[str], model_path: str, vocab_size: int = 8000,
                            max_records: int = 200_000, skip_bad_lines: bool = False,
                            obd: ObdOptions = ObdOptions(), **train_kwargs) -> tuple[Tokenizer, int]:
    """Train a SentencePiece model on the serialized text of (at most ``max_records``) input records.

    Records are taken from the input files in turn, one from each, so a cap still samples every
    file (logs are often one file per domain). Rewards are serialized with bins fitted on the same
    records (labels are user-defined symbols, so which label a record gets does not change the
    learned pieces).
    """
    records = []
    try:
        for record in _interleaved_records(expand_inputs(inputs), skip_bad_lines, obd):
            records.append(record)
            if len(records) >= max_records:
                break
    except RecordError as exc:
        raise PreprocessError(f"{exc} (use --skip-bad-lines to skip such lines)") from None
    if not records:
        raise PreprocessError("no valid records to train a tokenizer on")
    bins = RewardBins.fit_records(records)
    texts = [serialize_text(r, bins.classify) for r in records]
    return train_tokenizer(texts, model_path, vocab_size=vocab_size, **train_kwargs), len(records)


def _interleaved_records(paths: list[str], skip_bad_lines: bool, obd: ObdOptions) -> Iterator[SARRecord]:
    """Validated records of every file in turn (one from each) until all are exhausted."""
    streams = [read_records([path], skip_bad_lines, obd) for path in paths]
    while streams:
        alive = []
        for stream in streams:
            record = next(stream, None)
            if record is not None:
                yield record
                alive.append(stream)
        streams = alive


@dataclass(frozen=True)
class PreprocessedDataset:
    """What training and evaluation open: tokens, the aligned reward mask, the meta and the bins."""

    tokens: IndexedDataset
    reward_mask: IndexedDataset
    meta: dict
    bins: RewardBins


def open_preprocessed(prefix: str) -> PreprocessedDataset:
    """Open ``<prefix>`` as written by ``preprocess``, checking that its parts belong together."""
    meta_path = f"{prefix}.meta.json"
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_path} not found: not a preprocessed SAR dataset") from None
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{meta_path}: not a {META_FORMAT} meta file")
    tokens, mask = IndexedDataset(prefix), IndexedDataset(prefix + MASK_SUFFIX)
    if len(tokens) != meta["counts"]["records"] or not np.array_equal(tokens.sequence_lengths, mask.sequence_lengths):
        raise ValueError(f"{prefix}: tokens, reward mask and meta disagree (mixed files from different runs?)")
    bins = RewardBins.load(os.path.join(os.path.dirname(prefix), meta["reward_bins"]))
    return PreprocessedDataset(tokens, mask, meta, bins)
