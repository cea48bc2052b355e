"""ltu-engine: a Megatron-style training engine for decision-making language models."""

__version__ = "0.1.0"
