"""Engine checkpoints: a directory per iteration, one file set per (TP, PP) rank, resharding on load.

    <root>/latest                                  iteration number of the newest complete checkpoint
    <root>/iter_0000100/checkpoint.json            layout, pipeline, config, iteration, file sets, run state (last)
    <root>/iter_0000100/mp_rank_TT_PPP/model.safetensors      local shards under global parameter names
    <root>/iter_0000100/mp_rank_TT_PPP/meta.json              config, layout, rank, and the caller's state
    <root>/iter_0000100/mp_rank_TT_PPP/optimizer.safetensors  optimizer tensors "{name}/{kind}" (optional)
    <root>/iter_0000100/mp_rank_TT_PPP/optimizer.json         optimizer counters and hyper-parameters

Parameter names and shards follow :mod:`engine.parallel.layout`; vocab-parallel tensors are stored
padded to ``padded_vocab_size(vocab, TP)``. The file set of PP rank p holds every parameter of p's
model chunks in the checkpoint's :class:`~engine.parallel.layout.PipelineLayout` (recorded in
``checkpoint.json``, :attr:`Checkpoint.pipeline`; see :mod:`engine.train.checkpoint_layout`).
The optimizer state is stored like the parameters: for each parameter of the rank's model file, one
tensor per kind (``master``, ``exp_avg``, ...) with the parameter's local shape, one file set per
(TP, PP) rank whatever the data-parallel size (a ZeRO optimizer gathers its slices first). Loading
goes by parameter name, so both the model and the optimizer reshard onto another TP, PP, virtual
stage or DP layout; ``checkpoint.json`` records the layout the run used (:attr:`Checkpoint.layout`).

A save builds ``iter_N.saving/``, renames it to ``iter_N/`` once every rank's files and
``checkpoint.json`` are written, and only then replaces ``latest``, so a crash leaves the previous
checkpoint or the new one, never a partial one that looks complete.
Tensors are safetensors, everything else JSON: nothing here unpickles. Files are read and written
through :mod:`engine.safetensors_io`, one tensor at a time and without mmap, so peak memory
stays near one tensor (or one full parameter when resharding) rather than the checkpoint's size.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.fileio import fsync_dir, replace_dir, write_json_atomic, write_text_atomic
from engine.model.config import LlamaConfig, config_differences
from engine.model.llama import expected_shapes
from engine.parallel.layout import PipelineLayout, canonical_order, padded_vocab_size, tp_shard, tp_shard_dim
from engine.parallel.state import validate_layout
from engine.safetensors_io import (CheckpointError, SafetensorsWriter, decode_state, dtype_name, encode_state,
                                         header_problems, read_header, read_tensor)
from engine.train.checkpoint_layout import (check_optimizer_tensors, expected_rank_shapes, optimizer_key,
                                            pipeline_layout, pp_rank_names, recorded_layout, recorded_pipeline)

FORMAT = "ltu-engine-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_JSON = "checkpoint.json"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_STATE_FILE = "optimizer.json"


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# ----------------------------------------------------------------------------------------- saving
class CheckpointWriter:
    """Builds ``iter_N`` in ``iter_N.saving``; :meth:`commit` checks it, publishes it, then ``latest``.

    The file set of PP rank p holds the parameters of all its model chunks in the pipeline layout
    of ``pp`` ranks x ``virtual_stages`` chunks (:attr:`pipeline`, recorded in checkpoint.json).
    Several processes may write file sets into the same writer's directory (see
    :func:`save_checkpoint_distributed`); exactly one calls :meth:`prepare` before and :meth:`commit`
    after all of them.
    """

    def __init__(self, root: str | os.PathLike, iteration: int, config: LlamaConfig, tp: int, pp: int, *,
                 virtual_stages: int = 1):
        if not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be a non-negative integer, got {iteration!r}")
        validate_layout(config, tp, pp, virtual_stages=virtual_stages)
        self.root, self.iteration, self.config, self.tp, self.pp = Path(root), iteration, config, tp, pp
        self.pipeline = pipeline_layout(config, pp, virtual_stages)
        self.final_dir = self.root / iteration_dir_name(iteration)
        self.tmp_dir = self.root / (iteration_dir_name(iteration) + ".saving")
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, tp)

    def prepare(self) -> None:
        """Create an empty ``iter_N.saving``. Leftovers of crashed saves (``iter_*.saving`` of any
        iteration: one run writes a checkpoint root at a time) are discarded."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("iter_*.saving"):
            shutil.rmtree(leftover, ignore_errors=True)
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
        shapes = expected_rank_shapes(self.config, self.tp, self.pipeline, pp_rank)
        specs = {n: (dtypes if isinstance(dtypes, torch.dtype) else dtypes[n], s) for n, s in shapes.items()}
        return SafetensorsWriter(self._rank_dir(tp_rank, pp_rank) / MODEL_FILE, specs, {"format": "pt"})

    def write_model(self, tp_rank: int, pp_rank: int, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Write one rank's local shards; missing, unexpected or mis-shaped tensors raise by name."""
        shapes = expected_rank_shapes(self.config, self.tp, self.pipeline, pp_rank)
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

    def write_optimizer(self, tp_rank: int, pp_rank: int, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                        state: Mapping | None = None) -> None:
        """One rank's optimizer state: ``tensors[param_name][kind]`` (every parameter of the rank's
        model file, with its local shape; the same kinds for all) streamed to ``optimizer.safetensors``
        under ``"{name}/{kind}"``, and ``state`` (step counter, hyper-parameters) to ``optimizer.json``."""
        shapes = expected_rank_shapes(self.config, self.tp, self.pipeline, pp_rank)
        kinds = check_optimizer_tensors(tensors, shapes, f"optimizer state of TP rank {tp_rank}, PP rank {pp_rank}")
        rank_dir = self._rank_dir(tp_rank, pp_rank)
        specs = {optimizer_key(n, k): (tensors[n][k].dtype, shapes[n]) for n in shapes for k in kinds}
        with SafetensorsWriter(rank_dir / OPTIMIZER_FILE, specs, {"format": "pt"}) as w:
            for n in shapes:
                for k in kinds:
                    w.write(optimizer_key(n, k), tensors[n][k].detach().cpu())
        write_json_atomic(rank_dir / OPTIMIZER_STATE_FILE, {"format": FORMAT, "kinds": kinds,
                                                            "state": encode_state(dict(state or {}))})

    def commit(self, dtype: torch.dtype, layout: Mapping | None = None, extra: Mapping | None = None) -> Path:
        """Check every rank's files, write ``checkpoint.json`` (with ``layout`` and the caller's
        ``extra``: run config, counters), publish ``iter_N``, then ``latest``.

        The optimizer state is all or nothing: written for every file set with the same kinds, or
        for none."""
        layout = recorded_layout(layout, self.tp, self.pp, self.pipeline.virtual_stages)
        file_sets, missing, kinds_by_dir = [], [], {}
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                rdir = self.tmp_dir / rank_dir_name(tp_rank, pp_rank)
                missing += [f"{rdir.name}/{f}" for f in (MODEL_FILE, META_FILE) if not (rdir / f).is_file()]
                if (rdir / OPTIMIZER_STATE_FILE).is_file():  # written after its complete safetensors file
                    kinds_by_dir[rdir.name] = _read_json(rdir / OPTIMIZER_STATE_FILE).get("kinds")
                file_sets.append({"tp_rank": tp_rank, "pp_rank": pp_rank, "dir": rdir.name})
        if kinds_by_dir:
            missing += [f"{fs['dir']}/{f}" for fs in file_sets if fs["dir"] not in kinds_by_dir
                        for f in (OPTIMIZER_FILE, OPTIMIZER_STATE_FILE)]
        if missing:
            raise CheckpointError(f"{self.tmp_dir}: cannot commit, file(s) not written: {missing}")
        kinds = next(iter(kinds_by_dir.values()), None)
        if any(k != kinds for k in kinds_by_dir.values()):
            raise CheckpointError(f"{self.tmp_dir}: cannot commit, file sets hold different optimizer tensor "
                                  f"kinds: {kinds_by_dir}")
        write_json_atomic(self.tmp_dir / CHECKPOINT_JSON, {
            "format": FORMAT, "version": FORMAT_VERSION, "iteration": self.iteration,
            "tp": self.tp, "pp": self.pp, "padded_vocab_size": self.padded_vocab_size,
            "dtype": dtype_name(dtype), "config": self.config.to_hf_dict(), "layout": layout,
            "pipeline": self.pipeline.to_dict(), "file_sets": file_sets, "optimizer": {"kinds": kinds} if kinds_by_dir else None,
            "extra": encode_state(dict(extra or {})),
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
                    optimizer_tensors: Mapping[tuple[int, int], Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
                    optimizer_state: Mapping | None = None, layout: Mapping | None = None,
                    extra: Mapping | None = None, virtual_stages: int = 1) -> Path:
    """Save every rank's shards from one process; returns the published ``iter_N`` directory.

    ``rank_states[(tp_rank, pp_rank)]`` is that rank's local state dict (global names, local shards:
    with ``virtual_stages`` > 1, the parameters of all the rank's interleaved model chunks).
    ``meta`` goes into every rank's meta.json, merged with ``rank_meta[(tp_rank, pp_rank)]``.
    ``optimizer_tensors[(tp_rank, pp_rank)][param_name][kind]``, when given, covers every rank;
    ``optimizer_state`` goes with each rank's, or is ``{(tp_rank, pp_rank): state}`` when every key is
    such a tuple. ``layout`` and ``extra`` go into checkpoint.json.
    """
    writer = CheckpointWriter(root, iteration, config, tp, pp, virtual_stages=virtual_stages)
    ranks = [(t, p) for p in range(pp) for t in range(tp)]
    absent = [r for r in ranks if r not in rank_states]
    if absent:
        raise CheckpointError(f"save_checkpoint: no state for (tp_rank, pp_rank) {absent} of TP={tp} x PP={pp}")
    if optimizer_tensors is None and optimizer_state is not None:
        raise CheckpointError("save_checkpoint: optimizer_state given without optimizer_tensors")
    if optimizer_tensors is not None and (absent := [r for r in ranks if r not in optimizer_tensors]):
        raise CheckpointError(f"save_checkpoint: no optimizer tensors for (tp_rank, pp_rank) {absent} "
                              f"of TP={tp} x PP={pp}")
    per_rank_state = bool(optimizer_state) and all(isinstance(k, tuple) for k in optimizer_state)
    if per_rank_state and (absent := [r for r in ranks if r not in optimizer_state]):
        raise CheckpointError(f"save_checkpoint: no optimizer state for (tp_rank, pp_rank) {absent} "
                              f"of TP={tp} x PP={pp}")
    recorded_layout(layout, tp, pp, virtual_stages)  # a bad layout fails before any file is written
    dtype = _dominant_dtype(rank_states.values())
    writer.prepare()
    try:
        for (t, p), sd in rank_states.items():
            writer.write_model(t, p, sd)
            writer.write_meta(t, p, dtype, {**(meta or {}), **((rank_meta or {}).get((t, p), {}))})
        for (t, p), tensors in (optimizer_tensors or {}).items():
            writer.write_optimizer(t, p, tensors, optimizer_state[(t, p)] if per_rank_state else optimizer_state)
        return writer.commit(dtype, layout, extra)
    except BaseException:
        writer.abort()
        raise


def save_checkpoint_distributed(root: str | os.PathLike, iteration: int, config: LlamaConfig, tp: int,
                                pp: int, tp_rank: int, pp_rank: int, state_dict: Mapping[str, torch.Tensor],
                                *, meta: Mapping | None = None,
                                optimizer_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                                optimizer_state: Mapping | None = None, layout: Mapping | None = None,
                                extra: Mapping | None = None, dp_rank: int = 0, group=None,
                                virtual_stages: int = 1) -> Path:
    """Collective save: every rank of ``group`` calls it with its own shards (all its model chunks'
    parameters when ``virtual_stages`` > 1).

    Data-parallel rank 0 of each (TP, PP) position writes the model, ``meta`` and, when given, the
    optimizer state (``optimizer_tensors[param_name][kind]``: whole local tensors, a ZeRO optimizer
    gathers its DP slices first; ``optimizer_state``: counters and hyper-parameters); other DP ranks
    write nothing. Rank 0 of ``group`` commits once all succeeded, recording ``layout`` and ``extra``
    in checkpoint.json. A failure on any rank fails the save on every rank (no hang, nothing published).
    """
    import torch.distributed as dist

    rank = dist.get_rank(group)
    writer = CheckpointWriter(root, iteration, config, tp, pp, virtual_stages=virtual_stages)
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
        if dp_rank != 0:
            return
        if optimizer_tensors is None and optimizer_state is not None:
            raise CheckpointError("optimizer_state given without optimizer_tensors")
        recorded_layout(layout, tp, pp, virtual_stages)
        writer.write_model(tp_rank, pp_rank, state_dict)
        writer.write_meta(tp_rank, pp_rank, dtype, meta)
        if optimizer_tensors is not None:
            writer.write_optimizer(tp_rank, pp_rank, optimizer_tensors, optimizer_state)

    step(write_own)
    step(lambda: writer.commit(dtype, layout, extra) if rank == 0 else None)
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


@dataclass
class Checkpoint:
    """A validated checkpoint on disk: every rank's files present with the expected tensors.

    ``pipeline`` is the layout its file sets were written in (checkpoint.json's ``"pipeline"``;
    contiguous, one chunk per rank, for checkpoints written before it was recorded)."""

    path: Path
    iteration: int
    config: LlamaConfig
    tp: int
    pp: int
    pipeline: PipelineLayout
    padded_vocab_size: int
    info: dict
    headers: dict = field(default_factory=dict, repr=False)
    optimizer_headers: dict = field(default_factory=dict, repr=False)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def layout(self) -> dict:
        """The layout the run used (``tp``, ``pp``, ``dp`` and what the saver recorded); a checkpoint
        written without one gives its TP and PP, and ``dp`` None."""
        recorded = self.info.get("layout")
        return dict(recorded) if recorded else {"tp": self.tp, "pp": self.pp, "dp": None}

    @property
    def extra(self) -> dict:
        """What the saver stored in checkpoint.json (run config, counters)."""
        return decode_state(self.info.get("extra") or {})

    @property
    def has_optimizer(self) -> bool:
        return bool(self.info.get("optimizer"))

    @property
    def optimizer_kinds(self) -> list[str]:
        """The optimizer tensor kinds every parameter has (``master``, ``exp_avg``, ...); [] when none."""
        return list(self.info["optimizer"]["kinds"]) if self.has_optimizer else []

    def rank_dir(self, tp_rank: int, pp_rank: int) -> Path:
        return self.path / rank_dir_name(tp_rank, pp_rank)

    def names(self) -> list[str]:
        return canonical_order(expected_shapes(self.config))

    def full_shape(self, name: str) -> tuple[int, ...]:
        return expected_shapes(self.config)[name]

    def source_stage(self, name: str) -> int:
        """The PP rank whose file sets hold ``name`` (the first rank for a tied embedding)."""
        return self.pipeline.ranks_of(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self.headers[(0, self.source_stage(name))][name].dtype

    def read_shard(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        info = self.headers[(tp_rank, pp_rank)][name]
        return read_tensor(self.rank_dir(tp_rank, pp_rank) / MODEL_FILE, info)

    def read_optimizer_shard(self, tp_rank: int, pp_rank: int, name: str, kind: str) -> torch.Tensor:
        """One rank's ``kind`` tensor of parameter ``name``, as stored (local shape, vocab padded)."""
        path, key = self.rank_dir(tp_rank, pp_rank) / OPTIMIZER_FILE, optimizer_key(name, kind)
        if key not in self.optimizer_headers.get((tp_rank, pp_rank), {}):
            raise CheckpointError(f"{path}: no optimizer tensor {key!r} (kinds saved: {self.optimizer_kinds})")
        return read_tensor(path, self.optimizer_headers[(tp_rank, pp_rank)][key])

    def meta(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The state the saver passed for this rank (RNG states, counters, loader position...)."""
        return decode_state(_read_json(self.rank_dir(tp_rank, pp_rank) / META_FILE)["state"])

    def optimizer_state(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The optimizer counters and hyper-parameters saved with this rank's optimizer tensors."""
        if not self.has_optimizer:
            raise CheckpointError(f"{self.path}: holds no optimizer state")
        return decode_state(_read_json(self.rank_dir(tp_rank, pp_rank) / OPTIMIZER_STATE_FILE)["state"])


def _read_checkpoint_info(it_dir: Path, iteration: int | None):
    """checkpoint.json, validated: (info, config, tp, pp, pipeline, iteration)."""
    where = it_dir / CHECKPOINT_JSON
    info = _read_json(where)
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an engine checkpoint (format {info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unsupported checkpoint version {info.get('version')!r}")
    try:
        config = LlamaConfig.from_hf_dict(info["config"], source=f"{where} config")
        tp, pp, it = int(info["tp"]), int(info["pp"]), int(info["iteration"])
        validate_layout(config, tp, pp)
        pipeline = recorded_pipeline(info.get("pipeline"), config, pp)
        if info.get("layout") is not None:
            recorded_layout(info["layout"], tp, pp, pipeline.virtual_stages)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    optimizer = info.get("optimizer")
    if optimizer and not (isinstance(optimizer, dict) and isinstance(optimizer.get("kinds"), list)
                          and optimizer["kinds"] and all(isinstance(k, str) for k in optimizer["kinds"])):
        raise CheckpointError(f"{where}: 'optimizer' must hold a non-empty list of tensor kinds, got {optimizer!r}")
    if iteration is not None and it != iteration:
        raise CheckpointError(f"{where}: holds iteration {it}, not {iteration}")
    return info, config, tp, pp, pipeline, it


def open_checkpoint(path: str | os.PathLike, iteration: int | None = None,
                    expect_config: LlamaConfig | None = None) -> Checkpoint:
    """Find and validate a checkpoint (root with ``latest``, or an ``iter_N`` directory).

    Checks the format, that every (TP, PP) file set exists, that each ``model.safetensors`` (and,
    when checkpoint.json records an optimizer, each ``optimizer.safetensors``) holds exactly the
    expected tensors with the expected local shapes, that every ``meta.json`` describes the same
    model and layout, and (when given) that the model is ``expect_config``.
    """
    it_dir = resolve_checkpoint_dir(path, iteration)
    info, config, tp, pp, pipeline, it = _read_checkpoint_info(it_dir, iteration)
    if expect_config is not None and (diff := config_differences(config, expect_config)):
        raise CheckpointError(f"{it_dir}: checkpoint of another model; config differs: {'; '.join(diff)}")
    ckpt = Checkpoint(it_dir, it, config, tp, pp, pipeline, padded_vocab_size(config.vocab_size, tp), info)
    kinds = ckpt.optimizer_kinds
    required = (MODEL_FILE, META_FILE) + ((OPTIMIZER_FILE, OPTIMIZER_STATE_FILE) if kinds else ())
    problems: list[str] = []
    for pp_rank in range(pp):
        expected = expected_rank_shapes(config, tp, pipeline, pp_rank)
        expected_optimizer = {optimizer_key(n, k): s for n, s in expected.items() for k in kinds}
        for tp_rank in range(tp):
            rdir = ckpt.rank_dir(tp_rank, pp_rank)
            absent = [f for f in required if not (rdir / f).is_file()]
            if absent:
                problems.append(f"file set {rdir.name} (TP rank {tp_rank}, PP rank {pp_rank}) "
                                f"is missing {absent}")
                continue
            try:
                header = read_header(rdir / MODEL_FILE)[0]
                optimizer_header = read_header(rdir / OPTIMIZER_FILE)[0] if kinds else {}
            except ValueError as e:
                problems.append(str(e))
                continue
            ckpt.headers[(tp_rank, pp_rank)] = header
            problems += header_problems(f"{rdir.name}/{MODEL_FILE}", header, expected,
                                         ckpt.headers.get((0, pp_rank), {}))
            meta = _read_json(rdir / META_FILE)
            coords = {"tp": tp, "pp": pp, "tp_rank": tp_rank, "pp_rank": pp_rank, "iteration": it}
            wrong = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in coords.items() if meta.get(k) != v]
            if meta.get("config") != info["config"]:
                wrong.append("config differs from checkpoint.json")
            if wrong:
                problems.append(f"{rdir.name}/{META_FILE}: {'; '.join(wrong)}")
            if kinds:
                ckpt.optimizer_headers[(tp_rank, pp_rank)] = optimizer_header
                problems += header_problems(f"{rdir.name}/{OPTIMIZER_FILE}", optimizer_header, expected_optimizer,
                                             ckpt.optimizer_headers.get((0, pp_rank), {}))
                saved_kinds = _read_json(rdir / OPTIMIZER_STATE_FILE).get("kinds")
                if saved_kinds != kinds:
                    problems.append(f"{rdir.name}/{OPTIMIZER_STATE_FILE}: tensor kinds {saved_kinds!r} "
                                    f"(checkpoint.json records {kinds!r})")
    if problems:
        raise CheckpointError(f"{it_dir}: invalid checkpoint: " + " | ".join(problems))
    return ckpt


def _as_checkpoint(ckpt: Checkpoint | str | os.PathLike, iteration: int | None = None) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else open_checkpoint(ckpt, iteration)


def _assemble(ckpt: Checkpoint, name: str, read_shard: Callable[[int], torch.Tensor],
              dtype: torch.dtype) -> torch.Tensor:
    """A full, unpadded tensor of parameter ``name`` from ``read_shard(tp_rank)``, shard by shard:
    peak memory is the tensor plus one shard."""
    dim = tp_shard_dim(name)
    if dim is None:
        return read_shard(0)
    full = torch.empty(ckpt.full_shape(name), dtype=dtype)
    start = 0
    for t in range(ckpt.tp):
        shard = read_shard(t)
        kept = min(shard.shape[dim], full.shape[dim] - start)  # the vocabulary padding is dropped
        if kept > 0:
            full.narrow(dim, start, kept).copy_(shard.narrow(dim, 0, kept))
        start += shard.shape[dim]
        del shard
    return full


def read_full_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """One parameter reassembled from its TP shards, vocabulary padding removed."""
    stage = ckpt.source_stage(name)
    return _assemble(ckpt, name, lambda t: ckpt.read_shard(t, stage, name), ckpt.dtype(name))


def read_full_optimizer_tensor(ckpt: Checkpoint, name: str, kind: str) -> torch.Tensor:
    """One parameter's optimizer tensor of ``kind`` reassembled from its TP shards, padding removed."""
    stage = ckpt.source_stage(name)
    dtype = ckpt.optimizer_headers[(0, stage)][optimizer_key(name, kind)].dtype
    return _assemble(ckpt, name, lambda t: ckpt.read_optimizer_shard(t, stage, name, kind), dtype)


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


def _target_names(ckpt: Checkpoint, tp_rank: int, pp_rank: int, tp: int, pp: int, virtual_stages: int) -> list[str]:
    """The parameters rank (``tp_rank``, ``pp_rank``) of the target layout holds, refusing a layout
    the model cannot be split into."""
    validate_layout(ckpt.config, tp, pp, virtual_stages=virtual_stages)
    if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside the layout TP={tp} x PP={pp}")
    return pp_rank_names(ckpt.config, pipeline_layout(ckpt.config, pp, virtual_stages), pp_rank)


def load_rank_shard(ckpt: Checkpoint | str | os.PathLike, tp_rank: int, pp_rank: int, tp: int, pp: int,
                    *, virtual_stages: int = 1) -> dict[str, torch.Tensor]:
    """Local shards of rank (``tp_rank``, ``pp_rank``) for a target layout TP=``tp`` x PP=``pp`` with
    ``virtual_stages`` model chunks per pipeline rank, which may differ from the checkpoint's in any
    of the three (resharding): exactly the parameters of the rank's chunks, by name. Peak memory:
    one full parameter."""
    ckpt = _as_checkpoint(ckpt)
    out = {}
    for name in _target_names(ckpt, tp_rank, pp_rank, tp, pp, virtual_stages):
        if tp == ckpt.tp:  # same TP split: the shard is on disk as is, whatever the pipeline split
            out[name] = ckpt.read_shard(tp_rank, ckpt.source_stage(name), name)
        else:
            out[name] = tp_shard(name, read_full_tensor(ckpt, name), tp, tp_rank).clone()
    return out


def load_rank_optimizer(ckpt: Checkpoint | str | os.PathLike, tp_rank: int, pp_rank: int, tp: int, pp: int,
                        *, virtual_stages: int = 1) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Optimizer state of rank (``tp_rank``, ``pp_rank``) for a target layout TP=``tp`` x PP=``pp``
    with ``virtual_stages`` chunks per pipeline rank: ``(tensors[param_name][kind], state)``, each
    tensor shaped like the rank's parameter shard, for exactly the parameters of the rank's chunks.

    Another TP split reassembles each tensor from the saved shards and cuts it again (vocabulary
    padding rows are dropped and re-padded with zeros), one tensor at a time. ``state`` is that of
    the saved file set holding the rank's first parameter (counters and hyper-parameters are the
    same on every rank)."""
    ckpt = _as_checkpoint(ckpt)
    names = _target_names(ckpt, tp_rank, pp_rank, tp, pp, virtual_stages)
    if not ckpt.has_optimizer:
        raise CheckpointError(f"{ckpt.path}: holds no optimizer state (saved without one)")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        stage = ckpt.source_stage(name)
        if tp == ckpt.tp:
            out[name] = {k: ckpt.read_optimizer_shard(tp_rank, stage, name, k) for k in ckpt.optimizer_kinds}
        else:
            out[name] = {k: tp_shard(name, read_full_optimizer_tensor(ckpt, name, k), tp, tp_rank).clone()
                         for k in ckpt.optimizer_kinds}
    source = (tp_rank if tp == ckpt.tp else 0, ckpt.source_stage(names[0]))
    return out, ckpt.optimizer_state(*source)
