#!/usr/bin/env python
"""The ltu-engine demo on CPU: the whole "Learning then Using" story in one command.

    python tools/demo.py [--workdir runs/demo] [--ct-iters 1000] [--sft-iters 300] [--records 2000]
    python tools/demo.py --data-only          # the data path only: logs, tokenizer, datasets

Synthetic decision logs -> SentencePiece tokenizer -> .bin/.idx datasets -> a fresh tiny Llama saved
as the base checkpoint -> CT at TP=2 x PP=2 under torchrun (4 processes, gloo) -> SFT from the CT
checkpoint (LTU) and SFT only from the base, same budget -> tools/evaluate.py on both (the target's
and the held-out domain's test records) -> the LTU model exported to Hugging Face, and the exported
model, loaded by transformers, answering one decision beside the engine's probabilities -> the
result table, LTU beside SFT only, and the plots. Each run is an ordinary command, printed with its
log under --workdir/steps, so any step can be rerun by hand from the repository root.

Exit status: 0 done, 1 a step failed (its command and the end of its log are printed) or the
settings cannot work, 2 bad command line, 130/143 interrupted by SIGINT/SIGTERM (running steps,
torchrun's ranks included, are stopped).
"""
import argparse
import dataclasses
import os
import sys

from engine.cli import HelpFormatter, int_at_least, positive_float
from engine.demo import DemoConfig, run_data_demo, run_demo

PROG = os.path.basename(__file__)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(DemoConfig) if f.default is not dataclasses.MISSING}


def model_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a pretrain.py --model field), got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="folder for everything the demo writes")
    p.add_argument("--data-only", action="store_true", help="run the data steps only (what configs/tiny.yaml "
                   "trains on)")
    data = p.add_argument_group("data")
    data.add_argument("--records", type=int_at_least(1), default=DEFAULTS["records_per_domain"],
                      help="training records per synthetic domain (validation: 1/8 of it, test: 1/4)")
    data.add_argument("--sft-records", type=int_at_least(1), default=DEFAULTS["sft_records"],
                      help="SFT set: the target's first training records")
    data.add_argument("--workers", type=int_at_least(1), default=DEFAULTS["workers"],
                      help="preprocessing worker processes")
    data.add_argument("--seq-length", type=int_at_least(1), default=DEFAULTS["seq_length"],
                      help="tokens per CT training sample")
    data.add_argument("--seed", type=int_at_least(0), default=DEFAULTS["seed"],
                      help="seed of the logs and the sample shuffle")
    data.add_argument("--obd-dir", default=None, help="an Open Bandit Dataset folder to preprocess as well")
    runs = p.add_argument_group("runs")
    runs.add_argument("--ct-iters", type=int_at_least(1), default=DEFAULTS["ct_iters"], help="CT optimizer steps")
    runs.add_argument("--ct-batch", type=int_at_least(1), default=DEFAULTS["ct_batch_size"],
                      help="CT samples per step")
    runs.add_argument("--micro-batch", type=int_at_least(1), default=DEFAULTS["micro_batch_size"],
                      help="CT samples per microbatch (the pipeline needs at least --pp microbatches per step)")
    runs.add_argument("--ct-lr", type=positive_float, default=DEFAULTS["ct_lr"],
                      help="CT peak learning rate (cosine to a tenth of it)")
    runs.add_argument("--sft-iters", type=int_at_least(1), default=DEFAULTS["sft_iters"],
                      help="SFT optimizer steps, the same for LTU and SFT only")
    runs.add_argument("--sft-batch", type=int_at_least(1), default=DEFAULTS["sft_batch_size"],
                      help="SFT records per step")
    runs.add_argument("--sft-lr", type=positive_float, default=DEFAULTS["sft_lr"],
                      help="SFT peak learning rate (cosine to a tenth of it)")
    runs.add_argument("--tp", type=int_at_least(1), default=DEFAULTS["tp"], help="CT tensor-parallel size")
    runs.add_argument("--pp", type=int_at_least(1), default=DEFAULTS["pp"], help="CT pipeline-parallel size")
    runs.add_argument("--model", type=model_override, action="append", default=[], metavar="KEY=VALUE",
                      help="architecture field over the tiny preset (pretrain.py --model.KEY), repeatable, "
                           "e.g. num_hidden_layers=4")
    runs.add_argument("--bootstrap", type=int_at_least(2), default=DEFAULTS["bootstrap"],
                      help="bootstrap resamples of the evaluations' 95%% intervals")
    runs.add_argument("--jobs", type=int_at_least(1), default=DEFAULTS["jobs"],
                      help="commands run side by side (the two SFT runs, the two evaluations); 1: one at a time")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from engine.demo_steps import StepFailed
    from engine.fileio import Interrupted, signals_raise_interrupted

    try:
        cfg = DemoConfig(workdir=args.workdir, records_per_domain=args.records, sft_records=args.sft_records,
                         workers=args.workers, seq_length=args.seq_length, seed=args.seed, obd_dir=args.obd_dir,
                         progress=not args.no_progress and sys.stderr.isatty(), ct_iters=args.ct_iters,
                         ct_batch_size=args.ct_batch, micro_batch_size=args.micro_batch, ct_lr=args.ct_lr,
                         sft_iters=args.sft_iters, sft_batch_size=args.sft_batch, sft_lr=args.sft_lr,
                         tp=args.tp, pp=args.pp, model={"preset": "tiny", **dict(args.model)},
                         bootstrap=args.bootstrap, jobs=args.jobs)
        with signals_raise_interrupted():  # SIGTERM too: unwind, stopping running steps
            if args.data_only:
                run_data_demo(cfg)
            else:
                run_demo(cfg)
    except Interrupted as exc:
        print(f"{PROG}: interrupted by {exc.signal_name}; running steps stopped", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; running steps stopped", file=sys.stderr)
        return 130
    except StepFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:  # DemoError, PreprocessError, RecordError, unwritable folders
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
