"""The run config: YAML and command line into typed sections, refusals by name, model resolution and
data specs, each checked against hand-written expectations."""
import dataclasses
import glob
import json
import math
import os

import pytest
import yaml

from engine.config import (
    MODEL_PRESETS, CheckpointConfig, DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig,
    config_from_dict, config_to_dict, load_yaml_config, parse_data_spec, parse_run_config, validate_run_config)
from engine.model.config import LlamaConfig
from engine.model.llama import expected_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))

SAMPLE_YAML = """
model:
  preset: tiny
  num_hidden_layers: 4
parallel:
  tp: 2
  sequence_parallel: true
data:
  train: "0.7 data/sar 0.3 data/web"
  seq_length: 64
train:
  stage: sft
  lr: 1e-3            # PyYAML reads this as the string '1e-3'
  min_lr: 0           # an int for a float field
  global_batch_size: 16
  micro_batch_size: 2
checkpoint:
  save: runs/x
"""


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_cli(argv):
    return parse_run_config(argv, prog="pretrain.py")


# ------------------------------------------------------------------------------ YAML <-> dataclasses
def test_yaml_to_dataclasses_to_dict_round_trip(tmp_path):
    cfg = load_yaml_config(write(tmp_path, SAMPLE_YAML))
    assert cfg.model == ModelConfig(preset="tiny", num_hidden_layers=4)
    assert cfg.parallel == ParallelConfig(tp=2, sequence_parallel=True)
    assert cfg.data == DataConfig(train="0.7 data/sar 0.3 data/web", seq_length=64)
    assert cfg.train == TrainConfig(stage="sft", lr=1e-3, min_lr=0.0, global_batch_size=16, micro_batch_size=2)
    assert type(cfg.train.lr) is float and type(cfg.train.min_lr) is float
    assert cfg.checkpoint == CheckpointConfig(save="runs/x")

    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert d["train"]["lr"] == 1e-3 and d["parallel"]["bucket_size"] == 40_000_000
    assert set(d) == {"model", "parallel", "data", "train", "checkpoint"}
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_defaults_are_the_documented_contract():
    cfg = config_from_dict({})
    assert cfg == RunConfig()
    t, p = cfg.train, cfg.parallel
    assert (t.stage, t.iters, t.global_batch_size, t.micro_batch_size, t.lr, t.min_lr) == ("ct", 100, 8, 1, 3e-4, 0.0)
    assert (t.lr_decay, t.lr_decay_iters, t.decay_iters, t.weight_decay, t.clip_grad) == ("cosine", None, 100, 0.1, 1.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.seed, t.dtype) == (0.9, 0.95, 1e-8, 1234, "bf16")
    assert (t.log_interval, t.eval_interval, t.eval_iters, t.max_skipped_steps, t.kernels) == (10, 0, 10, 3, "auto")
    assert (p.tp, p.pp, p.virtual_stages, p.sequence_parallel, p.distributed_optimizer) == (1, 1, 1, False, False)
    assert (p.bucket_size, p.overlap_grad_reduce, p.timeout_s) == (40_000_000, True, 600.0)
    assert cfg.data == DataConfig(train="", valid=None, seq_length=256, cache_dir=None)
    assert cfg.checkpoint == CheckpointConfig(save=None, interval=0, load=None, init=None)
    assert all(getattr(cfg.model, f.name) is None for f in dataclasses.fields(ModelConfig))


def test_empty_yaml_section_keeps_defaults():
    assert config_from_dict({"checkpoint": None, "train": {"iters": 5}}).train.iters == 5


@pytest.mark.parametrize("d, message", [
    ({"trian": {"lr": 1.0}}, "unknown section 'trian' (did you mean 'train'?)"),
    ({"train": {"lrr": 1.0}}, "unknown field train.lrr (did you mean 'lr'"),
    ({"parallel": {"sequence_paralel": True}}, "did you mean 'sequence_parallel'?"),
    ({"train": {"lr": "abc"}}, "train.lr: expected float, got 'abc'"),
    ({"train": {"lr": "nan"}}, "train.lr: expected float, got 'nan'"),
    ({"train": {"lr": True}}, "train.lr: expected float, got True"),
    ({"train": {"iters": 1.5}}, "train.iters: expected int, got 1.5"),
    ({"train": {"iters": "10"}}, "train.iters: expected int, got '10'"),
    ({"train": {"stage": "rl"}}, "train.stage: expected one of 'ct', 'sft', got 'rl'"),
    ({"parallel": {"sequence_parallel": "yes"}}, "parallel.sequence_parallel: expected bool, got 'yes'"),
    ({"parallel": {"tp": True}}, "parallel.tp: expected int, got True"),
    ({"model": {"hidden_size": "big"}}, "model.hidden_size: expected int or null, got 'big'"),
    ({"data": {"train": 3}}, "data.train: expected str, got 3"),
    ({"train": [1, 2]}, "section 'train': expected a mapping of fields"),
])
def test_bad_fields_are_refused_by_name(d, message):
    with pytest.raises(ValueError) as e:
        config_from_dict(d, source="my.yaml")
    assert str(e.value).startswith("my.yaml: ") and message in str(e.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_yaml_config(missing)
    bad = write(tmp_path, "train: [unclosed\n", "bad.yaml")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        load_yaml_config(bad)
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping of sections, got list"):
        load_yaml_config(listing)
    empty = write(tmp_path, "# nothing\n", "empty.yaml")
    with pytest.raises(ValueError, match=r"empty\.yaml: the config file is empty"):
        load_yaml_config(empty)
    unknown = write(tmp_path, "train:\n  itres: 3\n", "unknown.yaml")
    with pytest.raises(ValueError, match=r"unknown\.yaml: unknown field train\.itres \(did you mean 'iters'"):
        load_yaml_config(unknown)


# -------------------------------------------------------------------------------------- command line
def test_cli_overrides_beat_yaml(tmp_path):
    path = write(tmp_path, SAMPLE_YAML)
    cfg = run_cli(["--config", path, "--train.lr", "2e-4", "--parallel.tp", "4",
                   "--parallel.sequence_parallel", "false", "--train.global_batch_size", "32",
                   "--model.preset", "None", "--model.hf_config", "hf/dir", "--data.valid", "data/v"])
    assert cfg.train.lr == 2e-4 and cfg.parallel.tp == 4 and cfg.parallel.sequence_parallel is False
    assert cfg.train.global_batch_size == 32 and cfg.model.preset is None and cfg.model.hf_config == "hf/dir"
    assert cfg.data.valid == "data/v"
    # Everything not on the command line is the YAML's.
    from_yaml = load_yaml_config(path)
    assert cfg.train.stage == "sft" and cfg.train.micro_batch_size == 2 and cfg.model.num_hidden_layers == 4
    assert cfg.data == dataclasses.replace(from_yaml.data, valid="data/v")
    assert cfg.checkpoint == from_yaml.checkpoint
    # The --config=PATH form and the flags before it give the same result.
    assert run_cli(["--train.lr", "2e-4", f"--config={path}"]).train == dataclasses.replace(from_yaml.train, lr=2e-4)


def test_cli_without_yaml_and_boolean_spellings():
    assert run_cli([]) == RunConfig()
    for text, value in (("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False)):
        cfg = run_cli(["--parallel.distributed_optimizer", text, "--train.recompute", text])
        assert cfg.parallel.distributed_optimizer is value and cfg.train.recompute is value
    cfg = run_cli(["--model.tie_word_embeddings", "true", "--train.lr_decay_iters", "50",
                   "--train.stage", "sft", "--data.train", "0.5 a 0.5 b", "--train.lr", "0.01"])
    assert cfg.model.tie_word_embeddings is True and cfg.train.lr_decay_iters == 50
    assert cfg.train.stage == "sft" and cfg.data.train == "0.5 a 0.5 b" and cfg.train.lr == 0.01
    assert run_cli(["--model.tie_word_embeddings", "None"]).model.tie_word_embeddings is None


def test_help_lists_every_field_with_its_doc(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        run_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--train.lr FLOAT" in out and "Peak learning rate, reached at the end of warmup." in out
    assert "--config" in out and "YAML run config read first" in out
    for section in (ModelConfig, ParallelConfig, DataConfig, TrainConfig, CheckpointConfig):
        name = next(f.name for f in dataclasses.fields(RunConfig) if f.default_factory is section)
        for f in dataclasses.fields(section):
            assert f"--{name}.{f.name} " in out, f"--{name}.{f.name} missing from --help"
    assert "--train.global_batch_size" in out and "--run." not in out


def test_hyphenated_spelling_is_an_alias():
    assert run_cli(["--train.global-batch-size", "4"]).train.global_batch_size == 4


def test_help_shows_the_yaml_values_as_defaults(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        run_cli(["--config", write(tmp_path, "train:\n  iters: 777\n"), "--help"])
    assert "(default: 777)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["--train.lrr", "1e-3"], "--train.lrr"),
    (["--trian.lr", "1e-3"], "--trian.lr"),
    (["--lr", "1e-3"], "--lr"),
    (["--train.lr", "abc"], "--train.lr"),
    (["--train.iters", "1.5"], "--train.iters"),
    (["--train.stage", "rl"], "--train.stage"),
    (["--parallel.sequence_parallel", "maybe"], "--parallel.sequence_parallel"),
])
def test_unknown_or_mistyped_flags_exit_2_naming_the_flag(argv, named, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        run_cli(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert named in captured.out + captured.err


def test_config_file_errors_on_the_command_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        run_cli(["--config", str(tmp_path / "missing.yaml")])
    a, b = write(tmp_path, "{}\n", "a.yaml"), write(tmp_path, "{}\n", "b.yaml")
    with pytest.raises(ValueError, match="--config given 2 times"):
        run_cli(["--config", a, "--config", b])


# ------------------------------------------------------------------------------------- shipped files
@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_every_shipped_config_loads_validates_and_resolves(path):
    with open(path) as f:
        assert f.readline().startswith("# "), "each config opens with a comment saying what it is for"
    cfg = load_yaml_config(path)
    cfg.validate()
    llama = cfg.model.to_llama_config(data_vocab_size=None)
    assert isinstance(llama, LlamaConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_the_three_shipped_configs_exist_with_their_layouts():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.yaml", "llama2-7b.yaml", "llama2-13b.yaml"} <= names
    tiny = load_yaml_config(os.path.join(REPO, "configs", "tiny.yaml"))
    assert (tiny.model.preset, tiny.data.seq_length, tiny.train.dtype) == ("tiny", 128, "fp32")
    assert (tiny.train.micro_batch_size, tiny.train.global_batch_size, tiny.train.iters) == (4, 8, 100)
    assert (tiny.checkpoint.save, tiny.checkpoint.interval, tiny.train.eval_interval) == ("runs/tiny", 50, 50)
    assert tiny.data.train == "runs/demo/data/sar_train" and tiny.data.valid == "runs/demo/data/sar_valid"
    for name, tp, pp, world in (("llama2-7b", 2, 1, 64), ("llama2-13b", 8, 1, 64)):
        cfg = load_yaml_config(os.path.join(REPO, "configs", f"{name}.yaml"))
        t = cfg.train
        assert (cfg.model.preset, cfg.parallel.tp, cfg.parallel.pp) == (name, tp, pp)
        assert cfg.parallel.sequence_parallel and cfg.parallel.distributed_optimizer and t.dtype == "bf16"
        dp = world // (tp * pp)
        assert t.global_batch_size % (t.micro_batch_size * dp) == 0
        tokens = t.iters * t.global_batch_size * cfg.data.seq_length
        assert (cfg.data.seq_length, t.global_batch_size) == (4096, 1024) and abs(tokens - 10e9) < 0.01 * 10e9
        assert (t.lr, t.min_lr, t.lr_decay, t.warmup_iters) == (3e-5, 3e-6, "cosine", 100)
        assert cfg.checkpoint.init and cfg.checkpoint.save and cfg.checkpoint.interval > 0


# ------------------------------------------------------------------------------------ model presets
def parameter_count(config: LlamaConfig) -> int:
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def test_presets_are_the_real_models():
    l7 = ModelConfig(preset="llama2-7b").to_llama_config()
    l13 = ModelConfig(preset="llama2-13b").to_llama_config()
    l3 = ModelConfig(preset="llama3-8b").to_llama_config()
    assert parameter_count(l7) == 6_738_415_616
    assert parameter_count(l13) == 13_015_864_320
    assert parameter_count(l3) == 8_030_261_248
    assert (l7.hidden_size, l7.intermediate_size, l7.num_hidden_layers, l7.num_attention_heads) == (4096, 11008, 32, 32)
    assert (l7.vocab_size, l7.rope_theta, l7.max_position_embeddings, l7.rms_norm_eps) == (32000, 1e4, 4096, 1e-5)
    assert (l13.hidden_size, l13.intermediate_size, l13.num_hidden_layers, l13.num_attention_heads) == (5120, 13824, 40, 40)
    assert (l3.num_key_value_heads, l3.vocab_size, l3.rope_theta, l3.max_position_embeddings) == (8, 128256, 5e5, 8192)
    assert l3.rope_scaling is None and l3.rms_norm_eps == 1e-5
    tiny = ModelConfig(preset="tiny").to_llama_config()
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_hidden_layers) == (64, 176, 2)
    assert (tiny.num_attention_heads, tiny.num_key_value_heads, tiny.head_dim) == (4, 2, 16)
    assert (tiny.max_position_embeddings, tiny.vocab_size) == (512, 1000)
    assert set(MODEL_PRESETS) == {"tiny", "llama2-7b", "llama2-13b", "llama3-8b"}


def test_vocab_precedence_explicit_then_data_then_preset():
    assert ModelConfig(preset="llama2-7b").to_llama_config().vocab_size == 32000
    assert ModelConfig(preset="llama2-7b").to_llama_config(data_vocab_size=32768).vocab_size == 32768
    assert ModelConfig(preset="llama2-7b", vocab_size=40000).to_llama_config(data_vocab_size=32768).vocab_size == 40000


def test_explicit_fields_override_the_preset_and_derivations_follow():
    cfg = ModelConfig(preset="llama2-7b", num_hidden_layers=2, hidden_size=1024, num_attention_heads=8,
                      tie_word_embeddings=True).to_llama_config()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 1024, 8)
    assert cfg.tie_word_embeddings is True and cfg.intermediate_size == 11008  # untouched fields: the preset's
    # Llama-2 is multi-head attention: key/value heads and head width follow the explicit sizes.
    assert (cfg.num_key_value_heads, cfg.head_dim) == (8, 128)
    # tiny states 2 key/value heads, which 3 query heads cannot share.
    with pytest.raises(ValueError, match="num_attention_heads .3. must be a multiple of num_key_value_heads .2."):
        ModelConfig(preset="tiny", num_attention_heads=3, hidden_size=48).to_llama_config()


def test_hf_config_file_or_directory(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8, "vocab_size": 5000,
          "rms_norm_eps": 1e-6, "rope_theta": 20000.0, "max_position_embeddings": 1024}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_dir = ModelConfig(hf_config=str(tmp_path)).to_llama_config()
    from_file = ModelConfig(hf_config=str(tmp_path / "config.json")).to_llama_config()
    assert from_dir == from_file == LlamaConfig.from_hf_dict(hf)
    # head_dim and kv heads are not in the file, so they follow the overridden widths.
    over = ModelConfig(hf_config=str(tmp_path), hidden_size=512, num_attention_heads=4).to_llama_config(
        data_vocab_size=700)
    assert (over.head_dim, over.num_key_value_heads, over.vocab_size, over.rope_theta) == (128, 4, 700, 20000.0)
    with pytest.raises(FileNotFoundError, match="model.hf_config: .*absent"):
        ModelConfig(hf_config=str(tmp_path / "absent")).to_llama_config()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model.hf_config: .*bad\.json: invalid JSON"):
        ModelConfig(hf_config=str(tmp_path / "bad.json")).to_llama_config()


def test_model_source_errors():
    with pytest.raises(ValueError, match="model.preset .* and model.hf_config .* both"):
        ModelConfig(preset="tiny", hf_config="x").to_llama_config()
    with pytest.raises(ValueError, match=r"unknown preset 'llama2-7B' \(did you mean 'llama2-7b'"):
        ModelConfig(preset="llama2-7B").to_llama_config()
    with pytest.raises(ValueError) as e:
        ModelConfig(hidden_size=64).to_llama_config()
    missing = str(e.value)
    for name in ("model.vocab_size", "model.intermediate_size", "model.num_hidden_layers",
                 "model.num_attention_heads", "model.rms_norm_eps", "model.rope_theta",
                 "model.max_position_embeddings", "model.tie_word_embeddings", "model.initializer_range"):
        assert name in missing
    assert "model.hidden_size" not in missing and "model.head_dim" not in missing
    with pytest.raises(ValueError, match="model: LlamaConfig.hidden_size must be a positive integer"):
        ModelConfig(preset="tiny", hidden_size=0).to_llama_config()


def test_fully_explicit_model_with_vocab_from_data():
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False,
                  initializer_range=0.02)
    cfg = ModelConfig(**fields).to_llama_config(data_vocab_size=300)
    assert cfg == LlamaConfig(vocab_size=300, num_key_value_heads=2, head_dim=16, **fields)
    with pytest.raises(ValueError, match="missing: model.vocab_size$"):
        ModelConfig(**fields).to_llama_config()


# --------------------------------------------------------------------------------------- validation
def valid_run(**sections) -> RunConfig:
    base = dict(model=ModelConfig(preset="tiny"), data=DataConfig(train="data/sar"))
    base.update(sections)
    return RunConfig(**base)


def test_a_plain_run_validates():
    valid_run().validate()
    validate_run_config(valid_run(parallel=ParallelConfig(tp=2, sequence_parallel=True)))


@pytest.mark.parametrize("change, named", [
    (dict(data=DataConfig(train="")), "data.train is empty"),
    (dict(data=DataConfig(train="1 a 2")), "data.train '1 a 2': 3 tokens"),
    (dict(data=DataConfig(train="a", valid="x a")), "data.valid 'x a': weight 'x' is not a number"),
    (dict(data=DataConfig(train="a", seq_length=0)), "data.seq_length must be at least 1"),
    (dict(train=TrainConfig(global_batch_size=10, micro_batch_size=4)),
     "train.global_batch_size (10) must be a multiple of train.micro_batch_size (4)"),
    (dict(train=TrainConfig(micro_batch_size=0)), "train.micro_batch_size must be at least 1"),
    (dict(train=TrainConfig(iters=0, warmup_iters=0)), "train.iters must be at least 1"),
    (dict(train=TrainConfig(lr=1e-4, min_lr=1e-3)), "train.min_lr (0.001) must not exceed train.lr (0.0001)"),
    (dict(train=TrainConfig(lr=-1.0, min_lr=-2.0)), "train.lr must not be negative"),
    (dict(train=TrainConfig(iters=10, warmup_iters=20)), "train.warmup_iters (20) must not exceed"),
    (dict(train=TrainConfig(iters=100, lr_decay_iters=5, warmup_iters=6)), "train.warmup_iters (6) must not exceed"),
    (dict(train=TrainConfig(adam_beta2=1.0)), "train.adam_beta2 must be in [0, 1)"),
    (dict(train=TrainConfig(clip_grad=-1.0)), "train.clip_grad must not be negative"),
    (dict(train=TrainConfig(eval_interval=10)), "train.eval_interval (10) asks for validation but data.valid"),
    (dict(train=TrainConfig(max_skipped_steps=0)), "train.max_skipped_steps must be at least 1"),
    (dict(checkpoint=CheckpointConfig(load="a", init="b")), "checkpoint.load ('a') resumes a run and checkpoint.init"),
    (dict(checkpoint=CheckpointConfig(interval=5)), "checkpoint.interval (5) asks for checkpoints but checkpoint.save"),
    (dict(parallel=ParallelConfig(tp=0)), "parallel.tp must be at least 1"),
    (dict(parallel=ParallelConfig(timeout_s=0.0)), "parallel.timeout_s must be positive"),
    (dict(parallel=ParallelConfig(virtual_stages=2)), "parallel.virtual_stages (2) above 1 needs parallel.pp"),
    (dict(parallel=ParallelConfig(tp=8)), "tensor-parallel size 8 does not divide the number of attention heads"),
    (dict(parallel=ParallelConfig(tp=4)), "tensor-parallel size 4 does not divide the number of key/value heads"),
    (dict(parallel=ParallelConfig(pp=2, virtual_stages=2)), "parallel.pp x parallel.virtual_stages (4)"),
    (dict(parallel=ParallelConfig(tp=2, sequence_parallel=True), data=DataConfig(train="a", seq_length=7)),
     "data.seq_length (7) must be a multiple of parallel.tp (2)"),
    (dict(model=ModelConfig(preset="tiny", hf_config="x")), "model.preset ('tiny') and model.hf_config"),
    (dict(model=ModelConfig(preset="small")), "model.preset: unknown preset 'small'"),
    (dict(model=ModelConfig(hidden_size=64)), "missing: model.intermediate_size"),
])
def test_invalid_runs_are_refused_naming_the_field(change, named):
    with pytest.raises(ValueError) as e:
        valid_run(**change).validate()
    assert named in str(e.value)


def test_validation_reports_every_problem_at_once():
    cfg = valid_run(train=TrainConfig(global_batch_size=10, micro_batch_size=4, lr=1e-4, min_lr=1e-3),
                    checkpoint=CheckpointConfig(load="a", init="b"))
    with pytest.raises(ValueError) as e:
        cfg.validate()
    assert all(s in str(e.value) for s in ("train.global_batch_size", "train.min_lr", "checkpoint.load"))


def test_vocab_may_come_from_the_data_at_validation():
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=False,
                  initializer_range=0.02)
    valid_run(model=ModelConfig(**fields)).validate()


# --------------------------------------------------------------------------------------- data specs
def test_parse_data_spec_cases():
    assert parse_data_spec("data/sar_train") == [(1.0, "data/sar_train")]
    assert parse_data_spec("  data/x  ") == [(1.0, "data/x")]
    assert parse_data_spec("0.7 data/sar 0.3 data/web") == [(0.7, "data/sar"), (0.3, "data/web")]
    assert parse_data_spec("3 a 1 b") == [(0.75, "a"), (0.25, "b")]
    assert parse_data_spec("1e0 a\n0 b") == [(1.0, "a"), (0.0, "b")]
    assert parse_data_spec("2 a 2 a") == [(0.5, "a"), (0.5, "a")]


@pytest.mark.parametrize("text, message", [
    ("", "empty data spec"),
    ("   ", "empty data spec"),
    ("0.5 a 0.5", "3 tokens"),
    ("a 0.5 b 0.5", "weight 'a' is not a number"),
    ("-1 a 2 b", "weight '-1' must be a finite non-negative number"),
    ("inf a 1 b", "weight 'inf' must be a finite"),
    ("0 a 0 b", "all weights are zero"),
])
def test_parse_data_spec_errors_name_the_spec(text, message):
    with pytest.raises(ValueError) as e:
        parse_data_spec(text, "data.train")
    assert str(e.value).startswith("data.train") and message in str(e.value)
    if text.strip():
        assert repr(text) in str(e.value)


def test_index_cache_dir_default():
    assert DataConfig(train="0.5 runs/d/a 0.5 other/b").index_cache_dir() == os.path.join("runs/d", "index_cache")
    assert DataConfig(train="prefix_here").index_cache_dir() == os.path.join(".", "index_cache")
    assert DataConfig(train="a", cache_dir="/c").index_cache_dir() == "/c"
