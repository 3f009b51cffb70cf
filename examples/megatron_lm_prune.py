"""Prune a GPT inside Megatron-LM with megatron-prune, laid out like Megatron-LM's post-training prune example.

Run it from a Megatron-LM checkout (it uses `megatron.training`, Megatron-LM's training package, which is not on
PyPI and not needed by megatron-prune itself), with the model flags of your checkpoint:

    torchrun --nproc-per-node 8 examples/megatron_lm_prune.py \
        ${MODEL_ARGS} --tensor-model-parallel-size 8 \
        --load /ckpts/llama-8b --save /ckpts/llama-8b-pruned \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model meta-llama/Llama-3.1-8B \
        --calib-data /data/calib.jsonl --calib-size 1024 --seq-length 4096 --micro-batch-size 1 \
        --target-ffn-hidden-size 9216 --target-hidden-size 3072 --protect-layers first,last \
        --pruning-scores-path /ckpts/llama-8b.scores.pt

It prints the model flags of the pruned checkpoint (e.g. `--hidden-size 3072 --ffn-hidden-size 9216`); pass them,
with `--finetune`, to the distillation run that loads it. Without Megatron-LM, `python -m megatron_prune --load`
does the same on Megatron-LM and Megatron-Bridge checkpoints.
"""

import functools
import os
import sys

sys.path.append(os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../")))  # a Megatron-LM checkout

from megatron.training import get_args, get_model, initialize_megatron  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.utils import print_rank_0, unwrap_model  # noqa: E402

from megatron_prune.minitron.megatron_lm import add_prune_args, prune_megatron_lm_model  # noqa: E402

if __name__ == "__main__":
    initialize_megatron(extra_args_provider=add_prune_args,
                        args_defaults={"no_load_rng": True, "no_load_optim": True})  # fmt: skip
    args = get_args()
    from gpt_builders import gpt_builder  # Megatron-LM's own builder (repository root)
    from model_provider import model_provider

    model = get_model(functools.partial(model_provider, gpt_builder), wrap_with_ddp=False)
    if args.load:
        load_checkpoint(model, None, None, strict=True)
        print_rank_0(f"loaded {args.load}")

    # calibrates on --calib-data, prunes this rank's stage, and writes --save (release/ with the pruned args)
    pruned, result, pruned_args = prune_megatron_lm_model(unwrap_model(model), args)
    print_rank_0(f"parameters: {result.params_before:,} -> {result.params_after:,}")
    print_rank_0("done")
