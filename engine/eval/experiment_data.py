"""Data the LTU experiment derives from decision logs: reward-shuffled logs, general text, SFT subsets.

- :func:`shuffle_rewards` writes the control arm's logs: the same records, with every reward value
  moved to another record of the same domain and field (one random permutation per domain/field,
  pooled over the input files and over the steps of episodes). States, actions, domains, metas and
  the order of records stay as they were; so does each field's distribution of rewards. Only the
  link between a decision and its reward is broken.
- :func:`write_general_text` writes Python's own documentation text (``pydoc_data.topics``, shipped
  with every CPython) as JSON Lines ``{"text": ...}`` documents, one per topic: general text that
  needs no download, for the ablation that blends it into continued pre-training.
- :func:`write_text_dataset` tokenizes such ``{"text": ...}`` documents into an indexed dataset a
  CT blend can name beside SAR datasets: ``<prefix>.bin/.idx`` (one document per line, EOS
  appended), an all-zero ``<prefix>_reward_mask.bin/.idx`` (no reward tokens) and
  ``<prefix>.meta.json`` with the tokenizer and counts. ``preprocess_data.py`` reads SAR logs only.
- :func:`write_subset` keeps the first ``n`` lines of a log (synthetic records are independent
  draws, so the first n are a random sample of n).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from engine.data.indexed import IndexedDatasetBuilder, best_dtype
from engine.data.tokenizer import Tokenizer
from engine.fileio import atomic_open, write_json_atomic

TEXT_META_FORMAT = "ltu-text-dataset"
REWARD_MASK_SUFFIX = "_reward_mask"  # the suffix preprocess_data.py gives reward masks


class ExperimentDataError(ValueError):
    """Input the experiment's data steps cannot use; the message names the file and line."""


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _read_json_lines(path: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExperimentDataError(f"{path}:{number}: not JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise ExperimentDataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def _reward_dicts(record: dict, where: str) -> list[dict]:
    """The reward objects of a record: one for a decision, one per step of an episode."""
    if "steps" in record:
        steps = record["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise ExperimentDataError(f"{where}: 'steps' must be a list of objects")
        rewards = [s.get("reward") for s in steps]
    else:
        rewards = [record.get("reward")]
    if not all(isinstance(r, dict) and r for r in rewards):
        raise ExperimentDataError(f"{where}: every decision needs a non-empty 'reward' object")
    return rewards


def shuffle_rewards(inputs: Iterable[str], out_dir: str, seed: int) -> dict:
    """Write ``out_dir/<basename of each input>`` with rewards permuted across records within each
    (domain, field); returns ``{"files": [...], "fields": {"domain/field": rewards}, "from_other_record":
    share of rewards that came from another record, "changed_value": share whose value changed}``.
    Deterministic in ``seed`` and the inputs."""
    paths = list(inputs)
    if not paths:
        raise ExperimentDataError("shuffle_rewards: no input files")
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) != len(names):
        raise ExperimentDataError(f"shuffle_rewards: input files share a name ({', '.join(names)}); "
                                  "outputs are written under the same names")
    records = [[obj for _, obj in _read_json_lines(p)] for p in paths]
    pools: dict[tuple[str, str], list] = {}
    for path, file_records in zip(paths, records):
        for index, record in enumerate(file_records):
            where = f"{path}: record {index + 1}"
            if not isinstance(record.get("domain"), str):
                raise ExperimentDataError(f"{where}: no 'domain' string")
            for reward in _reward_dicts(record, where):
                for name, value in reward.items():
                    pools.setdefault((record["domain"], name), []).append(value)
    rng = np.random.default_rng([seed, 0x5EED])
    permutations = {key: rng.permutation(len(values)) for key, values in sorted(pools.items())}
    taken = {key: 0 for key in permutations}
    from_other = changed = 0
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, file_records in zip(names, records):
        target = os.path.join(out_dir, name)
        with atomic_open(target) as fh:
            for record in file_records:
                for reward in _reward_dicts(record, name):
                    for field in reward:
                        key = (record["domain"], field)
                        position = taken[key]
                        source = int(permutations[key][position])
                        taken[key] += 1
                        new = pools[key][source]
                        from_other += source != position
                        changed += new != reward[field]
                        reward[field] = new
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        written.append(target)
    total = sum(len(v) for v in pools.values())
    return {"files": written, "fields": {f"{d}/{f}": len(v) for (d, f), v in sorted(pools.items())},
            "from_other_record": from_other / total if total else 0.0,
            "changed_value": changed / total if total else 0.0}


def general_text_documents() -> list[str]:
    """Python's documentation topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def write_general_text(path: str) -> dict:
    """``{"text": ...}`` JSON Lines of :func:`general_text_documents`; returns documents and characters."""
    documents = general_text_documents()
    _make_parent(path)
    with atomic_open(path) as fh:
        for text in documents:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return {"documents": len(documents), "characters": sum(len(t) for t in documents)}


def read_text_documents(path: str) -> Iterator[str]:
    for number, obj in _read_json_lines(path):
        text = obj.get("text")
        if not isinstance(text, str) or not text:
            raise ExperimentDataError(f"{path}:{number}: expected {{\"text\": \"...\"}} with a non-empty string")
        yield text


def write_text_dataset(inputs: Iterable[str], output_prefix: str, tokenizer_model: str,
                       append_eod: bool = True) -> dict:
    """Tokenize ``{"text": ...}`` documents into ``output_prefix`` (see the module docstring);
    returns the counts written to its meta."""
    tokenizer = Tokenizer(tokenizer_model)
    if append_eod and tokenizer.eos_id is None:
        raise ExperimentDataError(f"{tokenizer_model} has no EOS token to append")
    dtype = best_dtype(tokenizer.vocab_size)
    paths = list(inputs)
    if not paths:
        raise ExperimentDataError("write_text_dataset: no input files")
    _make_parent(output_prefix)
    documents = tokens = unknown = 0
    mask_prefix = output_prefix + REWARD_MASK_SUFFIX
    with IndexedDatasetBuilder(output_prefix + ".bin", dtype) as builder, \
            IndexedDatasetBuilder(mask_prefix + ".bin", np.uint8) as mask:
        for path in paths:
            for text in read_text_documents(path):
                ids = tokenizer.encode(text) + ([tokenizer.eos_id] if append_eod else [])
                builder.add_item(ids)
                builder.end_document()
                mask.add_item(np.zeros(len(ids), dtype=np.uint8))
                mask.end_document()
                documents += 1
                tokens += len(ids)
                unknown += sum(1 for i in ids if i == tokenizer.unk_id)
    if documents == 0:
        raise ExperimentDataError(f"no documents in {', '.join(paths)}")
    counts = {"documents": documents, "tokens": tokens, "unknown_tokens": unknown}
    write_json_atomic(output_prefix + ".meta.json", {
        "format": TEXT_META_FORMAT, "version": 1,
        "tokenizer": {"model": os.path.abspath(tokenizer_model), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
        "dtype": np.dtype(dtype).name, "append_eod": append_eod, "add_bos": False,
        "reward_mask": os.path.basename(mask_prefix), "inputs": [os.path.abspath(p) for p in paths],
        "counts": counts})
    return counts


def write_subset(source: str, target: str, count: int) -> int:
    """The first ``count`` non-blank lines of ``source`` into ``target``; refuses a log with fewer."""
    if count < 1:
        raise ExperimentDataError(f"a subset needs at least 1 record, got {count}")
    kept = 0
    _make_parent(target)
    with open(source, encoding="utf-8") as fh, atomic_open(target) as out:
        for line in fh:
            if kept == count:
                break
            if line.strip():
                out.write(line if line.endswith("\n") else line + "\n")
                kept += 1
        if kept < count:  # inside the block: nothing is published
            raise ExperimentDataError(f"{source} holds {kept} records, fewer than the {count} asked for")
    return kept
