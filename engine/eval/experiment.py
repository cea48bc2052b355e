"""The LTU experiment behind ``tools/ltu_experiment.py``: its settings and its plan of runs
(:mod:`engine.eval.experiment_runner` runs them).

From one base checkpoint and the same SFT budget and settings for every arm, on the synthetic
multi-domain logs (:mod:`engine.data.synthetic`), with the target domain ``ads/ctr`` and the
held-out domain ``shop/purchase``:

- **A** SFT only: SFT on the target's training records, from the base.
- **B** LTU: continued pre-training (CT) on the SAR logs of the other in-domain domains
  (``ads/cpc``, ``ads/impressions``, ``feed/session``), then the same SFT from the CT checkpoint.
  The target's training split is left out of CT by default, so B's gain over A is transfer of
  structure the domains share, never a second look at the target's labels; and the SFT set is the
  only target data any arm sees, which keeps the data-efficiency curve honest.
- **C** control: CT on the same logs with rewards shuffled across records (per domain and field),
  then SFT: the same text, format and reward marginals, no decision-reward link.
- **D** compute-matched SFT only: as many SFT optimizer steps as B's CT + SFT.
- **F** CT with general text blended in (``text_shares`` of the CT tokens, 25% and 50% by
  default, 50% in ``quick``: Python's documentation, :mod:`engine.eval.experiment_data`), then SFT.

Every arm is run for each seed (the seed sets the CT and SFT data order; every arm starts from the
same base weights, so arms are paired seed by seed). A data-efficiency curve repeats A and B with
SFT sets from a few dozen records to all; a dose-response repeats A and B on worlds whose domains
share less structure (``shared_structure``). Every run is an ordinary command (``tools/pretrain.py``,
``tools/evaluate.py``, the data tools) with its own output directory, listed in the report, so any
cell can be rerun by hand. Completed runs are recorded under ``<work>/jobs`` and reused when the
same command is planned again.

With ``logs`` set, the same plan runs on a SAR log folder already written (``<dir>/<split>/<domain>.jsonl``
and ``manifest.json``: MovieLens-100k, the Open Bandit Dataset, a user's own logs) instead of synthetic
logs: the target, held-out and CT domains are that folder's, the tokenizer trains on their training
split, and the dose-response, which needs the synthetic generator, is refused.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from engine.data.synthetic import DOMAIN_REWARDS, check_shared_structure, domain_slug
from engine.eval.experiment_data import ExperimentDataError, LogFolder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARM_NAMES = {"A": "SFT only", "B": "LTU: CT on SAR logs, then SFT",
             "C": "control: CT on reward-shuffled logs, then SFT",
             "D": "compute-matched SFT only (CT + SFT steps of SFT)", "F": "CT with general text blended in, then SFT"}
ARM_ORDER = ("A", "B", "C", "D", "F")


class ExperimentError(RuntimeError):
    """A run of the experiment failed or its settings cannot work; the message says which and why."""


@dataclass
class Stage:
    """Optimisation settings of one training stage (CT or SFT), the same for every arm."""

    iters: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    lr: float
    min_lr: float
    warmup_iters: int

    def tokens(self, iters: int | None = None) -> int:
        """Tokens processed in ``iters`` steps (padding of SFT samples included)."""
        return (self.iters if iters is None else iters) * self.global_batch_size * self.seq_length


@dataclass
class ExperimentConfig:
    out: str                                   # report.md, report.json, plots
    work: str                                  # logs, datasets, checkpoints, evaluations, job records
    setting: str = "quick"
    seeds: tuple[int, ...] = (1, 2, 3)
    records_per_domain: int = 4000             # training records per domain
    valid_per_domain: int = 500
    test_per_domain: int = 1000
    logs_seed: int = 0
    shared_structure: float = 1.0              # the main world's (see engine.data.synthetic)
    target: str = "ads/ctr"
    ood: str = "shop/purchase"
    ct_domains: tuple[str, ...] = ("ads/cpc", "ads/impressions", "feed/session")
    ct_includes_target: bool = False
    sft_records: int = 500                     # SFT set of the main arms
    curve_sizes: tuple[int, ...] = (50, 200, 1000, 4000)
    curve_seeds: int = 1                       # the first seeds also run the curve
    dose_levels: tuple[float, ...] = (0.0, 0.5)
    dose_seeds: int = 1
    text_shares: tuple[float, ...] = (0.25, 0.5)
    arms: tuple[str, ...] = ARM_ORDER
    vocab_size: int = 1000
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    base: str | None = None                    # a given base checkpoint (engine or Hugging Face)
    tokenizer: str | None = None               # a given tokenizer (needed with a given base)
    base_seed: int = 1234
    ct: Stage = field(default_factory=lambda: Stage(600, 8, 8, 128, 3e-3, 3e-4, 20))
    sft: Stage = field(default_factory=lambda: Stage(300, 16, 16, 80, 1e-3, 1e-4, 10))
    dtype: str = "fp32"
    eval_split: str = "test"
    eval_batch_size: int = 32
    bootstrap: int = 1000                      # resamples of the report's paired intervals
    eval_bootstrap: int = 200                  # resamples of each evaluation's own intervals (eval.json)
    jobs: int = 2
    threads_per_job: int | None = 1
    launcher: tuple[str, ...] = ("python",)   # how pretrain.py / evaluate.py start (e.g. torchrun ...)
    logs: str | None = None                    # a SAR log folder (with manifest.json) instead of synthetic logs

    def __post_init__(self):
        self.validate()

    def log_folder(self) -> LogFolder | None:
        """The given log folder's manifest (None: synthetic logs)."""
        return None if self.logs is None else LogFolder.read(self.logs)

    def validate(self) -> None:
        errors = []
        try:
            folder = self.log_folder()
        except ExperimentDataError as exc:
            raise ExperimentError(f"invalid experiment settings:\n  {exc}") from None
        available = self.records_per_domain  # training records of the target
        if folder is None:
            for name in (self.target, self.ood, *self.ct_domains):
                if name not in DOMAIN_REWARDS:
                    errors.append(f"unknown synthetic domain {name!r} (known: {', '.join(DOMAIN_REWARDS)})")
        else:
            problems, available = folder.experiment_problems(self.target, self.ood, self.ct_domains, self.eval_split)
            errors += problems
            if self.dose_levels:
                errors.append(f"the dose-response (dose_levels {list(self.dose_levels)}) needs the synthetic "
                              "generator's shared-structure knob, which logs from a folder do not have; leave "
                              "dose_levels empty")
        if self.target == self.ood or self.ood in self.ct_domains:
            errors.append(f"the held-out domain {self.ood} must be neither the target nor a CT domain")
        if self.target in self.ct_domains:
            errors.append(f"the target {self.target} is in ct_domains; use ct_includes_target to add its "
                          "training split to CT")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            errors.append(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        unknown = [a for a in self.arms if a not in ARM_ORDER]
        if unknown or "A" not in self.arms or "B" not in self.arms:
            errors.append(f"arms must include A and B, from {', '.join(ARM_ORDER)}; got {list(self.arms)}")
        for name in ("records_per_domain", "valid_per_domain", "test_per_domain", "sft_records", "jobs",
                     "eval_batch_size", "vocab_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.bootstrap < 2 or self.eval_bootstrap < 2:
            errors.append(f"bootstrap and eval_bootstrap must be at least 2, got {self.bootstrap} and "
                          f"{self.eval_bootstrap}")
        too_big = [n for n in (self.sft_records, *self.curve_sizes) if not 1 <= n <= available]
        if too_big and (folder is None or available):  # (an unreadable target file is reported above)
            bound = f"records_per_domain ({available})" if folder is None else \
                f"the {available} training records of the target {self.target}"
            errors.append(f"SFT sizes {too_big} must be between 1 and {bound}")
        for level in (self.shared_structure, *self.dose_levels):
            try:
                check_shared_structure(level)
            except ValueError as exc:
                errors.append(str(exc))
        if any(not 0 < s < 1 for s in self.text_shares):
            errors.append(f"text_shares must lie strictly between 0 and 1, got {list(self.text_shares)}")
        if not 0 <= self.curve_seeds <= len(self.seeds) or not 0 <= self.dose_seeds <= len(self.seeds):
            errors.append(f"curve_seeds ({self.curve_seeds}) and dose_seeds ({self.dose_seeds}) must be between "
                          f"0 and the number of seeds ({len(self.seeds)})")
        if self.eval_split not in ("test", "valid"):
            errors.append(f"eval_split must be 'test' or 'valid', got {self.eval_split!r}")
        if self.base is not None and self.tokenizer is None:
            errors.append("a given base checkpoint needs its tokenizer (tokenizer)")
        for stage_name in ("ct", "sft"):
            stage = getattr(self, stage_name)
            if stage.iters < 1 or stage.global_batch_size % stage.micro_batch_size:
                errors.append(f"{stage_name}: iters must be at least 1 and micro_batch_size must divide "
                              f"global_batch_size, got {stage}")
        if errors:
            raise ExperimentError("invalid experiment settings:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def preset(name: str) -> dict:
    """ExperimentConfig fields of a named setting: ``quick`` (2 CPU cores, about 11 minutes) or
    ``full`` (a GPU machine or a cluster: a wider model, 5x the records, longer runs, more seeds)."""
    # SFT: about one epoch of the main arms' 500 records at 3e-4, chosen on the validation split: 200
    # steps at 1e-3 (6 epochs) overfit, and after CT they undid what CT had learned (in-domain AUC
    # 0.603 zero-shot, 0.553 after SFT, against 0.620 at 30 steps of 3e-4).
    # quick: 800 CT steps and one general-text share, to finish in about 11 minutes on 2 cores. At
    # that budget CT learns little (1000 steps closed 3% of the CT domains' reward log-loss; 12000,
    # about 40%), so quick checks the pipeline; --ct-iters 12000 is the run that tests LTU.
    if name == "quick":
        return dict(seeds=(1, 2, 3), records_per_domain=4000, valid_per_domain=1000, test_per_domain=1000,
                    sft_records=500, curve_sizes=(50, 500, 4000), curve_seeds=1, dose_levels=(0.0, 0.5),
                    dose_seeds=1, text_shares=(0.5,), ct=Stage(800, 8, 8, 128, 3e-3, 3e-4, 30),
                    sft=Stage(30, 16, 16, 80, 3e-4, 3e-5, 10),
                    model={"preset": "tiny"}, dtype="fp32", jobs=2, threads_per_job=1, bootstrap=1000)
    if name == "full":
        return dict(seeds=(1, 2, 3, 4, 5), records_per_domain=20000, valid_per_domain=2000, test_per_domain=5000,
                    sft_records=1000, curve_sizes=(50, 200, 1000, 5000, 20000), curve_seeds=3,
                    dose_levels=(0.0, 0.25, 0.5, 0.75), dose_seeds=3, ct=Stage(4000, 32, 8, 256, 1e-3, 1e-4, 100),
                    sft=Stage(60, 32, 32, 80, 3e-4, 3e-5, 10),  # about 2 epochs of the SFT set (the quick choice)
                    model={"preset": "tiny", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                           "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512},
                    dtype="bf16", jobs=4, threads_per_job=None, bootstrap=2000)
    raise ExperimentError(f"unknown setting {name!r} (known: quick, full)")


# ------------------------------------------------------------------------------------------ plan
@dataclass
class Job:
    """One command of the experiment: what it runs, what it needs first, what it leaves behind."""

    name: str
    argv: list[str]
    deps: list[str]
    outputs: list[str]                 # paths that exist once it succeeded
    out_dir: str
    info: dict = field(default_factory=dict)

    def command(self) -> str:
        """The command as a shell line, to run from the repository root."""
        import shlex

        return " ".join(shlex.quote(a) for a in self.argv)


class PlanBuilder:
    """Builds the experiment's jobs in an order that starts long, blocking runs early."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.jobs: dict[str, Job] = {}
        self.work = _display_path(cfg.work)
        self.folder = cfg.log_folder()

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def add(self, name: str, argv: list[str], deps: list[str | None], outputs: list[str], out_dir: str,
            **info) -> str:
        deps = [d for d in deps if d is not None]  # None: nothing to wait for (e.g. logs given as a folder)
        if name in self.jobs:
            raise ExperimentError(f"job {name} planned twice")
        missing = [d for d in deps if d not in self.jobs]
        if missing:
            raise ExperimentError(f"job {name} depends on unplanned jobs {missing}")
        self.jobs[name] = Job(name, argv, list(deps), outputs, out_dir, info)
        return name

    # --------------------------------------------------------------------------- data
    def logs(self, level: float, tag: str) -> tuple[str | None, str]:
        cfg = self.cfg
        if self.folder is not None:
            return None, _display_path(self.folder.path)
        out = self.path(tag, "logs")
        domains = sorted({cfg.target, cfg.ood, *cfg.ct_domains}, key=list(DOMAIN_REWARDS).index)
        argv = ["python", "tools/make_synthetic_logs.py", "--output-dir", out, "--seed", str(cfg.logs_seed),
                "--train", str(cfg.records_per_domain), "--valid", str(cfg.valid_per_domain),
                "--test", str(cfg.test_per_domain), "--domains", *domains, "--ood-domains", cfg.ood,
                "--shared-structure", f"{level:g}"]
        return self.add(f"{tag}/logs", argv, [], [os.path.join(out, "manifest.json")], out, kind="data"), out

    def log_file(self, logs: str, split: str, domain: str) -> str:
        if self.folder is not None:
            return _display_path(self.folder.file(split, domain))
        return os.path.join(logs, split, domain_slug(domain) + ".jsonl")

    def preprocess(self, name: str, inputs: list[str], prefix: str, deps: list[str], bins: str | None) -> str:
        argv = ["python", "tools/preprocess_data.py", "--input", *inputs, "--output-prefix", prefix,
                "--tokenizer-model", self.tokenizer, "--append-eod", "--no-progress"]
        if bins:
            argv += ["--reward-bins", bins]
        return self.add(name, argv, deps + ([self.tokenizer_job] if self.tokenizer_job else []),
                        [prefix + ".idx", prefix + ".meta.json"], os.path.dirname(prefix), kind="data")

    def world(self, level: float, tag: str) -> dict:
        """Logs, reward bins, CT and SFT datasets of one world (one shared-structure level)."""
        cfg = self.cfg
        logs_job, logs = self.logs(level, tag)
        data = self.path(tag, "data")
        if tag == "main":
            self.tokenizer_job = None
            if cfg.tokenizer is None:
                self.tokenizer = os.path.join(data, "tokenizer.model")
                # The training split of the domains the experiment reads (all a synthetic world has).
                inputs = [os.path.join(logs, "train")] if self.folder is None else \
                    [self.log_file(logs, "train", d) for d in dict.fromkeys([cfg.target, cfg.ood, *cfg.ct_domains])]
                argv = ["python", "tools/train_tokenizer.py", "--input", *inputs,
                        "--model-prefix", os.path.join(data, "tokenizer"), "--vocab-size", str(cfg.vocab_size)]
                self.tokenizer_job = self.add("main/tokenizer", argv, [logs_job], [self.tokenizer], data, kind="data")
            else:
                self.tokenizer = cfg.tokenizer
        every = [self.log_file(logs, "train", d) for d in sorted({cfg.target, cfg.ood, *cfg.ct_domains})]
        bins_job = self.preprocess(f"{tag}/bins", every, os.path.join(data, "all_train"), [logs_job], None)
        bins = os.path.join(data, "all_train.reward_bins.json")
        ct_domains = list(cfg.ct_domains) + ([cfg.target] if cfg.ct_includes_target else [])
        ct_files = [self.log_file(logs, "train", d) for d in ct_domains]
        world = {"tag": tag, "level": level, "logs": logs, "logs_job": logs_job, "bins": bins, "ct_files": ct_files,
                 "ct": os.path.join(data, "ct_train"), "ct_valid": os.path.join(data, "ct_valid"),
                 "sft_valid": os.path.join(data, "sft_valid"), "sft": {}, "deps": {}}
        world["deps"]["ct"] = self.preprocess(f"{tag}/ct_data", ct_files, world["ct"], [bins_job], bins)
        world["deps"]["ct_valid"] = self.preprocess(
            f"{tag}/ct_valid_data", [self.log_file(logs, "valid", d) for d in ct_domains], world["ct_valid"],
            [bins_job], bins)
        world["deps"]["sft_valid"] = self.preprocess(
            f"{tag}/sft_valid_data", [self.log_file(logs, "valid", cfg.target)], world["sft_valid"], [bins_job], bins)
        world["bins_job"] = bins_job
        return world

    def sft_data(self, world: dict, records: int) -> tuple[str, str]:
        if records in world["sft"]:
            return world["sft"][records]
        tag, cfg = world["tag"], self.cfg
        subset = self.path(tag, "logs_sft", f"{domain_slug(cfg.target)}_n{records}.jsonl")
        argv = ["python", "tools/ltu_experiment.py", "subset", "--input",
                self.log_file(world["logs"], "train", cfg.target), "--output", subset, "--records", str(records)]
        subset_job = self.add(f"{tag}/sft_subset_n{records}", argv, [world["logs_job"]], [subset],
                              os.path.dirname(subset), kind="data")
        prefix = self.path(tag, "data", f"sft_n{records}")
        job = self.preprocess(f"{tag}/sft_data_n{records}", [subset], prefix, [subset_job, world["bins_job"]],
                              world["bins"])
        world["sft"][records] = (job, prefix)
        return job, prefix

    def shuffled_ct_data(self, world: dict, seed: int) -> tuple[str, str]:
        tag = world["tag"]
        out = self.path(tag, "logs_shuffled", f"seed{seed}")
        argv = ["python", "tools/ltu_experiment.py", "shuffle-rewards", "--seed", str(seed), "--out-dir", out,
                "--input", *world["ct_files"]]
        shuffle_job = self.add(f"{tag}/shuffle_s{seed}", argv, [world["logs_job"]],
                               [os.path.join(out, os.path.basename(f)) for f in world["ct_files"]], out, kind="data")
        prefix = self.path(tag, "data", f"ct_shuffled_s{seed}")
        job = self.preprocess(f"{tag}/ct_shuffled_data_s{seed}",
                              [os.path.join(out, os.path.basename(f)) for f in world["ct_files"]], prefix,
                              [shuffle_job, world["bins_job"]], world["bins"])
        return job, prefix

    def general_text(self) -> tuple[str, str]:
        jsonl = self.path("main", "text", "general_text.jsonl")
        prefix = self.path("main", "data", "general_text")
        argv = ["python", "tools/ltu_experiment.py", "general-text", "--jsonl", jsonl, "--output-prefix", prefix,
                "--tokenizer-model", self.tokenizer]
        deps = [self.tokenizer_job] if self.tokenizer_job else []
        return self.add("main/general_text", argv, deps, [jsonl, prefix + ".idx"], os.path.dirname(prefix),
                        kind="data"), prefix

    # ------------------------------------------------------------------------------ runs
    def train_argv(self, stage_name: str, stage: Stage, iters: int, data: str, valid: str, init: str, save: str,
                   seed: int) -> list[str]:
        """A pretrain.py command of one stage; only the data, start, output, length and seed vary."""
        cfg = self.cfg
        argv = [*cfg.launcher, "tools/pretrain.py"]
        if cfg.base is None:
            for key, value in cfg.model.items():
                argv += [f"--model.{key}", str(value)]
        argv += ["--train.stage", stage_name, "--data.train", data, "--data.valid", valid,
                 "--data.seq_length", str(stage.seq_length), "--train.iters", str(iters),
                 "--train.global_batch_size", str(stage.global_batch_size),
                 "--train.micro_batch_size", str(stage.micro_batch_size),
                 "--train.lr", f"{stage.lr:g}", "--train.min_lr", f"{stage.min_lr:g}",
                 "--train.warmup_iters", str(min(stage.warmup_iters, iters)), "--train.lr_decay", "cosine",
                 "--train.dtype", cfg.dtype, "--train.seed", str(seed), "--train.log_interval", str(max(1, iters // 5)),
                 "--train.eval_interval", str(iters), "--train.eval_iters", "2", "--train.loss_curve", "false",
                 "--checkpoint.init", init, "--checkpoint.save", save, "--checkpoint.interval", "0"]
        return argv

    def base(self, world: dict) -> str | None:
        cfg = self.cfg
        if cfg.base is not None:
            self.base_path, self.base_job = cfg.base, None
            return None
        save = self.path("runs", "base")
        # One step at learning rate 0: the seeded initial weights, saved as an ordinary checkpoint.
        argv = [*cfg.launcher, "tools/pretrain.py"]
        for key, value in cfg.model.items():
            argv += [f"--model.{key}", str(value)]
        argv += ["--train.stage", "ct", "--data.train", world["ct"], "--data.seq_length", "32",
                 "--train.iters", "1", "--train.global_batch_size", "1", "--train.micro_batch_size", "1",
                 "--train.lr", "0", "--train.min_lr", "0",
                 "--train.warmup_iters", "0", "--train.dtype", cfg.dtype, "--train.seed", str(cfg.base_seed),
                 "--checkpoint.save", save, "--checkpoint.interval", "0"]
        self.base_path = save
        self.base_job = self.add("base", argv, [world["deps"]["ct"]], [os.path.join(save, "latest")], save,
                                 kind="base", stage="base")
        return self.base_job

    def ct_run(self, world: dict, arm: str, seed: int, data: str, deps: list[str], label: str) -> tuple[str, str]:
        save = self.path(world["tag"], "runs", f"seed{seed}", f"ct_{label}")
        cfg = self.cfg
        argv = self.train_argv("ct", cfg.ct, cfg.ct.iters, data, world["ct_valid"], self.base_path, save, seed)
        deps = deps + [world["deps"]["ct_valid"]] + ([self.base_job] if self.base_job else [])
        job = self.add(f"{world['tag']}/seed{seed}/ct_{label}", argv, deps, [os.path.join(save, "latest")], save,
                       kind="train", stage="ct", arm=arm, label=label, seed=seed, level=world["level"],
                       iters=self.cfg.ct.iters, tokens=self.cfg.ct.tokens())
        return job, save

    def sft_and_eval(self, world: dict, arm: str, label: str, seed: int, records: int, init: tuple[str | None, str],
                     extra_iters: int = 0) -> str:
        cfg, tag = self.cfg, world["tag"]
        data_job, data = self.sft_data(world, records)
        iters = cfg.sft.iters + extra_iters
        save = self.path(tag, "runs", f"seed{seed}", f"sft_{label}_n{records}")
        argv = self.train_argv("sft", cfg.sft, iters, data, world["sft_valid"], init[1], save, seed)
        deps = [data_job, world["deps"]["sft_valid"]] + [d for d in (init[0],) if d]
        common = dict(arm=arm, label=label, seed=seed, level=world["level"], records=records)
        train_job = self.add(f"{tag}/seed{seed}/sft_{label}_n{records}", argv, deps, [os.path.join(save, "latest")],
                             save, kind="train", stage="sft", iters=iters, tokens=cfg.sft.tokens(iters), **common)
        return self.evaluation(world, save, train_job, f"{tag}/seed{seed}/eval_{label}_n{records}", common)

    def evaluation(self, world: dict, load: str, train_job: str, name: str, info: dict,
                   domains: list[str] | None = None) -> str:
        """An evaluate.py run of checkpoint ``load`` on the evaluation split of the world's logs."""
        cfg = self.cfg
        out = os.path.join(load, f"eval_{cfg.eval_split}")
        files = [self.log_file(world["logs"], cfg.eval_split, d) for d in domains or self.eval_domains()]
        argv = [*cfg.launcher, "tools/evaluate.py", "--load", load, "--data", *files, "--reward-bins", world["bins"],
                "--in-domain", cfg.target, *(["--tokenizer", self.tokenizer] if cfg.base else []),
                "--batch-size", str(cfg.eval_batch_size), "--bootstrap", str(cfg.eval_bootstrap), "--seed", "0",
                "--out", out, "--no-plots", "--no-progress"]  # the report draws its own plots
        outputs = [os.path.join(out, "eval.json"), os.path.join(out, "predictions.jsonl")]
        return self.add(name, argv, [train_job], outputs, out, kind="eval", stage="eval", train_job=train_job, **info)

    def ct_only_evaluation(self, world: dict, ct: tuple[str, str], arm: str, label: str, seed: int) -> str:
        """A CT checkpoint scored as it is, before any SFT (records 0): what CT alone learned, on the
        evaluation domains and on the CT domains' own held-out records."""
        info = dict(arm=arm, label=label, seed=seed, level=world["level"], records=0)
        domains = list(dict.fromkeys(self.eval_domains() + list(self.cfg.ct_domains)))
        return self.evaluation(world, ct[1], ct[0], f"{world['tag']}/seed{seed}/eval_{label}_ct", info, domains)

    def eval_domains(self) -> list[str]:
        """The target, the held-out domain, and the episodic domain when CT reads it (its own row)."""
        cfg = self.cfg
        return [cfg.target, cfg.ood] + (["feed/session"] if "feed/session" in cfg.ct_domains else [])


def _display_path(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it (commands run from there)."""
    absolute = os.path.abspath(path)
    inside = os.path.commonpath([absolute, REPO]) == REPO
    return os.path.relpath(absolute, REPO) if inside else absolute


def build_plan(cfg: ExperimentConfig) -> dict[str, Job]:
    """Every job of the experiment, keyed by name, in a runnable order."""
    plan = PlanBuilder(cfg)
    main = plan.world(cfg.shared_structure, "main")
    plan.base(main)
    base_init = (plan.base_job, plan.base_path)
    text = plan.general_text() if "F" in cfg.arms else None
    curve = sorted(set(cfg.curve_sizes) | {cfg.sft_records})
    for index, seed in enumerate(cfg.seeds):
        ct = {}
        ct["B"] = plan.ct_run(main, "B", seed, main["ct"], [main["deps"]["ct"]], "B")
        if "C" in cfg.arms:
            job, prefix = plan.shuffled_ct_data(main, seed)
            ct["C"] = plan.ct_run(main, "C", seed, prefix, [job], "C")
        if "F" in cfg.arms:
            for share in cfg.text_shares:
                label = f"F{round(share * 100)}"
                spec = f"{1 - share:g} {main['ct']} {share:g} {text[1]}"
                ct[label] = plan.ct_run(main, "F", seed, spec, [main["deps"]["ct"], text[0]], label)
        for label in ("B", "C"):  # what CT learned, with and without the decision-reward link
            if label in ct:
                plan.ct_only_evaluation(main, ct[label], label, label, seed)
        sizes = curve if index < cfg.curve_seeds else [cfg.sft_records]
        for records in sizes:
            plan.sft_and_eval(main, "A", "A", seed, records, base_init)
            plan.sft_and_eval(main, "B", "B", seed, records, ct["B"])
        for label, init in ct.items():
            if label != "B":
                plan.sft_and_eval(main, label[0], label, seed, cfg.sft_records, init)
        if "D" in cfg.arms:
            plan.sft_and_eval(main, "D", "D", seed, cfg.sft_records, base_init, extra_iters=cfg.ct.iters)
    for level in cfg.dose_levels:
        if level == cfg.shared_structure:
            continue  # the main world is that point
        world = plan.world(level, f"shared{level:g}")
        for seed in cfg.seeds[:cfg.dose_seeds]:
            ct_b = plan.ct_run(world, "B", seed, world["ct"], [world["deps"]["ct"]], "B")
            plan.sft_and_eval(world, "A", "A", seed, cfg.sft_records, base_init)
            plan.sft_and_eval(world, "B", "B", seed, cfg.sft_records, ct_b)
    return plan.jobs
