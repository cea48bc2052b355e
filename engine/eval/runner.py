"""One evaluation run behind ``tools/evaluate.py``: model, tokenizer, bins, records -> report and files.

    report = run_evaluation(EvalConfig(load="runs/sft", data=["logs/test"]))   # every rank calls it

What is not given is taken from the checkpoint: an engine checkpoint written by the training loop
records its run config, whose ``data.train`` datasets' ``.meta.json`` name the tokenizer, the
reward bins, whether records start with BOS, and the domains the run trained on (the in-domain
set). A Hugging Face directory (or a converted checkpoint) offers its ``tokenizer.model`` only.
Everything is checked before any weight is read: the tokenizer against the model's vocabulary and
against the reward-label tokens the training data used, every record against the bins.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from engine.config import parse_data_spec
from engine.data.reward_bins import RewardBins
from engine.data.sar import REWARD_LABELS
from engine.data.tokenizer import RecordEncoder, Tokenizer
from engine.eval.metrics import DEFAULT_RESAMPLES, evaluate_predictions, format_table, group_tasks
from engine.eval.scoring import (ModelSource, ScoringError, build_plan, check_tokenizer_matches, count_passes,
                                 load_model_chunks, open_model_source, predictions_from_scores, read_eval_records,
                                 score_plan)
from engine.fileio import atomic_open, progress_bar, write_json_atomic
from engine.train.checkpoint import CHECKPOINT_JSON

FORMAT = "ltu-eval"
VERSION = 1
DTYPES = ("fp32", "bf16", "fp16")
OUTPUT_FILES = ("eval.json", "predictions.jsonl", "roc.png", "calibration.png")


@dataclass
class EvalConfig:
    load: str                               # engine checkpoint (root or iter_N) or Hugging Face directory
    data: list[str]                         # held-out JSON Lines / OBD files, globs or directories
    tokenizer: str | None = None            # default: the training data's, else the checkpoint's tokenizer.model
    reward_bins: list[str] | None = None    # default: the training data's bins
    in_domain: list[str] | None = None      # default: the domains of the training data
    add_bos: bool | None = None             # default: as the training data was encoded
    tp: int = 1
    pp: int = 1
    batch_size: int = 8
    max_records: int | None = None
    out: str | None = None
    plots: bool = True                      # roc.png and calibration.png beside eval.json
    dtype: str = "fp32"
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    progress: bool = True


@dataclass
class EvalInputs:
    """What the scoring uses, with where each default came from."""

    tokenizer: str
    reward_bins: list[str]
    add_bos: bool
    in_domain: list[str] | None
    in_domain_source: str | None
    training_label_ids: dict | None = field(default=None, repr=False)


def training_data_meta(source: ModelSource) -> list[tuple[str, dict]]:
    """(prefix, meta) of each ``data.train`` dataset of the run that wrote the checkpoint whose
    ``.meta.json`` is readable; empty for a converted checkpoint or a Hugging Face directory."""
    run = source.run_config()
    if not run or not isinstance(run.get("data"), dict) or not run["data"].get("train"):
        return []
    out = []
    for _, prefix in parse_data_spec(run["data"]["train"], "data.train of the checkpoint's run"):
        try:
            with open(f"{prefix}.meta.json", encoding="utf-8") as fh:
                out.append((prefix, json.load(fh)))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _checkpoint_tokenizer(source: ModelSource) -> str | None:
    if source.checkpoint is None:
        candidates = [os.path.join(source.path, "tokenizer.model")]
    else:
        ckpt = source.checkpoint
        candidates = [os.path.join(ckpt.path, "tokenizer.model"), os.path.join(ckpt.root, "tokenizer", "tokenizer.model"),
                      os.path.join(ckpt.root, "tokenizer.model")]
    return next((c for c in candidates if os.path.isfile(c)), None)


def resolve_inputs(cfg: EvalConfig, source: ModelSource) -> EvalInputs:
    """The tokenizer, bins, BOS setting and in-domain list: given, else from the checkpoint."""
    metas = training_data_meta(source)
    where = f"the training data of {source.path} ({', '.join(p for p, _ in metas)})" if metas else None
    tokenizer = cfg.tokenizer
    if tokenizer is None:
        tokenizer = metas[0][1].get("tokenizer", {}).get("model") if metas else _checkpoint_tokenizer(source)
        if tokenizer is None:
            raise ScoringError(f"--tokenizer not given and {source.path} names none (no training data "
                               "meta.json of its run, no tokenizer.model beside it): pass --tokenizer")
    bins = cfg.reward_bins
    if not bins:
        bins = [os.path.join(os.path.dirname(p), m["reward_bins"]) for p, m in metas if m.get("reward_bins")]
        if not bins:
            raise ScoringError(f"--reward-bins not given and {source.path} has no training data whose "
                               "reward bins could be read: pass --reward-bins (the training split's "
                               "<prefix>.reward_bins.json)")
    add_bos = cfg.add_bos if cfg.add_bos is not None else bool(metas and metas[0][1].get("add_bos"))
    in_domain, in_source = cfg.in_domain, "--in-domain" if cfg.in_domain is not None else None
    if in_domain is None and metas:
        in_domain = sorted({d for _, m in metas for d in m.get("domains", {})})
        in_source = where
    label_ids = metas[0][1].get("reward_label_ids") if metas and cfg.tokenizer is not None else None
    return EvalInputs(tokenizer, list(bins), add_bos, in_domain, in_source, label_ids)


def build_encoder(inputs: EvalInputs, source: ModelSource) -> RecordEncoder:
    """The record encoder, refusing a tokenizer that is not the model's."""
    tokenizer = Tokenizer(inputs.tokenizer)
    check_tokenizer_matches(tokenizer.vocab_size, source.config, inputs.tokenizer)
    bins = RewardBins.merge([RewardBins.load(p) for p in inputs.reward_bins])
    encoder = RecordEncoder(tokenizer, bins, add_bos=inputs.add_bos)
    if inputs.training_label_ids is not None:
        used = {label: list(ids) for label, ids in zip(REWARD_LABELS, encoder.label_ids)}
        if used != inputs.training_label_ids:
            raise ScoringError(f"tokenizer {inputs.tokenizer} encodes the reward labels to other tokens than "
                               f"the tokenizer of {source.path}'s training data: use that tokenizer")
    return encoder


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ScoringError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def run_evaluation(cfg: EvalConfig, log=print) -> dict | None:
    """Score ``cfg.data`` with the model of ``cfg.load`` at TP x PP (the rest of the world
    data-parallel); on global rank 0 compute the report, print the table (through ``log``) and
    write the files under ``cfg.out``; returns the report there, None on other ranks."""
    import torch.distributed as dist

    from engine.parallel.state import init_parallel, validate_layout

    began = time.perf_counter()
    if cfg.batch_size < 1 or cfg.tp < 1 or cfg.pp < 1:
        raise ScoringError(f"batch size, TP and PP must be at least 1, got {cfg.batch_size}, {cfg.tp}, {cfg.pp}")
    dtype = _dtype(cfg.dtype)
    source = open_model_source(cfg.load)
    inputs = resolve_inputs(cfg, source)
    encoder = build_encoder(inputs, source)
    records = read_eval_records(cfg.data, cfg.max_records)
    if not records:
        raise ScoringError(f"no records in {' '.join(cfg.data)}")
    plan = build_plan(records, encoder, source.config.max_position_embeddings)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.tp * cfg.pp > 1:
        raise ScoringError(f"TP {cfg.tp} x PP {cfg.pp} needs {cfg.tp * cfg.pp} processes (or a multiple): "
                           f"launch with torchrun --nproc_per_node {cfg.tp * cfg.pp}")
    validate_layout(source.config, cfg.tp, cfg.pp, world_size=world)

    state = init_parallel(cfg.tp, cfg.pp)
    chunks = load_model_chunks(source, state, dtype)
    loaded = time.perf_counter()
    is_rank0 = state.rank == 0
    if is_rank0:
        log(f"model: {source.describe()}; scoring at TP={state.tp_size} x PP={state.pp_size} x "
            f"DP={state.dp_size} in {cfg.dtype} on {state.device.type}")
        log(f"data: {plan.num_records} records, {len(plan.spans)} rewards, {len(plan.sequences)} sequences "
            f"({len(plan.point_token)} scored tokens); in-domain: "
            f"{', '.join(inputs.in_domain) if inputs.in_domain is not None else 'unknown'}"
            f"{f' (from {inputs.in_domain_source})' if inputs.in_domain_source else ''}")
    bar = progress_bar(total=count_passes(plan, cfg.batch_size, state), unit=" passes",
                       disable=not (cfg.progress and is_rank0))
    with bar:
        scores = score_plan(plan, chunks, state, cfg.batch_size, progress=bar.update)
    scored = time.perf_counter()
    if not is_rank0:
        return None
    predictions = predictions_from_scores(plan, scores)
    report = evaluate_predictions(predictions, inputs.in_domain, cfg.resamples, cfg.seed)
    seconds = {"load": loaded - began, "score": scored - loaded, "metrics": time.perf_counter() - scored}
    report = {"format": FORMAT, "version": VERSION, "model": source.describe(), "load": os.path.abspath(cfg.load),
              "data": [os.path.abspath(d) for d in cfg.data], "tokenizer": os.path.abspath(inputs.tokenizer),
              "reward_bins": [os.path.abspath(b) for b in inputs.reward_bins], "add_bos": inputs.add_bos,
              "in_domain_source": inputs.in_domain_source,
              "layout": {"tp": state.tp_size, "pp": state.pp_size, "dp": state.dp_size}, "dtype": cfg.dtype,
              "batch_size": cfg.batch_size, "records": plan.num_records, "rewards": len(plan.spans),
              "seconds": seconds, "records_per_s": plan.num_records / max(seconds["score"], 1e-9), **report}
    log(format_table(report))
    log(f"scored {plan.num_records} records ({len(plan.spans)} rewards) in {seconds['score']:.2f} s: "
        f"{report['records_per_s']:.1f} records/s (model load {seconds['load']:.2f} s)")
    if cfg.out:
        for path in write_outputs(cfg.out, report, predictions, plots=cfg.plots):
            log(f"wrote {path}")
    return report


def write_outputs(out_dir: str, report: dict, predictions: list, plots: bool = True) -> list[str]:
    """``eval.json``, ``predictions.jsonl`` and (with ``plots``) ``roc.png`` and ``calibration.png``
    under ``out_dir``, each written whole or not at all."""
    if os.path.isfile(os.path.join(out_dir, CHECKPOINT_JSON)) or os.path.isfile(os.path.join(out_dir, "latest")):
        raise ScoringError(f"--out {out_dir} is a checkpoint directory: write the evaluation elsewhere")
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in OUTPUT_FILES]
    with atomic_open(paths[1]) as fh:
        for p in predictions:
            fh.write(json.dumps(p.to_json(), separators=(",", ":")) + "\n")
    if plots:
        from engine.eval.plots import plot_calibration, plot_roc  # matplotlib only when drawing

        tasks = group_tasks(predictions)
        plot_roc(tasks, paths[2])
        plot_calibration(tasks, paths[3])
    else:
        paths = paths[:2]
    write_json_atomic(paths[0], report)  # last: its presence says the others are complete
    return paths
