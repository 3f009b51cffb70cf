"""torchrun worker (2 processes): prune the same model with the same data under several parallel layouts.

Usage: prune_layouts.py CASE OUT. CASE (torch file): "state_dict" of a full PP=1 model, "config" overrides
for tiny_gpt_config, "batches" (token ids), "export_config", and "moe_state_dict", "moe_export_config" of a
tiny_moe_config model (the "moe-*" layouts), "hybrid_state_dict", "hybrid_export_config" of a tiny hybrid
MambaModel (tests.test_hybrid.make: pattern "M*-ME"; the "hybrid-*" layouts). For each layout below every rank writes
OUT/<layout>-rank<r>.pt with its pruned weights under global names, the orders, the kept layers per stage
and (last stage) the pruned model's logits; the scores file of each layout is OUT/<layout>-scores.pt.
"""

import sys

import torch
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.minitron.axes import AXES, LAYER_AXES
from megatron_prune.minitron.runtime.distributed import init_distributed
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.tensor_parallel import Partition, partitions
from tests.stages import global_state_dict, stage_state_dict
from tests.test_hybrid import make as make_hybrid
from tests.tiny import build_tiny_gpt, tiny_gpt_config, tiny_moe_config

LAYOUTS = {  # name: (tensor-parallel size, pipeline size, extra config)
    "pp2": (1, 2, {}),
    "pp2-uneven": (1, 2, {"num_layers_in_first_pipeline_stage": 1}),
    "pp2-account": (1, 2, {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}),
    "pp2-empty-first": (1, 2, {"pipeline_model_parallel_layout": "E|ttttL"}),
    "dp2": (1, 1, {}),
    "tp2": (2, 1, {}),
    "moe-pp2": (1, 2, {}),  # stage 0: layers 1 (MoE), 2 (dense); stage 1: layers 3, 4 (MoE)
    "moe-dp2": (1, 1, {}),
    "hybrid-pp2": (1, 2, {"num_layers_in_first_pipeline_stage": 3}),  # stage 0: "M*-", stage 1: "ME"
}


TAYLOR = "heads=taylor,groups=taylor,ffn=taylor"
TAYLOR_LAYOUTS = ("pp2", "dp2", "tp2")



def by_short_name(orders) -> dict:
    """A layer's orders as {short axis name: indices or None}, every per-layer axis present."""
    return {AXES[axis].alias: orders.get(axis) for axis in LAYER_AXES}

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
    family = name.split("-")[0] if name.startswith(("moe-", "hybrid-")) else ""
    prefix = f"{family}_" if family else ""
    state, export_config = case[f"{prefix}state_dict"], case[f"{prefix}export_config"]
    if family == "hybrid":
        model = make_hybrid(**extra)
    else:
        config = tiny_moe_config(**extra) if family == "moe" else tiny_gpt_config(**case["config"], **extra)
        model = build_tiny_gpt(config, vocab_size=case["vocab"])
    model.load_state_dict(stage_state_dict(state, model), strict=True)
    if tp > 1:
        check_table_partitions_match_megatron()
    loop = mp.make_forward_loop(case["batches"], progress=False)
    scores = f"{out}/{name}-scores.pt"
    pruned, result = mp.prune(model, export_config, forward_loop=loop, scores_path=scores)
    again, _ = mp.prune(model, export_config, scores_path=scores)  # reuse at the same layout
    assert all(torch.equal(a, b) for a, b in zip(global_state_dict(pruned).values(), global_state_dict(again).values()))
    logits = mp.run_forward(pruned, case["batches"], collect=lambda out, tokens: out.clone(), shard_over_dp=False)
    if logits and tp > 1:  # vocab-parallel output: gather the vocabulary shards
        logits = [torch.cat(ParallelContext.from_megatron().gather_over_tp(x), dim=-1) for x in logits]
    taylor = None
    if name in TAYLOR_LAYOUTS:  # gradients through the pipeline schedule (p2p backward at PP=2, TP-local inputs)
        backward = mp.make_forward_loop(case["batches"], progress=False, backward=True)
        taylor = mp.prune(model, export_config, forward_loop=backward, criteria=TAYLOR)[1].orders.layers
    torch.save(
        {
            "taylor_orders": taylor and {n: by_short_name(o) for n, o in taylor.items()},
            "weights": global_state_dict(pruned),
            "hidden_order": result.orders.hidden,
            "layer_orders": {n: by_short_name(o) for n, o in result.orders.layers.items()},
            "layer_scores": result.importance.layers,
            "stage_layers": result.stage_layers,
            "config_layout": str(result.config.pipeline_model_parallel_layout),
            "params_after": result.params_after,
            "logits": torch.cat(logits) if logits else None,
        },
        f"{out}/{name}-rank{torch.distributed.get_rank()}.pt",
    )
    parallel_state.destroy_model_parallel()


def fewer_kv_groups_than_tp_ranks(case: dict, out: str) -> None:
    """One query group at TP=2 (megatron-core replicates the K/V head on both ranks): calibration collects no
    per-group statistics and heads are ranked as in one process."""
    init_distributed(tensor_model_parallel_size=2)
    model = build_tiny_gpt(tiny_gpt_config(num_query_groups=1), vocab_size=case["vocab"])
    model.load_state_dict(stage_state_dict(case["mqa_state_dict"], model), strict=True)
    loop = mp.make_forward_loop(case["batches"], progress=False, backward=True)
    orders = {c: mp.prune(model, {"num_attention_heads": 4}, loop, criteria=c)[1].orders.layers
              for c in ("heads=output_contribution", "heads=taylor")}  # fmt: skip
    torch.save({c: {n: o.heads for n, o in layers.items()} for c, layers in orders.items()},
               f"{out}/mqa-tp2-rank{torch.distributed.get_rank()}.pt")  # fmt: skip
    parallel_state.destroy_model_parallel()


def refuse_unsupported_module_on_one_stage(out: str) -> None:
    """Only stage 1 (layers 3-4) holds a module the axis table does not describe: both stages must raise the
    same error (rather than stage 0 waiting forever in a collective)."""
    init_distributed(pipeline_model_parallel_size=2)
    model = build_tiny_gpt(tiny_gpt_config())
    if parallel_state.get_pipeline_model_parallel_rank() == 1:
        model.decoder.layers[0].mlp.adapter = torch.nn.Linear(64, 64)
    try:
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=lambda m: None)
        message = "no error"
    except mp.UnsupportedModelError as e:
        message = str(e)
    with open(f"{out}/unsupported-error-rank{torch.distributed.get_rank()}.txt", "w") as f:
        f.write(message)
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    case_path, out_dir = sys.argv[1:3]
    case = torch.load(case_path, weights_only=False)
    for layout in LAYOUTS:
        run(case, out_dir, layout)
    fewer_kv_groups_than_tp_ranks(case, out_dir)
    refuse_unsupported_module_on_one_stage(out_dir)
