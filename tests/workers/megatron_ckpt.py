"""Worker (under torchrun): write a Megatron-LM checkpoint of a tiny GPT at the given TP/PP.

    megatron_ckpt.py TP PP ROOT TOKENIZER ITERATION [moe]
moe: MoE layers (4 routed experts of FFN 32, top-2, the alltoall dispatcher) instead of dense MLPs.
"""

import sys

from megatron_prune.minitron.runtime.distributed import init_distributed
from tests.megatron_ckpt import build_mlm_model, mlm_args, write_mlm_checkpoint

if __name__ == "__main__":
    tp, pp, root, tokenizer, iteration = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    init_distributed(tp, pp, seed=0)
    moe = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall",
               moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_layer_freq=1)  # fmt: skip
    args = mlm_args(tokenizer, tp=tp, pp=pp, **(moe if sys.argv[6:] == ["moe"] else {}))
    write_mlm_checkpoint(build_mlm_model(args), args, root, iteration)
