"""Test-wide set-up: Triton runs in its interpreter where there is no GPU, markers, small helpers."""
import os

import pytest
import torch

# Must happen before any Triton kernel is decorated: kernels imported later pick the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
