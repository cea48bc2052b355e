"""Triton kernels, one file each, each with its autograd.Function and PyTorch reference.

Kernels never import the engine.
"""
