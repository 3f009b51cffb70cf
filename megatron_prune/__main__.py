"""`python -m megatron_prune ...` (and `torchrun ... -m megatron_prune ...`): the CLI."""

import sys

from megatron_prune.minitron.cli import main

if __name__ == "__main__":
    sys.exit(main())
