#!/usr/bin/env python
"""Run ``tools/pretrain.py`` with one fault injected: a rank SIGKILLs itself at a chosen point.

    LTU_FAULT=<point> LTU_FAULT_RANK=<rank> LTU_FAULT_ITERATION=<n> \\
        torchrun --nproc_per_node=2 tests/pretrain_with_fault.py --config configs/tiny.yaml ...

The product has no test hooks: this script replaces engine functions with versions that call the
original and then, on global rank ``LTU_FAULT_RANK`` only, ``os.kill(os.getpid(), SIGKILL)`` (no
exception handler, ``finally`` block or atexit hook runs, as with ``kill -9``). Then it calls
``tools/pretrain.py``'s ``main`` with the command line unchanged. Points (``n`` is an iteration):

    model_write      while writing this rank's model.safetensors of the save at iteration n: after
                     its header and first tensor, before the others
    rank_files       after this rank's files of the save at iteration n (model, meta, optimizer),
                     before the checkpoint is committed
    before_latest    after iter_n.saving was renamed to iter_n, before ``latest`` is replaced
                     (only the committing rank, global rank 0, gets there)
    train_step       at the start of the n-th optimizer step this process runs (1-based)

Without ``LTU_FAULT`` it is ``tools/pretrain.py`` itself.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

POINTS = ("model_write", "rank_files", "before_latest", "train_step")
REPO = Path(__file__).resolve().parent.parent


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise SystemExit(f"pretrain_with_fault.py: {name} must be an integer, got {value!r}")
    return int(value)


def install_fault(point: str, rank: int, iteration: int) -> None:
    """Patch the engine so that global rank ``rank`` kills itself at ``point`` (see the module doc)."""
    if point not in POINTS:
        raise SystemExit(f"pretrain_with_fault.py: LTU_FAULT must be one of {POINTS}, got {point!r}")
    if int(os.environ.get("RANK", "0")) != rank:
        return
    from engine.train import checkpoint, loop

    saving_dir = checkpoint.iteration_dir_name(iteration) + ".saving"
    if point == "model_write":
        writer_class = checkpoint.SafetensorsWriter  # the class the checkpoint writer streams files with
        original_write = writer_class.write

        def write_then_die(self, name, tensor):
            original_write(self, name, tensor)
            if self.path.name == checkpoint.MODEL_FILE and self.path.parent.parent.name == saving_dir:
                self._file.flush()  # the header and one tensor reach the file; the rest never does
                _die()

        writer_class.write = write_then_die
    elif point == "rank_files":
        original_optimizer = checkpoint.CheckpointWriter.write_optimizer

        def optimizer_then_die(self, *args, **kwargs):
            original_optimizer(self, *args, **kwargs)
            if self.iteration == iteration:
                _die()

        checkpoint.CheckpointWriter.write_optimizer = optimizer_then_die
    elif point == "before_latest":
        original_text = checkpoint.write_text_atomic

        def die_instead_of_latest(path, text):
            if Path(path).name == checkpoint.LATEST and text.strip() == str(iteration):
                _die()
            original_text(path, text)

        checkpoint.write_text_atomic = die_instead_of_latest
    else:
        original_step = loop.train_step
        steps = [0]

        def step_or_die(*args, **kwargs):
            steps[0] += 1
            if steps[0] == iteration:
                _die()
            return original_step(*args, **kwargs)

        loop.train_step = step_or_die


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "tools" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


if __name__ == "__main__":
    if os.environ.get("LTU_FAULT"):
        install_fault(os.environ["LTU_FAULT"], _env_int("LTU_FAULT_RANK"), _env_int("LTU_FAULT_ITERATION"))
    sys.exit(_pretrain_main()(sys.argv[1:]))
