"""An output directory that appears complete or not at all, and never replaces a user's data by accident.

    check_output_dir(path, overwrite)     before any expensive work: refuse an existing non-empty directory
    with atomic_output_dir(path, overwrite) as tmp:  every rank writes under `tmp` (a sibling of `path`)
        ...                                # on success rank 0 renames it to `path`; on error it is deleted

Collective under torch.distributed: every rank enters and leaves the context together. On leaving, the
ranks agree: if the body failed on any rank (outside a collective), every rank raises and the temporary
directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Optional
from pathlib import Path

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.runtime.interrupt import raise_if_interrupted
from megatron_prune.minitron.runtime.parallel import ParallelContext, as_problem


def check_output_dir(path: str, overwrite: bool = False) -> Path:
    """`path` as an absolute Path, if it may be written: it does not exist, is empty, or `overwrite` is set."""
    out = Path(os.path.expanduser(path)).absolute()
    if out.exists() and not out.is_dir():
        raise PruneConfigError(f"--output-dir {path!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PruneConfigError(f"--output-dir {path!r} exists and is not empty: choose a new directory or pass --overwrite")
    _check_writable(out.parent, path)
    return out


def _check_writable(parent: Path, path: str) -> None:
    """The temporary directory is created in `parent` (or its nearest existing ancestor): try writing there now."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PruneConfigError(f"--output-dir {path!r} cannot be created: {existing} is not writable "
                               f"({e.strerror or e}): choose a directory you can write to") from None


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False, ctx: Optional[ParallelContext] = None):
    """Yield a fresh temporary directory next to `path`; publish it as `path` if the body succeeds everywhere."""
    out = check_output_dir(path, overwrite)
    ctx = ParallelContext.given(ctx)
    tmp = Path(ctx.broadcast_object(str(out.parent / f".{out.name}.partial-{int(time.time())}-{os.getpid()}")))
    ctx.on_main(lambda: tmp.mkdir(parents=True))
    failure = None
    try:
        yield tmp
        raise_if_interrupted()  # a Ctrl-C that something swallowed: never publish after it
    except BaseException as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
        failure = e
    problems = ctx.gather_all(None if failure is None else as_problem(failure))
    if any(problems):
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure
        rank, (error, message) = next((r, p) for r, p in enumerate(problems) if p)
        raise error(f"(raised on rank {rank}) {message}")
    ctx.on_main(lambda: _publish(tmp, out))
    ctx.barrier()


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (allowed by the caller) is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{int(time.time())}-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
