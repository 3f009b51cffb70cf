"""Rank-0 logging with a recognisable prefix, progress lines that read well in a log file (no bars), and plain-text
tables (`format_table`) for the reports of every algorithm."""

from __future__ import annotations

import sys
import time
from typing import List

import torch.distributed as dist


def log(msg: str) -> None:
    """Print on global rank 0 only, flushed, prefixed with ``[megatron-prune]``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"[megatron-prune] {msg}", file=sys.stdout, flush=True)


class Progress:
    """Logs `label: i/n unit, rate, ETA` at most every 10% (and at least every 2 s apart, or after 30 s of
    silence), then a closing line with the total time. Plain lines: a log file or a non-TTY reads them as
    they are. `scale`: items per step for the rate (e.g. samples per micro-batch; 0: no rate)."""

    def __init__(self, label: str, total: int, unit: str = "micro-batches", scale: int = 1, rate_unit: str = "samples"):
        self.label, self.total, self.unit, self.scale, self.rate_unit = label, total, unit, scale, rate_unit
        self.done_n = 0
        self.start = self.last = time.perf_counter()
        self.every = max(1, total // 10)

    def step(self, n: int = 1) -> None:
        self.done_n += n
        now = time.perf_counter()
        if (self.done_n % self.every == 0 and now - self.last >= 2) or now - self.last > 30:
            self.last = now
            rate = self.done_n / max(now - self.start, 1e-9)
            eta = (self.total - self.done_n) / max(rate, 1e-9)
            speed = f", {rate * self.scale:.2f} {self.rate_unit}/s" if self.scale else ""
            log(f"{self.label}: {self.done_n}/{self.total} {self.unit}{speed}, ETA {eta:.0f}s")

    def done(self) -> None:
        seconds = time.perf_counter() - self.start
        rate = f" ({self.done_n * self.scale / max(seconds, 1e-9):.2f} {self.rate_unit}/s)" if self.scale else ""
        log(f"{self.label}: {self.done_n} {self.unit} in {seconds:.1f}s{rate}")


def format_table(header: List[str], rows: List[tuple]) -> str:
    """Plain-text columns, left-aligned, with a dashed rule under the header."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
