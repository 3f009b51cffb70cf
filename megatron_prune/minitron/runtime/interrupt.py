"""Ctrl-C that is never lost: a SIGINT handler that remembers the interrupt as well as raising it.

Python raises KeyboardInterrupt wherever the main thread happens to be; inside a weakref callback, a `__del__`
or a library's broad `except`, it is swallowed ("Exception ignored in ..."), and a job would carry on and
publish its output. With `watch_interrupts()` installed, the interrupt is also recorded, and
`raise_if_interrupted()` raises it again at the points that matter (between calibration steps, before an output
directory is published). Commands turn it into one line and exit status 130 (`runtime.command.run_command`).
"""

from __future__ import annotations

import contextlib
import signal
import threading

_interrupted = threading.Event()


def _handler(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def watch_interrupts():
    """Record SIGINT while the block runs (main thread only; elsewhere a no-op); the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if an interrupt arrived, even one that something swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
