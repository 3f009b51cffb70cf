"""An output directory that appears complete or not at all, and never replaces a user's data by accident.

    check_output_dir(path, overwrite)     before any expensive work: refuse an existing non-empty directory
    with atomic_output_dir(path, overwrite) as tmp:  every rank writes under `tmp` (a sibling of `path`)
        ...                                # on success rank 0 renames it to `path`; on error it is deleted

Collective under torch.distributed: every rank enters and leaves the context together.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from megatron_prune.config import PruneConfigError


def check_output_dir(path: str, overwrite: bool = False) -> Path:
    """`path` as an absolute Path, if it may be written: it does not exist, is empty, or `overwrite` is set."""
    out = Path(os.path.expanduser(path)).absolute()
    if out.exists() and not out.is_dir():
        raise PruneConfigError(f"--output-dir {path!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PruneConfigError(f"--output-dir {path!r} exists and is not empty: choose a new directory or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False):
    """Yield a fresh temporary directory next to `path`; publish it as `path` if the body succeeds."""
    out = check_output_dir(path, overwrite)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    tmp = out.parent / f".{out.name}.partial-{int(time.time())}-{os.getpid()}"
    if dist.is_initialized():  # one name for every rank: rank 0's
        box = [str(tmp)]
        dist.broadcast_object_list(box, src=0)
        tmp = Path(box[0])
    if rank0:
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank0:
        _publish(tmp, out)
    _barrier()


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (allowed by the caller) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{int(time.time())}-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
