"""Faults of ``tools/pretrain.py`` runs: kill -9 during a checkpoint save, bad input on every rank, a
rank that dies mid-run, and two "nodes" on one host.

Faults come from ``tests/pretrain_with_fault.py`` (a rank SIGKILLs itself at a chosen point); the
product has no test hooks. Every run is marked with an environment variable of its own, and after
each test the processes that carry it are looked up in /proc: any left over is killed and fails the
test (torchrun starts its ranks in sessions of their own, so killing torchrun's process group alone
would not reach them).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dist_utils import free_port
from run_utils import (PRETRAIN, REPO, config_args, finish, pretrain_env, read_losses, start_pretrain,
                       tiny_data, tiny_run_config, training_records, with_updates)

WRAPPER = Path(__file__).resolve().parent / "pretrain_with_fault.py"
MARK = "LTU_FAULT_TEST_RUN"  # every process of a test's runs inherits it
RUN_TIMEOUT = 150  # seconds; a run that needs it is hung

assert tiny_data  # a pytest fixture, used by name below


# --------------------------------------------------------------------------------- processes
def marked_pids(token: str) -> list[int]:
    """Live processes whose environment holds ``MARK=token`` (zombies excluded)."""
    needle = f"{MARK}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != b"Z" and needle in environ:
            found.append(int(entry))
    return found


@contextlib.contextmanager
def no_strays():
    """Yields the environment that marks a test's runs; on exit every marked process still alive
    after a short grace is SIGKILLed, and (when the test itself passed) the test fails naming them."""
    token = uuid.uuid4().hex
    failed = False
    try:
        yield {MARK: token}
    except BaseException:
        failed = True
        raise
    finally:
        deadline = time.monotonic() + 10.0
        while (left := marked_pids(token)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left and not failed:
            pytest.fail(f"processes outlived the test's runs: {left}")


def timed_run(args, nproc=2, env=None, timeout=RUN_TIMEOUT, script=WRAPPER, **kwargs):
    """``run_utils.run_pretrain`` through ``script``; returns (completed process, seconds)."""
    began = time.monotonic()
    proc = finish(start_pretrain(args, nproc, env, script=script, **kwargs), timeout)
    return proc, time.monotonic() - began


def output(proc) -> str:
    return f"--- exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def iteration_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("iter ")]


# ------------------------------------------------------------------ 1. kill -9 during a save
KILL_POINTS = [
    # (point, rank that kills itself, what the save of iteration 4 leaves)
    ("model_write", 1, "saving"),    # TP rank 1 inside its model.safetensors
    ("rank_files", 1, "saving"),     # TP rank 1 after its model, meta and optimizer files
    ("before_latest", 0, "renamed"),  # the committing rank: iter_4 renamed, latest still 2
]


@pytest.mark.parametrize("point,rank,leaves", KILL_POINTS, ids=[p for p, _, _ in KILL_POINTS])
def test_kill_during_save_leaves_previous_checkpoint_resumable(tiny_data, tmp_path, point, rank, leaves):
    from engine.train.checkpoint import LATEST, iteration_dir_name, open_checkpoint

    save = tmp_path / "run"
    cfg = tiny_run_config(tiny_data, save, parallel={"tp": 2, "timeout_s": 20}, checkpoint={"interval": 2})
    fault = {"LTU_FAULT": point, "LTU_FAULT_RANK": str(rank), "LTU_FAULT_ITERATION": "4"}
    with no_strays() as mark:
        killed, seconds = timed_run(config_args(cfg), env={**mark, **fault})
        assert killed.returncode != 0, output(killed)
        assert "exitcode  : -9" in killed.stderr, output(killed)  # torchrun saw the SIGKILL
        assert seconds < 90, f"the survivor took {seconds:.0f} s to exit\n{output(killed)}"
        # Iterations 1-4 ran and were logged (rank 0 logs before it saves); the save of 2 completed.
        logged = read_losses(save)
        assert len(logged) == 4, output(killed)

        assert (save / LATEST).read_text().strip() == "2"
        previous = open_checkpoint(save)
        assert previous.iteration == 2 and previous.has_optimizer
        saving, final = save / (iteration_dir_name(4) + ".saving"), save / iteration_dir_name(4)
        if leaves == "saving":
            assert saving.is_dir() and not final.exists()
        else:  # complete but unpublished: `latest` still names 2, so a resume starts there
            assert final.is_dir() and not saving.exists()
            assert open_checkpoint(save, 4).iteration == 4

        resumed, _ = timed_run(config_args(with_updates(cfg, checkpoint={"load": str(save)})), env=mark,
                               script=PRETRAIN)
        assert resumed.returncode == 0, output(resumed)
        assert f"resumed from {save / iteration_dir_name(2)} at iteration 2" in resumed.stdout, output(resumed)
        assert [int(line.split()[1].split("/")[0]) for line in iteration_lines(resumed.stdout)] == [3, 4]
    # The resumed run continues the killed one exactly: the same losses, bit for bit.
    assert read_losses(save) == logged
    assert open_checkpoint(save).iteration == 4
    assert not list(save.glob("*.saving")), "the next save of iteration 4 removes the leftover"


# --------------------------------------------------------------- 2. bad input on every rank
def run_ranks(args: list[str], env: dict, world_size: int = 2, timeout: float = 90,
              script: Path = PRETRAIN) -> list[tuple]:
    """Each rank as its own ``python <script>`` process with the launcher's environment (RANK,
    WORLD_SIZE, MASTER_ADDR...), so each rank's stderr and exit status are its own.
    Returns ``[(returncode, stdout, stderr, seconds), ...]`` by rank."""
    port = str(free_port())
    procs, began = [], time.monotonic()
    for rank in range(world_size):
        rank_env = pretrain_env({**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                 "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "COLUMNS": "200"})
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=str(REPO), env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    results = []
    try:
        for proc in procs:
            remaining = max(timeout - (time.monotonic() - began), 1.0)
            try:
                stdout, stderr = proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"rank {len(results)} still running after {timeout} s") from None
            results.append((proc.returncode, stdout, stderr, time.monotonic() - began))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return results


def _tiny_token_data(tmp_path: Path, vocab_size: int) -> str:
    """A data set of 3 records of 10 tokens: 30 tokens, fewer than one 65-token sample."""
    from engine.data.indexed import IndexedDatasetBuilder, best_dtype

    prefix = str(tmp_path / "few_tokens")
    with IndexedDatasetBuilder(prefix + ".bin", best_dtype(vocab_size)) as builder:
        for doc in range(3):
            builder.add_item([(doc * 10 + i) % vocab_size for i in range(10)])
            builder.end_document()
    with open(prefix + ".meta.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizer": {"vocab_size": vocab_size}}, f)
    return prefix


BAD_INPUTS = {
    # name: (overrides of the tiny run, exit status, what every rank's stderr must say)
    "missing_data_prefix": (dict(data={"train": "{tmp}/no_such_prefix"}), 1,
                            ["data prefix", "no_such_prefix", "not found"]),
    "fewer_tokens_than_a_sample": (dict(data={"train": "{few}"}), 1, ["30 tokens, fewer than one sample"]),
    "global_batch_not_divisible": (dict(train={"global_batch_size": 6}), 1,
                                   ["train.global_batch_size 6 is not divisible by train.micro_batch_size 2 "
                                    "x data-parallel size 2"]),
    "tp_does_not_divide_heads": (dict(parallel={"tp": 2}, model={"num_attention_heads": 1,
                                                                  "num_key_value_heads": 1}), 1,
                                 ["tensor-parallel size 2 does not divide the number of attention heads"]),
    "vocab_mismatch": (dict(model={"vocab_size": "{vocab_plus}"}), 1,
                       ["vocabulary mismatch", "vocab_size {vocab_plus}"]),
    "unknown_field": (dict(train={"bogus_field": 3}), 2, ["--train.bogus_field"]),
    "mistyped_value": (dict(train={"iters": "four"}), 2, ["--train.iters", "four"]),
    "unknown_field_in_yaml": ("yaml:train:\n  bogus_field: 3\n", 2, ["unknown field train.bogus_field"]),
    "mistyped_value_in_yaml": ("yaml:train:\n  iters: four\n", 2, ["train.iters: expected int, got 'four'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_on_every_rank_before_any_step(tiny_data, tmp_path, case):
    overrides, status, phrases = BAD_INPUTS[case]
    values = {"tmp": str(tmp_path), "vocab_plus": str(tiny_data["vocab_size"] + 8)}
    if case == "fewer_tokens_than_a_sample":
        values["few"] = _tiny_token_data(tmp_path, tiny_data["vocab_size"])
    # A rank that got past the checks would wait out this timeout on its peer: far past the bound below.
    cfg = tiny_run_config(tiny_data, tmp_path / "run", parallel={"timeout_s": 300})
    if isinstance(overrides, str):  # a YAML file holds the bad field
        config_file = tmp_path / "bad.yaml"
        config_file.write_text(overrides.removeprefix("yaml:"))
        args = ["--config", str(config_file), *config_args(cfg)]
    else:
        args = config_args(with_updates(cfg, **{s: {k: str(v).format(**values) for k, v in fields.items()}
                                                for s, fields in overrides.items()}))
    phrases = [p.format(**values) for p in phrases]
    with no_strays() as mark:
        ranks = run_ranks(args, mark)
    for rank, (code, stdout, stderr, seconds) in enumerate(ranks):
        where = f"rank {rank} ({seconds:.1f} s):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        assert code == status, where
        flat = " ".join(stderr.replace("│", " ").split())  # tyro draws boxes and wraps
        assert all(p in flat for p in phrases), f"{phrases} not all named; {where}"
        assert "Traceback" not in stderr, where
        assert not iteration_lines(stdout) and "layout:" not in stdout, f"training began; {where}"
        assert seconds < 60, f"took {seconds:.1f} s; {where}"
        if status == 1:
            assert f"error (rank {rank})" in stderr, where


# ------------------------------------------------------------------- 3. a rank dies mid-run
def test_dead_rank_makes_the_others_exit(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "run", parallel={"timeout_s": 15}, train={"iters": 8})
    fault = {"LTU_FAULT": "train_step", "LTU_FAULT_RANK": "1", "LTU_FAULT_ITERATION": "3"}
    with no_strays() as mark:
        proc, seconds = timed_run(config_args(cfg), env={**mark, **fault})
    assert proc.returncode != 0, output(proc)
    assert "exitcode  : -9" in proc.stderr, output(proc)
    done = [int(line.split()[1].split("/")[0]) for line in iteration_lines(proc.stdout)]
    assert done == [1, 2], output(proc)  # iteration 3 needs rank 1's gradients
    assert seconds < 15 + 60, f"{seconds:.0f} s: more than the group timeout plus start-up\n{output(proc)}"


def test_dead_rank_without_torchrun_survivor_exits_on_its_own(tiny_data, tmp_path):
    """No launcher to tear the job down: the survivor's own collective fails (peer gone, or the
    process-group timeout) and it exits non-zero, naming the failure."""
    cfg = tiny_run_config(tiny_data, tmp_path / "run", parallel={"timeout_s": 15}, train={"iters": 8})
    fault = {"LTU_FAULT": "train_step", "LTU_FAULT_RANK": "1", "LTU_FAULT_ITERATION": "3"}
    args = config_args(cfg)
    with no_strays() as mark:
        (code0, out0, err0, seconds0), (code1, _, _, _) = run_ranks(args, {**mark, **fault}, script=WRAPPER)
    where = f"--- stdout\n{out0}\n--- stderr\n{err0}"
    assert code1 == -signal.SIGKILL
    assert code0 == 1 and "pretrain.py: error (rank 0)" in err0, where
    assert seconds0 < 15 + 60, f"{seconds0:.0f} s; {where}"


# -------------------------------------------------------------------- 4. two nodes, one host
def test_two_nodes_train_the_same_curve_as_one(tiny_data, tmp_path):
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    cfg = tiny_run_config(tiny_data, one_node, parallel={"timeout_s": 30})
    with no_strays() as mark:
        single, _ = timed_run(config_args(cfg), nproc=2, env=mark, script=PRETRAIN)
        assert single.returncode == 0, output(single)
        endpoint = f"127.0.0.1:{free_port()}"
        args = config_args(with_updates(cfg, checkpoint={"save": str(two_nodes)}))
        nodes = [start_pretrain(args, 1, mark, nnodes=2, node_rank=r, rdzv_endpoint=endpoint) for r in (0, 1)]
        done = [finish(node, RUN_TIMEOUT) for node in nodes]
    for node_rank, proc in enumerate(done):
        assert proc.returncode == 0, f"node {node_rank}\n{output(proc)}"
    # c10d hands out ranks in the order the nodes join: either node may hold global rank 0, which logs.
    logs = "".join(proc.stdout for proc in done)
    assert "layout: world 2 = tp 1 x pp 1 x dp 2" in logs, logs
    assert len(iteration_lines(logs)) == 4, logs
    # Same ranks, same data shards, the same two-rank reductions: the curves agree bit for bit.
    assert read_losses(two_nodes) == read_losses(one_node)
    assert [r["grad_norm"] for r in training_records(two_nodes)] == \
        [r["grad_norm"] for r in training_records(one_node)]
