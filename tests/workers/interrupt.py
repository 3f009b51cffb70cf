"""Worker: the megatron-prune CLI with a real SIGINT delivered at a chosen point (what Ctrl-C sends).

    python tests/workers/interrupt.py calibration N ARGS...   SIGINT at the N-th calibration micro-batch
    python tests/workers/interrupt.py swallowed ARGS...       SIGINT right after the HF export, raised inside a weakref
                                                              callback: Python prints "Exception ignored" and goes on,
                                                              as it does when Ctrl-C lands in library cleanup code
"""

import os
import signal
import sys
import weakref

import megatron_prune.minitron.bridge as bridge
from megatron_prune.common import log
from megatron_prune.minitron.cli import main


def interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "calibration":
        at, args, step = int(args[0]), args[1:], log.Progress.step
        seen = [0]

        def counting_step(self, n=1):
            step(self, n)
            if self.label.startswith("calibration"):
                seen[0] += n
                if seen[0] == at:
                    interrupt()

        log.Progress.step = counting_step
    else:
        save_hf = bridge.save_hf

        def save_then_interrupt_in_a_callback(*a, **k):
            save_hf(*a, **k)

            class Garbage:
                pass

            garbage = Garbage()
            ref = weakref.ref(garbage, lambda _: interrupt())  # noqa: F841 - the callback runs when garbage dies
            del garbage

        bridge.save_hf = save_then_interrupt_in_a_callback
    sys.exit(main(args))
