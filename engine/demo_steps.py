"""The demo's training, evaluation and export steps, and what it reads back from them.

Every step is an ordinary command (``tools/pretrain.py`` under torchrun or alone,
``tools/evaluate.py``, ``tools/convert_hf.py``) run as a subprocess from the repository root, its
command line printed and its output kept in a log under the workdir, so any step can be rerun by
hand. Children run on CPU (``CUDA_VISIBLE_DEVICES`` empty: the tiny model's 4 ranks would not share
one GPU), one thread each. A failed command stops the demo with :class:`StepFailed` (its command
and the end of its log); an interrupt stops every running child, torchrun's ranks included, which
torchrun starts in sessions of their own: each child carries a marker in its environment and every
process still holding it is stopped.

After the runs, the result table puts the two arms side by side from their ``eval.json``, and the
exported Hugging Face model, loaded by ``transformers``, scores one record: the same prompt and
reward classes as the engine's evaluation (:func:`engine.eval.scoring.build_plan`), read from
``transformers``' next-token distribution.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_TAIL_LINES = 20
STOP_GRACE_S = 15.0            # after SIGTERM, before SIGKILL
MARKER = "LTU_DEMO_CHILD"       # environment variable carried by every process a command starts
AGREEMENT_TOLERANCE = 1e-4      # transformers against the engine, fp32 on CPU
# Launcher variables of an enclosing torchrun job: a child must start its own world.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


class StepFailed(RuntimeError):
    """A demo step's command failed; the message names the step, the command and the end of its log."""

    def __init__(self, step: str, message: str):
        super().__init__(message)
        self.step = step


def display_path(path: str) -> str:
    """``path`` relative to the repository root when inside it (commands run from there), else absolute."""
    absolute = os.path.abspath(path)
    return os.path.relpath(absolute, REPO) if os.path.commonpath([absolute, REPO]) == REPO else absolute


def repo_path(path: str) -> str:
    """The absolute path of a path as commands see it (relative ones from the repository root)."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)


@dataclass
class Command:
    """One step's command: the argv as printed (``python`` and ``torchrun`` resolved at launch), its log,
    the folder it writes (replaced on a rerun) and the paths that exist once it succeeded."""

    step: str
    argv: list[str]
    log: str
    out_dir: str
    outputs: list[str]

    def shell(self) -> str:
        return shlex.join(self.argv)


def launch_argv(argv: list[str]) -> list[str]:
    """The argv to execute: this interpreter for ``python``, its ``torch.distributed.run`` for ``torchrun``."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return list(argv)


def child_env(marker: str, threads: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env[MARKER] = marker
    return env


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment holds ``MARKER=marker`` (none where /proc is missing)."""
    needle = f"{MARKER}={marker}".encode()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    pids = []
    for entry in entries:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _signal_pids(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class _Running:
    def __init__(self, command: Command, threads: int):
        os.makedirs(os.path.dirname(command.log), exist_ok=True)
        self.command = command
        self.marker = uuid.uuid4().hex
        self.log = open(command.log, "w", encoding="utf-8")
        self.log.write(f"$ {command.shell()}    # from {REPO}\n")
        self.log.flush()
        self.began = time.perf_counter()
        self.proc = subprocess.Popen(launch_argv(command.argv), cwd=REPO, env=child_env(self.marker, threads),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seconds: float | None = None

    def poll(self) -> bool:
        if self.proc.poll() is None:
            return False
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.began
            self.log.close()
            self.sweep()
        return True

    def sweep(self) -> None:
        """Stop whatever the command left running (a rank torchrun failed to reap)."""
        left = marked_processes(self.marker)
        if left:
            _signal_pids(left, signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM to the command's session (torchrun passes it to its ranks) and to every marked
        process; SIGKILL to what is left after STOP_GRACE_S."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _signal_pids(marked_processes(self.marker), signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and (self.proc.poll() is None or marked_processes(self.marker)):
            time.sleep(0.1)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.sweep()
        if not self.log.closed:
            self.log.close()


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in fh.readlines()[-lines:]]
    except OSError:
        return []


def run_commands(commands: list[Command], log=print, indent: str = "", threads: int = 1) -> dict[str, float]:
    """Run ``commands`` side by side and wait for all; returns each step's wall time in seconds.

    A command that exits non-zero, or exits 0 without writing its outputs, stops the others and
    raises StepFailed. Any exception while waiting (an interrupt) stops every command first."""
    running: list[_Running] = []
    try:
        for command in commands:
            running.append(_Running(command, threads))
        pending = list(running)
        while pending:
            finished = [r for r in pending if r.poll()]
            if not finished:
                time.sleep(0.05)
                continue
            for r in finished:
                pending.remove(r)
                command = r.command
                if r.proc.returncode != 0:
                    raise StepFailed(command.step, _failure_text(command, f"exit status {r.proc.returncode}"))
                missing = [p for p in command.outputs if not os.path.exists(repo_path(p))]
                if missing:
                    raise StepFailed(command.step, _failure_text(command, f"exit status 0 but {', '.join(missing)} "
                                                                         "not written"))
                log(f"{indent}{command.step}: done in {r.seconds:.1f} s")
    finally:
        for r in running:
            if r.seconds is None:
                r.stop()
    return {r.command.step: r.seconds for r in running}


def _failure_text(command: Command, what: str) -> str:
    tail = log_tail(command.log)
    return (f"step '{command.step}' failed ({what}); its command, from {REPO}:\n  {command.shell()}\n"
            f"last lines of {command.log}:\n" + "\n".join("  " + line for line in tail))


# ------------------------------------------------------------------------------- reading results
def training_summary(save_dir: str) -> str:
    """First and last training loss and the last validation loss of a run's metrics.jsonl."""
    from engine.train.metrics import read_metrics

    records = read_metrics(os.path.join(repo_path(save_dir), "metrics.jsonl"))
    losses = [r for r in records if "loss" in r]
    valid = [r["valid_loss"] for r in records if "valid_loss" in r]
    if not losses:
        return "no training loss logged"
    text = (f"loss {losses[0]['loss']:.3f} (step {losses[0]['iteration']}) -> {losses[-1]['loss']:.3f} "
            f"(step {losses[-1]['iteration']})")
    return text + (f"; validation loss {valid[-1]:.3f}" if valid else "")


def read_eval(out_dir: str) -> dict:
    with open(os.path.join(repo_path(out_dir), "eval.json"), encoding="utf-8") as fh:
        return json.load(fh)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_ci(metric: dict) -> str:
    ci = metric.get("ci")
    text = fmt(metric.get("value"))
    return f"{text} [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else text


def group_auc(report: dict, group: str) -> float | None:
    entry = report["groups"].get(group)
    return None if entry is None else entry["metrics"]["auc"]["value"]


def results_table(reports: dict[str, dict], groups: dict[str, str]) -> str:
    """One block per group (``in_domain``, ``out_of_domain``): a row per arm (AUC, log-loss and
    accuracy with their bootstrap 95% intervals), then the chance levels and the Bayes ceiling."""
    label = 36
    head = f"{'':<{label + 2}} {'AUC [95% CI]':<22} {'log-loss [95% CI]':<22} {'accuracy [95% CI]'}"
    lines = [head, "-" * len(head)]
    for group, title in groups.items():
        entries = {arm: r["groups"].get(group) for arm, r in reports.items()}
        first = next((e for e in entries.values() if e is not None), None)
        if first is None:
            continue
        lines.append(f"{title} ({first['n']} records)")
        for arm, entry in entries.items():
            if entry is None:
                lines.append(f"  {arm:<{label}} -")
                continue
            m = entry["metrics"]
            lines.append(f"  {arm:<{label}} {_with_ci(m['auc']):<22} {_with_ci(m['log_loss']):<22} "
                         f"{_with_ci(m['accuracy'])}")
        prior, uniform = first["chance"]["prior"], first["chance"]["uniform"]
        lines.append(f"  {'chance (label frequencies)':<{label}} {fmt(prior['auc']):<22} {fmt(prior['log_loss']):<22} "
                     f"{fmt(prior['accuracy'])} (uniform guess {fmt(uniform['accuracy'])})")
        bayes = first.get("bayes") or {}
        lines.append(f"  {'Bayes ceiling (true probabilities)':<{label}} {fmt(bayes.get('auc')):<22} "
                     f"{fmt(bayes.get('log_loss')):<22} {fmt(bayes.get('accuracy'))}")
    return "\n".join(lines)


# -------------------------------------------------------------------- the exported model answers
def describe_class(bins, field: str, k: int) -> str:
    """What class ``k`` of a field's bins means, e.g. ``click=1`` or ``cost in (0.30, 0.51]``."""
    if bins.kind == "binary":
        return f"{field}={k}"
    edges = bins.edges
    if not edges:
        return f"{field} (one class)"
    if k == 0:
        return f"{field}<={edges[0]:g}"
    if k == len(edges):
        return f"{field}>{edges[-1]:g}"
    return f"{field} in ({edges[k - 1]:g}, {edges[k]:g}]"


def transformers_answer(hf_dir: str, eval_dir: str, record_file: str, record_line: int = 1) -> dict:
    """Score one record with the exported model in ``transformers`` and compare with the engine.

    The record is line ``record_line`` of ``record_file``; the engine's probabilities are those of the
    same record in ``eval_dir/predictions.jsonl`` (an evaluation whose first input is ``record_file``).
    The prompt and the reward classes are the evaluation's own (:func:`engine.eval.scoring.build_plan`
    with the evaluation's reward bins and BOS setting), tokenized by the SentencePiece model the export
    ships (``hf_dir/tokenizer.model``); the probability of each class is the exported model's
    next-token distribution at the reward position, renormalised over the field's classes
    (:func:`engine.eval.scoring.predictions_from_scores`)."""
    import torch
    import transformers

    from engine.data.reward_bins import RewardBins
    from engine.data.sar import REWARD_LABELS
    from engine.data.tokenizer import RecordEncoder, Tokenizer
    from engine.eval.scoring import build_plan, predictions_from_scores, read_eval_records

    report = read_eval(eval_dir)
    tokenizer_path = os.path.join(repo_path(hf_dir), "tokenizer.model")
    bins = RewardBins.merge([RewardBins.load(p) for p in report["reward_bins"]])
    encoder = RecordEncoder(Tokenizer(tokenizer_path), bins, add_bos=report["add_bos"])
    records = read_eval_records([repo_path(record_file)], max_records=record_line)
    if len(records) < record_line:
        raise StepFailed("transformers", f"{record_file} has no line {record_line}")
    record = records[record_line - 1]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the demo's output is one line per event
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(repo_path(hf_dir)).float().eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    plan = build_plan([record], encoder, model.config.max_position_embeddings)
    slot_scores = np.zeros(plan.num_slots)
    with torch.no_grad():
        for s, sequence in enumerate(plan.sequences):
            logits = model(torch.from_numpy(sequence)[None]).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1).numpy()
            points = np.flatnonzero(plan.point_sequence == s)
            np.add.at(slot_scores, plan.point_slot[points],
                      log_probs[plan.point_position[points], plan.point_token[points]])
    predictions = predictions_from_scores(plan, slot_scores)
    engine = _engine_predictions(eval_dir, record_line - 1)
    rewards = []
    for span, predicted in zip(plan.spans, predictions):
        key = (span.step, span.field)
        if key not in engine:
            raise StepFailed("transformers", f"{eval_dir}/predictions.jsonl has no prediction for record "
                                             f"{record_line - 1} step {span.step} field {span.field}")
        field_bins = bins.get(record.domain, span.field)
        rewards.append({"step": span.step, "field": span.field, "label": span.label,
                        "classes": [describe_class(field_bins, span.field, k) for k in range(span.num_classes)],
                        "tokens": [REWARD_LABELS[k] for k in range(span.num_classes)],
                        "transformers": predicted.probs.tolist(), "engine": list(engine[key]),
                        "true": None if span.true_probs is None else span.true_probs.tolist()})
    difference = max(float(np.max(np.abs(np.asarray(r["transformers"]) - np.asarray(r["engine"])))) for r in rewards)
    # The prompt of the first reward: the record's tokens up to the position that scores its first class.
    first = np.flatnonzero(plan.point_slot == plan.slot_start[0])
    point = first[np.argmin(plan.point_position[first])]
    prompt = encoder.tokenizer.decode(plan.sequences[plan.point_sequence[point]][:plan.point_position[point] + 1].tolist())
    return {"record": f"{record_file}:{record_line}", "domain": record.domain,
            "state": dict(record.steps[0].state), "action": dict(record.steps[0].action),
            "reward": dict(record.steps[0].reward), "prompt": prompt, "model_class": type(model).__name__,
            "rewards": rewards, "max_abs_difference": difference}


def _engine_predictions(eval_dir: str, record: int) -> dict:
    """(step, field) -> probabilities of record number ``record`` in an evaluation's predictions.jsonl."""
    out = {}
    with open(os.path.join(repo_path(eval_dir), "predictions.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            p = json.loads(line)
            if p["record"] == record:
                out[(p["step"], p["field"])] = p["probs"]
    return out


def format_answer(answer: dict, indent: str) -> list[str]:
    """The record, the prompt the model reads and each class's probability, engine beside transformers."""
    lines = [f"{indent}record {answer['record']} ({answer['domain']})",
             f"{indent}  state:  " + ", ".join(f"{k}={v}" for k, v in answer["state"].items()),
             f"{indent}  action: " + ", ".join(f"{k}={v}" for k, v in answer["action"].items()),
             f"{indent}  observed reward: " + ", ".join(f"{k}={v:g}" for k, v in answer["reward"].items()),
             f"{indent}  the model reads: {answer['prompt']!r}"]
    for reward in answer["rewards"]:
        width = max(len(c) + len(t) + 1 for c, t in zip(reward["classes"], reward["tokens"])) + 2
        lines.append(f"{indent}  P({reward['field']} | state, action), renormalised over its "
                     f"{len(reward['classes'])} classes:")
        lines.append(f"{indent}    {'class':<{width}} {'transformers':>12} {'engine':>12} {'true':>8}")
        for k, (name, token) in enumerate(zip(reward["classes"], reward["tokens"])):
            true = "-" if reward["true"] is None else f"{reward['true'][k]:.4f}"
            mark = "  <- observed" if k == reward["label"] else ""
            lines.append(f"{indent}    {name + ' ' + token:<{width}} {reward['transformers'][k]:>12.6f} "
                         f"{reward['engine'][k]:>12.6f} {true:>8}{mark}")
    lines.append(f"{indent}  max |transformers - engine| = {answer['max_abs_difference']:.2e} "
                 f"(tolerance {AGREEMENT_TOLERANCE:g})")
    return lines
