"""megatron-prune: Minitron structured pruning of Megatron-core language models."""

__version__ = "0.1.0"
