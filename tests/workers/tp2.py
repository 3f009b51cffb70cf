"""Worker: prune a model at TP=2 from the same weights and statistics as one process, and save what rank 0 sees:
orders, pruned global weights, pruned logits, counts.

    torchrun --nproc-per-node 2 tests/workers/tp2.py CASE.pt OUT_DIR MODEL
MODEL: "hybrid" (a hybrid Mamba model, pattern HYBRID_PATTERN, no MoE) or "mla" (a multi-latent-attention GPT).
CASE.pt: {"state_dict": the TP=1 model's, "export_config", "batches", "scores": a scores file written at TP=1}.
"""

import sys

import torch
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.minitron.axes import AXES, LAYER_AXES
from megatron_prune.minitron.runtime.distributed import init_distributed
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import inventory_of
from tests.stages import global_state_dict, stage_state_dict

HYBRID_PATTERN = "M*-M-"


def build(name: str) -> torch.nn.Module:
    if name == "hybrid":
        from tests.test_hybrid import make

        return make(HYBRID_PATTERN)
    from tests.test_mla import make

    return make()


def main(case_path: str, out: str, name: str) -> None:
    case = torch.load(case_path, weights_only=False)
    init_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    model = build(name)
    model.load_state_dict(stage_state_dict(case["state_dict"], model), strict=True)
    loop = mp.make_forward_loop(case["batches"], progress=False)
    unpruned = mp.run_forward(model, case["batches"], collect=lambda o, t: o.clone(), shard_over_dp=False)
    pruned, result = mp.prune(model, case["export_config"], forward_loop=loop, scores_path=f"{out}/tp2-scores.pt")
    reused, _ = mp.prune(model, case["export_config"], scores_path=case["scores"])  # statistics of one process
    ctx = ParallelContext.from_megatron()
    counted = inventory_of(model, ctx).count(result.export_config, kept_layers=result.plan.kept_layers)  # analytic, TP=2
    logits = mp.run_forward(pruned, case["batches"], collect=lambda o, t: o.clone(), shard_over_dp=False)
    gather = lambda xs: torch.cat([torch.cat(ctx.gather_over_tp(x), dim=-1) for x in xs])  # noqa: E731 vocab shards
    record = {
        "unpruned_logits": gather(unpruned), "logits": gather(logits),
        "weights": global_state_dict(pruned), "reused_weights": global_state_dict(reused),
        "hidden_order": result.orders.hidden, "layer_ranking": result.orders.layer_ranking,
        "layer_orders": {n: {AXES[a].alias: o.get(a) for a in LAYER_AXES} for n, o in result.orders.layers.items()},
        "params_after": result.params_after, "counted_params": counted.params, "config": {k: getattr(result.config, k) for k in case["export_config"]},
    }  # fmt: skip
    if torch.distributed.get_rank() == 0:
        torch.save(record, f"{out}/tp2.pt")
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
