"""Triton kernels, one file each with its autograd.Function; the PyTorch version of each op, which
they are checked against, lives in engine/ops.py.

Kernels never import the engine.
"""
