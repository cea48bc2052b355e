"""Hugging Face Llama directory <-> engine checkpoint sharded over TP x PP, one tensor at a time.

    import_hf("llama-hf/", "ckpt/", tp=2, pp=2)     # HF -> ckpt/iter_0000000 + ckpt/latest
    export_hf("ckpt/", "llama-out/")                # any engine checkpoint -> HF (same logits)

Both read a tensor, write its pieces and drop it before the next, so peak memory is about one full
parameter whatever the model size. Both build their output under a hidden staging name next to the
destination (``.NAME.partial-<pid>-<host>``) and rename it at the end: a failed or interrupted
conversion leaves nothing behind, and the staging directory of a killed one is removed by the next
conversion into the same destination.
Everything wrong with the input (unsupported config field, impossible layout, missing, unexpected
or mis-shaped tensors, a directory that is not a checkpoint) is reported by name before any output.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from engine.model.hf import engine_to_hf_name, plan_hf_tensors, read_hf_shard
from engine.fileio import (make_parent_dirs, progress_bar, remove_empty_dirs, remove_stale_temporaries,
                           replace_dir, temporary_name, write_json_atomic)
from engine.model.config import LlamaConfig
from engine.parallel.layout import tp_shard_dim
from engine.parallel.state import validate_layout
from engine.train.checkpoint import (CHECKPOINT_JSON, CheckpointError, CheckpointWriter, dominant_dtype, iteration_dir_name,
                                     open_checkpoint, read_full_tensor)
from engine.safetensors_io import SafetensorsWriter, dtype_name

# Files besides the weights that make a HF directory usable: copied into the checkpoint on import
# (under tokenizer/) and back out on export.
HF_SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "generation_config.json")
TOKENIZER_SUBDIR = "tokenizer"
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ConversionError(ValueError):
    """An input that cannot be converted; the message names the file, tensor or field."""


class OutputExistsError(ConversionError):
    """The destination holds files and replacing it was not asked for (``force``)."""

    def __init__(self, path: Path, remedy: str = "pass force=True to replace it"):
        self.path = path
        super().__init__(f"{path}: already exists and is not empty ({remedy})")


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    if text is None or isinstance(text, torch.dtype):
        return text
    if text.lower() not in _DTYPES:
        raise ConversionError(f"unknown dtype {text!r} (choose from {', '.join(_DTYPES)})")
    return _DTYPES[text.lower()]


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000 (Hugging Face's units), ints as bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
        if not m:
            raise ConversionError(f"cannot read the size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value <= 0:
        raise ConversionError(f"size must be positive, got {text!r}")
    return value


def _staging_for(dest: Path, force: bool) -> tuple[Path, list[str]]:
    """A fresh staging directory next to ``dest`` and the parent directories made for it; refuses
    to overwrite a non-empty ``dest``. Staging left by killed conversions into ``dest`` is removed."""
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())) and not force:
        raise OutputExistsError(dest)
    created = make_parent_dirs(dest)
    remove_stale_temporaries(dest)
    staging = dest.with_name(temporary_name(dest.name, "partial", hidden=True))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging, created


def _abandon(staging: Path, created: list[str]) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    remove_empty_dirs(created)


def _check_iteration(load: str | os.PathLike, iteration: int | None) -> None:
    """A requested iteration that a checkpoint root lacks: say which ones it has."""
    root = Path(load)
    if iteration is None or not root.is_dir() or (root / CHECKPOINT_JSON).is_file():
        return
    if (root / iteration_dir_name(iteration) / CHECKPOINT_JSON).is_file():
        return
    present = sorted(int(p.name[len("iter_"):]) for p in root.glob("iter_*")
                     if p.name[len("iter_"):].isdigit() and (p / CHECKPOINT_JSON).is_file())
    listed = ", ".join(map(str, present)) if present else "none"
    raise CheckpointError(f"{root / iteration_dir_name(iteration)}: checkpoint of iteration {iteration} is missing "
                          f"or incomplete; iterations saved in {root}: {listed}")


def _copy_side_files(sources: list[Path], dest: Path) -> list[str]:
    copied = []
    for name in HF_SIDE_FILES:
        for src in sources:
            if (src / name).is_file():
                dest.mkdir(exist_ok=True)
                shutil.copyfile(src / name, dest / name)
                copied.append(name)
                break
    return copied


def sentencepiece_tokenizer_config(model_file: Path, config) -> dict:
    """``tokenizer_config.json`` for a bare SentencePiece model, so that ``AutoTokenizer`` loads it
    and encodes text exactly as the engine does: no BOS or EOS added (the engine's SAR data carries
    neither), no space put in front of the text, and the model's own special pieces."""
    from engine.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(model_file))
    piece = lambda i: None if i is None else tokenizer.id_to_piece(i)  # noqa: E731
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
            "add_prefix_space": False, "legacy": False, "bos_token": piece(tokenizer.bos_id),
            "eos_token": piece(tokenizer.eos_id), "unk_token": piece(tokenizer.unk_id),
            "pad_token": piece(tokenizer.pad_id), "model_max_length": config.max_position_embeddings}


# ------------------------------------------------------------------------------------------ import
def import_hf(hf_dir: str | os.PathLike, save_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
              dtype: str | torch.dtype | None = None, progress: bool = True, force: bool = False) -> Path:
    """Convert a HF Llama directory into an engine checkpoint (iteration 0) for TP=``tp`` x PP=``pp``
    in the contiguous pipeline layout (one chunk per rank); a run with virtual stages loads it by
    parameter name (:func:`engine.train.checkpoint.load_rank_shard`).

    ``dtype`` casts floating tensors (default: keep each tensor's dtype, so export gives the same
    bits back). Returns the published ``iter_0000000`` directory.
    """
    dtype = parse_dtype(dtype)
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"{hf_dir}: no such Hugging Face directory")
    config = LlamaConfig.from_hf_dir(hf_dir)
    validate_layout(config, tp, pp)  # before touching any tensor
    config, plan, tied_head = plan_hf_tensors(hf_dir)
    dtypes = {n: dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
              for n, (_, _, info) in plan.items()}
    main_dtype = dominant_dtype((d, plan[n][2].end - plan[n][2].start) for n, d in dtypes.items())

    dest = Path(save_dir)
    staging, created = _staging_for(dest, force)
    writers: dict[tuple[int, int], SafetensorsWriter] = {}
    try:
        ckpt = CheckpointWriter(staging, 0, config, tp, pp)
        ckpt.prepare()
        writers = {(t, p): ckpt.model_writer(t, p, dtypes) for p in range(pp) for t in range(tp)}
        # File order, then offset order: the input is read sequentially.
        order = sorted(plan, key=lambda n: (str(plan[n][1]), plan[n][2].start))
        total = sum(plan[n][2].end - plan[n][2].start for n in order)
        with progress_bar(total=total, unit="B", unit_scale=True, desc="import", disable=not progress) as bar:
            for name in order:
                hf_name, path, info = plan[name]
                stages = ckpt.pipeline.ranks_of(name)
                for t in range(tp):
                    shard = read_hf_shard(name, path, info, tp, t).to(dtypes[name])
                    if name == "embed_tokens.weight" and tied_head is not None:
                        head = read_hf_shard(name, *tied_head, tp, t).to(dtypes[name])
                        if not torch.equal(head, shard):
                            raise ConversionError(f"{hf_dir}: tie_word_embeddings is true but 'lm_head.weight' "
                                                  "differs from 'model.embed_tokens.weight'")
                        del head
                    for stage in stages:
                        writers[(t, stage)].write(name, shard)
                    del shard
                bar.update(info.end - info.start)
        for key in list(writers):
            writers.pop(key).close()
        source = {"hf_dir": str(Path(hf_dir).resolve())}
        for p in range(pp):
            for t in range(tp):
                ckpt.write_meta(t, p, main_dtype, {"iteration": 0, "consumed_samples": 0, "source": source})
        _copy_side_files([Path(hf_dir)], staging / TOKENIZER_SUBDIR)
        ckpt.commit(main_dtype)
        replace_dir(staging, dest)
    except BaseException:
        for w in writers.values():
            w.abort()
        _abandon(staging, created)
        raise
    return dest / ckpt.final_dir.name


# ------------------------------------------------------------------------------------------ export
def _write_full_tensor(writer: SafetensorsWriter, hf_name: str, ckpt, name: str, dtype: torch.dtype) -> None:
    """Write the full, unpadded parameter ``name``. TP shards along dimension 0 (column-parallel and
    vocabulary rows) are written one by one at their rows, so memory holds one shard; other tensors
    are reassembled whole first (at most an MLP matrix)."""
    if tp_shard_dim(name) != 0 or ckpt.tp == 1:
        writer.write(hf_name, read_full_tensor(ckpt, name).to(dtype))
        return
    rows, start = ckpt.full_shape(name)[0], 0
    for t in range(ckpt.tp):
        shard = ckpt.read_shard(t, ckpt.source_stage(name), name)
        kept = min(shard.shape[0], rows - start)  # the vocabulary padding is dropped
        if kept > 0:
            writer.write_rows(hf_name, start, shard[:kept].to(dtype))
        start += shard.shape[0]
        del shard


def export_hf(load: str | os.PathLike, hf_dir: str | os.PathLike, iteration: int | None = None,
              max_shard_size: str | int = "5GB", tokenizer_dir: str | os.PathLike | None = None,
              dtype: str | torch.dtype | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write a HF Llama directory from an engine checkpoint of any layout (``latest`` by default).

    Weights go to ``model.safetensors``, or to ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json`` when larger than ``max_shard_size``; vocabulary padding is
    removed and a tied embedding is written once. Tokenizer files are copied from ``tokenizer_dir``,
    else from the checkpoint (``iter_N/``, ``<root>/tokenizer/``, ``<root>/``) when present.
    """
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    _check_iteration(load, iteration)
    ckpt = open_checkpoint(load, iteration)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ConversionError(f"{tokenizer_dir}: tokenizer directory does not exist")
    names = ckpt.names()
    out_dtype = {n: dtype if dtype is not None and ckpt.dtype(n).is_floating_point else ckpt.dtype(n)
                 for n in names}
    nbytes = {n: torch.Size(ckpt.full_shape(n)).numel() * out_dtype[n].itemsize for n in names}
    shards: list[list[str]] = [[]]
    for n in names:  # greedy, in model order; a tensor larger than the limit gets a file of its own
        if shards[-1] and sum(nbytes[m] for m in shards[-1]) + nbytes[n] > limit:
            shards.append([])
        shards[-1].append(n)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    dest = Path(hf_dir)
    staging, created = _staging_for(dest, force)
    try:
        config = ckpt.config.to_hf_dict()
        config["torch_dtype"] = config["dtype"] = dtype_name(dominant_dtype((out_dtype[n], nbytes[n]) for n in names))
        write_json_atomic(staging / "config.json", config)
        weight_map = {}
        with progress_bar(total=sum(nbytes.values()), unit="B", unit_scale=True, desc="export",
                          disable=not progress) as bar:
            for file, shard in zip(files, shards):
                specs = {engine_to_hf_name(n): (out_dtype[n], ckpt.full_shape(n)) for n in shard}
                with SafetensorsWriter(staging / file, specs, {"format": "pt"}) as w:
                    for n in shard:
                        _write_full_tensor(w, engine_to_hf_name(n), ckpt, n, out_dtype[n])
                        weight_map[engine_to_hf_name(n)] = file
                        bar.update(nbytes[n])
        if len(files) > 1:
            write_json_atomic(staging / "model.safetensors.index.json",
                              {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map})
        sources = [Path(tokenizer_dir)] if tokenizer_dir is not None else \
            [ckpt.path, ckpt.root / TOKENIZER_SUBDIR, ckpt.root]
        copied = _copy_side_files(sources, staging)
        if "tokenizer.model" in copied and "tokenizer_config.json" not in copied:
            write_json_atomic(staging / "tokenizer_config.json",
                              sentencepiece_tokenizer_config(staging / "tokenizer.model", ckpt.config))
        replace_dir(staging, dest)
    except BaseException:
        _abandon(staging, created)
        raise
    return dest


def describe(path: str | os.PathLike) -> str:
    """One paragraph about a checkpoint: iteration, layout, optimizer state, model size (for the CLI)."""
    ckpt = open_checkpoint(path)
    params = sum(torch.Size(ckpt.full_shape(n)).numel() for n in ckpt.names())
    c = ckpt.config
    dp = ckpt.layout.get("dp")
    optimizer = f"optimizer state ({', '.join(ckpt.optimizer_kinds)})" if ckpt.has_optimizer else "no optimizer state"
    virtual = ckpt.pipeline.virtual_stages
    return (f"{ckpt.path}: iteration {ckpt.iteration}, TP={ckpt.tp} x PP={ckpt.pp}"
            f"{f' x {virtual} virtual stages' if virtual > 1 else ''}"
            f"{f' (saved at DP={dp})' if dp else ''}, {optimizer}, "
            f"{params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"heads {c.num_attention_heads}/{c.num_key_value_heads}, vocab {c.vocab_size} "
            f"(padded {ckpt.padded_vocab_size}), dtype {ckpt.info.get('dtype')}")


__all__ = ["ConversionError", "OutputExistsError", "import_hf", "export_hf", "parse_size", "parse_dtype",
           "describe", "HF_SIDE_FILES"]
