"""Pipeline-parallel training runs end to end, against the one-process run of the same config.

- The loss curves in metrics.jsonl of CT and SFT, with tied and untied embeddings, at (TP, PP, DP) =
  (1,2,1), (1,2,1) with 2 virtual stages, and (1,2,2) with the distributed optimizer, equal the
  (1,1,1) run's; so do the validation losses (data.valid, eval_interval) and the loss-token counts.
- Stopping and resuming at PP 2 and at PP 2 x 2 virtual stages gives the uninterrupted losses bit for
  bit; a PP 2 checkpoint resumed at PP 1, and a PP 1 checkpoint at PP 2 x 2, continue the curve.
- ``tools/pretrain.py --parallel.pp 2`` under torchrun trains the same curve and writes a checkpoint
  that records its pipeline layout; ``tools/convert_hf.py export`` of it gives a transformers model
  with the trained model's logits, and its ``import --pp 2`` starts a run at PP 2 x 2 (checkpoint.init)
  whose first loss is transformers' loss on the first batch.
- Impossible pipeline settings (too few microbatches, interleaving with a microbatch count PP does
  not divide, PP or PP x virtual stages not dividing the layers) stop every rank before any step,
  naming the field, without a hang, also as a whole torchrun job.

Tolerance. Another layout sums the same numbers in another order (pipeline stages, the tied
embedding's two gradient halves, DP reductions), so curves agree to float32 rounding: losses and
gradient norms to rtol 1e-5 (measured: below 2e-7 and 6e-7 relative over these four Adam
steps), loss-token counts exactly. A real fault is far outside: leaving one of the four microbatches
out of the backward moves the losses of steps 2 to 4 by 2e-4 to 3e-3 relative.

Each curve: 4 iterations, a checkpoint and a validation every 2; the stopped run stops after
iteration 3 (its newest checkpoint is iteration 2, as when a job dies between checkpoints) and the
resumed run continues it in the same directory.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from run_utils import (REPO, config_args, make_trainer, pretrain_env, read_metrics, run_pretrain,  # noqa: F401
                       tiny_data, tiny_run_config, train_in_process, training_records, with_updates)

ITERS, INTERVAL, STOP_AFTER = 4, 2, 3
LAYERS = 4                      # 2 ranks x 2 virtual stages x 1 layer
LOSS_RTOL = NORM_RTOL = 1e-5
CASES = [("ct", False), ("ct", True), ("sft", False), ("sft", True)]
LAYOUTS = {
    "pp2": {"pp": 2},
    "pp2_v2": {"pp": 2, "virtual_stages": 2},
    # Small buckets: several reduce-scatters, ZeRO slices cutting parameters mid-tensor.
    "pp2_dp2_zero": {"pp": 2, "distributed_optimizer": True, "bucket_size": 30000},
}
CONVERT_HF = REPO / "tools" / "convert_hf.py"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared cores
    yield
    torch.set_num_threads(threads)


def case_name(stage: str, tied: bool) -> str:
    return f"{stage}_{'tied' if tied else 'untied'}"


def run_cfg(data: dict, save, stage: str, tied: bool, parallel: dict | None = None, **sections) -> dict:
    """A 4-layer tiny run of ``stage`` with validation and checkpoints every INTERVAL iterations.
    CT: 8 samples of 64 tokens per step in 4 microbatches; SFT: 4 whole records per step, one per
    microbatch (4 microbatches at DP 1, 2 at DP 2: enough for PP 2 and divisible by it)."""
    train = {"iters": ITERS, "eval_interval": INTERVAL, "eval_iters": 1}
    if stage == "sft":
        train.update(global_batch_size=4, micro_batch_size=1)
    cfg = tiny_run_config(data, save, stage=stage, train=train,
                          model={"num_hidden_layers": LAYERS, "tie_word_embeddings": tied},
                          parallel=parallel or {}, checkpoint={"interval": INTERVAL})
    return with_updates(cfg, data={"valid": data["valid"]}, **sections)


def curve(save) -> dict:
    """What a run wrote to metrics.jsonl: per training step (iteration, loss, grad norm, loss tokens),
    and the validation losses by iteration."""
    records = read_metrics(save)
    return {"steps": [(r["iteration"], r["loss"], r["grad_norm"], r["loss_tokens"]) for r in records if "loss" in r],
            "valid": [(r["iteration"], r["valid_loss"]) for r in records if "valid_loss" in r]}


def iter_dir(save, iteration: int) -> str:
    return os.path.join(str(save), f"iter_{iteration:07d}")


def assert_same_curve(got: dict, expected: dict, first_iteration: int = 1, what: str = "") -> None:
    """``got``'s steps and validations equal ``expected``'s from ``first_iteration`` on, to float32
    tolerance (loss tokens exactly)."""
    steps = [s for s in expected["steps"] if s[0] >= first_iteration]
    valid = [v for v in expected["valid"] if v[0] >= first_iteration]
    assert [s[0] for s in got["steps"]] == [s[0] for s in steps], what
    assert [s[3] for s in got["steps"]] == [s[3] for s in steps], f"{what}: loss tokens"
    assert all(math.isfinite(s[1]) for s in got["steps"]), what
    torch.testing.assert_close(torch.tensor([s[1] for s in got["steps"]], dtype=torch.float64),
                               torch.tensor([s[1] for s in steps], dtype=torch.float64), rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"{what}: training losses: {m}")
    torch.testing.assert_close(torch.tensor([s[2] for s in got["steps"]], dtype=torch.float64),
                               torch.tensor([s[2] for s in steps], dtype=torch.float64), rtol=NORM_RTOL, atol=0,
                               msg=lambda m: f"{what}: gradient norms: {m}")
    assert [v[0] for v in got["valid"]] == [v[0] for v in valid], f"{what}: validation iterations"
    torch.testing.assert_close(torch.tensor([v[1] for v in got["valid"]], dtype=torch.float64),
                               torch.tensor([v[1] for v in valid], dtype=torch.float64), rtol=LOSS_RTOL, atol=0,
                               msg=lambda m: f"{what}: validation losses: {m}")


# ------------------------------------------------------------------------- the (1,1,1) runs
@pytest.fixture(scope="module")
def references(tiny_data, tmp_path_factory):
    """The one-process run of every case: its curve and save directory; the CT untied run's trained
    model too."""
    root = tmp_path_factory.mktemp("pipeline_references")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for stage, tied in CASES:
            name = case_name(stage, tied)
            save = root / name
            trainer = train_in_process(run_cfg(tiny_data, save, stage, tied))
            out[name] = {"save": str(save), **curve(save)}
            if name == "ct_untied":
                out[name]["model"] = trainer.chunks[0]
    finally:
        torch.set_num_threads(threads)
    for name, run in out.items():  # the curves fall: there is something to compare
        assert len(run["steps"]) == ITERS and run["steps"][-1][1] < run["steps"][0][1], (name, run["steps"])
        assert [v[0] for v in run["valid"]] == [INTERVAL, ITERS], name
    return out


# ---------------------------------------------------------------------- the two-rank runs
RESUMED = {"pp2": ("ct", False), "pp2_v2": ("sft", True)}  # layout: the case stopped and resumed there
PP1_TO_PP2_V2 = ("ct", True)


def _two_rank_job(rank, world_size, data, root, references):
    """Every case at PP 2 and at PP 2 x 2; the stopped and resumed runs; the PP 1 checkpoint resumed
    at PP 2 x 2. Rank 0 returns the curves and what the runs logged."""
    out = {}
    for layout in ("pp2", "pp2_v2"):
        for stage, tied in CASES:
            save = os.path.join(root, f"{layout}_{case_name(stage, tied)}")
            trainer = train_in_process(run_cfg(data, save, stage, tied, LAYOUTS[layout]))
            if rank == 0:
                pipeline_line = next(x for x in trainer.lines if x.startswith("pipeline:"))
                out[(layout, stage, tied)] = {"save": save, **curve(save), "pipeline_line": pipeline_line}
    for layout, (stage, tied) in RESUMED.items():
        stopped = os.path.join(root, f"stopped_{layout}")
        cfg = run_cfg(data, stopped, stage, tied, LAYOUTS[layout])
        train_in_process(cfg, stop_after=STOP_AFTER)
        if rank == 0:  # what the stop left: iterations 1..3 logged, the newest checkpoint at 2
            assert [r["iteration"] for r in training_records(stopped)] == list(range(1, STOP_AFTER + 1))
            with open(os.path.join(stopped, "latest")) as f:
                assert int(f.read()) == INTERVAL
        trainer = train_in_process(with_updates(cfg, checkpoint={"load": stopped}))
        if rank == 0:
            out[("stopped", layout)] = {**curve(stopped),
                                        "resume_line": next(x for x in trainer.lines if x.startswith("resumed from"))}
    stage, tied = PP1_TO_PP2_V2
    save = os.path.join(root, "pp1_to_pp2_v2")
    load = iter_dir(references[case_name(stage, tied)], INTERVAL)
    trainer = train_in_process(run_cfg(data, save, stage, tied, LAYOUTS["pp2_v2"], checkpoint={"load": load}))
    if rank == 0:
        out["pp1_to_pp2_v2"] = {**curve(save),
                                "resume_line": next(x for x in trainer.lines if x.startswith("resumed from"))}
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def two_rank(tiny_data, references, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline_two_ranks"))
    saves = {name: run["save"] for name, run in references.items()}
    [result, _] = run_distributed(_two_rank_job, 2, args=(tiny_data, root, saves), timeout=400)
    return result


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["pp2", "pp2_v2"])
@pytest.mark.parametrize("stage,tied", CASES, ids=[case_name(*c) for c in CASES])
def test_pipeline_curve_equals_the_one_process_curve(references, two_rank, layout, stage, tied):
    run = two_rank[(layout, stage, tied)]
    assert_same_curve(run, references[case_name(stage, tied)], what=f"{layout} {case_name(stage, tied)}")
    schedule, layers = {"pp2": ("1f1b", "rank 0: layers [0, 1]; rank 1: layers [2, 3]"),
                        "pp2_v2": ("interleaved", "rank 0: layers [0, 2]; rank 1: layers [1, 3]")}[layout]
    assert run["pipeline_line"].startswith(f"pipeline: schedule {schedule}, "), run["pipeline_line"]
    assert layers in run["pipeline_line"], run["pipeline_line"]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(RESUMED))
def test_stop_and_resume_at_the_same_pipeline_layout_is_bit_identical(two_rank, layout):
    stage, tied = RESUMED[layout]
    full, resumed = two_rank[(layout, stage, tied)], two_rank[("stopped", layout)]
    assert f"iter_{INTERVAL:07d} at iteration {INTERVAL}" in resumed["resume_line"], resumed["resume_line"]
    assert f"'pp': 2, 'dp': 1, 'virtual_stages': {LAYOUTS[layout].get('virtual_stages', 1)}" \
        in resumed["resume_line"], resumed["resume_line"]
    # Bit for bit: the float64 values the runs wrote, compared exactly (the stopped run's lines after
    # its checkpoint were replaced, not duplicated).
    assert resumed["steps"] == full["steps"], f"resumed {resumed['steps']} != uninterrupted {full['steps']}"
    assert resumed["valid"] == full["valid"]


@pytest.mark.distributed
def test_pp1_checkpoint_resumed_at_pp2_with_virtual_stages_continues_the_curve(references, two_rank):
    run = two_rank["pp1_to_pp2_v2"]
    assert "'pp': 1" in run["resume_line"] and f"at iteration {INTERVAL}" in run["resume_line"], run["resume_line"]
    assert_same_curve(run, references[case_name(*PP1_TO_PP2_V2)], first_iteration=INTERVAL + 1,
                      what="PP 1 -> PP 2 x 2")


@pytest.mark.distributed
def test_pp2_checkpoint_resumed_at_pp1_continues_the_curve(tiny_data, references, two_rank, tmp_path):
    stage, tied = "sft", False
    pp2 = two_rank[("pp2", stage, tied)]
    save = tmp_path / "pp2_to_pp1"
    load = iter_dir(pp2["save"], INTERVAL)
    trainer = train_in_process(run_cfg(tiny_data, save, stage, tied, checkpoint={"load": load}))
    resume_line = next(x for x in trainer.lines if x.startswith("resumed from"))
    assert "'pp': 2" in resume_line and trainer.state.pp_size == 1, resume_line
    assert_same_curve(curve(save), references[case_name(stage, tied)], first_iteration=INTERVAL + 1,
                      what="PP 2 -> PP 1, against the PP 1 run")
    assert_same_curve(curve(save), pp2, first_iteration=INTERVAL + 1, what="PP 2 -> PP 1, against the PP 2 run")


# --------------------------------------------------------------------- the four-rank runs
def _four_rank_job(rank, world_size, data, root):
    out = {}
    for stage, tied in CASES:
        save = os.path.join(root, case_name(stage, tied))
        trainer = train_in_process(run_cfg(data, save, stage, tied, LAYOUTS["pp2_dp2_zero"]))
        if rank == 0:
            out[(stage, tied)] = curve(save)
            out["layout"] = (trainer.state.tp_size, trainer.state.pp_size, trainer.state.dp_size)
    return out if rank == 0 else None


@pytest.mark.distributed
def test_pp2_dp2_distributed_optimizer_curves_equal_the_one_process_curves(tiny_data, references, tmp_path):
    [result, *_] = run_distributed(_four_rank_job, 4, args=(tiny_data, str(tmp_path)), timeout=400)
    assert result["layout"] == (1, 2, 2)
    for stage, tied in CASES:
        assert_same_curve(result[(stage, tied)], references[case_name(stage, tied)],
                          what=f"pp2 dp2 distributed optimizer {case_name(stage, tied)}")


# ---------------------------------------------------------------------------- the commands
def convert_hf(*args) -> subprocess.CompletedProcess:
    """``python tools/convert_hf.py args --no-progress``: CPU, one thread."""
    return subprocess.run([sys.executable, str(CONVERT_HF), *map(str, args), "--no-progress"], cwd=str(REPO),
                          env=pretrain_env(), capture_output=True, text=True, timeout=120, check=False)


def first_step_loss_by_transformers(model, data: dict, cfg: dict) -> tuple[float, int]:
    """The CT loss of the run's first global batch under a transformers model: the mean of
    -log softmax(label) over every loss token, and the number of loss tokens."""
    from engine.data.batches import BatchLoader, build_dataset

    t = cfg["train"]
    dataset = build_dataset(data["train"], "ct", cfg["data"]["seq_length"], t["iters"] * t["global_batch_size"],
                            t["seed"])
    microbatches = BatchLoader(dataset, t["global_batch_size"], t["micro_batch_size"], dp_rank=0, dp_size=1,
                               vocab_size=data["vocab_size"]).next_step()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for mb in microbatches:
            logits = model(mb["tokens"]).logits.double()
            losses = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100, reduction="none")
            total += float((losses * mb["loss_mask"].flatten().double()).sum())
            tokens += int(mb["loss_mask"].sum())
    return total / tokens, tokens


@pytest.mark.distributed
def test_pretrain_command_at_pp2_records_the_layout_and_converts_to_and_from_transformers(tiny_data, references,
                                                                                           tmp_path):
    transformers = __import__("transformers")
    vocab = tiny_data["vocab_size"]
    save = tmp_path / "pp2"
    cfg = run_cfg(tiny_data, save, "ct", False, LAYOUTS["pp2"])
    done = run_pretrain(config_args(cfg), nproc=2, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layout: world 2 = tp 1 x pp 2 x dp 1" in done.stdout, done.stdout
    assert "pipeline: schedule 1f1b" in done.stdout, done.stdout
    assert_same_curve(curve(save), references["ct_untied"], what="pretrain.py --parallel.pp 2")
    info = json.loads((save / f"iter_{ITERS:07d}" / "checkpoint.json").read_text())
    assert (info["pp"], info["layout"]["pp"], info["layout"]["virtual_stages"]) == (2, 2, 1)
    assert info["pipeline"] == {"pp": 2, "virtual_stages": 1, "layers": [[0, 0], [0, 0], [1, 0], [1, 0]]}

    # Export: transformers' logits are the trained model's. Against the PP 1 run's model (trained
    # apart, the same to float32 rounding) and against this checkpoint loaded at PP 1 by the engine.
    hf_dir = tmp_path / "hf"
    exported = convert_hf("export", "--load", save, "--hf-dir", hf_dir)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    as_pp1 = with_updates(cfg, parallel={"pp": 1}, checkpoint={"save": None, "interval": 0})
    with torch.no_grad():
        hf_logits = hf(ids).logits
        loaded = make_trainer(with_updates(as_pp1, checkpoint={"init": str(save)})).chunks[0](ids)[..., :vocab]
        trained_apart = references["ct_untied"]["model"](ids)[..., :vocab]
        initial = make_trainer(as_pp1).chunks[0](ids)[..., :vocab]
    torch.testing.assert_close(hf_logits, loaded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf_logits, trained_apart, rtol=1e-5, atol=1e-5)  # measured: 2e-7 apart
    assert (initial - trained_apart).abs().max() > 1e-2, "the training steps changed nothing to compare"

    # Import at PP 2, then a run at PP 2 x 2 virtual stages from it: its first loss is transformers'
    # on the first batch, its curve that of a PP 1 run started from the Hugging Face directory.
    imported = tmp_path / "imported"
    done = convert_hf("import", "--hf-dir", hf_dir, "--save", imported, "--pp", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((imported / "iter_0000000" / "checkpoint.json").read_text())["pp"] == 2
    started = tmp_path / "from_imported"
    init_cfg = run_cfg(tiny_data, started, "ct", False, LAYOUTS["pp2_v2"], train={"iters": 2},
                       checkpoint={"init": str(imported)})
    done = run_pretrain(config_args(init_cfg), nproc=2, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"initialised weights from {imported}" in done.stdout, done.stdout
    assert "pipeline: schedule interleaved" in done.stdout, done.stdout
    from_hf = tmp_path / "from_hf"
    train_in_process(with_updates(init_cfg, parallel={"pp": 1, "virtual_stages": 1},
                                  checkpoint={"save": str(from_hf), "init": str(hf_dir)}))
    assert_same_curve(curve(started), curve(from_hf), what="PP 2 x 2 from the import")
    loss, tokens = first_step_loss_by_transformers(hf, tiny_data, init_cfg)
    first = curve(started)["steps"][0]
    assert first[3] == tokens
    assert first[1] == pytest.approx(loss, rel=LOSS_RTOL)


# ----------------------------------------------------------------- what cannot run is refused
BAD_PIPELINES = {
    # name: (overrides of a 4-layer CT run of 8 samples per step in microbatches of 2, what the error says)
    "too_few_microbatches": (
        {"parallel": {"pp": 2}, "train": {"global_batch_size": 2}},
        "pipeline parallelism with parallel.pp 2 needs at least 2 microbatches per step, got 1"),
    "interleaving_microbatches_not_divisible_by_pp": (
        {"parallel": {"pp": 2, "virtual_stages": 2}, "train": {"global_batch_size": 6}},
        ("the interleaved schedule (parallel.virtual_stages 2) needs a number of microbatches per step "
         "divisible by parallel.pp 2, got 3")),
    "pp_does_not_divide_the_layers": (
        {"parallel": {"pp": 2}, "model": {"num_hidden_layers": 3}},
        "pipeline-parallel size 2 does not divide the number of layers (num_hidden_layers=3)"),
    "virtual_stages_do_not_divide_the_layers": (
        {"parallel": {"pp": 2, "virtual_stages": 2}, "model": {"num_hidden_layers": 6}},
        "parallel.pp x parallel.virtual_stages (4) does not divide the number of layers (num_hidden_layers=6)"),
}


def bad_config(data: dict, save, case: str) -> dict:
    overrides, _ = BAD_PIPELINES[case]
    cfg = tiny_run_config(data, save, model={"num_hidden_layers": LAYERS}, parallel={"timeout_s": 300})
    return with_updates(cfg, **overrides)


def _refusals_job(rank, world_size, data, root):
    """Each bad config set up on every rank: (the error's message or None, seconds) by case."""
    out = {}
    for case in BAD_PIPELINES:
        began = time.monotonic()
        try:
            make_trainer(bad_config(data, os.path.join(root, case), case))
            message = None
        except ValueError as e:
            message = str(e)
        out[case] = (message, time.monotonic() - began)
    return out


@pytest.mark.distributed
def test_impossible_pipeline_settings_are_refused_by_name_on_every_rank(tiny_data, tmp_path):
    # A rank that got past its check would wait on its peer in the process group's set-up until
    # run_distributed's timeout: the whole job must end well before it.
    ranks = run_distributed(_refusals_job, 2, args=(tiny_data, str(tmp_path)), timeout=120)
    for case, (_, phrase) in BAD_PIPELINES.items():
        messages = [r[case][0] for r in ranks]
        assert all(m is not None and phrase in m for m in messages), f"{case}: {messages}"
        assert messages[0] == messages[1], case
        assert all(r[case][1] < 20 for r in ranks), f"{case}: {[r[case][1] for r in ranks]} s"
        assert not os.path.exists(os.path.join(tmp_path, case, "metrics.jsonl")), case


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["too_few_microbatches", "pp_does_not_divide_the_layers"])
def test_pretrain_command_with_an_impossible_pipeline_stops_the_whole_job(tiny_data, tmp_path, case):
    began = time.monotonic()
    done = run_pretrain(config_args(bad_config(tiny_data, tmp_path / "run", case)), nproc=2, timeout=120)
    seconds = time.monotonic() - began
    where = f"--- exit {done.returncode} ({seconds:.0f} s)\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    # A failed run (not a malformed command line): exit status 1, every rank naming the field.
    assert done.returncode == 1, where
    flat = " ".join(done.stderr.split())
    # Each rank fails by itself at set-up, before any collective; torchrun ends the job at the first
    # failure, so a slower rank may be stopped before it prints its own line.
    assert "pretrain.py: error (rank " in done.stderr, where
    assert BAD_PIPELINES[case][1] in flat, where
    assert "layout:" not in done.stdout and "iteration 1/" not in done.stdout, where
    assert seconds < 60, f"took {seconds:.0f} s, the group timeout is 300 s: a rank waited\n{where}"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
