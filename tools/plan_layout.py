#!/usr/bin/env python
"""Which TP x PP x DP layout to launch: predicted memory per GPU and step time of every layout.

    python tools/plan_layout.py --model llama2-13b --gpus 64 --gpu A100-80GB --seq-length 4096 \\
        --global-batch-size 1024 --base-config configs/llama2-13b.yaml --out planned.yaml

Prints the layouts that fit ranked by predicted step time (memory on the busiest rank, step time,
tokens/s, MFU, time to --train-tokens, the shares of bubble, TP and exposed DP communication), then
every refused layout with its reason, then the chosen one in detail. --out writes it as a run
config for tools/pretrain.py: --base-config (its data, optimisation and checkpoint settings) with
the layout, micro batch, sequence length, global batch and train.iters for --train-tokens.

    python tools/plan_layout.py --validate    # the time model against Megatron-LM's A100 table

Exit status: 0 a layout was chosen, 1 no layout can run (the message says why), 2 bad command line.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from engine.cli import HelpFormatter, int_at_least, positive_float

positive_int = int_at_least(1, "a positive integer")


def build_parser() -> argparse.ArgumentParser:
    from engine.config import MODEL_PRESETS
    from engine.plan.devices import DEVICES

    p = argparse.ArgumentParser(prog="plan_layout.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--validate", action="store_true",
                   help="print the time model against Megatron-LM's published A100 table (for --gpu) and exit")
    p.add_argument("--model", help=f"a preset ({', '.join(MODEL_PRESETS)}) or a Hugging Face "
                   "config.json (or its directory)")
    p.add_argument("--gpus", type=positive_int, help="GPUs of the cluster")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs per server (NVLink domain)")
    p.add_argument("--gpu", default="A100-80GB", choices=list(DEVICES), help="the GPU model")
    for name, what in (("peak-tflops", "dense bf16 peak, TFLOP/s"), ("memory-gib", "HBM, GiB"),
                       ("hbm-gbps", "HBM bandwidth, GB/s"), ("nvlink-gbps", "NVLink per GPU and direction, GB/s"),
                       ("network-gbps", "inter-server bandwidth per GPU and direction, GB/s"),
                       ("matmul-efficiency", "fraction of peak large GEMMs reach"),
                       ("bandwidth-efficiency", "fraction of nominal bandwidths reached")):
        p.add_argument(f"--{name}", type=positive_float, default=None, help=f"override the GPU's {what}")
    p.add_argument("--seq-length", type=positive_int, default=None,
                   help="tokens per sample (default: the base config's data.seq_length)")
    p.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="samples per step (default: the base config's train.global_batch_size)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the base config's train.dtype")
    p.add_argument("--base-config", default=None, help="YAML run config the written config starts from")
    p.add_argument("--data-train", default=None, help="data.train of the written config when the base has none")
    p.add_argument("--train-tokens", type=positive_float, default=10e9,
                   help="tokens of the run: time to train them, and train.iters of the written config")
    p.add_argument("--top", type=positive_int, default=15, help="rows of the ranked table")
    p.add_argument("--all-variants", action="store_true",
                   help="rank every fitting variant (micro batch, SP, ZeRO-1, recomputation), not one per layout")
    p.add_argument("--out", default=None, help="write the chosen layout as a run config (YAML) here")
    return p


def _model(text: str):
    """(LlamaConfig, model section of the written config) of a preset name or a config.json path."""
    from engine.config import MODEL_PRESETS, ModelConfig

    section = {"preset": text} if text in MODEL_PRESETS or not os.path.exists(text) else {"hf_config": os.path.abspath(text)}
    return ModelConfig(**section).to_llama_config(), section


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from engine.config import RunConfig, load_yaml_config
    from engine.plan.devices import get_device
    from engine.plan.memory import Workload
    from engine.plan.report import chosen_layout, ranked_table, rejected_list
    from engine.plan.search import Cluster, run_config, search

    if args.validate:
        from engine.plan.published import validation_table

        print(validation_table(get_device(args.gpu, matmul_efficiency=args.matmul_efficiency,
                                          bandwidth_efficiency=args.bandwidth_efficiency)))
        return 0
    if args.model is None or args.gpus is None:
        parser.error("give --model and --gpus (or --validate)")
    try:
        base = load_yaml_config(args.base_config) if args.base_config else RunConfig()
        config, model_section = _model(args.model)
        device = get_device(args.gpu, peak_tflops=args.peak_tflops, memory_gib=args.memory_gib,
                            hbm_gbps=args.hbm_gbps, nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps,
                            matmul_efficiency=args.matmul_efficiency, bandwidth_efficiency=args.bandwidth_efficiency)
        seq = args.seq_length or (base.data.seq_length if args.base_config else None)
        gbs = args.global_batch_size or (base.train.global_batch_size if args.base_config else None)
        if seq is None or gbs is None:
            parser.error("give --seq-length and --global-batch-size (or a --base-config that has them)")
        workload = Workload(seq, gbs, args.dtype or base.train.dtype,
                            "torch" if base.train.kernels == "torch" else "kernels", base.parallel.bucket_size)
        cluster = Cluster(device, args.gpus, args.gpus_per_node)
    except (ValueError, OSError) as e:
        print(f"plan_layout.py: error: {e}", file=sys.stderr)
        return 2

    plan = search(config, workload, cluster)
    print(f"model {args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads ({config.num_key_value_heads} kv), vocab {config.vocab_size}; "
          f"sequence {seq}, global batch {gbs}, {workload.dtype}")
    print(f"cluster: {cluster.gpus} x {device.name} ({device.peak_tflops:g} TFLOP/s, "
          f"{device.memory_bytes / 2**30:.0f} GiB, {cluster.gpus_per_node} per server)\n")
    if not plan.ranked:
        print("refused layouts:\n" + rejected_list(plan))
        print(f"plan_layout.py: error: {plan.why_none()}", file=sys.stderr)
        return 1
    print(ranked_table(plan, args.top, args.train_tokens, args.all_variants))
    print("\nrefused layouts:\n" + rejected_list(plan) + "\n")
    print(chosen_layout(plan.best, plan, args.train_tokens))
    if args.out:
        if not base.data.train.strip() and args.data_train:
            base.data.train = args.data_train
        try:
            cfg = run_config(plan.best, base, model_section, workload, args.train_tokens)
            cfg.validate()
        except ValueError as e:
            print(f"plan_layout.py: error: the planned config does not validate: {e}"
                  + ("" if base.data.train.strip() else " (give --base-config or --data-train)"), file=sys.stderr)
            return 1
        from engine.config import config_to_dict
        from engine.fileio import atomic_open

        best = plan.best
        header = (f"# Planned by tools/plan_layout.py for {cluster.gpus} x {device.name}: {best.layout.describe()}\n"
                  f"# predicted: {best.memory.total / 2**30:.1f} GiB per GPU, {best.time.total:.2f} s per step, "
                  f"{best.time.tokens_per_s:,.0f} tokens/s, MFU {100 * best.time.mfu:.1f}%\n"
                  f"# torchrun --nnodes {max(1, cluster.gpus // cluster.gpus_per_node)} "
                  f"--nproc_per_node {min(cluster.gpus, cluster.gpus_per_node)} tools/pretrain.py --config {args.out}\n")
        with atomic_open(args.out) as f:
            f.write(header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
