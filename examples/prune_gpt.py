"""Prune a small Megatron-core GPT the Minitron way, on CPU or GPU, at any pipeline/data-parallel size.

    python examples/prune_gpt.py                                   # one process
    torchrun --nproc-per-node 2 examples/prune_gpt.py --pp 2       # two pipeline stages
    torchrun --nproc-per-node 2 examples/prune_gpt.py --tp 2       # two tensor-parallel ranks
    torchrun --nproc-per-node 2 examples/prune_gpt.py              # two data-parallel replicas

The model is randomly initialised (bring your own checkpoint in real use); calibration data are random
token ids. Statistics are cached in --scores: run again with another --export-config and calibration is
skipped. The file is tied to the model's weights, not to the layout: with a real checkpoint it is reusable
at any TP/PP/DP size, but random initialisation here differs per TP/PP size, so the default path names them.
The pruned model is a stock GPTModel built from the pruned config; its weights are saved per rank to --out.
"""

import argparse
import json
import os

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

import megatron_prune as mp
from megatron_prune.minitron.runtime.distributed import init_distributed


def main():
    p = argparse.ArgumentParser(description="Minitron pruning of a small GPT")
    p.add_argument("--tp", type=int, default=1, help="tensor-model-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-model-parallel size")
    p.add_argument("--export-config", default='{"hidden_size": 192, "ffn_hidden_size": 512, "num_attention_heads": 4, "num_layers": 6}')
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--scores", default=None, help="default: <out>/scores-tp<tp>-pp<pp>.pt")
    p.add_argument("--importance", default=None, help="criteria per axis, e.g. heads=taylor,ffn=output_contribution")
    p.add_argument("--out", default="outputs/example")
    args = p.parse_args()

    init_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, seed=1234)
    config = TransformerConfig(
        num_layers=8, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=768,
        gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
    )  # fmt: skip
    model = GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=1024, max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope", share_embeddings_and_output_weights=True,
    )  # fmt: skip
    if torch.cuda.is_available():
        model.cuda()

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1024, (1, args.seq_length), generator=g) for _ in range(args.calib_samples)]
    taylor = "taylor" in (args.importance or "")  # Taylor criteria need the loss's backward pass
    pruned, result = mp.prune(
        model,
        export_config=json.loads(args.export_config),
        forward_loop=mp.make_forward_loop(batches, backward=taylor),
        scores_path=args.scores or os.path.join(args.out, f"scores-tp{args.tp}-pp{args.pp}.pt"),
        criteria=args.importance,
    )
    os.makedirs(args.out, exist_ok=True)
    rank = torch.distributed.get_rank()
    torch.save({"config": result.config, "state_dict": pruned.state_dict()}, os.path.join(args.out, f"pruned-rank{rank}.pt"))
    if rank == 0:
        print(f"kept layers per stage: {result.stage_layers}; dropped {result.plan.dropped_layers}")
        print(f"parameters: {result.params_before:,} -> {result.params_after:,}; weights in {args.out}/pruned-rank*.pt")


if __name__ == "__main__":
    main()
