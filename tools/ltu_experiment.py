#!/usr/bin/env python
"""The LTU experiment: does continued pre-training on decision logs (CT), then SFT, beat SFT alone?

    python tools/ltu_experiment.py --quick --out benchmarks/results/ltu_quick --work runs/ltu_quick
    python tools/ltu_experiment.py --full --out runs/ltu_full/report --work runs/ltu_full   # GPU machine
    python tools/ltu_experiment.py --quick --dry-run            # list every run's command, run nothing
    python tools/ltu_experiment.py --quick --logs runs/movielens/logs --target movielens/drama \
        --ood movielens/horror --ct-domains movielens/comedy movielens/romance --work runs/ltu_movielens

Arms, each from one base checkpoint with the same SFT budget and settings: A SFT only; B LTU (CT on
the SAR logs of other domains, then SFT); C control (CT on the same logs with rewards shuffled across
records); D compute-matched SFT only (CT + SFT steps); F CT with general text blended in (25% and 50%
of tokens; --quick 50% only). Several seeds, paired; a data-efficiency curve (A and B from a few dozen SFT records to
all) and a dose-response (B - A as the domains share less structure). Every run is an ordinary
tools/pretrain.py, tools/evaluate.py or data-tool command with its own output directory; report.md
lists them all. Completed runs are reused when the same command is planned again. Writes report.md,
report.json and plots (arms, differences, data efficiency, dose-response) under --out.

--logs DIR runs the same plan on SAR logs already written in the layout <DIR>/<split>/<domain>.jsonl
with DIR/manifest.json (tools/make_movielens_logs.py, tools/make_obd_logs.py, make_synthetic_logs.py):
--target, --ood and --ct-domains default to the manifest's choices (its first out-of-domain domain
held out, its in-domain domain with the most training records as the target, the others for CT). The
dose-response needs the synthetic generator and is off; without true reward distributions (real logs)
the report has no Bayes ceiling and no KL.

The data steps it runs are also subcommands, to rerun by hand:

    python tools/ltu_experiment.py shuffle-rewards --seed 1 --out-dir OUT --input logs/train/ads_cpc.jsonl ...
    python tools/ltu_experiment.py general-text --jsonl text.jsonl --output-prefix data/text --tokenizer-model M
    python tools/ltu_experiment.py subset --input logs/train/ads_ctr.jsonl --output sft.jsonl --records 500

Exit status: 0 done, 1 a run failed (its command and the end of its log are printed), 2 bad command
line, 130/143 interrupted (running jobs are stopped; completed ones are kept for the next run).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from engine.cli import HelpFormatter, int_at_least

PROG = os.path.basename(__file__)
positive_int = int_at_least(1, "a positive integer")
SUBCOMMANDS = ("shuffle-rewards", "general-text", "subset")


def _floats(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true", help="the 2-CPU-core setting (about 11 minutes on 2 idle cores)")
    setting.add_argument("--full", action="store_true", help="the GPU / cluster setting")
    p.add_argument("--out", default=None, help="folder for report.md, report.json and plots "
                   "(default: <work>/report)")
    p.add_argument("--work", default=None, help="folder for logs, datasets, checkpoints, evaluations and job "
                   "records (default: runs/ltu_quick or runs/ltu_full, with --logs DIR runs/ltu_quick_<DIR's name>)")
    p.add_argument("--logs", default=None, metavar="DIR", help="SAR logs with a manifest.json to run on instead of "
                   "synthetic logs (e.g. written by make_movielens_logs.py or make_obd_logs.py)")
    p.add_argument("--target", default=None, help="the domain SFT trains on and in-domain metrics score "
                   "(default: ads/ctr; with --logs, the manifest's in-domain domain with the most training records)")
    p.add_argument("--ood", default=None, help="the held-out domain, never trained on (default: shop/purchase; "
                   "with --logs, the manifest's first out-of-domain domain)")
    p.add_argument("--ct-domains", nargs="+", default=None, metavar="DOMAIN",
                   help="domains whose training logs CT reads (default: ads/cpc ads/impressions feed/session; "
                   "with --logs, the manifest's other in-domain domains)")
    p.add_argument("--seeds", type=int_at_least(0), nargs="+", default=None, help="training seeds (data order)")
    p.add_argument("--records", type=positive_int, default=None, help="training records per domain")
    p.add_argument("--valid-records", type=positive_int, default=None, help="validation records per domain")
    p.add_argument("--test-records", type=positive_int, default=None, help="test records per domain")
    p.add_argument("--sft-records", type=positive_int, default=None, help="target records of the main arms' SFT")
    p.add_argument("--ct-iters", type=positive_int, default=None, help="CT optimizer steps")
    p.add_argument("--sft-iters", type=positive_int, default=None, help="SFT optimizer steps (every arm)")
    p.add_argument("--ct-seq-length", type=positive_int, default=None, help="tokens per CT sample")
    p.add_argument("--sft-seq-length", type=positive_int, default=None,
                   help="tokens per SFT sample (at least the longest record's)")
    p.add_argument("--ct-batch", type=positive_int, default=None, help="CT samples per step (one microbatch)")
    p.add_argument("--sft-batch", type=positive_int, default=None,
                   help="SFT records per step (one microbatch; every arm)")
    p.add_argument("--ct-lr", type=_floats, default=None, help="CT peak learning rate (cosine to a tenth)")
    p.add_argument("--sft-lr", type=_floats, default=None, help="SFT peak learning rate (cosine to a tenth)")
    p.add_argument("--curve-sizes", type=positive_int, nargs="*", default=None,
                   help="SFT records of the data-efficiency curve (none: no curve; with --logs the setting's "
                   "sizes up to the target's training records)")
    p.add_argument("--curve-seeds", type=int_at_least(0), default=None, help="how many seeds run the curve")
    p.add_argument("--dose-levels", type=_floats, nargs="*", default=None,
                   help="shared-structure levels of the dose-response besides the main world (none: no dose-response; "
                   "synthetic logs only)")
    p.add_argument("--dose-seeds", type=int_at_least(0), default=None, help="how many seeds run the dose-response")
    p.add_argument("--shared-structure", type=_floats, default=None, help="the main world's shared structure")
    p.add_argument("--text-shares", type=_floats, nargs="+", default=None,
                   help="shares of general text in arm F's CT tokens (one F run per share)")
    p.add_argument("--arms", nargs="+", choices=("A", "B", "C", "D", "F"), default=None,
                   help="arms to run (A and B always)")
    p.add_argument("--ct-includes-target", action="store_true",
                   help="add the target's training split to CT (default: CT reads only other domains)")
    p.add_argument("--eval-split", choices=("test", "valid"), default=None,
                   help="split the metrics are computed on: make choices on valid, report test")
    p.add_argument("--model", nargs="+", default=None, metavar="KEY=VALUE",
                   help="the fresh model's architecture as pretrain.py --model.KEY values, e.g. "
                   "preset=tiny hidden_size=128 num_hidden_layers=4 (default: preset=tiny)")
    p.add_argument("--base", default=None, help="start every arm from this checkpoint (engine or Hugging Face) "
                   "instead of a fresh model; needs --tokenizer")
    p.add_argument("--tokenizer", default=None, help="the tokenizer of --base")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at a time")
    p.add_argument("--launcher", default=None, help="how training and evaluation start, e.g. "
                   "'torchrun --nproc_per_node 8' (default: python)")
    p.add_argument("--bootstrap", type=int_at_least(2), default=None, help="bootstrap resamples per interval")
    p.add_argument("--notes", default=None, metavar="FILE", help="a Markdown file the report shows under "
                   "'What the numbers show' (a reading of the results, written once they are in)")
    p.add_argument("--dry-run", action="store_true", help="print every run's command and output, run nothing")
    return p


def _model_fields(pairs: list[str]) -> dict:
    """``--model preset=tiny hidden_size=128`` as {"preset": "tiny", "hidden_size": "128"}."""
    from engine.eval.experiment import ExperimentError

    model = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ExperimentError(f"--model takes KEY=VALUE pairs, got {pair!r}")
        model[key] = value
    return model


def _log_folder_fields(args: argparse.Namespace, fields: dict) -> None:
    """What --logs changes: the domains (given or the manifest's), no dose-response, the curve's sizes
    up to the target's training records; flags that shape synthetic logs are refused."""
    from engine.eval.experiment import ExperimentError
    from engine.eval.experiment_data import ExperimentDataError, LogFolder

    synthetic_only = [flag for flag, value in (("--records", args.records), ("--valid-records", args.valid_records),
                                               ("--test-records", args.test_records),
                                               ("--shared-structure", args.shared_structure)) if value is not None]
    if synthetic_only:
        raise ExperimentError(f"{', '.join(synthetic_only)} shape the synthetic logs; with --logs the folder's split "
                              "files are the data")
    if args.dose_levels:
        raise ExperimentError("--dose-levels: the dose-response needs the synthetic generator (its shared-structure "
                              "knob) and cannot run on --logs")
    fields.update(logs=args.logs, dose_levels=(), dose_seeds=0)
    try:
        folder = LogFolder.read(args.logs)
        target, ood, ct = folder.choose_domains(args.target, args.ood, args.ct_domains and tuple(args.ct_domains))
        fields.update(target=target, ood=ood, ct_domains=ct)
        if args.curve_sizes is None and not folder.problems({"train": [target]}):
            available = folder.records("train", target)
            fields["curve_sizes"] = tuple(n for n in fields["curve_sizes"] if n <= available)
    except ExperimentDataError as exc:
        raise ExperimentError(str(exc)) from None


def experiment_config(args: argparse.Namespace):
    from engine.eval.experiment import ExperimentConfig, preset

    name = "full" if args.full else "quick"
    fields = preset(name)
    if args.logs is not None:
        _log_folder_fields(args, fields)
    else:
        fields.update({k: v for k, v in (("target", args.target), ("ood", args.ood),
                                         ("ct_domains", args.ct_domains and tuple(args.ct_domains))) if v})
    overrides = {"seeds": args.seeds and tuple(args.seeds), "records_per_domain": args.records,
                 "sft_records": args.sft_records, "curve_seeds": args.curve_seeds, "dose_seeds": args.dose_seeds,
                 "shared_structure": args.shared_structure, "eval_split": args.eval_split, "base": args.base,
                 "tokenizer": args.tokenizer, "jobs": args.jobs, "bootstrap": args.bootstrap,
                 "valid_per_domain": args.valid_records, "test_per_domain": args.test_records}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in (("curve_sizes", args.curve_sizes), ("dose_levels", args.dose_levels),
                       ("text_shares", args.text_shares)):
        if value is not None and not (key == "dose_levels" and args.logs):
            fields[key] = tuple(value)
    if args.bootstrap is not None:
        fields["eval_bootstrap"] = min(args.bootstrap, fields.get("eval_bootstrap", 200))
    if args.arms is not None:
        fields["arms"] = tuple(dict.fromkeys(("A", "B", *args.arms)))
    if args.ct_includes_target:
        fields["ct_includes_target"] = True
    for stage, iters, lr in (("ct", args.ct_iters, args.ct_lr), ("sft", args.sft_iters, args.sft_lr)):
        changes = {}
        if stage == "ct" and args.ct_seq_length is not None:
            changes["seq_length"] = args.ct_seq_length
        if stage == "sft" and args.sft_seq_length is not None:
            changes["seq_length"] = args.sft_seq_length
        batch = args.ct_batch if stage == "ct" else args.sft_batch
        if batch is not None:
            changes.update(global_batch_size=batch, micro_batch_size=batch)
        if iters is not None:
            changes["iters"] = iters
        if lr is not None:
            changes.update(lr=lr, min_lr=lr / 10)
        if changes:
            import dataclasses

            fields[stage] = dataclasses.replace(fields[stage], **changes)
    if args.model is not None:
        fields["model"] = _model_fields(args.model)
    if args.launcher is not None:
        fields["launcher"] = tuple(shlex.split(args.launcher))
    logs_name = f"_{os.path.basename(os.path.normpath(args.logs))}" if args.logs else ""
    fields["work"] = args.work or os.path.join("runs", f"ltu_{name}{logs_name}")
    fields["out"] = args.out or os.path.join(fields["work"], "report")
    return ExperimentConfig(setting=name, **fields)


def print_planned_work(cfg, plan: dict) -> None:
    """The plan's size: its runs, and each arm's steps and tokens per seed at the main setting."""
    from engine.eval.experiment_report import planned_work

    kinds = [job.info.get("kind") for job in plan.values()]
    tokens = sum(job.info["tokens"] for job in plan.values() if job.info.get("kind") == "train")
    print(f"# {len(plan)} runs: {kinds.count('train')} training ({tokens:,} tokens in all), "
          f"{kinds.count('eval')} evaluations, {len(plan) - kinds.count('train') - kinds.count('eval')} data steps")
    print("# per arm and seed at the main setting: arm, CT steps, SFT steps, tokens (CT + SFT)")
    for label, row in planned_work(cfg, plan).items():
        print(f"#   {label}: {row.get('ct_steps', 0)} {row.get('sft_steps', 0)} {row['tokens']:,}")


def run_main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from engine.eval.experiment import ExperimentError, build_plan
    from engine.fileio import Interrupted, signals_raise_interrupted

    try:
        cfg = experiment_config(args)
    except ExperimentError as exc:
        parser.error(str(exc))
    if args.dry_run:
        plan = build_plan(cfg)
        for job in plan.values():
            print(f"# {job.name} -> {job.out_dir}\n{job.command()}")
        print_planned_work(cfg, plan)
        return 0
    from engine.eval.experiment_report import run_experiment

    command = " ".join(shlex.quote(a) for a in ["python", "tools/ltu_experiment.py", *argv])
    try:
        notes = None
        if args.notes is not None:
            with open(args.notes, encoding="utf-8") as fh:
                notes = fh.read()
        with signals_raise_interrupted():
            report = run_experiment(cfg, command, notes=notes)
    except Interrupted as exc:
        print(f"{PROG}: interrupted by {exc.signal_name}; completed runs are kept under {cfg.work}", file=sys.stderr)
        return exc.exit_status
    except (ExperimentError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    for v in report["verdicts"]:
        word = {True: "holds", False: "does not hold", None: "undecided"}[v["holds"]]
        print(f"{v['comparison']} {v['group']} AUC: {v['mean']:+.4f}: {word}")
    for kind, path in report["written"].items():
        print(f"wrote {path}")
    return 0


def data_main(argv: list[str]) -> int:
    """The data subcommands (the experiment runs them as ordinary commands too)."""
    p = argparse.ArgumentParser(prog=f"{PROG} {argv[0]}", formatter_class=HelpFormatter)
    if argv[0] == "shuffle-rewards":
        p.description = "Write the logs with every reward moved to another record of its domain and field."
        p.add_argument("--input", nargs="+", required=True, help="JSON Lines logs (pooled per domain and field)")
        p.add_argument("--out-dir", required=True, help="folder for the shuffled files (same names)")
        p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the permutations")
    elif argv[0] == "general-text":
        p.description = "Write Python's documentation topics as {\"text\": ...} JSON Lines and tokenize them."
        p.add_argument("--jsonl", required=True, help="the JSON Lines file to write")
        p.add_argument("--output-prefix", default=None, help="also tokenize it into this indexed dataset")
        p.add_argument("--tokenizer-model", default=None, help="tokenizer for --output-prefix")
    else:
        p.description = "Keep the first N records of a log."
        p.add_argument("--input", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--records", type=positive_int, required=True)
    args = p.parse_args(argv[1:])
    from engine.eval import experiment_data as data

    try:
        if argv[0] == "shuffle-rewards":
            summary = data.shuffle_rewards(args.input, args.out_dir, args.seed)
            print(f"wrote {len(summary['files'])} files to {args.out_dir}: rewards of "
                  f"{', '.join(f'{k} ({v})' for k, v in summary['fields'].items())} permuted across records; "
                  f"{summary['from_other_record']:.1%} now come from another record, "
                  f"{summary['changed_value']:.1%} changed value")
        elif argv[0] == "general-text":
            if (args.output_prefix is None) != (args.tokenizer_model is None):
                p.error("--output-prefix and --tokenizer-model go together")
            summary = data.write_general_text(args.jsonl)
            print(f"wrote {args.jsonl}: {summary['documents']} documents, {summary['characters']} characters")
            if args.output_prefix:
                counts = data.write_text_dataset([args.jsonl], args.output_prefix, args.tokenizer_model)
                print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, "
                      f"{counts['tokens']} tokens ({counts['unknown_tokens']} unknown)")
        else:
            kept = data.write_subset(args.input, args.output, args.records)
            print(f"wrote {args.output}: the first {kept} records of {args.input}")
    except (OSError, ValueError) as exc:
        print(f"{PROG} {argv[0]}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return data_main(argv)
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
