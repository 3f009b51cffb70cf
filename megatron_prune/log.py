"""Rank-0 logging with a recognisable prefix."""

from __future__ import annotations

import sys

import torch.distributed as dist


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log(msg: str) -> None:
    """Print on global rank 0 only, flushed, prefixed with ``[megatron-prune]``."""
    if is_rank0():
        print(f"[megatron-prune] {msg}", file=sys.stdout, flush=True)
