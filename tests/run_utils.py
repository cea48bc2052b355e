"""Helpers for end-to-end tests of training runs: tiny data, run configs, ``tools/pretrain.py`` under
torchrun in a subprocess, and the metrics a run writes.

    data = make_tiny_data(tmp_dir)                 # or the session fixture ``tiny_data``
    cfg = tiny_run_config(data, save_dir, train={"iters": 4})
    proc = run_pretrain(config_args(cfg), nproc=2, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = read_losses(save_dir)                 # [loss of iteration 1, 2, ...]

``tiny_data`` is a pytest fixture: a test module uses it after ``from run_utils import tiny_data``.
It builds the data once per session (the second module that asks finds it built).

Subprocesses run on CPU with gloo (``CUDA_VISIBLE_DEVICES`` empty), one thread per process, in a
process group of their own: on timeout the whole group (torchrun and every rank) is killed and
``TimeoutError`` is raised with what the run printed, so no process outlives a test.
``start_pretrain`` / ``finish`` split the same call for runs that must overlap (two "nodes").

In-process runs (one process, or each rank of ``dist_utils.run_distributed``) go through
``train_in_process(cfg, stop_after=k)``: the run stops as if killed once k steps are done, before
step k + 1 (only what it saved and logged by then remains); the :class:`Trainer` is returned.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "tools" / "pretrain.py"

MARKER = "LTU_TEST_RUN"  # environment variable carried by every process of a test run
TINY_DATA_VERSION = 1  # bump when make_tiny_data changes what it writes


# ---------------------------------------------------------------------------------------- data
def make_tiny_data(directory: str | os.PathLike, records_per_domain: int = 40, vocab_size: int = 400,
                   seed: int = 0) -> dict:
    """Synthetic SAR logs -> SentencePiece tokenizer -> token and reward-mask datasets in ``directory``.

    Five domains, the episodic ``feed/session`` among them, so records hold 1 to 5 reward tokens.
    Returns ``{"root", "train", "valid" (dataset prefixes), "tokenizer" (model path),
    "vocab_size", "longest_record" (tokens of the longest training record), "sft_seq_length"
    (a data.seq_length that fits every record, a multiple of 8)}``.
    """
    from engine.data.indexed import IndexedDataset
    from engine.data.preprocess import PreprocessConfig, preprocess, train_tokenizer_on_logs
    from engine.data.samples import document_token_counts
    from engine.data.synthetic import DEFAULT_DOMAINS, SyntheticConfig, write_logs
    from engine.data.tokenizer import Tokenizer

    root = Path(directory)
    logs, data = root / "logs", root / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_logs(SyntheticConfig(seed=seed, train_per_domain=records_per_domain,
                               valid_per_domain=max(records_per_domain // 5, 1), test_per_domain=1,
                               domains=DEFAULT_DOMAINS + ("feed/session",)), str(logs))
    tokenizer = str(data / "tokenizer.model")
    train_tokenizer_on_logs([str(logs / "train")], tokenizer, vocab_size=vocab_size)
    train, valid = str(data / "sar_train"), str(data / "sar_valid")
    preprocess(PreprocessConfig(inputs=[str(logs / "train")], output_prefix=train, tokenizer_model=tokenizer,
                                append_eod=True, progress=False))
    preprocess(PreprocessConfig(inputs=[str(logs / "valid")], output_prefix=valid, tokenizer_model=tokenizer,
                                append_eod=True, progress=False, reward_bins=train + ".reward_bins.json"))
    longest = 0
    for prefix in (train, valid):
        ds = IndexedDataset(prefix)
        longest = max(longest, int(document_token_counts(ds.sequence_lengths, ds.document_indices).max()))
    return {"root": str(root), "train": train, "valid": valid, "tokenizer": tokenizer,
            "vocab_size": Tokenizer(tokenizer).vocab_size, "longest_record": longest,
            "sft_seq_length": -(-(longest - 1) // 8) * 8}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """:func:`make_tiny_data` once per test session (shared by every module that imports it)."""
    root = tmp_path_factory.getbasetemp() / f"tiny_data_v{TINY_DATA_VERSION}"
    done = root / "tiny_data.json"
    if done.is_file():
        return json.loads(done.read_text())
    info = make_tiny_data(root)
    done.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------- configs
def tiny_run_config(data: dict, save: str | os.PathLike | None, stage: str = "ct", **sections) -> dict:
    """A nested config dict (what a YAML file holds) of a fast run on ``data``: the tiny preset, fp32,
    CT with 64-token samples (SFT: ``data["sft_seq_length"]``), log_interval 1, 4 iterations, 8
    samples per step in microbatches of 2, saving to ``save``. ``sections`` update it section by
    section, e.g. ``train={"iters": 6}, parallel={"tp": 2}``."""
    cfg = {
        "model": {"preset": "tiny"},
        "parallel": {"tp": 1, "timeout_s": 60.0},
        "data": {"train": data["train"], "seq_length": 64 if stage == "ct" else data["sft_seq_length"]},
        "train": {"stage": stage, "iters": 4, "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3,
                  "min_lr": 1e-4, "warmup_iters": 1, "lr_decay": "cosine", "dtype": "fp32",
                  "log_interval": 1, "seed": 1234, "kernels": "torch"},
        "checkpoint": {"save": None if save is None else str(save)},
    }
    for section, values in sections.items():
        if section not in cfg:
            raise KeyError(f"tiny_run_config: unknown section {section!r}")
        cfg[section].update(values)
    return cfg


def with_updates(cfg: dict, **sections) -> dict:
    """A deep copy of ``cfg`` with ``sections`` updated as in :func:`tiny_run_config`."""
    out = copy.deepcopy(cfg)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


def config_args(cfg: dict) -> list[str]:
    """``--section.field value`` flags for every field of a nested config dict (None fields left out)."""
    args = []
    for section, values in cfg.items():
        for key, value in values.items():
            if value is None:
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            args += [f"--{section}.{key}", text]
    return args


def run_config(cfg: dict):
    """The :class:`engine.config.RunConfig` of a nested config dict (for in-process runs)."""
    from engine.config import config_from_dict

    return config_from_dict(copy.deepcopy(cfg), source="test config")


# --------------------------------------------------------------------------------- in process
class RunStopped(Exception):
    """Raised inside a run by :func:`run_trainer` to stop it as if the job had been killed."""


def make_trainer(cfg: dict, log=None):
    """An :class:`engine.train.loop.Trainer` of a nested config dict; its log lines go to
    ``trainer.lines`` (and to ``log`` when given)."""
    from engine.train.loop import Trainer

    lines: list[str] = []

    def record(text: str) -> None:
        lines.append(text)
        if log is not None:
            log(text)

    trainer = Trainer(run_config(cfg), log=record)
    trainer.lines = lines
    return trainer


def run_trainer(trainer, stop_after: int | None = None) -> dict | None:
    """Run ``trainer``; with ``stop_after`` k, stop it just before step k + 1 (nothing of that step
    happens). Returns the run's summary, or None when stopped."""
    import engine.train.loop as loop

    original = loop.train_step

    def step(*args, **kwargs):
        if stop_after is not None and trainer.run_state.iteration >= stop_after:
            raise RunStopped(f"stopped after iteration {trainer.run_state.iteration}")
        return original(*args, **kwargs)

    loop.train_step = step
    try:
        return trainer.run()
    except RunStopped:
        if trainer.metrics is not None:
            trainer.metrics.close()  # what a killed run leaves: the lines flushed so far
        return None
    finally:
        loop.train_step = original


def train_in_process(cfg: dict, stop_after: int | None = None, log=None):
    """:func:`make_trainer` then :func:`run_trainer`; returns the trainer."""
    trainer = make_trainer(cfg, log)
    run_trainer(trainer, stop_after)
    return trainer


# ---------------------------------------------------------------------------------- subprocesses
def pretrain_env(env: dict | None = None) -> dict:
    """The environment of a test run: CPU only, one thread, unbuffered output, plus ``env``."""
    out = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        out.pop(var, None)
    out.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.update(env or {})
    return out


def start_pretrain(args: list[str], nproc: int = 1, env: dict | None = None, *, nnodes: int = 1,
                   node_rank: int = 0, rdzv_endpoint: str | None = None, script: str | os.PathLike = PRETRAIN,
                   cwd: str | os.PathLike = REPO, torchrun: bool = True) -> subprocess.Popen:
    """Launch ``torchrun --nproc_per_node nproc <script> args`` in a new process group; text pipes.

    One node (default): a free port on 127.0.0.1. Several (``nnodes`` > 1): c10d rendezvous at
    ``rdzv_endpoint`` ("127.0.0.1:PORT", the same for every node), this process being ``node_rank``.
    ``torchrun=False``: ``python <script> args``, one process without a launcher (its stderr is
    the script's own, without torchrun's failure report).
    """
    if not torchrun:
        if nproc != 1 or nnodes != 1:
            raise ValueError("start_pretrain: without torchrun the run is one process (nproc 1, nnodes 1)")
        return _popen([sys.executable, str(script), *map(str, args)], cwd, env)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        command += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("start_pretrain: nnodes > 1 needs rdzv_endpoint (HOST:PORT, the same for every node)")
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=ltu-test", "--max-restarts=0"]
    command += [str(script), *map(str, args)]
    return _popen(command, cwd, env)


def _popen(command: list[str], cwd, env: dict | None) -> subprocess.Popen:
    """Start a run whose every descendant carries a marker in its environment, so that
    :func:`kill_group` finds ranks that left the process group (torchrun may start them in sessions
    of their own)."""
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    proc = subprocess.Popen(command, cwd=str(cwd), env=pretrain_env({**(env or {}), MARKER: marker}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    proc.ltu_marker = marker
    return proc


def marked_processes(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (torchrun and its ranks), then any marked descendant that
    left the group, and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in marked_processes(getattr(proc, "ltu_marker", "")) if hasattr(proc, "ltu_marker") else []:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """Wait for a run of :func:`start_pretrain`; past ``timeout`` seconds kill its whole process group
    and raise TimeoutError with its output. Whatever happens, no process of the group is left."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f"run {proc.args} did not finish in {timeout} s\n--- stdout\n{stdout}\n"
                           f"--- stderr\n{stderr}") from None
    except BaseException:
        kill_group(proc)
        raise
    # Ranks torchrun failed to reap (it died first) go with the group.
    kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_pretrain(args: list[str], nproc: int = 1, timeout: float = 120, env: dict | None = None, *,
                 nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                 script: str | os.PathLike = PRETRAIN, torchrun: bool = True) -> subprocess.CompletedProcess:
    """:func:`start_pretrain` then :func:`finish`: the completed run (returncode, stdout, stderr)."""
    return finish(start_pretrain(args, nproc, env, nnodes=nnodes, node_rank=node_rank,
                                 rdzv_endpoint=rdzv_endpoint, script=script, torchrun=torchrun), timeout)


# --------------------------------------------------------------------------------------- metrics
def read_metrics(save_dir: str | os.PathLike) -> list[dict]:
    """Every record of ``<save_dir>/metrics.jsonl`` in order (NaN/Inf read back as floats)."""
    from engine.train.metrics import read_metrics as read

    return read(Path(save_dir) / "metrics.jsonl")


def training_records(save_dir: str | os.PathLike) -> list[dict]:
    """The training-step records (those with a ``loss``) of ``<save_dir>/metrics.jsonl``, in order."""
    return [r for r in read_metrics(save_dir) if "loss" in r]


def read_losses(save_dir: str | os.PathLike) -> list[float]:
    """The ``loss`` of each training record, in order; checks the iterations run 1, 2, ... without gap
    (log_interval 1)."""
    records = training_records(save_dir)
    iterations = [r["iteration"] for r in records]
    if iterations != list(range(1, len(records) + 1)):
        raise AssertionError(f"{save_dir}/metrics.jsonl: training iterations {iterations}, expected 1..N "
                             "once each (log_interval 1)")
    return [r["loss"] for r in records]
