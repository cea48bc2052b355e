"""Hugging Face <-> engine weight conversion."""
