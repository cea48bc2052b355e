"""Stopping a training run and resuming it (checkpoint.load) against the run that never stopped.

At the same layout the loss sequence of metrics.jsonl (log_interval 1) is bit-identical: one process
in fp32 and in bf16 (whose fp32 master weights must come back from the checkpoint, not from the
bf16 weights), two processes with DP=2 and the distributed optimizer, and TP=2 with sequence
parallelism. Resumed onto another layout, the curve continues to float32 tolerance. A checkpoint of
another model, data setting or stage is refused by name before any step.

Each run: 6 iterations, a checkpoint every 3; the stopped run stops after iteration 5 (lines 4 and 5
of metrics.jsonl are written but the newest checkpoint is iteration 3, as when a job dies between
checkpoints), and the resumed run continues it in the same directory.
"""
import math
import os

import pytest
import torch

from dist_utils import run_distributed
from run_utils import (config_args, make_trainer, read_losses, run_config, run_pretrain, run_trainer,  # noqa: F401
                       tiny_data, tiny_run_config, train_in_process, training_records, with_updates)

ITERS, INTERVAL, STOP_AFTER = 6, 3, 5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on the shared cores
    yield
    torch.set_num_threads(threads)


def base_config(data, save, **sections):
    cfg = tiny_run_config(data, save, train={"iters": ITERS}, checkpoint={"interval": INTERVAL})
    return with_updates(cfg, **sections)


def uninterrupted_and_resumed(cfg: dict, root: str) -> tuple[str, str]:
    """Run ``cfg`` to the end in ``root/full``; run it again in ``root/stopped``, stopped after
    STOP_AFTER iterations, and resume it there from its newest checkpoint. Returns both directories."""
    full, stopped = os.path.join(root, "full"), os.path.join(root, "stopped")
    train_in_process(with_updates(cfg, checkpoint={"save": full}))
    train_in_process(with_updates(cfg, checkpoint={"save": stopped}), stop_after=STOP_AFTER)
    # What the stop left: metrics of iterations 1..5, the newest checkpoint that of iteration 3
    # (rank 0 writes metrics.jsonl: only it reads the file without racing the writer).
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        assert [r["iteration"] for r in training_records(stopped)] == list(range(1, STOP_AFTER + 1))
        with open(os.path.join(stopped, "latest")) as f:
            assert int(f.read()) == INTERVAL
    train_in_process(with_updates(cfg, checkpoint={"save": stopped, "load": stopped}))
    return full, stopped


def assert_same_losses(full: str, stopped: str) -> None:
    reference, resumed = read_losses(full), read_losses(stopped)
    assert len(reference) == ITERS
    assert all(math.isfinite(x) for x in reference)
    # Bit for bit: the float64 values the run wrote, compared exactly.
    assert resumed == reference, f"resumed {resumed} != uninterrupted {reference}"


# ------------------------------------------------------------------------------ one process
def test_resume_is_bit_identical_fp32(tiny_data, tmp_path):
    full, stopped = uninterrupted_and_resumed(base_config(tiny_data, None), str(tmp_path))
    assert_same_losses(full, stopped)
    # The stopped run's lines after its checkpoint (iterations 4, 5) were replaced, not duplicated.
    assert [r["iteration"] for r in training_records(stopped)] == list(range(1, ITERS + 1))
    # The learning rate follows the same schedule across the stop.
    assert [r["lr"] for r in training_records(stopped)] == [r["lr"] for r in training_records(full)]


def test_resume_is_bit_identical_bf16_with_master_weights(tiny_data, tmp_path):
    cfg = base_config(tiny_data, str(tmp_path / "stopped"), train={"dtype": "bf16"})
    full = str(tmp_path / "full")
    train_in_process(with_updates(cfg, checkpoint={"save": full}))
    stopped = make_trainer(cfg)
    masters_at_save = {}
    save = stopped.save

    def save_and_remember():
        save()
        masters_at_save[stopped.run_state.iteration] = stopped.optimizer.master.clone()

    stopped.save = save_and_remember
    run_trainer(stopped, stop_after=STOP_AFTER)
    assert sorted(masters_at_save) == [INTERVAL]

    resumed = make_trainer(with_updates(cfg, checkpoint={"load": cfg["checkpoint"]["save"]}))
    assert resumed.run_state.iteration == INTERVAL
    master = resumed.optimizer.master
    params = next(iter(resumed.named_parameters().values()))
    assert params.dtype == torch.bfloat16 and master.dtype == torch.float32
    assert torch.equal(master, masters_at_save[INTERVAL])
    # The masters carry more than the bf16 weights: re-deriving them from the weights would differ.
    from_weights = torch.cat([resumed.grads.params[s:e].float() for _, s, e in resumed.grads.owned_pieces()])
    assert not torch.equal(master, from_weights)
    run_trainer(resumed)
    assert_same_losses(full, cfg["checkpoint"]["save"])


# ------------------------------------------------------------------------- two processes
def _layout_job(rank, world_size, data, root, layout, other_layout):
    """At ``layout``: the uninterrupted run, the stopped and resumed run, and a run resumed from the
    uninterrupted run's checkpoint of iteration INTERVAL at ``other_layout``. Rank 0 returns the
    losses of the three directories."""
    cfg = base_config(data, None, parallel=layout)
    full, stopped = uninterrupted_and_resumed(cfg, root)
    resharded = os.path.join(root, "resharded")
    other = with_updates(base_config(data, None, parallel={**cfg["parallel"], **other_layout}),
                         checkpoint={"save": resharded, "load": os.path.join(full, f"iter_{INTERVAL:07d}")})
    trainer = train_in_process(other)
    if rank != 0:
        return None
    return {"full": read_losses(full), "stopped": read_losses(stopped),
            "resharded": [(r["iteration"], r["loss"]) for r in training_records(resharded)],
            "resharded_layout": (trainer.state.tp_size, trainer.state.dp_size),
            "resume_line": next(line for line in trainer.lines if line.startswith("resumed from"))}


def check_layout_job(result, other_tp_dp):
    full, stopped = result["full"], result["stopped"]
    assert len(full) == ITERS and all(math.isfinite(x) for x in full)
    assert stopped == full, f"resumed {stopped} != uninterrupted {full}"
    assert result["resharded_layout"] == other_tp_dp
    iterations = [i for i, _ in result["resharded"]]
    assert iterations == list(range(INTERVAL + 1, ITERS + 1))
    resharded = [loss for _, loss in result["resharded"]]
    # Another layout sums in another order: the same curve to float32 rounding (Adam's default
    # eps 1e-8 does not amplify it at these gradient sizes; the reference curve of the other
    # layout from scratch would differ by the same order).
    torch.testing.assert_close(torch.tensor(resharded, dtype=torch.float64),
                               torch.tensor(full[INTERVAL:], dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.distributed
def test_resume_dp2_distributed_optimizer_and_reshard_to_tp2(tiny_data, tmp_path):
    # Small buckets: several reduce-scatters, ZeRO slices that cut parameters mid-tensor.
    layout = {"tp": 1, "distributed_optimizer": True, "bucket_size": 30000}
    [result, _] = run_distributed(_layout_job, 2, args=(tiny_data, str(tmp_path), layout,
                                                        {"tp": 2, "distributed_optimizer": False}), timeout=240)
    check_layout_job(result, (2, 1))
    assert "saved with layout" in result["resume_line"] and "'dp': 2" in result["resume_line"]


@pytest.mark.distributed
def test_resume_tp2_sequence_parallel_and_reshard_to_dp2_distributed_optimizer(tiny_data, tmp_path):
    layout = {"tp": 2, "sequence_parallel": True}
    [result, _] = run_distributed(_layout_job, 2, args=(tiny_data, str(tmp_path), layout,
                                                        {"tp": 1, "sequence_parallel": False,
                                                         "distributed_optimizer": True}), timeout=240)
    check_layout_job(result, (1, 2))
    assert "'tp': 2" in result["resume_line"]


# -------------------------------------------------------------------- tools/pretrain.py
@pytest.mark.slow
def test_pretrain_command_resumes_the_same_curve(tiny_data, tmp_path):
    """The command line: a run whose newest checkpoint is older than its metrics (it died between
    checkpoints) resumed with --checkpoint.load gives the uninterrupted run's metrics.jsonl losses."""
    cfg = base_config(tiny_data, str(tmp_path / "full"))
    done = run_pretrain(config_args(cfg), nproc=1, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    stopped = str(tmp_path / "stopped")
    train_in_process(with_updates(cfg, checkpoint={"save": stopped}), stop_after=STOP_AFTER)
    resumed = run_pretrain(config_args(with_updates(cfg, checkpoint={"save": stopped, "load": stopped})),
                           nproc=1, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {stopped}/iter_{INTERVAL:07d} at iteration {INTERVAL}" in resumed.stdout
    assert_same_losses(str(tmp_path / "full"), stopped)


# --------------------------------------------------------------- what a resume refuses
@pytest.fixture(scope="module")
def ct_checkpoint(tiny_data, tmp_path_factory):
    """A CT run of 2 iterations (checkpoint at 2) and its config."""
    save = str(tmp_path_factory.mktemp("ct_checkpoint") / "run")
    cfg = tiny_run_config(tiny_data, save, train={"iters": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg


@pytest.mark.parametrize("change, named", [
    ({"model": {"num_hidden_layers": 1}}, "num_hidden_layers: 2 != 1"),
    ({"model": {"hidden_size": 32, "intermediate_size": 96}}, "hidden_size: 64 != 32"),
    ({"data": {"seq_length": 32}}, "data.seq_length: 64 -> 32"),
    ({"train": {"seed": 7}}, "train.seed: 1234 -> 7"),
    ({"train": {"global_batch_size": 4}}, "train.global_batch_size: 8 -> 4"),
    ({"train": {"iters": 800}}, "train.iters: 2 -> 800"),  # another sample count: another CT order
    ({"train": {"stage": "sft"}, "data": {"seq_length": 64}}, "train.stage: 'ct' -> 'sft'"),
])
def test_resume_refuses_another_model_or_data_setting_by_name(ct_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                              change, named):
    import engine.train.loop as loop

    steps = []
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: steps.append(1))
    save = str(tmp_path / "resumed")
    cfg = with_updates(ct_checkpoint, checkpoint={"save": save, "load": ct_checkpoint["checkpoint"]["save"]},
                       train={"iters": 4})
    cfg = with_updates(cfg, **change)
    if change.get("train", {}).get("stage") == "sft":
        cfg["data"]["train"] = tiny_data["train"]
    with pytest.raises(ValueError) as refused:
        loop.train(run_config(cfg), log=lambda s: None)
    message = str(refused.value)
    assert "checkpoint.load" in message and named in message, message
    assert steps == [] and not os.path.exists(os.path.join(save, "metrics.jsonl"))


def test_resume_refuses_other_training_data_and_weights_only_checkpoints(ct_checkpoint, tiny_data, tmp_path):
    from engine.train import checkpoint as ckpt_io

    load = ct_checkpoint["checkpoint"]["save"]
    other_data = with_updates(ct_checkpoint, data={"train": tiny_data["valid"]},
                              checkpoint={"save": str(tmp_path / "a"), "load": load})
    with pytest.raises(ValueError, match="data.train"):
        make_trainer(other_data)
    # A converted model (weights, no run state) starts a run with checkpoint.init, not load.
    source = ckpt_io.open_checkpoint(load)
    weights = ckpt_io.load_rank_shard(source, 0, 0, 1, 1)
    converted = str(tmp_path / "converted")
    ckpt_io.save_checkpoint(converted, 0, source.config, 1, 1, {(0, 0): weights})
    resume = with_updates(ct_checkpoint, checkpoint={"save": str(tmp_path / "b"), "load": converted})
    with pytest.raises(ValueError, match="not a training checkpoint.*checkpoint.init"):
        make_trainer(resume)
    trainer = make_trainer(with_updates(resume, checkpoint={"load": None, "init": converted}))
    assert trainer.run_state.iteration == 0


# --------------------------------------------------------------------------- NaN / Inf steps
class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def parameters(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.named_parameters().items()}


def poison(monkeypatch, trainer, bad_iterations, kind: str) -> dict:
    """Make iterations ``bad_iterations`` non-finite: ``kind`` "loss" turns the loss NaN, "grad" keeps
    the loss and makes its gradients infinite. Returns, filled as the run goes, for each iteration
    the parameters before and after, the optimizer's step count before and after, and the result."""
    import engine.train.loop as loop
    import engine.train.step as step_module

    current = {"iteration": 0}
    make_loss_fn = step_module.make_loss_fn

    def poisoned_make_loss_fn(model, state, loss_tokens):
        loss_fn = make_loss_fn(model, state, loss_tokens)
        if current["iteration"] not in bad_iterations:
            return loss_fn

        def poisoned(logits, microbatch):
            loss, loss_sum = loss_fn(logits, microbatch)
            if kind == "loss":
                return loss * float("nan"), loss_sum * float("nan")
            return InfiniteGradient.apply(loss), loss_sum

        return poisoned

    steps = {}
    train_step = loop.train_step

    def recording_train_step(*args, **kwargs):
        iteration = current["iteration"] = trainer.run_state.iteration + 1
        before, optimizer_steps = parameters(trainer), trainer.optimizer.steps
        result = train_step(*args, **kwargs)
        steps[iteration] = {"before": before, "after": parameters(trainer), "result": result,
                            "optimizer_steps": (optimizer_steps, trainer.optimizer.steps)}
        return result

    monkeypatch.setattr(step_module, "make_loss_fn", poisoned_make_loss_fn)
    monkeypatch.setattr(loop, "train_step", recording_train_step)
    return steps


def same(a: dict, b: dict) -> bool:
    """Equal tensors under every name of ``b``; a vocabulary-padded parameter of ``a`` is cut to
    ``b``'s rows (checkpoints hold the unpadded tensors)."""
    return all(torch.equal(a[n][tuple(slice(0, size) for size in b[n].shape)], b[n]) for n in b)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_and_training_continues(tiny_data, tmp_path, monkeypatch, kind):
    save = str(tmp_path / "run")
    trainer = make_trainer(tiny_run_config(tiny_data, save, train={"iters": 4}))
    steps = poison(monkeypatch, trainer, {2}, kind)
    trainer.run()
    assert steps[2]["result"].skipped and not math.isfinite(steps[2]["result"].grad_norm)
    assert same(steps[2]["before"], steps[2]["after"]), "a skipped step changed the parameters"
    assert steps[2]["optimizer_steps"] == (1, 1), "a skipped step advanced the optimizer"
    for i in (1, 3, 4):  # the steps around it update as usual, from finite gradients
        assert not steps[i]["result"].skipped
        assert not same(steps[i]["before"], steps[i]["after"])
        assert all(torch.isfinite(p).all() for p in steps[i]["after"].values())
    assert steps[4]["optimizer_steps"] == (2, 3)
    records = training_records(save)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert [r["skipped"] for r in records] == [0, 1, 1, 1]
    assert math.isnan(records[1]["loss"]) == (kind == "loss")
    assert not math.isfinite(records[1]["grad_norm"])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in (records[0], *records[2:]))
    assert any(line.startswith("iteration 2: skipped the update") for line in trainer.lines)


def test_consecutive_skips_stop_the_run_keeping_the_last_checkpoint(tiny_data, tmp_path, monkeypatch):
    from engine.train import checkpoint as ckpt_io
    from engine.train.loop import TrainingError

    save = str(tmp_path / "run")
    cfg = tiny_run_config(tiny_data, save, train={"iters": 8, "max_skipped_steps": 3}, checkpoint={"interval": 2})
    trainer = make_trainer(cfg)
    steps = poison(monkeypatch, trainer, {3, 4, 5}, "loss")
    with pytest.raises(TrainingError) as stopped:
        trainer.run()
    message = str(stopped.value)
    assert message.startswith("iteration 5: 3 consecutive steps") and "train.max_skipped_steps 3" in message
    assert f"{save}/iter_0000004" in message and "\n" not in message
    assert sorted(steps) == [1, 2, 3, 4, 5]
    records = training_records(save)
    assert [(r["iteration"], r["skipped"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]

    # The newest checkpoint (iteration 4, saved between skips) holds the weights of iteration 2.
    ckpt = ckpt_io.open_checkpoint(save)
    assert ckpt.iteration == 4
    saved = ckpt_io.load_full_tensors(ckpt)
    assert set(saved) == set(steps[3]["before"])
    assert same(steps[3]["before"], saved) and same(steps[5]["after"], saved)

    # It resumes: with finite steps the run goes on, the skip streak broken.
    monkeypatch.undo()
    resumed = train_in_process(with_updates(cfg, checkpoint={"load": save}), stop_after=6)
    assert resumed.run_state.iteration == 6 and resumed.run_state.skipped_in_a_row == 0
    records = training_records(save)
    assert [(r["iteration"], r["skipped"]) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert all(math.isfinite(r["loss"]) for r in records[4:])


def test_pretrain_command_exits_1_with_one_line_after_repeated_non_finite_steps(tiny_data, tmp_path):
    """A learning rate of 1e30 makes every step after the first overflow: the command stops at
    iteration 4 (three skips), exit status 1, one line on stderr; the checkpoint of iteration 3 loads."""
    from engine.train import checkpoint as ckpt_io

    save = str(tmp_path / "run")
    cfg = tiny_run_config(tiny_data, save, train={"iters": 8, "lr": 1e30, "min_lr": 1e30, "warmup_iters": 0,
                                                  "lr_decay": "constant"}, checkpoint={"interval": 1})
    done = run_pretrain(config_args(cfg), timeout=180, torchrun=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("pretrain.py: error (rank 0): iteration 4: 3 consecutive steps"), done.stderr
    assert f"{save}/iter_0000003" in done.stderr
    assert [r["skipped"] for r in training_records(save)] == [0, 1, 2, 3]
    ckpt = ckpt_io.open_checkpoint(save)
    assert ckpt.iteration == 3 and ckpt.has_optimizer
    assert all(torch.isfinite(t).all() for t in ckpt_io.load_full_tensors(ckpt).values())
