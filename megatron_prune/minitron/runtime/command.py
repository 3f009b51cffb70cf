"""How a command runs: what it prints besides its own lines, and how it ends (exit status, one-line errors).

    return run_command("megatron-prune", job, args)   # job(args) is the command's body

Used by the prune CLI (`python -m megatron_prune`), `megatron_prune.minitron.distill` and its `evaluate`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from typing import Callable, Iterator

from megatron_prune.errors import PruneError

_OURS = f"{os.sep}megatron_prune{os.sep}"


@contextlib.contextmanager
def quiet_output(verbose: bool = False) -> Iterator[None]:
    """Enter before megatron-core is imported (it warns at import time); the previous display is restored on exit.

    Ranks other than global rank 0 print no third-party warnings or notices (Python warnings not shown, library
    logging only above WARNING, stdout discarded); errors still reach stderr. Rank 0 without `verbose` shows only
    the warnings megatron-prune raises itself: Apex / Transformer Engine fallbacks, deprecations and library
    logging below ERROR are hidden (they say nothing about the prune)."""
    show, stdout, disabled = warnings.showwarning, sys.stdout, logging.root.manager.disable
    if os.environ.get("RANK", "0") != "0":
        warnings.showwarning = lambda *args, **kwargs: None  # libraries reset the filters, not the display hook
        logging.disable(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed on exit
    elif not verbose:

        def ours_only(message, category, filename, lineno, file=None, line=None):
            if _OURS in str(filename):
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = ours_only
        logging.disable(logging.WARNING)  # megatron-prune's own lines are printed, not logged
    try:
        yield
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
        warnings.showwarning, sys.stdout = show, stdout
        logging.disable(disabled)


def run_command(prog: str, job: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run `job(args)` as a command's body: an error in the user's input prints `prog: error: ...` (once, from
    global rank 0) and returns 2; Ctrl-C prints one line and returns 130 (nothing published; a bug keeps its
    traceback); the distributed state is torn down either way. `args.verbose` (if present) shows third-party
    warnings (`quiet_output`)."""
    with quiet_output(getattr(args, "verbose", False)):
        from megatron_prune.minitron.runtime.distributed import destroy_distributed  # imports megatron-core: quiet first
        from megatron_prune.minitron.runtime.interrupt import watch_interrupts

        main_rank = os.environ.get("RANK", "0") == "0"
        try:
            with watch_interrupts():
                job(args)
        except PruneError as e:
            if main_rank:
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return 2
        except KeyboardInterrupt:
            if main_rank:
                print(f"{prog}: interrupted: nothing was published to --output-dir; statistics calibrated so far are "
                      "kept beside it (or in --scores-path): the same command resumes", file=sys.stderr, flush=True)
            return 130
        finally:
            destroy_distributed()
    return 0
