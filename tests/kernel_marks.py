"""Marks shared by the kernel tests."""
import pytest

from kernels._utils import interpreting

# Tests that give the kernels CPU tensors, which only Triton's interpreter runs. tests/conftest.py turns
# it on only where there is no CUDA; on a GPU machine run them as: CUDA_VISIBLE_DEVICES= pytest <file>
INTERPRETER_ONLY = pytest.mark.skipif(
    not interpreting(), reason="CPU tensors need the Triton interpreter: run with CUDA_VISIBLE_DEVICES=")
