"""What each file set of an engine checkpoint holds, and the layout records of ``checkpoint.json``.

A (TP rank, PP rank) file set stores, under global names, the local TP shards of every parameter
that pipeline rank holds in the checkpoint's :class:`~engine.parallel.layout.PipelineLayout`: all of
its model chunks (with virtual stages, several non-contiguous blocks of layers), the embedding on the
first rank, the final norm and head on the last, and with tied embeddings and PP > 1 the last rank's
copy of the embedding. ``checkpoint.json`` records that layout (``"pipeline"``) next to the run's
parallel sizes (``"layout"``); the helpers here build and validate both records.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from engine.model.config import LlamaConfig
from engine.model.llama import expected_shapes
from engine.parallel.layout import PipelineLayout, local_shape
from engine.safetensors_io import CheckpointError


def optimizer_key(name: str, kind: str) -> str:
    """Key of a parameter's optimizer tensor in ``optimizer.safetensors``: ``"{name}/{kind}"``."""
    return f"{name}/{kind}"


def pipeline_layout(config: LlamaConfig, pp: int, virtual_stages: int = 1) -> PipelineLayout:
    """The pipeline layout of ``config``'s layers over ``pp`` ranks with ``virtual_stages`` chunks each."""
    return PipelineLayout(config.num_hidden_layers, pp, virtual_stages, config.tie_word_embeddings)


def pp_rank_names(config: LlamaConfig, pipeline: PipelineLayout, pp_rank: int) -> list[str]:
    """Names of the parameters pipeline rank ``pp_rank`` holds over all its chunks (tied copy
    included), in canonical order."""
    if not 0 <= pp_rank < pipeline.pp:
        raise ValueError(f"pipeline rank {pp_rank} outside 0..{pipeline.pp - 1}")
    return pipeline.rank_names(expected_shapes(config), pp_rank)


def expected_rank_shapes(config: LlamaConfig, tp: int, pipeline: PipelineLayout,
                         pp_rank: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a (any TP rank, PP rank ``pp_rank``) file set holds, with its local shape."""
    full = expected_shapes(config)
    return {n: local_shape(n, full[n], config.vocab_size, tp) for n in pp_rank_names(config, pipeline, pp_rank)}


def recorded_layout(layout: Mapping | None, tp: int, pp: int, virtual_stages: int = 1) -> dict:
    """The layout ``checkpoint.json`` records: the caller's entries (DP size, sequence parallelism,
    distributed optimizer...) with ``tp`` and ``pp``; entries must be JSON values and agree with
    TP x PP and the pipeline's virtual stages."""
    if layout is None:
        layout = {}
    if not isinstance(layout, Mapping) or not all(isinstance(k, str) for k in layout):
        raise CheckpointError(f"layout must be a mapping with string keys, got {layout!r}")
    for key, want in (("tp", tp), ("pp", pp), ("virtual_stages", virtual_stages)):
        if key in layout and layout[key] != want:
            raise CheckpointError(f"layout says {key}={layout[key]!r} but the checkpoint is written for {key}={want}")
    dp = layout.get("dp")
    if dp is not None and (type(dp) is not int or dp < 1):
        raise CheckpointError(f"layout: dp must be a positive integer, got {dp!r}")
    try:
        json.dumps(dict(layout))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"layout: not JSON values only ({e})") from None
    return {"tp": tp, "pp": pp, "dp": None, **layout}


def recorded_pipeline(record, config: LlamaConfig, pp: int) -> PipelineLayout:
    """The pipeline layout of checkpoint.json's ``"pipeline"`` record; a checkpoint written before
    the record existed (``None``) is contiguous, one chunk per rank. A record that is not a layout
    of this model over ``pp`` ranks is refused, naming the field."""
    if record is None:
        return pipeline_layout(config, pp)
    if isinstance(record, dict):
        for key in ("pp", "virtual_stages"):
            if key in record and (type(record[key]) is not int):
                raise CheckpointError(f"'pipeline' record: {key} must be an integer, got {record[key]!r}")
        if record.get("pp", pp) != pp:
            raise CheckpointError(f"'pipeline' record says pp={record['pp']!r} but the checkpoint "
                                  f"has pp={pp}")
    try:
        return PipelineLayout.from_dict(record, config.num_hidden_layers, config.tie_word_embeddings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"'pipeline' record: {e}") from None


def check_optimizer_tensors(tensors: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str) -> list[str]:
    """Validate ``tensors[param_name][kind]`` against a rank's local ``shapes``; returns the kinds
    (sorted). Every parameter must have the same kinds; all problems are named in one error."""
    if not isinstance(tensors, Mapping) or not all(isinstance(v, Mapping) for v in tensors.values()):
        raise CheckpointError(f"{where}: expected a mapping parameter name -> tensor kind -> tensor")
    present = [n for n in shapes if n in tensors]
    kinds = sorted(tensors[present[0]], key=str) if present else []
    problems = {
        "missing parameter(s)": [n for n in shapes if n not in tensors],
        "unexpected parameter(s)": sorted(set(tensors) - set(shapes)),
        f"parameter(s) whose tensor kinds are not {kinds} like {present[:1]}":
            [n for n in present if sorted(tensors[n], key=str) != kinds],
        "tensor kind(s) that are not non-empty strings without '/'":
            [k for k in kinds if not isinstance(k, str) or not k or "/" in k] or ([] if kinds else ["(none given)"]),
        "mis-shaped or non-tensor value(s)":
            [f"{optimizer_key(n, k)} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__} "
             f"(expected {shapes[n]})" for n in present for k in kinds if k in tensors[n]
             for t in [tensors[n][k]] if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[n]],
    }
    if any(problems.values()):
        raise CheckpointError(f"{where}: " + "; ".join(f"{label} {items}" for label, items in problems.items() if items))
    return kinds


__all__ = ["optimizer_key", "pipeline_layout", "pp_rank_names", "expected_rank_shapes", "recorded_layout",
           "recorded_pipeline", "check_optimizer_tensors"]
