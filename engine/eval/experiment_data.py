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
  draws, and the MovieLens and OBD tools shuffle each file, so the first n are a random sample of n).
- :class:`LogFolder` reads a SAR log folder's ``manifest.json`` (the layout ``<dir>/<split>/<domain>.jsonl``
  that ``make_synthetic_logs.py``, ``make_movielens_logs.py`` and ``make_obd_logs.py`` write): its
  domains, which are in- and out-of-domain, its split files, whether it carries the true reward
  distributions; :meth:`LogFolder.problems` says what an experiment on it would lack.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------ log folders
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class LogFolder:
    """A SAR log folder as its manifest describes it. ``files`` maps split -> domain -> path (the
    manifest's relative paths joined to ``path``); ``has_truth``: the manifest holds Bayes ceilings,
    so the records carry their true reward distributions (synthetic logs), else they are real logs."""

    path: str
    in_domain: tuple[str, ...]
    out_of_domain: tuple[str, ...]
    files: dict[str, dict[str, str]]
    has_truth: bool
    source: str | None                       # the manifest's source name (e.g. MovieLens-100k)
    manifest: dict

    @classmethod
    def read(cls, path: str) -> "LogFolder":
        manifest_path = os.path.join(path, MANIFEST)
        what = ("a SAR log folder (<dir>/<split>/<domain>.jsonl and manifest.json, as make_synthetic_logs.py, "
                "make_movielens_logs.py and make_obd_logs.py write)")
        try:
            with open(manifest_path, encoding="utf-8") as fh:
                manifest = json.load(fh)
        except FileNotFoundError:
            raise ExperimentDataError(f"{manifest_path}: not found; --logs takes {what}") from None
        except json.JSONDecodeError as exc:
            raise ExperimentDataError(f"{manifest_path}: not JSON: {exc.msg}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ExperimentDataError(f"{manifest_path}: no 'files' map (split -> domain -> path); expected {what}")
        joined = {split: {d: os.path.join(path, rel) for d, rel in by_domain.items()}
                  for split, by_domain in files.items()}
        source = manifest.get("source")
        return cls(path, tuple(manifest.get("in_domain") or ()), tuple(manifest.get("out_of_domain") or ()),
                   joined, bool(manifest.get("bayes_ceiling")),
                   source.get("name") if isinstance(source, dict) else None, manifest)

    @property
    def domains(self) -> list[str]:
        """Every domain with a file, the manifest's in-domain ones first, then out-of-domain, then the rest."""
        present = {d for by_domain in self.files.values() for d in by_domain}
        ordered = [d for d in (*self.in_domain, *self.out_of_domain) if d in present]
        return ordered + sorted(present - set(ordered))

    def file(self, split: str, domain: str) -> str:
        try:
            return self.files[split][domain]
        except KeyError:
            raise ExperimentDataError(f"{os.path.join(self.path, MANIFEST)}: no {split} file for domain "
                                      f"{domain!r}") from None

    def records(self, split: str, domain: str) -> int:
        """Non-blank lines of a split file."""
        with open(self.file(split, domain), encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())

    def choose_domains(self, target: str | None = None, ood: str | None = None,
                       ct_domains: tuple[str, ...] | None = None) -> tuple[str, str, tuple[str, ...]]:
        """(target, held-out domain, CT domains), each the given one or the manifest's choice: the
        held-out domain is its first out-of-domain one; the target its in-domain domain with the most
        training records (the first of equals); CT the other in-domain domains."""
        where = os.path.join(self.path, MANIFEST)
        domains = self.domains
        taken = {target, ood, *(ct_domains or ())}
        if ood is None:
            ood = next((d for d in self.out_of_domain if d in domains and d not in taken), None)
            if ood is None:
                raise ExperimentDataError(f"{where} marks no out-of-domain domain to hold out; give --ood")
        if target is None:
            inside = [d for d in self.in_domain if d in domains and d not in taken | {ood}]
            if not inside:
                raise ExperimentDataError(f"{where} has no other in-domain domain to be the target; give --target")
            counts = {d: self.records("train", d) if d in self.files.get("train", {}) else 0 for d in inside}
            target = max(inside, key=lambda d: (counts[d], -inside.index(d)))
        if ct_domains is None:
            ct_domains = tuple(d for d in self.in_domain if d in domains and d not in (target, ood))
            if not ct_domains:
                raise ExperimentDataError(f"{where} has no in-domain domain besides the target {target} to "
                                          "continue pre-training on; give --ct-domains")
        return target, ood, tuple(ct_domains)

    def problems(self, needs: dict[str, list[str]]) -> list[str]:
        """What is missing for an experiment that reads ``needs`` (split -> domains): unknown domains,
        split files the manifest lacks or that are missing or empty on disk."""
        known = self.domains
        errors = []
        for domain in dict.fromkeys(d for ds in needs.values() for d in ds):
            if domain not in known:
                errors.append(f"unknown domain {domain!r} in {self.path} (known: {', '.join(known)})")
        for split, domains in needs.items():
            for domain in dict.fromkeys(d for d in domains if d in known):
                path = self.files.get(split, {}).get(domain)
                if path is None:
                    errors.append(f"{os.path.join(self.path, MANIFEST)} has no {split} file for domain {domain!r}")
                elif not os.path.isfile(path):
                    errors.append(f"missing split file {path} (the {split} split of {domain})")
                elif os.path.getsize(path) == 0:
                    errors.append(f"empty split file {path} (the {split} split of {domain})")
        return errors

    def experiment_problems(self, target: str, ood: str, ct_domains: tuple[str, ...],
                            eval_split: str) -> tuple[list[str], int]:
        """:meth:`problems` of an experiment (tokenizer, bins and CT read the training split of every
        domain it names; SFT and CT validation the valid split of the target and CT domains; the
        evaluations ``eval_split`` of all), and the target's training records (0 when unreadable)."""
        every = [target, ood, *ct_domains]
        needs = {"train": every, "valid": [target, *ct_domains]}
        needs[eval_split] = list(dict.fromkeys(needs.get(eval_split, []) + every))
        problems = self.problems(needs)
        return problems, 0 if self.problems({"train": [target]}) else self.records("train", target)
