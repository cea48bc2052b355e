"""Optimizer, schedule, checkpoints and the step loop."""
