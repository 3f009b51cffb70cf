"""Worker (under torchrun): write a Megatron-LM checkpoint of a tiny GPT at the given TP/PP.

    megatron_ckpt.py TP PP ROOT TOKENIZER ITERATION
"""

import sys

from megatron_prune.minitron.runtime.distributed import init_distributed
from tests.megatron_ckpt import build_mlm_model, mlm_args, write_mlm_checkpoint

if __name__ == "__main__":
    tp, pp, root, tokenizer, iteration = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    init_distributed(tp, pp, seed=0)
    args = mlm_args(tokenizer, tp=tp, pp=pp)
    write_mlm_checkpoint(build_mlm_model(args), args, root, iteration)
