"""The run configuration of ``tools/pretrain.py``: typed, documented sections read from YAML and the
command line.

A run is a :class:`RunConfig` of five sections (``model``, ``parallel``, ``data``, ``train``,
``checkpoint``). The docstring under each field is its reference documentation and is what
``pretrain.py --help`` prints. A YAML file holds the same nesting::

    train:
      lr: 3.0e-4
      global_batch_size: 8

and every field can be overridden on the command line as ``--section.field value``, booleans as
``--parallel.sequence_parallel true`` (or ``false``). YAML is read first, then the flags apply on top.
Unknown sections and fields, and values of the wrong type, are refused by name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import tyro
import yaml

from engine.model.config import LlamaConfig

# Architectures by preset name, under Hugging Face's config.json names. Fields left out follow HF's
# derivations (head_dim = hidden_size / heads; key/value heads = query heads, as in Llama-2's
# multi-head attention), so an explicit width or head count derives them afresh.
MODEL_PRESETS: types.MappingProxyType[str, types.MappingProxyType] = types.MappingProxyType({
    name: types.MappingProxyType(preset) for name, preset in {
        "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.02),
        "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, rms_norm_eps=1e-5,
                          rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                          initializer_range=0.02, bos_token_id=1, eos_token_id=2),
        "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=40, rms_norm_eps=1e-5,
                           rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                           initializer_range=0.02, bos_token_id=1, eos_token_id=2),
        "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                          rope_theta=500000.0, rope_scaling=None, max_position_embeddings=8192,
                          tie_word_embeddings=False, initializer_range=0.02, bos_token_id=128000,
                          eos_token_id=128001),
    }.items()})

# Architecture fields a run may set explicitly (ModelConfig's fields beyond preset / hf_config).
MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings", "initializer_range")
# Without a preset or hf_config these follow from the others exactly as Hugging Face derives them.
_DERIVABLE_MODEL_FIELDS = ("num_key_value_heads", "head_dim")


@dataclass
class ModelConfig:
    """The model's architecture: a preset or a Hugging Face config.json, and explicit fields on top."""

    preset: str | None = None
    """Named architecture: tiny, llama2-7b, llama2-13b or llama3-8b."""
    hf_config: str | None = None
    """A Hugging Face config.json file, or a directory holding one, to take the architecture from
    (instead of a preset)."""
    vocab_size: int | None = None
    """Vocabulary size; default: the data's tokenizer, else the preset / hf_config."""
    hidden_size: int | None = None
    """Width of the residual stream; default: from the preset / hf_config."""
    intermediate_size: int | None = None
    """Width of the SwiGLU MLP's hidden layer; default: from the preset / hf_config."""
    num_hidden_layers: int | None = None
    """Number of decoder layers; default: from the preset / hf_config."""
    num_attention_heads: int | None = None
    """Number of query heads; default: from the preset / hf_config."""
    num_key_value_heads: int | None = None
    """Number of key/value heads (grouped-query attention); default: from the preset / hf_config,
    else as many as query heads."""
    head_dim: int | None = None
    """Width of one attention head; default: from the preset / hf_config, else
    hidden_size / num_attention_heads."""
    rms_norm_eps: float | None = None
    """Epsilon inside RMSNorm; default: from the preset / hf_config."""
    rope_theta: float | None = None
    """Base of the rotary embedding frequencies; default: from the preset / hf_config."""
    max_position_embeddings: int | None = None
    """Longest sequence the architecture is meant for; default: from the preset / hf_config."""
    tie_word_embeddings: bool | None = None
    """Share the input embedding with the output head; default: from the preset / hf_config."""
    initializer_range: float | None = None
    """Standard deviation of the random initialisation; default: from the preset / hf_config."""

    def to_llama_config(self, data_vocab_size: int | None = None) -> LlamaConfig:
        """The model's :class:`LlamaConfig`.

        The preset or hf_config (not both) gives the base and explicit fields override it. The
        vocabulary is, first found: ``vocab_size`` here, ``data_vocab_size`` (the tokenizer's), the
        base. Without a base every architecture field must be given (vocab_size may come from the
        data; num_key_value_heads and head_dim follow HF's derivation when left out).
        """
        if self.preset is not None and self.hf_config is not None:
            raise ValueError(f"model.preset ({self.preset!r}) and model.hf_config ({self.hf_config!r}) "
                             "both give the architecture; set one of them")
        if self.preset is not None:
            kwargs = dict(_preset(self.preset))
        elif self.hf_config is not None:
            kwargs = _read_hf_config(self.hf_config)
        else:
            given = {name for name in MODEL_FIELDS if getattr(self, name) is not None}
            if data_vocab_size is not None:
                given.add("vocab_size")
            missing = [name for name in MODEL_FIELDS if name not in given and name not in _DERIVABLE_MODEL_FIELDS]
            if missing:
                raise ValueError("model: without model.preset or model.hf_config every architecture field "
                                 "must be set; missing: " + ", ".join(f"model.{name}" for name in missing))
            kwargs = {}
        if data_vocab_size is not None:
            kwargs["vocab_size"] = data_vocab_size
        kwargs.update({name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None})
        try:
            return LlamaConfig(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model: {e}") from None


def _preset(name: str) -> types.MappingProxyType:
    if name not in MODEL_PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}{_suggest(name, MODEL_PRESETS)}; "
                         "known: " + ", ".join(MODEL_PRESETS))
    return MODEL_PRESETS[name]


def _read_hf_config(path: str) -> dict:
    """LlamaConfig keyword arguments from a HF config.json (or its directory); fields the file
    leaves to derivation stay None so that explicit overrides derive them afresh."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"model.hf_config: {file}: no such file")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model.hf_config: {file}: invalid JSON: {e}") from None
    kwargs = dataclasses.asdict(LlamaConfig.from_hf_dict(raw, source=file))
    for name in _DERIVABLE_MODEL_FIELDS:
        if raw.get(name) is None:
            kwargs[name] = None
    return kwargs


@dataclass
class ParallelConfig:
    """How the ranks split the work; data parallelism (DP) is world size / (tp x pp)."""

    tp: int = 1
    """Tensor-parallel size: ranks that split each layer's weights (keep it within a node)."""
    pp: int = 1
    """Pipeline-parallel size: ranks that split the layers into consecutive stages."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved schedule); above 1 it needs pp above 1."""
    sequence_parallel: bool = False
    """Split the activations outside attention and MLP along the sequence over the TP ranks (no
    effect when tp is 1)."""
    distributed_optimizer: bool = False
    """ZeRO-1: each DP rank keeps fp32 master weights and Adam moments for its slice of the
    parameters only; gradients are reduce-scattered and parameters all-gathered."""
    bucket_size: int = 40_000_000
    """Gradient elements per DP reduction bucket."""
    overlap_grad_reduce: bool = True
    """Launch each bucket's DP reduction from the backward pass as soon as the bucket is full."""
    timeout_s: float = 600.0
    """Process-group timeout in seconds: a dead rank makes the others fail after it instead of
    hanging."""


@dataclass
class DataConfig:
    """What the run reads."""

    train: str = ""
    """Training data: an indexed-dataset prefix "PREFIX", or a blend "W1 PREFIX1 W2 PREFIX2 ..."
    sampled in proportion to the weights."""
    valid: str | None = None
    """Validation data, same syntax as data.train; None: no validation."""
    seq_length: int = 256
    """Tokens per sample."""
    cache_dir: str | None = None
    """Where the sample-index cache is written; default: <directory of the first train
    prefix>/index_cache."""

    def index_cache_dir(self) -> str:
        """``cache_dir``, or its default beside the first training prefix."""
        if self.cache_dir is not None:
            return self.cache_dir
        first_prefix = parse_data_spec(self.train, "data.train")[0][1]
        return os.path.join(os.path.dirname(first_prefix) or ".", "index_cache")


@dataclass
class TrainConfig:
    """The optimisation: stage, batch, schedule, numerics, logging."""

    stage: Literal["ct", "sft"] = "ct"
    """ct: continued pre-training, loss on every token; sft: supervised fine-tuning, loss on the
    reward tokens only."""
    iters: int = 100
    """Optimizer steps of the whole run."""
    global_batch_size: int = 8
    """Samples per optimizer step, over all DP ranks and microbatches."""
    micro_batch_size: int = 1
    """Samples per forward/backward pass on one DP rank."""
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_iters: int = 0
    """Steps of linear warmup from lr / warmup_iters to lr."""
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup, down to min_lr (constant: stays at lr)."""
    lr_decay_iters: int | None = None
    """Step at which the decay reaches min_lr; default: train.iters."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    seed: int = 1234
    """Seed of the weight initialisation, the sample order and every other random choice of the run."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 parameters and activations with fp32 master weights and gradient accumulation;
    fp32: everything in fp32."""
    recompute: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them."""
    log_interval: int = 10
    """Steps between log lines (and metrics.jsonl records)."""
    loss_curve: bool = True
    """Draw loss_curve.png from metrics.jsonl when the run ends (needs matplotlib)."""
    eval_interval: int = 0
    """Steps between validation-loss evaluations on data.valid; 0: never."""
    eval_iters: int = 10
    """Global batches of data.valid per evaluation."""
    max_skipped_steps: int = 3
    """Consecutive steps skipped for NaN/Inf loss or gradients after which the run stops."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """auto: Triton kernels on CUDA, each checked once against PyTorch at start-up (falling back to
    PyTorch if it fails); triton: Triton kernels unchecked; torch: PyTorch ops only."""

    @property
    def decay_iters(self) -> int:
        """``lr_decay_iters``, or ``iters`` when it is not set."""
        return self.iters if self.lr_decay_iters is None else self.lr_decay_iters


@dataclass
class CheckpointConfig:
    """Where checkpoints are written and what a run starts from."""

    save: str | None = None
    """Directory of the run's checkpoints (and metrics.jsonl); None: nothing is saved."""
    interval: int = 0
    """Steps between checkpoints; 0: only at the end."""
    load: str | None = None
    """Checkpoint directory to resume exactly: weights, optimizer, RNG, data position, iteration."""
    init: str | None = None
    """Weights only, from an engine checkpoint or a Hugging Face directory; fresh optimizer at
    iteration 0 (how SFT starts from CT, or CT from Llama-2)."""


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sets."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""

    def validate(self) -> None:
        """Refuse a configuration that cannot run, whatever the world size; see :func:`validate_run_config`."""
        validate_run_config(self)


# ---------------------------------------------------------------------------------------- data specs
def parse_data_spec(text: str, name: str = "data spec") -> list[tuple[float, str]]:
    """``"PREFIX"`` -> ``[(1.0, PREFIX)]``; ``"W1 P1 W2 P2 ..."`` -> ``[(w1, P1), (w2, P2), ...]``
    with the weights normalised to sum to 1 (zero weights are kept: never sampled).

    ``name`` names the spec in errors (e.g. ``data.train``).
    """
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, got {text!r}")
    tokens = text.split()
    if not tokens:
        raise ValueError(f"{name}: empty data spec; expected \"PREFIX\" or \"W1 PREFIX1 W2 PREFIX2 ...\"")
    if len(tokens) == 1:
        return [(1.0, tokens[0])]
    if len(tokens) % 2:
        raise ValueError(f"{name} {text!r}: {len(tokens)} tokens; a blend alternates weights and prefixes "
                         "(\"W1 PREFIX1 W2 PREFIX2 ...\"), so it needs an even number")
    weights = []
    for weight_text in tokens[0::2]:
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"{name} {text!r}: weight {weight_text!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{name} {text!r}: weight {weight_text!r} must be a finite non-negative number")
        weights.append(weight)
    total = sum(weights)
    if total == 0:
        raise ValueError(f"{name} {text!r}: all weights are zero")
    return [(weight / total, prefix) for weight, prefix in zip(weights, tokens[1::2])]


# ------------------------------------------------------------------------------ dict <-> dataclasses
def _section_classes() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)" if close else ""


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (int, float, bool, str, Literal, unions with None), or _Mismatch."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in get_args(annotation):
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if isinstance(value, str) and value in get_args(annotation):
            return value
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string, so numeric strings are accepted here.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {annotation!r}")


def config_from_dict(d: dict, source: str = "config") -> RunConfig:
    """A :class:`RunConfig` from a nested dict (a parsed YAML file); absent fields keep defaults.

    Unknown sections or fields and values of the wrong type are refused, naming ``source`` and
    the field. Integers are accepted for float fields, and so are numeric strings.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    classes = _section_classes()
    sections = {}
    for section_name, values in d.items():
        if section_name not in classes:
            raise ValueError(f"{source}: unknown section {section_name!r}{_suggest(str(section_name), classes)}; "
                             "sections: " + ", ".join(classes))
        if values is None:  # a YAML section with nothing under it
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section_name!r}: expected a mapping of fields, "
                             f"got {values!r}")
        cls = classes[section_name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ValueError(f"{source}: unknown field {section_name}.{key}{_suggest(str(key), hints)}; "
                                 f"fields of {section_name}: " + ", ".join(hints))
            try:
                kwargs[key] = _coerce(value, hints[key])
            except _Mismatch:
                raise ValueError(f"{source}: {section_name}.{key}: expected {_type_name(hints[key])}, "
                                 f"got {value!r}") from None
        sections[section_name] = cls(**kwargs)
    return RunConfig(**sections)


def config_to_dict(cfg: RunConfig) -> dict:
    """A plain (JSON-able) nested dict of every field; :func:`config_from_dict` reads it back."""
    return dataclasses.asdict(cfg)


def load_yaml_config(path: str | os.PathLike) -> RunConfig:
    """Read a YAML run config; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if d is None:
        raise ValueError(f"{path}: the config file is empty; expected a mapping of sections")
    return config_from_dict(d, source=path)


# ------------------------------------------------------------------------------------- validation
def validate_run_config(cfg: RunConfig) -> None:
    """Refuse, naming every offending field, what no world size can run: non-positive sizes, a
    global batch not a multiple of the micro batch, a schedule that is not one, a missing or
    malformed data spec, an unknown or contradictory model, a TP/PP split the model does not allow,
    checkpoint options that contradict each other. Checks that need the world size or the data
    (DP divisibility, data prefixes, vocabulary) happen when the run starts.
    """
    errors: list[str] = []

    def require(condition: bool, message: str) -> None:
        if not condition:
            errors.append(message)

    p, d, t, c = cfg.parallel, cfg.data, cfg.train, cfg.checkpoint
    for name, value in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.virtual_stages", p.virtual_stages),
                        ("parallel.bucket_size", p.bucket_size), ("data.seq_length", d.seq_length),
                        ("train.iters", t.iters), ("train.global_batch_size", t.global_batch_size),
                        ("train.micro_batch_size", t.micro_batch_size), ("train.log_interval", t.log_interval),
                        ("train.eval_iters", t.eval_iters), ("train.max_skipped_steps", t.max_skipped_steps)):
        require(value >= 1, f"{name} must be at least 1, got {value}")
    for name, value in (("train.warmup_iters", t.warmup_iters), ("train.eval_interval", t.eval_interval),
                        ("train.seed", t.seed), ("checkpoint.interval", c.interval)):
        require(value >= 0, f"{name} must not be negative, got {value}")
    for name, value in (("train.lr", t.lr), ("train.min_lr", t.min_lr), ("train.weight_decay", t.weight_decay),
                        ("train.clip_grad", t.clip_grad)):
        require(value >= 0, f"{name} must not be negative, got {value}")
    for name, value in (("parallel.timeout_s", p.timeout_s), ("train.adam_eps", t.adam_eps)):
        require(value > 0, f"{name} must be positive, got {value}")
    for name, value in (("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        require(0 <= value < 1, f"{name} must be in [0, 1), got {value}")
    require(p.virtual_stages == 1 or p.pp > 1,
            f"parallel.virtual_stages ({p.virtual_stages}) above 1 needs parallel.pp above 1")

    if t.micro_batch_size >= 1:
        require(t.global_batch_size % t.micro_batch_size == 0,
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size})")
    require(t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if t.lr_decay_iters is not None:
        require(t.lr_decay_iters >= 1, f"train.lr_decay_iters must be at least 1, got {t.lr_decay_iters}")
    require(t.warmup_iters <= t.decay_iters,
            f"train.warmup_iters ({t.warmup_iters}) must not exceed the decay length "
            f"(train.lr_decay_iters, default train.iters: {t.decay_iters})")

    if not d.train.strip():
        errors.append("data.train is empty; give a prefix \"PREFIX\" or a blend \"W1 PREFIX1 W2 PREFIX2 ...\"")
    else:
        _collect(errors, lambda: parse_data_spec(d.train, "data.train"))
    if d.valid is not None:
        _collect(errors, lambda: parse_data_spec(d.valid, "data.valid"))
    require(t.eval_interval == 0 or d.valid is not None,
            f"train.eval_interval ({t.eval_interval}) asks for validation but data.valid is not set")

    require(c.load is None or c.init is None,
            f"checkpoint.load ({c.load!r}) resumes a run and checkpoint.init ({c.init!r}) starts one from "
            "weights; set only one")
    require(c.interval == 0 or c.save is not None,
            f"checkpoint.interval ({c.interval}) asks for checkpoints but checkpoint.save is not set")

    # Layout checks against the architecture; the vocabulary may still come from the data.
    m = cfg.model
    vocab_given = m.vocab_size is not None or m.preset is not None or m.hf_config is not None
    llama = _collect(errors, lambda: m.to_llama_config(data_vocab_size=None if vocab_given else 1))
    if llama is not None and p.tp >= 1 and p.pp >= 1 and p.virtual_stages >= 1:
        from engine.parallel.state import validate_layout

        _collect(errors, lambda: validate_layout(llama, tp=p.tp, pp=p.pp), prefix="parallel: ")
        chunks = p.pp * p.virtual_stages
        require(p.virtual_stages == 1 or llama.num_hidden_layers % chunks == 0,
                f"parallel.pp x parallel.virtual_stages ({chunks}) does not divide the number of layers "
                f"(num_hidden_layers={llama.num_hidden_layers})")
        require(not p.sequence_parallel or d.seq_length % p.tp == 0,
                f"parallel.sequence_parallel: data.seq_length ({d.seq_length}) must be a multiple of "
                f"parallel.tp ({p.tp})")
    if errors:
        raise ValueError("invalid run config:\n  " + "\n  ".join(errors))


def _collect(errors: list[str], check, prefix: str = ""):
    """Run ``check``; on ValueError / FileNotFoundError record its message and return None."""
    try:
        return check()
    except (ValueError, FileNotFoundError) as e:
        errors.append(prefix + str(e))
        return None


# ------------------------------------------------------------------------------------ command line
@dataclass
class _CommandLine:
    """What pretrain.py reads: the YAML file and the run's fields."""

    config: str | None = None
    """YAML run config read first; its values become the defaults the flags below override."""
    run: Annotated[RunConfig, tyro.conf.arg(name="")] = field(default_factory=RunConfig)
    """The run (its flags carry no prefix: --train.lr, not --run.train.lr)."""


def _config_paths(argv: list[str]) -> list[str]:
    """The values of ``--config PATH`` / ``--config=PATH`` in argv."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg[len("--config="):])
    return paths


def _parse_boolean(args: list[str]) -> bool:
    text = args[0].lower()
    if text not in ("true", "false"):
        raise ValueError(f"expected true or false, got {args[0]!r}")
    return text == "true"


def _boolean_registry() -> tyro.constructors.ConstructorRegistry:
    """Booleans take a value on the command line, true or false in any case."""
    registry = tyro.constructors.ConstructorRegistry()

    @registry.primitive_rule
    def boolean_rule(type_info):
        if type_info.type is not bool:
            return None
        return tyro.constructors.PrimitiveConstructorSpec(
            nargs=1, metavar="{true,false}", instance_from_str=_parse_boolean,
            is_instance=lambda x: isinstance(x, bool), str_from_instance=lambda x: ["true" if x else "false"])

    return registry


def parse_run_config(argv: list[str] | None = None, prog: str = "pretrain.py") -> RunConfig:
    """The run config of a command line: ``--config X.yaml`` (optional) read first as the defaults,
    then every ``--section.field value`` on top. ``--help`` prints every field's documentation and
    exits; unknown flags and bad values exit with status 2, naming the flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    paths = _config_paths(argv)
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}); give one file")
    defaults = load_yaml_config(paths[0]) if paths else RunConfig()
    command_line = tyro.cli(
        _CommandLine, args=argv, default=_CommandLine(config=paths[0] if paths else None, run=defaults),
        prog=prog, description="Train a Llama (continued pre-training or SFT) with tensor and data parallelism.",
        use_underscores=True, config=(tyro.conf.FlagConversionOff,), registry=_boolean_registry())
    return command_line.run
