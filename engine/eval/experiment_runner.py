"""Running the LTU experiment's plan: each job a subprocess from the repository root, a few at a
time, each after the jobs it depends on; completed jobs are recorded under ``<work>/jobs`` and
reused when the same command is planned again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from engine.eval.experiment import REPO, ExperimentError, Job
from engine.fileio import write_json_atomic

LOG_TAIL_LINES = 15


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


@dataclass
class JobResult:
    name: str
    seconds: float
    reused: bool
    log: str


def critical_path_order(jobs: dict[str, Job]) -> list[str]:
    """Job names, those heading the costliest chain of dependent jobs first (plan order among
    equals). A job's cost is the tokens it trains on (evaluations and data steps about nothing), so
    the long CT runs start early and short jobs fill the cores at the end instead of one long run
    finishing alone."""
    children: dict[str, list[str]] = {name: [] for name in jobs}
    for name, job in jobs.items():
        for dep in job.deps:
            children[dep].append(name)
    chain: dict[str, int] = {}
    for name in reversed(list(jobs)):  # plan order puts every job after its dependencies
        chain[name] = jobs[name].info.get("tokens", 0) + 1 + max((chain[c] for c in children[name]), default=0)
    position = {name: i for i, name in enumerate(jobs)}
    return sorted(jobs, key=lambda name: (-chain[name], position[name]))


class Runner:
    """Runs a plan's jobs as subprocesses from the repository root, ``parallel`` at a time, each after
    the jobs it depends on, those heading the costliest chains first (:func:`critical_path_order`).
    A job whose record says the same command already succeeded (and whose outputs exist) is reused,
    unless a job it depends on ran again. The first failure stops the others and raises
    ExperimentError with the command and the end of its log."""

    def __init__(self, jobs: dict[str, Job], work: str, parallel: int = 1, threads_per_job: int | None = 1,
                 log=print):
        self.jobs, self.parallel, self.threads, self.log = jobs, max(1, parallel), threads_per_job, log
        self.records_dir = os.path.join(os.path.abspath(work), "jobs")

    def record_path(self, name: str) -> str:
        return os.path.join(self.records_dir, name + ".json")

    def log_path(self, name: str) -> str:
        return os.path.join(self.records_dir, name + ".log")

    def _reusable(self, job: Job) -> dict | None:
        try:
            with open(self.record_path(job.name), encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return None
        same = record.get("argv") == job.argv and record.get("returncode") == 0
        return record if same and all(os.path.exists(_abs(p)) for p in job.outputs) else None

    def _env(self) -> dict:
        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def _start(self, job: Job):
        os.makedirs(os.path.dirname(self.log_path(job.name)), exist_ok=True)
        argv = [sys.executable if job.argv[0] == "python" else job.argv[0], *job.argv[1:]]
        log = open(self.log_path(job.name), "w", encoding="utf-8")
        log.write(f"$ {job.command()}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return proc, log, time.perf_counter()

    def run(self) -> dict[str, JobResult]:
        results: dict[str, JobResult] = {}
        pending = critical_path_order(self.jobs)
        running: dict[str, tuple] = {}
        total = len(pending)
        try:
            while pending or running:
                for name in list(pending):
                    job = self.jobs[name]
                    if not all(d in results for d in job.deps):
                        continue
                    # Reused only when everything it reads was reused too: a rerun input means a rerun.
                    record = self._reusable(job) if all(results[d].reused for d in job.deps) else None
                    if record is not None:
                        pending.remove(name)
                        results[name] = JobResult(name, record["seconds"], True, self.log_path(name))
                        continue
                    if len(running) < self.parallel:
                        pending.remove(name)
                        running[name] = self._start(job)
                finished = [n for n, (proc, _, _) in running.items() if proc.poll() is not None]
                if not finished:
                    time.sleep(0.05)
                    continue
                for name in finished:
                    proc, log, began = running.pop(name)
                    log.close()
                    seconds = time.perf_counter() - began
                    job = self.jobs[name]
                    if proc.returncode != 0:
                        raise ExperimentError(self._failure(job, proc.returncode))
                    write_json_atomic(self.record_path(name), {"argv": job.argv, "returncode": 0, "seconds": seconds,
                                                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    results[name] = JobResult(name, seconds, False, self.log_path(name))
                    self.log(f"[{len(results)}/{total}] {name}: {_seconds(seconds)}")
        finally:
            for proc, log, _ in running.values():
                _stop(proc)
                log.close()
        return results

    def _failure(self, job: Job, returncode: int) -> str:
        try:
            with open(self.log_path(job.name), encoding="utf-8", errors="replace") as fh:
                tail = fh.readlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        return (f"run {job.name} failed (exit status {returncode}); command, from {REPO}:\n  {job.command()}\n"
                f"last lines of {self.log_path(job.name)}:\n" + "".join("  " + line for line in tail))


def _abs(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a job and everything it started (its own session), SIGTERM first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
