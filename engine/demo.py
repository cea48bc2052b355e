"""The end-to-end demo behind ``tools/demo.py``: the whole "Learning then Using" story on one machine.

1. Data (:func:`run_data_demo`): synthetic decision logs -> SentencePiece tokenizer -> token and
   reward-mask indexed datasets -> CT and SFT samples, checking on the way what later stages rely
   on: the reward tokens of each sample are exactly where the reward mask says. The CT data holds
   the in-domain records of the manifest (the target's among them); the out-of-domain task
   (``shop/purchase``) is held out, so that evaluating on it measures transfer to a domain the model
   never trained on. The SFT data is the first ``sft_records`` training records of the target.
2. The runs (:func:`run_demo`), each an ordinary command (:mod:`engine.demo_steps`): a fresh seeded
   tiny model saved once as the base checkpoint; CT from it at TP x PP under torchrun; SFT from the
   CT checkpoint (LTU) and, beside it, SFT only from the base with the same budget; both evaluated
   by ``tools/evaluate.py`` on the target's and the held-out domain's test records; the LTU model
   exported to Hugging Face, and the exported model, loaded by ``transformers``, scoring one decision
   beside the engine's probabilities for it; then the result table, LTU beside SFT only.

Unlike ``tools/ltu_experiment.py``'s arm B, the demo's CT reads the target's training records too
(as text, every reward included), and it runs one seed: it shows the pipeline, not a controlled
comparison.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from engine.data.batches import BatchLoader, CTSamples, SampleMasks, build_dataset
from engine.data.indexed import IndexedDataset
from engine.data.preprocess import MASK_SUFFIX, PreprocessConfig, preprocess, train_tokenizer_on_logs
from engine.data.samples import GPTSampleDataset, document_token_counts
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, domain_slug, write_logs
from engine.data.tokenizer import Tokenizer
from engine.fileio import write_json_atomic

DATA_STEPS = ("synthetic logs", "tokenizer", "CT data", "CT samples", "SFT data")
RUN_STEPS = ("base model", "CT", "SFT from CT (LTU)", "SFT only", "evaluate LTU", "evaluate SFT only",
             "export", "transformers", "results")
DEMO_STEPS = DATA_STEPS + RUN_STEPS
INDENT = "      "  # continuation lines sit under the text after "[k/n] "
SAMPLE_PREVIEW_TOKENS = 48
ARMS = {"ltu": "LTU (CT, then SFT)", "sft_only": "SFT only"}


class DemoError(ValueError):
    """The demo cannot run with these settings; the message says which and what to change."""


@dataclass
class DemoConfig:
    """Everything the demo's sizes depend on; the defaults fit 2 CPU cores in about 10 minutes."""

    workdir: str
    # data
    records_per_domain: int = 2000     # training records per synthetic domain (validation 1/8, test 1/4)
    vocab_size: int = 1000
    workers: int = 2                   # preprocessing processes
    seq_length: int = 256              # tokens per CT sample
    micro_batch_size: int = 2          # CT samples per microbatch
    seed: int = 0                      # the logs and the sample shuffle
    obd_dir: str | None = None         # an Open Bandit Dataset folder to preprocess too, if given
    progress: bool = True
    target: str = "ads/ctr"            # the SFT task, an in-domain domain
    sft_records: int = 500             # the target's first training records, the SFT set
    # the runs
    tp: int = 2
    pp: int = 2
    ct_iters: int = 1000
    ct_batch_size: int = 8             # CT samples per step (ct_batch_size / micro_batch_size microbatches)
    ct_lr: float = 3e-3
    # SFT: about one epoch of the SFT records, as tools/ltu_experiment.py's quick setting (chosen on
    # the validation split there: several epochs overfit and undo what CT learned).
    sft_iters: int = 30
    sft_batch_size: int = 16           # records per SFT step, one microbatch
    sft_lr: float = 3e-4
    model: dict = field(default_factory=lambda: {"preset": "tiny"})  # pretrain.py --model.KEY VALUE
    base_seed: int = 1234              # the base model's initial weights
    train_seed: int = 1                # the CT and SFT data order
    eval_batch_size: int = 32
    bootstrap: int = 1000              # resamples of each evaluation's 95% intervals
    jobs: int = 2                      # commands run side by side (the two SFT runs, the two evaluations)

    def __post_init__(self):
        if not self.workdir:
            raise DemoError("workdir must be a folder name, got an empty string")
        for name, minimum in (("records_per_domain", 1), ("vocab_size", 1), ("workers", 1), ("seq_length", 1),
                              ("micro_batch_size", 1), ("seed", 0), ("sft_records", 1), ("tp", 1), ("pp", 1),
                              ("ct_iters", 1), ("ct_batch_size", 1), ("sft_iters", 1), ("sft_batch_size", 1),
                              ("base_seed", 0), ("train_seed", 0), ("eval_batch_size", 1), ("bootstrap", 2),
                              ("jobs", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DemoError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("ct_lr", "sft_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise DemoError(f"{name} must be a number > 0, got {value!r}")
        if self.target not in DOMAIN_REWARDS:
            raise DemoError(f"target must be a synthetic domain ({', '.join(DOMAIN_REWARDS)}), got {self.target!r}")
        if self.sft_records > self.records_per_domain:
            raise DemoError(f"sft_records ({self.sft_records}) must not exceed records_per_domain "
                            f"({self.records_per_domain}): the SFT set is taken from the target's training records")
        microbatches, left = divmod(self.ct_batch_size, self.micro_batch_size)
        if left or microbatches < self.pp:
            raise DemoError(f"ct_batch_size ({self.ct_batch_size}) must be a multiple of micro_batch_size "
                            f"({self.micro_batch_size}) giving at least pp ({self.pp}) microbatches per step")
        bad = [k for k in self.model if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise DemoError(f"model keys must be pretrain.py --model fields, got {bad}")

    @property
    def processes(self) -> int:
        """CT's torchrun processes: TP x PP (one data-parallel replica)."""
        return self.tp * self.pp


class _Steps:
    """Numbers the demo's steps once each (``[k/n] text``) and keeps how long each took."""

    def __init__(self, names: tuple[str, ...], log):
        self.names, self.log = names, log
        self.done = 0
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def __call__(self, name: str, text: str) -> None:
        """Announce step ``name``; its time so far is the time since the previous announcement (an
        in-process step announces itself once its work is done; :meth:`took` sets a command's)."""
        if self.done >= len(self.names) or self.names[self.done] != name:
            raise RuntimeError(f"demo step {name!r} out of order after {self.done} steps")
        now = time.perf_counter()
        self.seconds[name], self.mark = now - self.mark, now
        self.done += 1
        self.log(f"[{self.done}/{len(self.names)}] {text}")

    def took(self, seconds: dict[str, float]) -> None:
        self.seconds.update(seconds)
        self.mark = time.perf_counter()


def run_data_demo(cfg: DemoConfig, log=print, steps: _Steps | None = None) -> dict:
    """Run the data pipeline end to end under ``cfg.workdir``; returns a summary dict.

    Writes ``logs/`` (synthetic logs, ``manifest.json``, ``sft/`` the SFT subset), ``data/`` (tokenizer,
    the CT datasets ``sar_train`` and ``sar_valid``, the target's SFT datasets, the held-out domain's
    reward bins, ``index_cache/``) and ``demo_summary.json``. Alone (``steps`` None) it numbers its own
    steps and ends saying where everything went; :func:`run_demo` passes its step counter."""
    if cfg.obd_dir and not os.path.exists(cfg.obd_dir):
        raise DemoError(f"Open Bandit Dataset folder not found: {cfg.obd_dir}")
    alone = steps is None
    step = _Steps(DATA_STEPS, log) if alone else steps
    os.makedirs(cfg.workdir, exist_ok=True)
    logs = os.path.join(cfg.workdir, "logs")
    data = os.path.join(cfg.workdir, "data")
    os.makedirs(data, exist_ok=True)

    synthetic = SyntheticConfig(seed=cfg.seed, train_per_domain=cfg.records_per_domain,
                                valid_per_domain=max(cfg.records_per_domain // 8, 1),
                                test_per_domain=max(cfg.records_per_domain // 4, 1))
    manifest = write_logs(synthetic, logs)
    ct_domains, held_out = manifest["in_domain"], manifest["out_of_domain"]
    if cfg.target not in ct_domains:
        raise DemoError(f"target {cfg.target} is not an in-domain domain of the logs ({', '.join(ct_domains)})")
    manifest_path = os.path.join(logs, "manifest.json")
    step("synthetic logs", f"synthetic logs in {logs}: in-domain {', '.join(ct_domains)}; "
         f"out-of-domain, held out of CT: {', '.join(held_out) or 'none'}")

    def log_files(split: str, domains) -> list[str]:
        return [os.path.join(logs, manifest["files"][split][d]) for d in domains]

    # The tokenizer reads every domain's training text, the held-out one too: it fixes the vocabulary
    # before CT, as a pretrained Llama's tokenizer would, so the held-out domain's names and values
    # get whole pieces and its later evaluation measures the model, not a tokenizer that never saw
    # its text. The tokenizer learns which strings are frequent, nothing about rewards (every reward
    # is a fixed label symbol), and the model never trains on the held-out records.
    tokenizer_path = os.path.join(data, "tokenizer.model")
    train_tokenizer_on_logs([os.path.join(logs, "train")], tokenizer_path, vocab_size=cfg.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    step("tokenizer", f"tokenizer {tokenizer_path}: vocabulary {tokenizer.vocab_size}, trained on the "
         "training logs of every domain (held-out ones too)")

    def run_preprocess(inputs: list[str], prefix: str, bins: str | None = None):
        return preprocess(PreprocessConfig(inputs=inputs, output_prefix=prefix, tokenizer_model=tokenizer_path,
                                           workers=cfg.workers, append_eod=True, progress=cfg.progress,
                                           reward_bins=bins))

    train_prefix = os.path.join(data, "sar_train")
    valid_prefix = os.path.join(data, "sar_valid")
    train_bins = train_prefix + ".reward_bins.json"
    summaries = {"train": run_preprocess(log_files("train", ct_domains), train_prefix)}
    summaries["valid"] = run_preprocess(log_files("valid", ct_domains), valid_prefix, train_bins)
    if cfg.obd_dir:
        summaries["obd"] = run_preprocess([cfg.obd_dir], os.path.join(data, "obd"))
    step("CT data", f"CT data: the in-domain records ({', '.join(held_out) or 'nothing'} held out)")
    for name, s in summaries.items():
        log(INDENT + f"{name}: " + s.format().replace("\n", "\n" + INDENT))

    mbs = cfg.micro_batch_size
    # One epoch of GPT packing gives (tokens - 1) // seq_length samples (they overlap by one token).
    if (summaries["train"].tokens - 1) // cfg.seq_length < mbs:
        raise DemoError(f"the CT data holds {summaries['train'].tokens} tokens, fewer than one batch of "
                        f"{mbs} samples of {cfg.seq_length + 1} tokens; use more records per domain or a "
                        "shorter sequence length")
    tokens = IndexedDataset(train_prefix)
    mask = IndexedDataset(train_prefix + MASK_SUFFIX)
    cache_dir = os.path.join(data, "index_cache")
    samples = GPTSampleDataset(tokens, cfg.seq_length, seed=cfg.seed, num_epochs=1, cache_dir=cache_dir)
    masks = SampleMasks(samples, mask)
    vocab = tokenizer.vocab_size
    ct_batch = BatchLoader(CTSamples(samples, vocab), mbs, mbs, dp_rank=0, dp_size=1,
                           vocab_size=vocab).next_step()[0]
    reward_share = float(np.mean([masks[k].mean() for k in range(min(len(samples), 64))]))
    step("CT samples", f"CT samples: {len(samples)} of {cfg.seq_length + 1} tokens; first batch "
         f"{tuple(ct_batch['tokens'].shape)} inputs; {reward_share:.1%} of tokens are reward tokens")
    for line in describe_sample_start(samples, tokens, tokenizer, 0):
        log(INDENT + line)
    first = samples[0]
    log(INDENT + "its reward tokens: "
        + repr(tokenizer.decode(first[masks[0].astype(bool)][:8].tolist())))

    # SFT: the target's first training records, one whole record per sample, validated on the
    # target's validation records; the held-out domain's reward bins are fitted on its training split
    # (as the in-domain ones are), so that its test records can be scored.
    slug = domain_slug(cfg.target)
    sft_logs = os.path.join(logs, "sft", f"{slug}_first{cfg.sft_records}.jsonl")
    write_first_lines(log_files("train", [cfg.target])[0], sft_logs, cfg.sft_records)
    sft_prefix = os.path.join(data, f"sft_{slug}")
    sft_valid_prefix = os.path.join(data, f"sft_valid_{slug}")
    summaries["sft"] = run_preprocess([sft_logs], sft_prefix, train_bins)
    summaries["sft_valid"] = run_preprocess(log_files("valid", [cfg.target]), sft_valid_prefix, train_bins)
    held_out_prefix = os.path.join(data, "held_out_train")
    held_out_bins = None
    if held_out:
        summaries["held_out_train"] = run_preprocess(log_files("train", held_out), held_out_prefix)
        held_out_bins = held_out_prefix + ".reward_bins.json"
    longest = max(int(document_token_counts(d.sequence_lengths, d.document_indices).max())
                  for d in (IndexedDataset(sft_prefix), IndexedDataset(sft_valid_prefix)))
    sft_seq_length = -(-(longest - 1) // 8) * 8   # fits every record (inputs are its tokens but the last)
    sft = build_dataset(sft_prefix, "sft", sft_seq_length, num_samples=mbs, seed=cfg.seed)
    sft_batch = BatchLoader(sft, mbs, mbs, dp_rank=0, dp_size=1, vocab_size=vocab).next_step()[0]
    predicted = sft_batch["loss_mask"].bool()
    step("SFT data", f"SFT data: the first {cfg.sft_records} training records of {cfg.target} (the target) in "
         f"{sft_prefix}, its validation records in {sft_valid_prefix}"
         + (f"; reward bins of {', '.join(held_out)} fitted on its training split in {held_out_bins}"
            if held_out_bins else ""))
    log(INDENT + f"SFT samples: {sft.num_records} records ({sft.skipped_records} without a reward token) of "
        f"up to {longest} tokens, seq_length {sft_seq_length}; first batch {tuple(sft_batch['tokens'].shape)} "
        f"predicts {int(predicted.sum())} reward tokens: "
        + repr(tokenizer.decode(sft_batch["labels"][predicted][:8].tolist())))

    summary_path = os.path.join(cfg.workdir, "demo_summary.json")
    held_out_logs = {d: [os.path.join(logs, manifest["files"][split][d]) for split in manifest["files"]]
                     for d in held_out}
    paths = {"summary": summary_path, "manifest": manifest_path, "logs": logs, "tokenizer": tokenizer_path,
             "train": train_prefix, "valid": valid_prefix, "train_bins": train_bins, "sft_logs": sft_logs,
             "sft_train": sft_prefix, "sft_valid": sft_valid_prefix, "held_out_bins": held_out_bins,
             "index_cache": cache_dir, "held_out_logs": held_out_logs,
             "test_logs": {d: os.path.join(logs, manifest["files"]["test"][d]) for d in [cfg.target, *held_out]}}
    result = {"samples": len(samples), "batch_shape": list(ct_batch["tokens"].shape),
              "reward_token_share": reward_share,
              "sft": {"records": sft.num_records, "skipped_records": sft.skipped_records,
                      "seq_length": sft_seq_length, "batch_reward_tokens": int(predicted.sum())},
              "records": {k: s.records for k, s in summaries.items()},
              "tokens": {k: s.tokens for k, s in summaries.items()},
              "ct_domains": ct_domains, "held_out_domains": held_out, "target": cfg.target,
              "bayes_ceiling_valid": manifest["bayes_ceiling"].get("valid", {}),
              "paths": paths}
    write_json_atomic(summary_path, result)
    if alone:
        log("done; where everything went:")
        log_where(data_places(result), log)
    return result


def write_first_lines(source: str, dest: str, count: int) -> None:
    """The first ``count`` lines of ``source`` into ``dest`` (written whole or not at all)."""
    from engine.fileio import atomic_open

    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(source, encoding="utf-8") as src, atomic_open(dest) as out:
        for k, line in enumerate(src):
            if k == count:
                break
            out.write(line)


def data_places(result: dict) -> list[tuple[str, str]]:
    """(what, where) of everything the data steps wrote."""
    p = result["paths"]
    places = [("summary of this run", p["summary"]),
              ("Bayes ceilings per domain and split", f"{p['manifest']} (the logs' manifest)"),
              ("CT datasets", f"{p['train']}, {p['valid']} (each with {MASK_SUFFIX}, .meta.json "
                              "and .reward_bins.json files)"),
              ("SFT datasets", f"{p['sft_train']}, {p['sft_valid']} (from {p['sft_logs']})"),
              ("tokenizer", p["tokenizer"]),
              ("sample-index cache", p["index_cache"])]
    if p["held_out_bins"]:
        places.append(("held-out reward bins", p["held_out_bins"]))
    places += [(f"held-out {domain} logs", ", ".join(files)) for domain, files in p["held_out_logs"].items()]
    return places


def log_where(places: list[tuple[str, str]], log) -> None:
    width = max(len(label) for label, _ in places) + 1
    for label, value in places:
        log(INDENT + f"{label + ':':{width}} {value}")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """The whole story under ``cfg.workdir``: the data steps, then the runs (see the module docstring).

    Writes, besides the data: ``runs/`` (the base, CT and both SFT checkpoints), ``eval/`` (both
    evaluations), ``hf/ltu`` (the exported LTU model), ``steps/`` (each command's log) and, in
    ``demo_summary.json``, the commands, times, results and the transformers check. Raises
    StepFailed for a failed command, DemoError for settings that cannot work."""
    from engine import demo_steps as S

    began = time.perf_counter()
    steps = _Steps(DEMO_STEPS, log)
    result = run_data_demo(cfg, log, steps)
    p = result["paths"]
    work = S.display_path(cfg.workdir)
    where = {name: os.path.join(work, *parts) for name, parts in (
        ("base", ("runs", "base")), ("ct", ("runs", "ct")), ("ltu", ("runs", "sft_ltu")),
        ("sft_only", ("runs", "sft_only")), ("eval_ltu", ("eval", "ltu")), ("eval_sft_only", ("eval", "sft_only")),
        ("hf", ("hf", "ltu")), ("steps", ("steps",)))}
    data = {k: S.display_path(p[k]) for k in ("train", "valid", "sft_train", "sft_valid", "tokenizer", "train_bins")}
    held_out, target = result["held_out_domains"], cfg.target
    tests = [S.display_path(p["test_logs"][d]) for d in [target, *held_out]]
    bins = [data["train_bins"]] + ([S.display_path(p["held_out_bins"])] if p["held_out_bins"] else [])
    sft_seq = result["sft"]["seq_length"]
    commands: dict[str, S.Command] = {}

    def command(step: str, argv: list[str], out_dir: str, outputs: list[str]) -> S.Command:
        number = DEMO_STEPS.index(step) + 1
        name = step.split(" (")[0].replace(" ", "_").lower()
        log_path = S.repo_path(os.path.join(where["steps"], f"{number:02d}_{name}.log"))
        commands[step] = S.Command(step, argv, log_path, out_dir, [os.path.join(out_dir, o) for o in outputs])
        return commands[step]

    def train(stage: str, data_train: str, data_valid: str | None, seq: int, iters: int, batch: int, micro: int,
              lr: float, init: str | None, save: str, seed: int, launcher=("python",), parallel=()) -> list[str]:
        argv = [*launcher, "tools/pretrain.py"]
        for key, value in cfg.model.items():
            argv += [f"--model.{key}", str(value)]
        argv += [*parallel, "--train.stage", stage, "--data.train", data_train,
                 *(["--data.valid", data_valid] if data_valid else []), "--data.seq_length", str(seq),
                 "--train.iters", str(iters), "--train.global_batch_size", str(batch),
                 "--train.micro_batch_size", str(micro), "--train.lr", f"{lr:g}", "--train.min_lr", f"{lr / 10:g}",
                 "--train.warmup_iters", str(iters // 20), "--train.lr_decay", "cosine", "--train.dtype", "fp32",
                 "--train.seed", str(seed), "--train.log_interval", str(max(1, iters // 10))]
        if data_valid:
            argv += ["--train.eval_interval", str(iters), "--train.eval_iters", "2"]
        argv += [*(["--checkpoint.init", init] if init else []), "--checkpoint.save", save,
                 "--checkpoint.interval", "0"]
        return argv

    def run(*group: S.Command) -> None:
        for c in group:  # a rerun replaces the demo's own earlier output, never adds to it
            shutil.rmtree(S.repo_path(c.out_dir), ignore_errors=True)
        if len(group) > 1:
            log(INDENT + f"({len(group)} commands side by side)")
        steps.took(S.run_commands(list(group), log, INDENT))

    def show(c: S.Command) -> None:
        log(INDENT + f"$ {c.shell()}")
        log(INDENT + f"log: {S.display_path(c.log)}")

    model_text = ", ".join(f"{k} {v}" for k, v in cfg.model.items())
    base = command("base model", train("ct", data["train"], None, 32, 1, 1, 1, 0.0, None, where["base"],
                                       cfg.base_seed), where["base"], ["latest"])
    steps("base model", f"base model: a fresh model ({model_text}) initialised with seed {cfg.base_seed}, saved "
          f"once as a checkpoint (one step at learning rate 0) in {where['base']}")
    show(base)
    run(base)

    launcher = ("torchrun", "--standalone", "--nproc_per_node", str(cfg.processes)) if cfg.processes > 1 else ("python",)
    ct = command("CT", train("ct", data["train"], data["valid"], cfg.seq_length, cfg.ct_iters, cfg.ct_batch_size,
                             cfg.micro_batch_size, cfg.ct_lr, where["base"], where["ct"], cfg.train_seed, launcher,
                             ("--parallel.tp", str(cfg.tp), "--parallel.pp", str(cfg.pp))),
                 where["ct"], ["latest"])
    steps("CT", f"CT: continued pre-training on the in-domain SAR logs ({', '.join(result['ct_domains'])}), "
          f"{cfg.ct_iters} steps of {cfg.ct_batch_size} x {cfg.seq_length} tokens at TP={cfg.tp} x PP={cfg.pp} "
          f"({cfg.processes} processes, gloo; {cfg.ct_batch_size // cfg.micro_batch_size} microbatches per step), "
          f"from the base -> {where['ct']}")
    show(ct)
    run(ct)
    log(INDENT + S.training_summary(where["ct"]))

    sft_args = dict(seq=sft_seq, iters=cfg.sft_iters, batch=cfg.sft_batch_size, micro=cfg.sft_batch_size,
                    lr=cfg.sft_lr, seed=cfg.train_seed)
    ltu = command("SFT from CT (LTU)", train("sft", data["sft_train"], data["sft_valid"], init=where["ct"],
                                             save=where["ltu"], **sft_args), where["ltu"], ["latest"])
    sft_only = command("SFT only", train("sft", data["sft_train"], data["sft_valid"], init=where["base"],
                                         save=where["sft_only"], **sft_args), where["sft_only"], ["latest"])
    budget = (f"{cfg.sft_iters} steps of {cfg.sft_batch_size} records, loss on the reward tokens only, "
              f"on the first {cfg.sft_records} training records of {target}")
    steps("SFT from CT (LTU)", f"SFT from the CT checkpoint (LTU): {budget} -> {where['ltu']}")
    show(ltu)
    steps("SFT only", f"SFT only, from the base with the same budget -> {where['sft_only']}")
    show(sft_only)
    for group in ([ltu, sft_only],) if cfg.jobs > 1 else ([ltu], [sft_only]):
        run(*group)
    for c, save in ((ltu, where["ltu"]), (sft_only, where["sft_only"])):
        log(INDENT + f"{c.step}: {S.training_summary(save)}")

    evals = {}
    for step, arm, save in (("evaluate LTU", "ltu", where["ltu"]), ("evaluate SFT only", "sft_only", where["sft_only"])):
        out = where["eval_" + arm]
        evals[arm] = command(step, ["python", "tools/evaluate.py", "--load", save, "--data", *tests,
                                    "--tokenizer", data["tokenizer"], "--reward-bins", *bins, "--in-domain", target,
                                    "--batch-size", str(cfg.eval_batch_size), "--bootstrap", str(cfg.bootstrap),
                                    "--seed", "0", "--out", out, "--no-progress"],
                             out, ["eval.json", "predictions.jsonl", "roc.png", "calibration.png"])
        steps(step, f"{step}: the reward-class probabilities of every test record of {', '.join([target, *held_out])} "
              f"and their metrics -> {out}")
        show(evals[arm])
    for group in ([evals["ltu"], evals["sft_only"]],) if cfg.jobs > 1 else ([evals["ltu"]], [evals["sft_only"]]):
        run(*group)
    reports = {ARMS[arm]: S.read_eval(where["eval_" + arm]) for arm in ARMS}
    for arm, report in reports.items():
        log(INDENT + f"{arm}: AUC in-domain {S.fmt(S.group_auc(report, 'in_domain'))}, held-out "
            f"{S.fmt(S.group_auc(report, 'out_of_domain'))}; {report['records']} records at "
            f"{report['records_per_s']:.0f} records/s")

    export = command("export", ["python", "tools/convert_hf.py", "export", "--load", where["ltu"], "--hf-dir",
                                where["hf"], "--tokenizer-dir", os.path.dirname(data["tokenizer"]), "--force",
                                "--no-progress"], where["hf"], ["config.json", "model.safetensors", "tokenizer.model"])
    steps("export", f"export: the LTU checkpoint as a Hugging Face Llama directory, with the SentencePiece "
          f"tokenizer -> {where['hf']}")
    show(export)
    run(export)
    log(INDENT + "wrote " + ", ".join(sorted(os.listdir(S.repo_path(where["hf"])))))

    answer = S.transformers_answer(where["hf"], where["eval_ltu"], tests[0])
    steps("transformers", f"transformers: {answer['model_class']} from {where['hf']} answers one decision, the first "
          f"test record of {target}, beside the engine's evaluation ({where['eval_ltu']}/predictions.jsonl)")
    for line in S.format_answer(answer, INDENT):
        log(line)
    if not answer["max_abs_difference"] <= S.AGREEMENT_TOLERANCE:
        raise S.StepFailed("transformers", f"step 'transformers' failed: the exported model's probabilities differ "
                                           f"from the engine's by {answer['max_abs_difference']:.3g}, more than "
                                           f"{S.AGREEMENT_TOLERANCE:g}")

    groups = {"in_domain": f"in-domain: {target}, the SFT target",
              "out_of_domain": f"held-out: {', '.join(held_out)}, never trained on"}
    steps("results", f"results: LTU beside SFT only on the test records (one seed; bootstrap 95% intervals "
          f"over records, {cfg.bootstrap} resamples)")
    for line in S.results_table(reports, groups).splitlines():
        log(INDENT + line)
    gains = {g: _difference(S.group_auc(reports[ARMS["ltu"]], g), S.group_auc(reports[ARMS["sft_only"]], g))
             for g in groups}
    log(INDENT + "LTU - SFT only, AUC: " + ", ".join(f"{title.split(':')[0]} {_signed(gains[g])}" for g, title in groups.items())
        + " (tools/ltu_experiment.py runs the controlled comparison: paired seeds, control arms)")
    plots = [os.path.join(where["eval_" + arm], name) for arm in ARMS for name in ("roc.png", "calibration.png")]
    curves = [os.path.join(where[k], "loss_curve.png") for k in ("ct", "ltu", "sft_only")]
    log("plots:")
    for path in plots + curves:
        log(INDENT + path)
    total = time.perf_counter() - began
    story = {"commands": {name: c.shell() for name, c in commands.items()},
             "logs": {name: S.display_path(c.log) for name, c in commands.items()},
             "seconds": dict(steps.seconds), "total_seconds": total, "load_average": _load_average(),
             "auc": {arm: {g: S.group_auc(reports[ARMS[arm]], g) for g in groups} for arm in ARMS},
             "transformers": answer, "plots": plots + curves,
             "paths": {k: v for k, v in where.items()}}
    result["story"] = story
    write_json_atomic(p["summary"], result)
    log("done; where everything went:")
    log_where(data_places(result) + [
        ("base, CT and SFT checkpoints", ", ".join(where[k] for k in ("base", "ct", "ltu", "sft_only"))),
        ("evaluations", f"{where['eval_ltu']}, {where['eval_sft_only']} (eval.json, predictions.jsonl, plots)"),
        ("exported LTU model", where["hf"]), ("each command's log", where["steps"])], log)
    log("time per step:")
    width = max(len(n) for n in DEMO_STEPS) + 1
    for name in DEMO_STEPS:
        log(INDENT + f"{name + ':':{width}} {steps.seconds.get(name, 0.0):7.1f} s")
    load = story["load_average"]
    log(f"total: {total:.1f} s ({total / 60:.1f} min)" + (f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
                                                         if load else ""))
    return result


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None



def describe_sample_start(samples: GPTSampleDataset, tokens: IndexedDataset, tokenizer: Tokenizer,
                          k: int) -> list[str]:
    """Lines showing how sample ``k`` begins: at a record start, or inside a record cut by GPT packing
    (then the sample is shown from the first record that starts in it, if one does)."""
    sequence, offset, length = (int(v) for v in samples.sample_span(k)[0])
    sample = samples[k]
    if offset == 0:
        return [f"sample {k} begins at the start of a record: "
                + repr(tokenizer.decode(sample[:SAMPLE_PREVIEW_TOKENS].tolist()))[:160]]
    record_length = int(tokens.sequence_lengths[sequence])
    lines = [f"sample {k} begins in the middle of a record (at its token {offset} of {record_length}: "
             "GPT packing cuts records at sample boundaries)"]
    if length < len(sample):
        lines.append(f"the next record starts at token {length}: "
                     + repr(tokenizer.decode(sample[length:length + SAMPLE_PREVIEW_TOKENS].tolist()))[:160])
    else:
        lines.append("no record starts in it; it begins: "
                     + repr(tokenizer.decode(sample[:SAMPLE_PREVIEW_TOKENS].tolist()))[:160])
    return lines
