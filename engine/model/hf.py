"""Reading Hugging Face Llama directories: config, tensor names, streamed tensors, a one-process model.

A HF directory holds ``config.json`` and either ``model.safetensors`` or shards ``model-*.safetensors``
listed by ``model.safetensors.index.json``. :func:`plan_hf_tensors` checks every tensor against
``config.json`` from the safetensors headers alone, before any data is read; both
:func:`load_hf_model` and :func:`engine.convert.sharded.import_hf` start from its plan and then read
one tensor at a time, so memory never holds more than the tensor being converted (plus, for
:func:`load_hf_model`, the model being built).

    model = load_hf_model("path/to/llama")      # engine Llama, one process, no torchrun
    logits = model(token_ids)                   # [batch, seq] -> [batch, seq, vocab]
    shards = dict(iter_hf_rank_shards("path/to/llama", config, tp=2, tp_rank=1))  # one TP rank's weights
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.model.config import LlamaConfig, config_differences
from engine.model.llama import Llama, expected_shapes
from engine.parallel.layout import (PipelineLayout, canonical_order, is_vocab_parallel, pad_rows, tp_shard,
                                   tp_shard_dim, vocab_shard_range)
from engine.parallel.state import validate_layout
from engine.safetensors_io import TensorInfo, read_header, read_rows, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HF_PREFIX = "model."
# Non-parameter buffers that some older HF Llama checkpoints saved; recomputed from the config.
_IGNORED_HF_TENSOR = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_to_engine_name(name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj.weight``; lm_head unchanged."""
    if name == "lm_head.weight":
        return name
    if name.startswith(_HF_PREFIX):
        return name[len(_HF_PREFIX):]
    raise ValueError(f"tensor {name!r} is not a Hugging Face LlamaForCausalLM parameter name")


def engine_to_hf_name(name: str) -> str:
    """``layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``; lm_head unchanged."""
    return name if name == "lm_head.weight" else _HF_PREFIX + name


def hf_weight_files(hf_dir: str | os.PathLike) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it, after validating the directory.

    With an index: every shard it lists must exist, hold every tensor the index assigns to it, and
    hold nothing the index does not list. Errors name the file and tensors.
    """
    hf_dir = os.fspath(hf_dir)
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            if os.path.basename(file) != file:
                raise ValueError(f"{index_path}: shard {file!r} of tensor {name!r} is not a plain file name")
            by_file.setdefault(file, set()).add(name)
        missing_files = sorted(f for f in by_file if not os.path.isfile(os.path.join(hf_dir, f)))
        if missing_files:
            raise FileNotFoundError(f"{index_path}: shard file(s) missing from {hf_dir}: {missing_files}")
        locations = {}
        for file, names in sorted(by_file.items()):
            path = os.path.join(hf_dir, file)
            present = set(_safetensors_keys(path))
            absent = sorted(names - present)
            if absent:
                raise ValueError(f"{path}: tensor(s) listed in {INDEX_FILE} but absent: {absent}")
            unlisted = sorted(present - names)
            if unlisted:
                raise ValueError(f"{path}: tensor(s) not listed in {INDEX_FILE} for this file: {unlisted}")
            locations.update((name, path) for name in names)
        return locations
    if os.path.isfile(single_path):
        return {name: single_path for name in _safetensors_keys(single_path)}
    others = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))) \
        if os.path.isdir(hf_dir) else []
    hint = f" (found {others}: only safetensors weights are read)" if others else ""
    raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _safetensors_keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def iter_hf_tensors(hf_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) one at a time, file by file, after validating the whole directory.

    Saved rotary ``inv_freq`` buffers of old checkpoints are skipped (they are not parameters).
    """
    by_path: dict[str, list[str]] = {}
    for name, path in hf_weight_files(hf_dir).items():
        if not _IGNORED_HF_TENSOR.match(name):
            by_path.setdefault(path, []).append(name)
    for path, names in sorted(by_path.items()):
        with safe_open(path, framework="pt") as f:
            for name in sorted(names):
                yield name, f.get_tensor(name)


def plan_hf_tensors(hf_dir: str | os.PathLike):
    """Check a HF directory against its config.json without reading tensor data.

    Returns ``(config, plan, tied_head)``: ``plan[engine_name] = (hf_name, file, TensorInfo)`` and
    ``tied_head`` the location of a redundant ``lm_head.weight`` saved beside tied embeddings.
    Raises ValueError listing every missing, unexpected and mis-shaped tensor.
    """
    hf_dir = Path(hf_dir)
    config = LlamaConfig.from_hf_dir(hf_dir)
    expected = expected_shapes(config)
    locations = hf_weight_files(hf_dir)
    headers = {path: read_header(path)[0] for path in set(locations.values())}
    plan, tied_head, unexpected, misshaped, misshaped_names = {}, None, [], [], set()
    for hf_name, path in sorted(locations.items()):
        if _IGNORED_HF_TENSOR.match(hf_name):
            continue
        info = headers[path][hf_name]
        try:
            name = hf_to_engine_name(hf_name)
        except ValueError:
            unexpected.append(hf_name)
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = (path, info)
            if info.shape != expected["embed_tokens.weight"]:
                misshaped.append(f"{hf_name} {list(info.shape)} (tied to the embedding: "
                                 f"{list(expected['embed_tokens.weight'])})")
        elif name not in expected:
            unexpected.append(hf_name)
        elif info.shape != expected[name]:
            misshaped_names.add(name)
            misshaped.append(f"{hf_name} {list(info.shape)} (config.json implies {list(expected[name])})")
        else:
            plan[name] = (hf_name, path, info)
    missing = [engine_to_hf_name(n) for n in canonical_order(expected)
               if n not in plan and n not in misshaped_names]
    problems = [f"{label}: {items}" for label, items in (
        ("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
        ("mis-shaped tensor(s)", misshaped)) if items]
    if problems:
        raise ValueError(f"{hf_dir}: " + "; ".join(problems))
    return config, plan, tied_head


def read_hf_shard(name: str, path: str, info: TensorInfo, tp: int, tp_rank: int) -> torch.Tensor:
    """``tp_rank``'s slice of a HF tensor, as :func:`tp_shard` of the whole tensor gives it.

    Slices along dimension 0 (column-parallel and vocabulary rows) are contiguous in the file and
    read alone, so peak memory is one shard; row-parallel slices (dimension 1) are cut from the
    whole tensor, which is at most an MLP or attention output matrix.
    """
    if tp_shard_dim(name) != 0 or tp == 1 and not is_vocab_parallel(name):
        return tp_shard(name, read_tensor(path, info), tp, tp_rank)
    rows = info.shape[0]
    if is_vocab_parallel(name):
        start, end = vocab_shard_range(rows, tp, tp_rank)
        return pad_rows(read_rows(path, info, min(start, rows), min(end, rows)), end - start)
    if rows % tp:
        raise ValueError(f"{name}: dimension 0 of size {rows} is not divisible by the tensor-parallel size {tp}")
    per = rows // tp
    return read_rows(path, info, tp_rank * per, (tp_rank + 1) * per)


def iter_hf_rank_shards(hf_dir: str | os.PathLike, config: LlamaConfig, tp: int, tp_rank: int, pp: int = 1,
                        pp_rank: int = 0, *, virtual_stages: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, this rank's shard) for every parameter pipeline rank ``pp_rank`` holds
    (all its ``virtual_stages`` model chunks, see :class:`~engine.parallel.layout.PipelineLayout`),
    in canonical order, read from a HF Llama directory one tensor at a time (dimension-0 slices
    without the whole tensor): how a training run on TP x PP starts from Hugging Face weights. The
    directory must hold the model ``config`` describes (differences are named) and is checked whole
    before any tensor is read."""
    hf_config, plan, tied_head = plan_hf_tensors(hf_dir)
    if diff := config_differences(hf_config, config):
        raise ValueError(f"{hf_dir}: weights of another model; config differs: {'; '.join(diff)}")
    validate_layout(config, tp, pp, virtual_stages=virtual_stages)
    if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside the layout TP={tp} x PP={pp}")
    pipeline = PipelineLayout(config.num_hidden_layers, pp, virtual_stages, config.tie_word_embeddings)
    for name in pipeline.rank_names(plan, pp_rank):
        _, path, info = plan[name]
        shard = read_hf_shard(name, path, info, tp, tp_rank)
        if name == "embed_tokens.weight" and tied_head is not None and \
                not torch.equal(read_hf_shard(name, *tied_head, tp, tp_rank), shard):
            raise ValueError(f"{hf_dir}: tie_word_embeddings is true but 'lm_head.weight' differs from "
                             "'model.embed_tokens.weight'")
        yield name, shard


def load_hf_model(hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Llama:
    """The engine Llama with the weights of a HF Llama directory, in this process (eval mode).

    Every tensor is checked before any is read: missing, unexpected and mis-shaped tensors are all
    named in one error. With tied embeddings the file may or may not contain ``lm_head.weight``;
    when it does it must equal ``model.embed_tokens.weight``.
    """
    config, plan, tied_head = plan_hf_tensors(hf_dir)
    state = {name: read_tensor(path, info).to(device=device, dtype=dtype)
             for name, (_, path, info) in plan.items()}
    if tied_head is not None and not torch.equal(read_tensor(*tied_head).to(device, dtype),
                                                 state["embed_tokens.weight"]):
        raise ValueError(f"{hf_dir}: tie_word_embeddings is true but 'lm_head.weight' differs from "
                         "'model.embed_tokens.weight'")

    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
