"""Engine checkpoints: a directory per iteration, one file set per (TP, PP) rank, resharding on load.

    <root>/latest                                  iteration number of the newest complete checkpoint
    <root>/iter_0000100/checkpoint.json            layout, config, iteration, file sets (written last)
    <root>/iter_0000100/mp_rank_TT_PPP/model.safetensors   local shards under global parameter names
    <root>/iter_0000100/mp_rank_TT_PPP/meta.json           config, layout, rank, and the caller's state
    <root>/iter_0000100/mp_rank_TT_PPP/optim_dp_DDD.{safetensors,json}   optimizer state (optional)

Parameter names and shards follow :mod:`engine.parallel.layout`; vocab-parallel tensors are stored
padded to ``padded_vocab_size(vocab, TP)``. A save builds ``iter_N.saving/``, renames it to ``iter_N/``
once every rank's files and ``checkpoint.json`` are written, and only then replaces ``latest``, so a
crash leaves the previous checkpoint or the new one, never a partial one that looks complete.
Tensors are safetensors, everything else JSON: nothing here unpickles. Files are read and written
through :mod:`engine.train.safetensors_io`, one tensor at a time and without mmap, so peak memory
stays near one tensor (or one full parameter when resharding) rather than the checkpoint's size.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.convert.hf import expected_engine_shapes
from engine.fileio import fsync_dir, replace_dir, write_json_atomic, write_text_atomic
from engine.model.config import LlamaConfig
from engine.parallel.layout import (canonical_order, is_vocab_parallel, padded_vocab_size, stage_of, tp_shard,
                                   tp_shard_dim)
from engine.parallel.state import validate_layout
from engine.train.safetensors_io import (CheckpointError, SafetensorsWriter, decode_state, dtype_name, encode_state,
                                         read_header, read_tensor)

FORMAT = "ltu-engine-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def optimizer_file_names(dp_rank: int) -> tuple[str, str]:
    return f"optim_dp_{dp_rank:03d}.safetensors", f"optim_dp_{dp_rank:03d}.json"


# ----------------------------------------------------------------------------- layout of the shards
def stage_names(config: LlamaConfig, pp: int, pp_rank: int) -> list[str]:
    """Names of the parameters that pipeline stage ``pp_rank`` holds (tied copy included)."""
    return [n for n in canonical_order(expected_engine_shapes(config))
            if pp_rank in stage_of(n, config.num_hidden_layers, pp, config.tie_word_embeddings)]


def local_shape(name: str, full_shape: tuple[int, ...], config: LlamaConfig, tp: int) -> tuple[int, ...]:
    """Shape of one TP rank's shard of a parameter whose full, unpadded shape is ``full_shape``."""
    shape = list(full_shape)
    if is_vocab_parallel(name):
        shape[0] = padded_vocab_size(config.vocab_size, tp)
    dim = tp_shard_dim(name)
    if dim is not None:
        shape[dim] //= tp
    return tuple(shape)


def expected_rank_shapes(config: LlamaConfig, tp: int, pp: int, pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a (any TP rank, PP rank ``pp_rank``) file set holds, with its local shape."""
    full = expected_engine_shapes(config)
    return {n: local_shape(n, full[n], config, tp) for n in stage_names(config, pp, pp_rank)}


# ----------------------------------------------------------------------------------------- saving
class CheckpointWriter:
    """Builds ``iter_N`` in ``iter_N.saving``; :meth:`commit` checks it, publishes it, then ``latest``.

    Several processes may write file sets into the same writer's directory (see
    :func:`save_checkpoint_distributed`); exactly one calls :meth:`prepare` before and :meth:`commit`
    after all of them.
    """

    def __init__(self, root: str | os.PathLike, iteration: int, config: LlamaConfig, tp: int, pp: int):
        if not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
        validate_layout(config, tp, pp)
        self.root, self.iteration, self.config, self.tp, self.pp = Path(root), iteration, config, tp, pp
        self.final_dir = self.root / iteration_dir_name(iteration)
        self.tmp_dir = self.root / (iteration_dir_name(iteration) + ".saving")
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, tp)

    def prepare(self) -> None:
        """Create an empty ``iter_N.saving`` (a leftover of a crashed save is discarded)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir()

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _rank_dir(self, tp_rank: int, pp_rank: int) -> Path:
        if not (0 <= tp_rank < self.tp and 0 <= pp_rank < self.pp):
            raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside the layout TP={self.tp} x PP={self.pp}")
        path = self.tmp_dir / rank_dir_name(tp_rank, pp_rank)
        path.mkdir(exist_ok=True)
        return path

    def model_writer(self, tp_rank: int, pp_rank: int,
                     dtypes: Mapping[str, torch.dtype] | torch.dtype) -> SafetensorsWriter:
        """A writer for this rank's ``model.safetensors`` expecting exactly its local shards."""
        shapes = expected_rank_shapes(self.config, self.tp, self.pp, pp_rank)
        specs = {n: (dtypes if isinstance(dtypes, torch.dtype) else dtypes[n], s) for n, s in shapes.items()}
        return SafetensorsWriter(self._rank_dir(tp_rank, pp_rank) / MODEL_FILE, specs, {"format": "pt"})

    def write_model(self, tp_rank: int, pp_rank: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Write one rank's local shards; missing, unexpected or mis-shaped tensors raise by name."""
        shapes = expected_rank_shapes(self.config, self.tp, self.pp, pp_rank)
        where = f"state of TP rank {tp_rank}, PP rank {pp_rank}"
        missing = [n for n in shapes if n not in state_dict]
        unexpected = sorted(set(state_dict) - set(shapes))
        if missing or unexpected:
            raise CheckpointError(f"{where}: missing tensor(s) {missing}, unexpected tensor(s) {unexpected}")
        with self.model_writer(tp_rank, pp_rank, {n: t.dtype for n, t in state_dict.items()}) as w:
            for name in shapes:
                w.write(name, state_dict[name].detach().cpu())

    def write_meta(self, tp_rank: int, pp_rank: int, dtype: torch.dtype, state: Mapping | None = None) -> None:
        """``meta.json``: the model config, layout, rank coordinates and the caller's ``state``
        (iteration counters, RNG states, data-loader position...; tensors and arrays allowed)."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "iteration": self.iteration,
                "tp": self.tp, "pp": self.pp, "tp_rank": tp_rank, "pp_rank": pp_rank,
                "padded_vocab_size": self.padded_vocab_size, "dtype": dtype_name(dtype),
                "config": self.config.to_hf_dict(), "state": encode_state(dict(state or {}))}
        write_json_atomic(self._rank_dir(tp_rank, pp_rank) / META_FILE, meta)

    def write_optimizer(self, tp_rank: int, pp_rank: int, optimizer_state: Mapping, dp_rank: int = 0) -> None:
        """An optimizer state (e.g. ``optimizer.state_dict()``): tensors to safetensors, the rest JSON."""
        tensors: dict[str, torch.Tensor] = {}
        skeleton = encode_state(optimizer_state, tensors)
        st_name, json_name = optimizer_file_names(dp_rank)
        rank_dir = self._rank_dir(tp_rank, pp_rank)
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        with SafetensorsWriter(rank_dir / st_name, specs) as w:
            for k, t in tensors.items():
                w.write(k, t.detach().cpu())
        write_json_atomic(rank_dir / json_name, {"format": FORMAT, "state": skeleton})

    def commit(self, dtype: torch.dtype, extra: Mapping | None = None) -> Path:
        """Check every rank's files, write ``checkpoint.json``, publish ``iter_N``, then ``latest``."""
        file_sets, missing = [], []
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                rdir = self.tmp_dir / rank_dir_name(tp_rank, pp_rank)
                absent = [f for f in (MODEL_FILE, META_FILE) if not (rdir / f).is_file()]
                missing += [f"{rdir.name}/{f}" for f in absent]
                dp_ranks = sorted(int(p.name[len("optim_dp_"):-len(".json")]) for p in rdir.glob("optim_dp_*.json"))
                file_sets.append({"tp_rank": tp_rank, "pp_rank": pp_rank, "dir": rdir.name,
                                  "optimizer_dp_ranks": dp_ranks})
        if missing:
            raise CheckpointError(f"{self.tmp_dir}: cannot commit, file(s) not written: {missing}")
        write_json_atomic(self.tmp_dir / CHECKPOINT_JSON, {
            "format": FORMAT, "version": FORMAT_VERSION, "iteration": self.iteration,
            "tp": self.tp, "pp": self.pp, "padded_vocab_size": self.padded_vocab_size,
            "dtype": dtype_name(dtype), "config": self.config.to_hf_dict(), "file_sets": file_sets,
            **({"extra": encode_state(dict(extra))} if extra else {}),
        })
        fsync_dir(self.tmp_dir)
        replace_dir(self.tmp_dir, self.final_dir)  # re-saving an iteration replaces it whole
        fsync_dir(self.root)
        write_text_atomic(self.root / LATEST, f"{self.iteration}\n")
        fsync_dir(self.root)
        return self.final_dir


def dominant_dtype(sizes: Iterable[tuple[torch.dtype, int]]) -> torch.dtype:
    """The dtype with the largest total size over ``(dtype, size)`` pairs (float32 when there are none):
    the dtype a checkpoint or a HF config reports for the whole model."""
    counts: dict[torch.dtype, int] = {}
    for dtype, size in sizes:
        counts[dtype] = counts.get(dtype, 0) + size
    return max(counts, key=counts.get) if counts else torch.float32


def _dominant_dtype(states) -> torch.dtype:
    return dominant_dtype((t.dtype, t.numel()) for sd in states for t in sd.values())


def save_checkpoint(root: str | os.PathLike, iteration: int, config: LlamaConfig, tp: int, pp: int,
                    rank_states: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], *,
                    meta: Mapping | None = None, rank_meta: Mapping[tuple[int, int], Mapping] | None = None,
                    optimizer_states: Mapping[tuple, Mapping] | None = None) -> Path:
    """Save every rank's shards from one process; returns the published ``iter_N`` directory.

    ``rank_states[(tp_rank, pp_rank)]`` is that rank's local state dict (global names, local shards).
    ``meta`` goes into every rank's meta.json, merged with ``rank_meta[(tp_rank, pp_rank)]``.
    ``optimizer_states`` is keyed by ``(tp_rank, pp_rank)`` or ``(tp_rank, pp_rank, dp_rank)``.
    """
    writer = CheckpointWriter(root, iteration, config, tp, pp)
    absent = [(t, p) for p in range(pp) for t in range(tp) if (t, p) not in rank_states]
    if absent:
        raise CheckpointError(f"save_checkpoint: no state for (tp_rank, pp_rank) {absent} of TP={tp} x PP={pp}")
    dtype = _dominant_dtype(rank_states.values())
    writer.prepare()
    try:
        for (t, p), sd in rank_states.items():
            writer.write_model(t, p, sd)
            writer.write_meta(t, p, dtype, {**(meta or {}), **((rank_meta or {}).get((t, p), {}))})
        for key, opt in (optimizer_states or {}).items():
            writer.write_optimizer(key[0], key[1], opt, key[2] if len(key) > 2 else 0)
        return writer.commit(dtype)
    except BaseException:
        writer.abort()
        raise


def save_checkpoint_distributed(root: str | os.PathLike, iteration: int, config: LlamaConfig, tp: int,
                                pp: int, tp_rank: int, pp_rank: int, state_dict: Mapping[str, torch.Tensor],
                                *, meta: Mapping | None = None, optimizer_state: Mapping | None = None,
                                dp_rank: int = 0, group=None) -> Path:
    """Collective save: every rank of ``group`` calls it with its own shards.

    Data-parallel rank 0 of each (TP, PP) position writes the model and meta; every rank that passes
    ``optimizer_state`` writes its own (ZeRO-sharded states differ across DP). Rank 0 of ``group``
    commits once all succeeded. A failure on any rank fails the save on every rank (no hang, nothing
    published).
    """
    import torch.distributed as dist

    rank = dist.get_rank(group)
    writer = CheckpointWriter(root, iteration, config, tp, pp)
    dtype = _dominant_dtype([state_dict])

    def step(fn) -> None:
        error = None
        try:
            fn()
        except Exception as e:  # reported to every rank below, so that all fail together
            error = f"rank {rank}: {type(e).__name__}: {e}"
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        errors = [e for e in errors if e]
        if errors:
            if rank == 0:
                writer.abort()
            raise CheckpointError(f"saving {writer.final_dir} failed: " + "; ".join(errors))

    step(lambda: writer.prepare() if rank == 0 else None)

    def write_own() -> None:
        if dp_rank == 0:
            writer.write_model(tp_rank, pp_rank, state_dict)
            writer.write_meta(tp_rank, pp_rank, dtype, meta)
        if optimizer_state is not None:
            writer.write_optimizer(tp_rank, pp_rank, optimizer_state, dp_rank)

    step(write_own)
    step(lambda: writer.commit(dtype) if rank == 0 else None)
    return writer.final_dir


# ---------------------------------------------------------------------------------------- loading
def resolve_checkpoint_dir(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """The ``iter_N`` directory of ``path`` (a checkpoint root or an ``iter_N`` directory)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / CHECKPOINT_JSON).is_file():
        return path
    if iteration is None:
        latest = path / LATEST
        if not latest.is_file():
            hint = " (an unfinished save left only '.saving' data)" if any(path.glob("iter_*.saving")) else ""
            raise CheckpointError(f"{path}: not an engine checkpoint: no {CHECKPOINT_JSON} and no "
                                  f"'{LATEST}' file{hint}")
        text = latest.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{latest}: expected an iteration number, found {text[:40]!r}")
        iteration = int(text)
    it_dir = path / iteration_dir_name(iteration)
    if not (it_dir / CHECKPOINT_JSON).is_file():
        raise CheckpointError(f"{it_dir}: checkpoint of iteration {iteration} is missing or incomplete "
                              f"(no {CHECKPOINT_JSON})")
    return it_dir


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def config_differences(a: LlamaConfig, b: LlamaConfig) -> list[str]:
    da, db = a.to_hf_dict(), b.to_hf_dict()
    return [f"{k}: {da.get(k)!r} != {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]


@dataclass
class Checkpoint:
    """A validated checkpoint on disk: every rank's files present with the expected tensors."""

    path: Path
    iteration: int
    config: LlamaConfig
    tp: int
    pp: int
    padded_vocab_size: int
    info: dict
    headers: dict = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent

    def rank_dir(self, tp_rank: int, pp_rank: int) -> Path:
        return self.path / rank_dir_name(tp_rank, pp_rank)

    def names(self) -> list[str]:
        return canonical_order(expected_engine_shapes(self.config))

    def full_shape(self, name: str) -> tuple[int, ...]:
        return expected_engine_shapes(self.config)[name]

    def source_stage(self, name: str) -> int:
        return stage_of(name, self.config.num_hidden_layers, self.pp, self.config.tie_word_embeddings)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self.headers[(0, self.source_stage(name))][name].dtype

    def read_shard(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        info = self.headers[(tp_rank, pp_rank)][name]
        return read_tensor(self.rank_dir(tp_rank, pp_rank) / MODEL_FILE, info)

    def meta(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The state the saver passed for this rank (RNG states, counters, loader position...)."""
        return decode_state(_read_json(self.rank_dir(tp_rank, pp_rank) / META_FILE)["state"])

    def optimizer_state(self, tp_rank: int, pp_rank: int, dp_rank: int = 0) -> dict:
        """The optimizer state saved for this rank, with its tensors (same layout only)."""
        st_name, json_name = optimizer_file_names(dp_rank)
        rdir = self.rank_dir(tp_rank, pp_rank)
        if not (rdir / json_name).is_file():
            raise CheckpointError(f"{rdir}: no optimizer state for data-parallel rank {dp_rank} ({json_name})")
        st_path = rdir / st_name
        tensors = {k: read_tensor(st_path, info) for k, info in read_header(st_path)[0].items()}
        return decode_state(_read_json(rdir / json_name)["state"], tensors)


def open_checkpoint(path: str | os.PathLike, iteration: int | None = None,
                    expect_config: LlamaConfig | None = None) -> Checkpoint:
    """Find and validate a checkpoint (root with ``latest``, or an ``iter_N`` directory).

    Checks the format, that every (TP, PP) file set exists, that each ``model.safetensors`` holds
    exactly the expected names with the expected local shapes, that every ``meta.json`` describes
    the same model and layout, and (when given) that the model is ``expect_config``.
    """
    it_dir = resolve_checkpoint_dir(path, iteration)
    info = _read_json(it_dir / CHECKPOINT_JSON)
    where = it_dir / CHECKPOINT_JSON
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an engine checkpoint (format {info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported checkpoint version {info.get('version')!r}")
    try:
        config = LlamaConfig.from_hf_dict(info["config"], source=f"{where} config")
        tp, pp, it = int(info["tp"]), int(info["pp"]), int(info["iteration"])
        validate_layout(config, tp, pp)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    if iteration is not None and it != iteration:
        raise CheckpointError(f"{where}: holds iteration {it}, not {iteration}")
    if expect_config is not None and (diff := config_differences(config, expect_config)):
        raise CheckpointError(f"{it_dir}: checkpoint of another model; config differs: {'; '.join(diff)}")
    ckpt = Checkpoint(it_dir, it, config, tp, pp, padded_vocab_size(config.vocab_size, tp), info)
    problems: list[str] = []
    for pp_rank in range(pp):
        expected = expected_rank_shapes(config, tp, pp, pp_rank)
        for tp_rank in range(tp):
            rdir = ckpt.rank_dir(tp_rank, pp_rank)
            absent = [f for f in (MODEL_FILE, META_FILE) if not (rdir / f).is_file()]
            if absent:
                problems.append(f"file set {rdir.name} (TP rank {tp_rank}, PP rank {pp_rank}) "
                                f"is missing {absent}")
                continue
            try:
                header = read_header(rdir / MODEL_FILE)[0]
            except ValueError as e:
                problems.append(str(e))
                continue
            ckpt.headers[(tp_rank, pp_rank)] = header
            missing = [n for n in expected if n not in header]
            unexpected = sorted(set(header) - set(expected))
            misshaped = [f"{n} {header[n].shape} (expected {s})" for n, s in expected.items()
                         if n in header and header[n].shape != s]
            first = ckpt.headers.get((0, pp_rank), {})
            misshaped += [f"{n} is {header[n].dtype} but {first[n].dtype} on TP rank 0" for n in expected
                          if n in header and n in first and header[n].dtype != first[n].dtype]
            for label, items in (("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
                                 ("mis-shaped tensor(s)", misshaped)):
                if items:
                    problems.append(f"{rdir.name}/{MODEL_FILE}: {label} {items}")
            meta = _read_json(rdir / META_FILE)
            coords = {"tp": tp, "pp": pp, "tp_rank": tp_rank, "pp_rank": pp_rank, "iteration": it}
            wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in coords.items() if meta.get(k) != v]
            if meta.get("config") != info["config"]:
                wrong.append("config differs from checkpoint.json")
            if wrong:
                problems.append(f"{rdir.name}/{META_FILE}: {'; '.join(wrong)}")
    if problems:
        raise CheckpointError(f"{it_dir}: invalid checkpoint: " + " | ".join(problems))
    return ckpt


def _as_checkpoint(ckpt: Checkpoint | str | os.PathLike, iteration: int | None = None) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt, iteration)


def read_full_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One parameter reassembled from its TP shards, vocabulary padding removed.

    Shards are copied one by one into the result: peak memory is the parameter plus one shard.
    """
    stage = ckpt.source_stage(name)
    dim = tp_shard_dim(name)
    if dim is None:
        return ckpt.read_shard(0, stage, name)
    full = torch.empty(ckpt.full_shape(name), dtype=ckpt.dtype(name))
    start = 0
    for t in range(ckpt.tp):
        shard = ckpt.read_shard(t, stage, name)
        kept = min(shard.shape[dim], full.shape[dim] - start)  # the vocabulary padding is dropped
        if kept > 0:
            full.narrow(dim, start, kept).copy_(shard.narrow(dim, 0, kept))
        start += shard.shape[dim]
        del shard
    return full


def iter_full_tensors(ckpt: Checkpoint | str | os.PathLike, iteration: int | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full unpadded tensor) one parameter at a time, from any layout.

    With tied embeddings and PP > 1, ``embed_tokens.weight`` is read from the first stage only.
    """
    ckpt = _as_checkpoint(ckpt, iteration)
    for name in ckpt.names():
        yield name, read_full_tensor(ckpt, name)


def load_full_tensors(ckpt: Checkpoint | str | os.PathLike, iteration: int | None = None) -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(ckpt, iteration))


def load_rank_shard(ckpt: Checkpoint | str | os.PathLike, tp_rank: int, pp_rank: int, tp: int, pp: int,
                    ) -> dict[str, torch.Tensor]:
    """Local shards of rank (``tp_rank``, ``pp_rank``) for a target layout TP=``tp`` x PP=``pp``,
    which may differ from the checkpoint's (resharding). Peak memory: one full parameter."""
    ckpt = _as_checkpoint(ckpt)
    validate_layout(ckpt.config, tp, pp)
    if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside the layout TP={tp} x PP={pp}")
    out = {}
    for name in stage_names(ckpt.config, pp, pp_rank):
        if tp == ckpt.tp:  # same TP split: the shard is on disk as is, whatever the PP split
            out[name] = ckpt.read_shard(tp_rank, ckpt.source_stage(name), name)
        else:
            out[name] = tp_shard(name, read_full_tensor(ckpt, name), tp, tp_rank).clone()
    return out
