"""The hand-written Llama."""
