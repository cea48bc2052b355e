#!/usr/bin/env python
"""Train a Llama on decision logs: continued pre-training (CT) or supervised fine-tuning (SFT).

    torchrun --nproc_per_node=N tools/pretrain.py --config configs/tiny.yaml [--section.field value ...]
    python tools/pretrain.py --config configs/tiny.yaml          # one process
    python tools/pretrain.py --help                              # every field, with its documentation

Multi-node: torchrun --nnodes=K --nproc_per_node=N --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...
Exit status: 0 when the run finished, 1 when it failed (the message names why), 2 for a bad command
line, 130 / 143 when stopped by SIGINT / SIGTERM (a save in progress never publishes half a checkpoint).
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from engine.config import parse_run_config

    try:
        cfg = parse_run_config(argv, prog="pretrain.py")
    except (ValueError, OSError) as e:  # the --config file is missing or names a bad field: a bad command line
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    # torch comes after the command line is read, so a bad one (and --help) answers at once.
    import torch.distributed as dist

    from engine.fileio import Interrupted, signals_raise_interrupted
    from engine.train.loop import train

    try:
        with signals_raise_interrupted():  # torchrun stops ranks with SIGTERM: unwind, no traceback
            train(cfg)
    except Interrupted as e:
        print(f"pretrain.py: interrupted by {e.signal_name}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("pretrain.py: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        # Set-up checks run before the process group exists: the launcher's RANK names the process.
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")
        print(f"pretrain.py: error (rank {rank}): {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
