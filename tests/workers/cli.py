"""Worker (under torchrun): the megatron-prune CLI with the given arguments."""

import sys

from megatron_prune.minitron.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
