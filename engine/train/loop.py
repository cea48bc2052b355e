"""The training loop behind ``torchrun tools/pretrain.py``: build everything, then step, log, evaluate, save.

    train(run_config)   # every process of the job calls it with the same config

Set-up checks everything that can fail before any work (layout, batch sizes, data prefixes, the
vocabulary of data and model, the checkpoint to resume), the same way on every rank, so a bad input
stops every rank with the same message instead of leaving some waiting on a collective. The loop
itself has no layout special cases: the schedule is chosen by the layout (engine.train.schedules),
gradients are finalised by the grad buffer, the optimizer works on whatever slice this rank owns.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from engine.config import RunConfig, config_to_dict, parse_data_spec
from engine.data.batches import BatchLoader, build_dataset, read_vocab_size
from engine.model.config import LlamaConfig, config_differences
from engine.model.hf import iter_hf_rank_shards
from engine.model.llama import expected_shapes
from engine.ops import CheckShapes, Ops
from engine.parallel.state import ParallelState, init_parallel, validate_layout
from engine.parallel.p2p import PipelineComm
from engine.parallel.tensor_parallel import build_model_chunks, pipeline_layout, sequence_parallel_names
from engine.train import checkpoint as ckpt_io
from engine.train.grads import GradBuffer
from engine.train.lr import LRSchedule
from engine.train.metrics import (MetricsWriter, StepMetrics, device_name, device_peak_tflops, format_log_line,
                                  memory_gib, model_flops_per_token, plot_loss_curve)
from engine.train.optimizer import AdamWConfig, MixedPrecisionAdamW
from engine.train.schedules import check_microbatches, get_forward_backward
from engine.train.step import evaluate_loss, train_step

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Run settings that fix the sample order: a resumed run must not change them. train.iters is among
# them because the sample index is built for iters x global_batch_size samples, and another count can
# change the epochs and with them the order of samples already consumed.
_ORDER_FIELDS = (("data", "train"), ("data", "seq_length"), ("train", "seed"), ("train", "global_batch_size"),
                 ("train", "stage"), ("train", "iters"))


class TrainingError(RuntimeError):
    """The run cannot go on (repeated NaN/Inf steps, data exhausted); the message names why."""


@dataclass
class RunState:
    iteration: int = 0          # optimizer steps completed
    consumed_samples: int = 0
    skipped_total: int = 0
    skipped_in_a_row: int = 0
    last_loss: float | None = None
    last_valid_loss: float | None = None
    history: list = field(default_factory=list)


def _rank0(state: ParallelState) -> bool:
    return state.rank == 0


def _model_given(cfg: RunConfig) -> bool:
    m = cfg.model
    return m.preset is not None or m.hf_config is not None or any(
        getattr(m, f) is not None for f in ("hidden_size", "num_hidden_layers", "num_attention_heads"))


def _is_hf_dir(path: str) -> bool:
    """A Hugging Face directory (config.json) rather than an engine checkpoint (latest / checkpoint.json)."""
    engine_files = (ckpt_io.LATEST, ckpt_io.CHECKPOINT_JSON)
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not any(os.path.exists(os.path.join(path, f)) for f in engine_files))


def resolve_model_config(cfg: RunConfig) -> LlamaConfig:
    """The model: model.* fields, else the architecture of checkpoint.load / checkpoint.init. The
    vocabulary comes from the training data's tokenizer unless model.vocab_size is given; a
    different vocabulary in data and model is refused by name."""
    data_vocab = None
    for _, prefix in parse_data_spec(cfg.data.train, "data.train"):
        vocab = read_vocab_size(prefix)
        if vocab is not None and data_vocab is not None and vocab != data_vocab:
            raise ValueError(f"data.train: prefixes were tokenized with different vocabularies "
                             f"({data_vocab} and {vocab} for {prefix})")
        data_vocab = vocab if vocab is not None else data_vocab
    source = cfg.checkpoint.load or cfg.checkpoint.init
    if _model_given(cfg):
        config = cfg.model.to_llama_config(None if cfg.model.vocab_size is not None else data_vocab)
    elif source is not None and _is_hf_dir(source):
        config = LlamaConfig.from_hf_dir(source)
    elif source is not None:
        config = ckpt_io.open_checkpoint(source).config
    else:
        config = cfg.model.to_llama_config(data_vocab)  # raises, naming the missing fields
    if data_vocab is not None and data_vocab != config.vocab_size:
        raise ValueError(f"vocabulary mismatch: data.train was tokenized with a vocabulary of {data_vocab} "
                         f"tokens, the model has vocab_size {config.vocab_size}; use the model's tokenizer "
                         "for preprocessing, or set model.vocab_size")
    return config


def _check_layout(cfg: RunConfig, config: LlamaConfig, world_size: int) -> int:
    p, t = cfg.parallel, cfg.train
    validate_layout(config, p.tp, p.pp, world_size=world_size, virtual_stages=p.virtual_stages)
    dp = world_size // (p.tp * p.pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size {t.global_batch_size} is not divisible by "
                         f"train.micro_batch_size {t.micro_batch_size} x data-parallel size {dp} "
                         f"(world size {world_size} / (tp {p.tp} x pp {p.pp}))")
    check_microbatches(p.pp, p.virtual_stages, t.global_batch_size // (t.micro_batch_size * dp))
    if p.sequence_parallel and p.tp > 1 and cfg.data.seq_length % p.tp:
        raise ValueError(f"parallel.sequence_parallel: data.seq_length {cfg.data.seq_length} is not a "
                         f"multiple of parallel.tp {p.tp}")
    return dp


def _world_size_from_env() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _check_resume(cfg: RunConfig, config: LlamaConfig, ckpt: ckpt_io.Checkpoint) -> None:
    if diff := config_differences(ckpt.config, config):
        raise ValueError(f"checkpoint.load {ckpt.path}: a checkpoint of another model ({'; '.join(diff)})")
    saved = ckpt.extra.get("run")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint.load {ckpt.path}: not a training checkpoint (no run config recorded; "
                         "a converted model starts a run with checkpoint.init)")
    if not ckpt.has_optimizer:
        raise ValueError(f"checkpoint.load {ckpt.path}: holds no optimizer state; use checkpoint.init")
    now = config_to_dict(cfg)
    changed = [f"{s}.{f}: {saved.get(s, {}).get(f)!r} -> {now[s][f]!r}" for s, f in _ORDER_FIELDS
               if saved.get(s, {}).get(f) != now[s][f]]
    if changed:
        raise ValueError(f"checkpoint.load {ckpt.path}: cannot continue this run with other data settings "
                         f"({'; '.join(changed)}); start a new run from it with checkpoint.init")


# ------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- the components
class Trainer:
    """Everything one process of a run holds; :meth:`run` trains to ``train.iters``."""

    def __init__(self, cfg: RunConfig, log=print):
        cfg.validate()
        self.cfg, self.log_fn = cfg, log
        t, p = cfg.train, cfg.parallel
        self.config = resolve_model_config(cfg)
        self.dp = _check_layout(cfg, self.config, _world_size_from_env())
        load = ckpt_io.open_checkpoint(cfg.checkpoint.load) if cfg.checkpoint.load else None
        if load is not None:
            _check_resume(cfg, self.config, load)
        cache = cfg.data.index_cache_dir()
        self.train_data = build_dataset(cfg.data.train, t.stage, cfg.data.seq_length,
                                        t.iters * t.global_batch_size, t.seed, cache, name="data.train")
        self.valid_data = None
        if cfg.data.valid and t.eval_interval > 0:
            self.valid_data = build_dataset(cfg.data.valid, t.stage, cfg.data.seq_length,
                                            t.eval_iters * t.global_batch_size, t.seed, cache, name="data.valid")
        self.schedule = LRSchedule(t.lr, t.min_lr, t.warmup_iters, t.decay_iters, t.lr_decay)

        self.state = init_parallel(p.tp, p.pp, timeout_s=p.timeout_s)
        seed_everything(t.seed)
        self.dtype = DTYPES[t.dtype]
        self.pipeline = pipeline_layout(self.config, self.state, p.virtual_stages)
        self.chunks = build_model_chunks(self.config, self.state, p.virtual_stages,
                                         sequence_parallel=p.sequence_parallel,
                                         seed=None if (load or cfg.checkpoint.init) else t.seed,
                                         device=self.state.device, dtype=self.dtype)
        for chunk in self.chunks:
            chunk.activation_checkpointing = t.recompute
        self.comm = PipelineComm(self.state) if self.state.pp_size > 1 else None
        self.ops, self.kernel_verdicts = Ops(t.kernels), None
        if t.kernels != "torch" and self.state.device.type == "cuda":
            # Each kernel proves itself on this device once, against PyTorch; under "auto" a failing
            # one falls back to PyTorch (with a warning) instead of silently training a wrong model.
            self.kernel_verdicts = self.ops.self_check(self.state.device, self.dtype if self.dtype != torch.float32
                                                       else torch.bfloat16, shapes=CheckShapes.for_model(self.config))
        for chunk in self.chunks:
            chunk.set_ops(self.ops)
        self.grads = GradBuffer(self.chunks, self.state, bucket_size=p.bucket_size,
                                distributed_optimizer=p.distributed_optimizer, overlap=p.overlap_grad_reduce,
                                sequence_parallel_names=set().union(*map(sequence_parallel_names, self.chunks)),
                                pipeline=self.pipeline)
        self.optimizer = MixedPrecisionAdamW(self.grads, AdamWConfig(
            lr=t.lr, weight_decay=t.weight_decay, beta1=t.adam_beta1, beta2=t.adam_beta2, eps=t.adam_eps))
        self.run_state = RunState()
        self.last_checkpoint: str | None = None  # newest checkpoint of this run: saved, or resumed from
        self.loader = BatchLoader(self.train_data, t.global_batch_size, t.micro_batch_size, self.state.dp_rank,
                                  self.dp, self.config.vocab_size)
        if load is not None:
            self._resume(load)
        elif cfg.checkpoint.init:
            self._init_weights(cfg.checkpoint.init)
        self.metrics = None
        if _rank0(self.state) and cfg.checkpoint.save:
            os.makedirs(cfg.checkpoint.save, exist_ok=True)
            self.metrics = MetricsWriter(os.path.join(cfg.checkpoint.save, "metrics.jsonl"),
                                         os.path.join(cfg.checkpoint.save, "tensorboard"))
            self.metrics.truncate_after(self.run_state.iteration)
        self.flops_per_token = model_flops_per_token(self.config, cfg.data.seq_length, t.recompute)
        self.peak = device_peak_tflops(self.state.device)

    def log(self, text: str) -> None:
        if _rank0(self.state):
            self.log_fn(text)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameters over all its chunks, by global name."""
        return {n: p for chunk in self.chunks for n, p in chunk.named_parameters()}

    # ---------------------------------------------------------------------------- weights in
    def _copy_weights(self, shards: dict[str, torch.Tensor], source: str) -> None:
        params = self.named_parameters()
        missing = sorted(set(params) - set(shards))
        if missing:
            raise ValueError(f"{source}: no weights for {missing}")
        with torch.no_grad():
            for name, p in params.items():
                if tuple(shards[name].shape) != tuple(p.shape):
                    raise ValueError(f"{source}: {name} has shape {tuple(shards[name].shape)}, this rank "
                                     f"expects {tuple(p.shape)}")
                p.copy_(shards[name])
        self.optimizer.reload_master_from_params()

    def _init_weights(self, path: str) -> None:
        s = self.state
        if _is_hf_dir(path):
            shards = dict(iter_hf_rank_shards(path, self.config, s.tp_size, s.tp_rank, s.pp_size, s.pp_rank,
                                              virtual_stages=self.pipeline.virtual_stages))
        else:
            ckpt = ckpt_io.open_checkpoint(path)
            if diff := config_differences(ckpt.config, self.config):
                raise ValueError(f"checkpoint.init {path}: weights of another model ({'; '.join(diff)})")
            shards = ckpt_io.load_rank_shard(ckpt, s.tp_rank, s.pp_rank, s.tp_size, s.pp_size,
                                             virtual_stages=self.pipeline.virtual_stages)
        self._copy_weights(shards, f"checkpoint.init {path}")
        self.log(f"initialised weights from {path} (fresh optimizer, iteration 0)")

    def _resume(self, ckpt: ckpt_io.Checkpoint) -> None:
        s, v = self.state, self.pipeline.virtual_stages
        self._copy_weights(ckpt_io.load_rank_shard(ckpt, s.tp_rank, s.pp_rank, s.tp_size, s.pp_size, virtual_stages=v),
                           f"checkpoint.load {ckpt.path}")
        tensors, opt_state = ckpt_io.load_rank_optimizer(ckpt, s.tp_rank, s.pp_rank, s.tp_size, s.pp_size,
                                                         virtual_stages=v)
        self.optimizer.load_state_tensors(tensors, int(opt_state["steps"]))
        counters = ckpt.extra["counters"]
        self.run_state = RunState(iteration=ckpt.iteration, consumed_samples=int(counters["consumed_samples"]),
                                  skipped_total=int(counters["skipped_total"]),
                                  skipped_in_a_row=int(counters["skipped_in_a_row"]))
        self.loader.load_state_dict({"consumed_samples": self.run_state.consumed_samples})
        same = s.tp_size == ckpt.tp and s.pp_size == ckpt.pp
        meta = ckpt.meta(s.tp_rank if same else 0, s.pp_rank if same else 0)
        set_rng_state(meta["rng"])
        self.last_checkpoint = str(ckpt.path)
        self.log(f"resumed from {ckpt.path} at iteration {ckpt.iteration} "
                 f"({self.run_state.consumed_samples} samples consumed; saved with layout {ckpt.layout})")

    # ------------------------------------------------------------------------------- saving
    def save(self) -> None:
        cfg, s, rs = self.cfg, self.state, self.run_state
        include_master = self.dtype != torch.float32
        tensors = self.optimizer.state_tensors(include_master)
        state_dict = {n: p.detach().cpu() for n, p in self.named_parameters().items()}
        layout = {"tp": s.tp_size, "pp": s.pp_size, "dp": s.dp_size, "virtual_stages": cfg.parallel.virtual_stages,
                  "sequence_parallel": cfg.parallel.sequence_parallel,
                  "distributed_optimizer": cfg.parallel.distributed_optimizer}
        extra = {"run": config_to_dict(cfg),
                 "counters": {"consumed_samples": rs.consumed_samples, "skipped_total": rs.skipped_total,
                              "skipped_in_a_row": rs.skipped_in_a_row}}
        group = dist.group.WORLD if dist.is_initialized() else None
        if group is None:
            path = ckpt_io.save_checkpoint(cfg.checkpoint.save, rs.iteration, self.config, 1, 1,
                                           {(0, 0): state_dict}, meta={"rng": rng_state()},
                                           optimizer_tensors={(0, 0): tensors},
                                           optimizer_state={(0, 0): self.optimizer.state_meta()},
                                           layout=layout, extra=extra, virtual_stages=self.pipeline.virtual_stages)
        else:
            path = ckpt_io.save_checkpoint_distributed(
                cfg.checkpoint.save, rs.iteration, self.config, s.tp_size, s.pp_size, s.tp_rank, s.pp_rank,
                state_dict, meta={"rng": rng_state()}, optimizer_tensors=tensors,
                optimizer_state=self.optimizer.state_meta(), layout=layout, extra=extra,
                dp_rank=s.dp_rank, group=group, virtual_stages=self.pipeline.virtual_stages)
        self.last_checkpoint = str(path)
        self.log(f"saved checkpoint {path}")

    # ------------------------------------------------------------------------------ the loop
    def _evaluate(self) -> float:
        t = self.cfg.train
        loader = BatchLoader(self.valid_data, t.global_batch_size, t.micro_batch_size, self.state.dp_rank,
                             self.dp, self.config.vocab_size)
        total, tokens = 0.0, 0
        for _ in range(t.eval_iters):
            loss, n = evaluate_loss(self.chunks, loader.next_step(), self.state, self.grads.grads.device, self.comm)
            total, tokens = total + loss * n, tokens + n
        return total / max(tokens, 1)

    def _write(self, record: dict) -> None:
        if _rank0(self.state):
            self.log_fn(format_log_line(record))
            if self.metrics is not None:
                self.metrics.log(record)

    def describe(self) -> None:
        cfg, s, t = self.cfg, self.state, self.cfg.train
        params = sum(math.prod(shape) for shape in expected_shapes(self.config).values())
        tokens = t.global_batch_size * cfg.data.seq_length
        self.log(f"layout: world {s.world_size} = tp {s.tp_size} x pp {s.pp_size} x dp {s.dp_size}"
                 f"{' + sequence parallel' if cfg.parallel.sequence_parallel and s.tp_size > 1 else ''}"
                 f"{' + distributed optimizer' if cfg.parallel.distributed_optimizer else ''}; "
                 f"device {device_name(s.device)}; {t.dtype}; optimizer {self.optimizer.implementation}")
        if s.pp_size > 1:
            schedule = get_forward_backward(s, self.pipeline.virtual_stages).__name__.removeprefix("forward_backward_")
            stages = "; ".join(f"rank {r}: layers {self.pipeline.rank_layers(r)}" for r in range(s.pp_size))
            self.log(f"pipeline: schedule {schedule}, {self.pipeline.virtual_stages} chunk(s) of "
                     f"{self.pipeline.layers_per_chunk} layer(s) per rank ({stages})")
        self.log(f"model: {params:,} parameters ({self.config.num_hidden_layers} layers, hidden "
                 f"{self.config.hidden_size}, vocab {self.config.vocab_size}); stage {t.stage}")
        self.log(f"data: {len(self.train_data):,} training samples; {tokens:,} tokens per step "
                 f"({t.global_batch_size} x {cfg.data.seq_length}), {self.loader.num_microbatches} "
                 f"microbatch(es) of {t.micro_batch_size} per rank")
        if self.kernel_verdicts is None:
            self.log(f"kernels: {t.kernels} -> PyTorch ops on {s.device.type}")
        else:
            self.log(f"kernels: {t.kernels}: " + "; ".join(str(v) for v in self.kernel_verdicts.values()))
        self.log(f"writing: {cfg.checkpoint.save or 'nothing (checkpoint.save not set)'}")

    def run(self) -> dict:
        cfg, t, rs = self.cfg, self.cfg.train, self.run_state
        self.describe()
        tokens_per_step = t.global_batch_size * cfg.data.seq_length
        start_time, interval_time, interval_steps = time.perf_counter(), 0.0, 0
        while rs.iteration < t.iters:
            try:
                microbatches = self.loader.next_step()
            except StopIteration as e:
                raise TrainingError(f"iteration {rs.iteration}: training data exhausted ({e})") from None
            lr = self.schedule(rs.iteration)
            began = time.perf_counter()
            result = train_step(self.chunks, microbatches, self.grads, self.optimizer, self.state, lr=lr,
                                clip_grad=t.clip_grad, comm=self.comm)
            interval_time += time.perf_counter() - began
            interval_steps += 1
            rs.iteration += 1
            rs.consumed_samples = self.loader.consumed_samples
            rs.last_loss = result.loss
            if result.skipped:
                rs.skipped_total += 1
                rs.skipped_in_a_row += 1
                self.log(f"iteration {rs.iteration}: skipped the update: loss {result.loss}, "
                         f"grad norm {result.grad_norm} (non-finite)")
            else:
                rs.skipped_in_a_row = 0
            stop = rs.skipped_in_a_row >= t.max_skipped_steps
            if stop or rs.iteration % t.log_interval == 0 or rs.iteration == t.iters:
                perf = StepMetrics(interval_time / interval_steps, tokens_per_step, self.state.world_size,
                                   self.flops_per_token, self.peak)
                mem, label = memory_gib(self.state.device)
                record = {"iteration": rs.iteration, "iters": t.iters, "loss": result.loss, "lr": lr,
                          "grad_norm": result.grad_norm, "skipped": rs.skipped_total,
                          "loss_tokens": result.loss_tokens, **perf.as_record(), "mem_gib": mem,
                          "mem_label": label, "device": device_name(self.state.device)}
                self._write(record)
                rs.history.append(record)
                interval_time, interval_steps = 0.0, 0
            if stop:  # the step that stops the run is in the log and metrics.jsonl like any other
                if self.metrics is not None:
                    self.metrics.close()
                raise TrainingError(
                    f"iteration {rs.iteration}: {rs.skipped_in_a_row} consecutive steps with NaN/Inf loss "
                    f"or gradients (train.max_skipped_steps {t.max_skipped_steps}); stopping. The last "
                    f"checkpoint is {self.last_checkpoint or 'none (nothing saved yet)'}")
            if self.valid_data is not None and rs.iteration % t.eval_interval == 0:
                rs.last_valid_loss = self._evaluate()
                self._write({"iteration": rs.iteration, "valid_loss": rs.last_valid_loss})
            if cfg.checkpoint.save and ((cfg.checkpoint.interval and rs.iteration % cfg.checkpoint.interval == 0)
                                        or rs.iteration == t.iters):
                self.save()
        return self._finish(time.perf_counter() - start_time)

    def _finish(self, elapsed: float) -> dict:
        cfg, rs = self.cfg, self.run_state
        summary = {"iterations": rs.iteration, "final_loss": rs.last_loss, "valid_loss": rs.last_valid_loss,
                   "skipped_steps": rs.skipped_total, "consumed_samples": rs.consumed_samples,
                   "elapsed_s": elapsed}
        if self.metrics is not None:
            self.metrics.close()
            png = os.path.join(cfg.checkpoint.save, "loss_curve.png")
            if cfg.train.loss_curve and plot_loss_curve(os.path.join(cfg.checkpoint.save, "metrics.jsonl"), png):
                summary["loss_curve"] = png
        self.log(f"done: {rs.iteration} iterations in {elapsed:.1f} s; final loss {rs.last_loss}; "
                 f"valid loss {rs.last_valid_loss}; skipped {rs.skipped_total}"
                 + (f"; checkpoints and metrics in {cfg.checkpoint.save}" if cfg.checkpoint.save else ""))
        return summary


def train(cfg: RunConfig, log=print) -> dict:
    """Run ``cfg`` to the end in this process (one of the job's ranks); returns the summary."""
    return Trainer(cfg, log).run()
