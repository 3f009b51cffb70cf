"""torchrun worker (2 processes): prune the same model with the same data under several parallel layouts.

Usage: prune_layouts.py CASE OUT. CASE (torch file): "state_dict" of a full PP=1 model, "config" overrides
for tiny_gpt_config, "batches" (token ids), "export_config". For each layout below every rank writes
OUT/<layout>-rank<r>.pt with its pruned weights under global names, the orders, the kept layers per stage
and (last stage) the pruned model's logits; the scores file of each layout is OUT/<layout>-scores.pt.
"""

import sys

import torch
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.runtime.distributed import init_distributed
from megatron_prune.runtime.parallel import ParallelContext
from megatron_prune.slicing.tensor_parallel import Partition, partitions
from tests.stages import global_state_dict, stage_state_dict
from tests.tiny import build_tiny_gpt, tiny_gpt_config

LAYOUTS = {  # name: (tensor-parallel size, pipeline size, extra config)
    "pp2": (1, 2, {}),
    "pp2-uneven": (1, 2, {"num_layers_in_first_pipeline_stage": 1}),
    "pp2-account": (1, 2, {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}),
    "pp2-empty-first": (1, 2, {"pipeline_model_parallel_layout": "E|ttttL"}),
    "dp2": (1, 1, {}),
    "tp2": (2, 1, {}),
}


def check_table_partitions_match_megatron() -> None:
    """The axis table's TP splits equal the partition attributes megatron-core sets at initialisation."""
    model = build_tiny_gpt(tiny_gpt_config(add_bias_linear=True), tied=False)
    table = partitions(model)
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            assert table.get(name) == Partition(p.partition_dim, p.partition_stride), (name, table.get(name))
        else:
            assert name not in table, name


def run(case: dict, out: str, name: str) -> None:
    tp, pp, extra = LAYOUTS[name]
    init_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = build_tiny_gpt(tiny_gpt_config(**case["config"], **extra), vocab_size=case["vocab"])
    model.load_state_dict(stage_state_dict(case["state_dict"], model), strict=True)
    if tp > 1:
        check_table_partitions_match_megatron()
    loop = mp.make_forward_loop(case["batches"], progress=False)
    scores = f"{out}/{name}-scores.pt"
    pruned, result = mp.prune(model, case["export_config"], forward_loop=loop, scores_path=scores)
    again, _ = mp.prune(model, case["export_config"], scores_path=scores)  # reuse at the same layout
    assert all(torch.equal(a, b) for a, b in zip(global_state_dict(pruned).values(), global_state_dict(again).values()))
    logits = mp.run_forward(pruned, case["batches"], collect=lambda out, tokens: out.clone(), shard_over_dp=False)
    if logits and tp > 1:  # vocab-parallel output: gather the vocabulary shards
        logits = [torch.cat(ParallelContext.from_megatron().gather_over_tp(x), dim=-1) for x in logits]
    torch.save(
        {
            "weights": global_state_dict(pruned),
            "hidden_order": result.orders.hidden,
            "layer_orders": {n: (o.ffn, o.groups, o.heads) for n, o in result.orders.layers.items()},
            "layer_scores": result.importance.layers,
            "stage_layers": result.stage_layers,
            "config_layout": str(result.config.pipeline_model_parallel_layout),
            "params_after": result.params_after,
            "logits": torch.cat(logits) if logits else None,
        },
        f"{out}/{name}-rank{torch.distributed.get_rank()}.pt",
    )
    parallel_state.destroy_model_parallel()


def refuse_moe_on_one_stage(out: str) -> None:
    """Layers 3-4 are MoE, so only stage 1 holds unsupported modules: both stages must raise the same error
    (rather than stage 0 waiting forever in a collective)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    init_distributed(pipeline_model_parallel_size=2)
    config = tiny_gpt_config(num_moe_experts=4, moe_layer_freq=[0, 0, 1, 1], moe_ffn_hidden_size=64, moe_router_topk=2)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                      pp_rank=parallel_state.get_pipeline_model_parallel_rank())  # fmt: skip
    model = GPTModel(config, spec, vocab_size=128, max_sequence_length=32,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())  # fmt: skip
    try:
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=lambda m: None)
        message = "no error"
    except mp.UnsupportedModelError as e:
        message = str(e)
    with open(f"{out}/moe-error-rank{torch.distributed.get_rank()}.txt", "w") as f:
        f.write(message)
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    case_path, out_dir = sys.argv[1:3]
    case = torch.load(case_path, weights_only=False)
    for layout in LAYOUTS:
        run(case, out_dir, layout)
    refuse_moe_on_one_stage(out_dir)
