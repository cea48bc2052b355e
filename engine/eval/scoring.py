"""Reward-class probabilities of held-out SAR records, read from a model's next-token distribution.

For every reward of every record (each reward field of each step), the model is given the record's
tokens before that reward's label (state, action and, in an episode, the earlier steps with their
observed rewards) and scores each class label of the field:

    score(k) = sum_i log p(c_k[i] | prefix, c_k[:i])       c_k: the tokens of class k's label
    P(k)     = exp(score(k)) / sum_j exp(score(j))          renormalised over the field's classes

A label of one token needs one next-token distribution, the one at the last prefix position, and
every single-token reward of a record is read from one forward pass of the record itself (a later
reward's prefix holds the earlier labels, as the record does). A label of several tokens (a
tokenizer without the label symbols, such as Llama-2's) is scored teacher-forced: one sequence per
class, ``prefix + c_k[:-1]``, whose last ``len(c_k)`` positions give its tokens' log-probabilities.

The model runs forward-only through the training schedules (:func:`engine.train.schedules.
forward_backward`) at any TP x PP layout, the rest of the world being data-parallel replicas that
score different batches. Sequences are sorted by length and padded at the end (causal attention:
padding never changes an earlier position). On the last pipeline stage each TP rank holds logits
for its slice of the vocabulary; only the few rows at scored positions are used, and the
log-probabilities of the candidate tokens come from two small all-reduces over TP (the row maxima,
then the sums of exponentials with the owned candidate logits): no rank ever gathers the
vocabulary. The results go to global rank 0.

Weights come from any engine checkpoint (a root with ``latest`` or an ``iter_N`` directory, any
saved TP / PP / virtual-stage layout) or a Hugging Face Llama directory (:func:`open_model_source`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import softmax

from engine.data.preprocess import expand_inputs, read_records
from engine.data.reward_bins import RewardBins
from engine.data.sar import SARRecord
from engine.data.synthetic import class_probabilities
from engine.data.tokenizer import RecordEncoder
from engine.model.config import LlamaConfig
from engine.model.hf import iter_hf_rank_shards
from engine.parallel.collectives import group_size
from engine.parallel.p2p import PipelineComm
from engine.parallel.state import ParallelState
from engine.parallel.tensor_parallel import build_model_chunks, lm_head_vocab_range
from engine.train.checkpoint import CHECKPOINT_JSON, LATEST, Checkpoint, load_rank_shard, open_checkpoint
from engine.train.schedules import forward_backward

# Microbatches per forward pass and pipeline stage: more shrink the pipeline bubble, at the cost of
# padding every microbatch of the pass to the pass's longest sequence.
MICROBATCHES_PER_STAGE = 4


class ScoringError(ValueError):
    """Inputs that cannot be scored (records, tokenizer, model); the message names which and why."""


# ----------------------------------------------------------------------------------- the model
def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face directory (config.json) rather than an engine checkpoint (latest / checkpoint.json)."""
    path = os.fspath(path)
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not any(os.path.exists(os.path.join(path, f)) for f in (LATEST, CHECKPOINT_JSON)))


@dataclass
class ModelSource:
    """Where the weights come from: an engine checkpoint (validated) or a Hugging Face directory."""

    path: str
    config: LlamaConfig
    checkpoint: Checkpoint | None = None    # None for a Hugging Face directory

    @property
    def kind(self) -> str:
        return "hf" if self.checkpoint is None else "engine"

    def run_config(self) -> dict | None:
        """The run config the training loop saved with the checkpoint (None: converted or HF)."""
        if self.checkpoint is None:
            return None
        run = self.checkpoint.extra.get("run")
        return run if isinstance(run, dict) else None

    def rank_shards(self, state: ParallelState) -> dict[str, torch.Tensor]:
        """This rank's parameter shards for ``state``'s TP x PP layout (one model chunk per rank)."""
        if self.checkpoint is None:
            return dict(iter_hf_rank_shards(self.path, self.config, state.tp_size, state.tp_rank,
                                            state.pp_size, state.pp_rank))
        return load_rank_shard(self.checkpoint, state.tp_rank, state.pp_rank, state.tp_size, state.pp_size)

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"Hugging Face directory {self.path}"
        c = self.checkpoint
        return f"engine checkpoint {c.path} (iteration {c.iteration}, saved at TP={c.tp} x PP={c.pp})"


def open_model_source(path: str | os.PathLike) -> ModelSource:
    """Validate ``path`` as an engine checkpoint or a Hugging Face directory (before any weight is
    read); a missing, incomplete or corrupt one raises an error naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ScoringError(f"{path}: no such checkpoint directory")
    if is_hf_dir(path):
        from engine.model.hf import plan_hf_tensors

        config, _, _ = plan_hf_tensors(path)  # every tensor checked against config.json
        return ModelSource(path, config)
    checkpoint = open_checkpoint(path)
    return ModelSource(path, checkpoint.config, checkpoint)


def load_model_chunks(source: ModelSource, state: ParallelState, dtype: torch.dtype = torch.float32) -> list:
    """This rank's model chunk (eval mode) with its weights, for ``state``'s TP x PP layout."""
    chunks = build_model_chunks(source.config, state, 1, sequence_parallel=False, seed=None,
                                device=state.device, dtype=dtype)
    shards = source.rank_shards(state)
    params = {n: p for chunk in chunks for n, p in chunk.named_parameters()}
    if missing := sorted(set(params) - set(shards)):
        raise ScoringError(f"{source.path}: no weights for {missing}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(shards[name].shape) != tuple(param.shape):
                raise ScoringError(f"{source.path}: {name} has shape {tuple(shards[name].shape)}, this rank "
                                   f"expects {tuple(param.shape)}")
            param.copy_(shards[name])
    return [chunk.eval() for chunk in chunks]


# ---------------------------------------------------------------------------------- the records
def read_eval_records(inputs: Sequence[str], max_records: int | None = None) -> list[SARRecord]:
    """Validated records of JSON Lines / OBD inputs (files, globs, directories). With
    ``max_records``, at most that many, taken from the input files in turn (one from each), so a cap
    still samples every file (logs are often one file per domain). A bad line raises RecordError."""
    paths = expand_inputs(inputs)
    if max_records is None:
        return list(read_records(paths))
    streams: list[Iterator[SARRecord]] = [read_records([p]) for p in paths]
    records: list[SARRecord] = []
    while streams and len(records) < max_records:
        alive = []
        for stream in streams:
            record = next(stream, None)
            if record is not None and len(records) < max_records:
                records.append(record)
                alive.append(stream)
        streams = alive
    return records


def true_class_probabilities(record: SARRecord, bins: RewardBins) -> list[np.ndarray] | None:
    """Per reward of the record (steps in order, fields in order), the exact class probabilities
    its ``meta.reward_dist`` gives (synthetic logs); None when the record carries no distribution."""
    if not isinstance(record.meta, dict) or "reward_dist" not in record.meta:
        return None
    dists = record.meta["reward_dist"]
    out = []
    try:
        for i, step in enumerate(record.steps):
            step_dists = dists[i] if isinstance(dists, list) else dists
            for name in step.reward:
                out.append(class_probabilities(step_dists[name], bins.get(record.domain, name)))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ScoringError(f"{record.where or 'record'}: meta.reward_dist does not describe its rewards "
                           f"({type(exc).__name__}: {exc})") from None
    return out


@dataclass(frozen=True)
class RewardSpanInfo:
    """One scored reward: which record, task and observed class."""

    record: int               # index of the record in the evaluated list
    where: str                # file:line of the record
    domain: str
    step: int
    field: str
    label: int                # the observed class
    num_classes: int
    true_probs: np.ndarray | None = None


@dataclass
class ScoringPlan:
    """What the model must compute: token sequences and, per scored token ("point"), the sequence,
    the position whose next-token distribution scores it, the token, and the (reward, class) slot
    whose summed log-probability it adds to. Reward i owns slots ``slot_start[i] .. slot_start[i+1]``."""

    spans: list[RewardSpanInfo]
    sequences: list[np.ndarray]
    point_sequence: np.ndarray
    point_position: np.ndarray
    point_token: np.ndarray
    point_slot: np.ndarray
    slot_start: np.ndarray
    num_records: int

    @property
    def num_slots(self) -> int:
        return int(self.slot_start[-1])


def build_plan(records: Sequence[SARRecord], encoder: RecordEncoder, max_positions: int | None = None) -> ScoringPlan:
    """The sequences and scored tokens of every reward of ``records`` (see the module docstring).

    Raises RecordError for a reward the bins cannot classify (naming file:line and field) and
    ScoringError for a record longer than ``max_positions`` tokens."""
    spans: list[RewardSpanInfo] = []
    sequences: list[np.ndarray] = []
    points: list[tuple[int, int, int, int]] = []   # (sequence, position, token, slot)
    slots = [0]
    for index, record in enumerate(records):
        encoded = encoder.encode(record)
        truth = true_class_probabilities(record, encoder.bins)
        first_sequence = len(sequences)
        if not encoded.spans:
            raise ScoringError(f"{record.where or 'record'}: no rewards to score")
        single: list[tuple[int, int, int]] = []    # points read from the record's own forward pass
        for j, span in enumerate(encoded.spans):
            if span.start == 0:
                raise ScoringError(f"{record.where}: reward '{span.field}' has no tokens before it")
            candidates = encoder.candidate_ids(record.domain, span.field)
            base = slots[-1]
            spans.append(RewardSpanInfo(index, record.where, record.domain, span.step, span.field,
                                        span.label_class, len(candidates), None if truth is None else truth[j]))
            slots.append(base + len(candidates))
            if all(len(c) == 1 for c in candidates):
                single += [(span.start - 1, c[0], base + k) for k, c in enumerate(candidates)]
                continue
            prefix = encoded.tokens[:span.start]
            for k, c in enumerate(candidates):
                seq = len(sequences)
                sequences.append(np.concatenate([prefix, np.asarray(c[:-1], dtype=np.int64)]))
                points += [(seq, span.start - 1 + i, c[i], base + k) for i in range(len(c))]
        if single:
            seq = len(sequences)
            sequences.append(encoded.tokens[:max(p[0] for p in single) + 1])
            points += [(seq, *p) for p in single]
        longest = max(len(s) for s in sequences[first_sequence:])
        if max_positions is not None and longest > max_positions:
            raise ScoringError(f"{record.where}: {longest} tokens to score, more than the model's "
                               f"max_position_embeddings {max_positions}")
    array = np.asarray(points, dtype=np.int64).reshape(-1, 4)
    return ScoringPlan(spans, sequences, array[:, 0].copy(), array[:, 1].copy(), array[:, 2].copy(),
                       array[:, 3].copy(), np.asarray(slots, dtype=np.int64), len(records))


# ---------------------------------------------------------------------------- the forward passes
def vocab_parallel_log_probs(rows: torch.Tensor, point_row: torch.Tensor, point_token: torch.Tensor,
                             vocab_start: int, vocab_size: int, group=None) -> torch.Tensor:
    """log p(token) at each point, from the rows of logits [R, local_vocab] holding this rank's
    columns ``vocab_start ..`` of the padded vocabulary (columns from ``vocab_size`` on are padding
    and take no part). Point i reads row ``point_row[i]``. Float64; two all-reduces over ``group``
    of R and R + P numbers."""
    rows = rows.double()
    local_vocab = rows.shape[-1]
    real = min(local_vocab, max(0, vocab_size - vocab_start))
    if real > 0:
        row_max = rows[:, :real].max(dim=-1).values
    else:
        row_max = rows.new_full(rows.shape[:1], float("-inf"))
    distributed = group_size(group) > 1
    if distributed:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    shifted = rows[:, :real] - row_max[:, None]
    local = point_token - vocab_start
    owned = (local >= 0) & (local < real)
    token_logit = torch.zeros(point_token.shape, dtype=torch.float64, device=rows.device)
    if real > 0:
        token_logit = torch.where(owned, shifted[point_row, local.clamp(0, real - 1)], token_logit)
    sums = torch.cat([shifted.exp().sum(dim=-1), token_logit])
    if distributed:
        dist.all_reduce(sums, group=group)
    count = rows.shape[0]
    return sums[count:] - sums[:count].log()[point_row]


def _passes(plan: ScoringPlan, batch_size: int, pp: int) -> list[list[list[int]]]:
    """Forward passes, each a list of microbatches (lists of sequence indices), longest sequences
    first; with PP > 1 a pass holds ``MICROBATCHES_PER_STAGE * pp`` microbatches (at least pp)."""
    order = sorted(range(len(plan.sequences)), key=lambda i: -len(plan.sequences[i]))
    micro = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_pass = 1 if pp == 1 else MICROBATCHES_PER_STAGE * pp
    return [micro[i:i + per_pass] for i in range(0, len(micro), per_pass)]


def _pass_microbatches(plan: ScoringPlan, micro: list[list[int]], pp: int, by_sequence: list[np.ndarray],
                       device) -> list[dict]:
    """The pass's microbatches, all of one shape [rows, longest] (what pipeline stages exchange), each
    with its points as (row in batch, position, token, point index); empty ones fill a pass up to pp."""
    rows = max(len(m) for m in micro)
    length = max(len(plan.sequences[s]) for m in micro for s in m)
    out = []
    for sequences in micro + [[]] * max(0, pp - len(micro)):
        tokens = np.zeros((rows, length), dtype=np.int64)
        parts = []
        for b, s in enumerate(sequences):
            tokens[b, :len(plan.sequences[s])] = plan.sequences[s]
            parts.append((np.full(len(by_sequence[s]), b), by_sequence[s]))
        ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        batch_row = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        out.append({"tokens": torch.from_numpy(tokens).to(device), "point_ids": ids,
                    "point_batch_row": batch_row, "point_position": plan.point_position[ids],
                    "point_token": plan.point_token[ids]})
    return out


@torch.no_grad()
def score_plan(plan: ScoringPlan, chunks: list, state: ParallelState, batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> np.ndarray | None:
    """The summed log-probability of every (reward, class) slot, on global rank 0 (None elsewhere).

    Every rank of the job calls it with the same plan. Each data-parallel replica runs every
    ``dp``-th pass through the layout's forward-only schedule; ``progress(n)`` is called on rank 0
    after each of its passes."""
    if batch_size < 1:
        raise ScoringError(f"batch size must be at least 1, got {batch_size}")
    pp = state.pp_size
    comm = PipelineComm(state) if pp > 1 else None
    group = state.tp_group if state.tp_size > 1 else None
    by_sequence: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(plan.sequences)
    order = np.argsort(plan.point_sequence, kind="stable")
    bounds = np.searchsorted(plan.point_sequence[order], np.arange(len(plan.sequences) + 1))
    for s in range(len(plan.sequences)):
        by_sequence[s] = order[bounds[s]:bounds[s + 1]]
    collected: list[tuple[np.ndarray, np.ndarray]] = []
    head = chunks[-1]
    zero = torch.zeros((), device=state.device)

    def loss_fn(logits: torch.Tensor, microbatch: dict):
        ids = microbatch["point_ids"]
        if len(ids):
            length = logits.shape[1]
            flat = microbatch["point_batch_row"] * length + microbatch["point_position"]
            unique, point_row = np.unique(flat, return_inverse=True)
            device = logits.device
            rows = logits.reshape(-1, logits.shape[-1])[torch.from_numpy(unique).to(device)]
            vocab_start, vocab_size = lm_head_vocab_range(head)
            log_probs = vocab_parallel_log_probs(rows, torch.from_numpy(point_row).to(device),
                                                 torch.from_numpy(microbatch["point_token"]).to(device),
                                                 vocab_start, vocab_size, group)
            if state.tp_rank == 0:
                collected.append((ids, log_probs.cpu().numpy()))
        return zero, zero

    for number, micro in enumerate(_passes(plan, batch_size, pp)):
        if number % state.dp_size != state.dp_rank:
            continue
        microbatches = _pass_microbatches(plan, micro, pp, by_sequence, state.device)
        forward_backward(chunks, microbatches, loss_fn, state=state, grads=None, forward_only=True,
                         virtual_stages=len(chunks), comm=comm)
        if progress is not None and state.rank == 0:
            progress(1)
    parts = _gather_to_rank0(collected, state)
    if parts is None:
        return None
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
    if not np.array_equal(np.sort(ids), np.arange(len(plan.point_token))):
        raise RuntimeError(f"scoring lost or repeated points: {len(ids)} results for {len(plan.point_token)} points")
    return np.bincount(plan.point_slot[ids], weights=values, minlength=plan.num_slots)


def _gather_to_rank0(collected: list, state: ParallelState) -> list | None:
    """Every rank's collected (point ids, log-probs) on global rank 0, None elsewhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return collected
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(collected, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    return [part for rank_parts in gathered for part in rank_parts]


# --------------------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class SpanPrediction:
    """The model's reward-class probabilities for one reward of one record."""

    record: int
    where: str
    domain: str
    step: int
    field: str
    label: int
    probs: np.ndarray
    true_probs: np.ndarray | None = None

    @property
    def task(self) -> str:
        """``domain/field``: the unit metrics are computed on (as the synthetic manifest's ceilings)."""
        return f"{self.domain}/{self.field}"

    def to_json(self) -> dict:
        out = {"record": self.record, "where": self.where, "domain": self.domain, "step": self.step,
               "field": self.field, "label": self.label, "probs": [float(p) for p in self.probs]}
        if self.true_probs is not None:
            out["true_probs"] = [float(p) for p in self.true_probs]
        return out


def predictions_from_scores(plan: ScoringPlan, slot_log_probs: np.ndarray) -> list[SpanPrediction]:
    """Each reward's class probabilities: its slots' summed log-probabilities, renormalised."""
    out = []
    for i, span in enumerate(plan.spans):
        scores = slot_log_probs[plan.slot_start[i]:plan.slot_start[i + 1]]
        out.append(SpanPrediction(span.record, span.where, span.domain, span.step, span.field, span.label,
                                  softmax(scores), span.true_probs))
    return out


def score_records(records: Sequence[SARRecord], encoder: RecordEncoder, chunks: list, state: ParallelState,
                  batch_size: int = 8, progress: Callable[[int], None] | None = None
                  ) -> list[SpanPrediction] | None:
    """:func:`build_plan` then :func:`score_plan`: every reward's class probabilities on rank 0."""
    plan = build_plan(records, encoder, chunks[0].config.max_position_embeddings)
    scores = score_plan(plan, chunks, state, batch_size, progress)
    return None if scores is None else predictions_from_scores(plan, scores)


def count_passes(plan: ScoringPlan, batch_size: int, state: ParallelState) -> int:
    """Forward passes this rank's data-parallel replica runs (for a progress bar)."""
    passes = len(_passes(plan, batch_size, state.pp_size))
    return len(range(state.dp_rank, passes, state.dp_size))


def check_tokenizer_matches(vocab_size: int, config: LlamaConfig, tokenizer_path: str) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's (ids would mean other tokens)."""
    if vocab_size != config.vocab_size:
        raise ScoringError(f"tokenizer {tokenizer_path} has a vocabulary of {vocab_size} tokens, the model "
                           f"has vocab_size {config.vocab_size}: use the tokenizer the model was trained with")

