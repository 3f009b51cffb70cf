"""Worker: prune a MoE GPT (4 routed experts, top-2, shared expert, allgather dispatcher) at a parallel layout of two
ranks from the same weights as one process.

    torchrun --nproc-per-node N tests/workers/moe_layouts.py CASE.pt OUT_DIR TP EP ETP DISPATCHER
e.g. N=2 TP=1 EP=2: each rank holds 2 experts, dense weights are data-parallel. N=2 TP=2 EP=1 ETP=2: every linear
is split over the two ranks, routed experts' too. N=2 TP=2 EP=1 ETP=1: attention, dense MLP and shared expert split,
routed experts whole on both ranks. DISPATCHER: the token dispatcher (allgather or alltoall). CASE.pt: {"state_dict": the one-process model's, "export_config", "batches", "scores": a scores file
written by one process}. Rank 0 saves OUT_DIR/layout.pt: orders, the pruned model's weights (global names), logits,
counts, the errors of bad targets.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.minitron.axes import AXES, LAYER_AXES
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.runtime.distributed import init_distributed
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import inventory_of
from tests.stages import global_state_dict, stage_state_dict
from tests.test_moe import make

DISPATCHER = {"moe_token_dispatcher_type": "allgather"}


def main(case_path: str, out: str, tp: int, ep: int, etp: int, dispatcher: str) -> None:
    case = torch.load(case_path, weights_only=False)
    init_distributed(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    ctx = ParallelContext.from_megatron()
    model = make(moe_token_dispatcher_type=dispatcher, expert_tensor_parallel_size=etp)
    model.load_state_dict(stage_state_dict(case["state_dict"], model), strict=True)
    loop = mp.make_forward_loop(case["batches"], progress=False)  # data-parallel ranks each forward their share
    bad = [{"num_moe_experts": 1}]  # below the router's top-k; then sizes this layout cannot split
    bad += [{"num_moe_experts": 3}] * (ep > 1) + [{"moe_ffn_hidden_size": 15}] * (etp > 1)
    bad += [{"moe_shared_expert_intermediate_size": 47}] * (tp > 1)
    errors = {}
    for target in bad:
        try:
            mp.prune(model, target, forward_loop=loop)
        except mp.PruneConfigError as e:
            errors["{}={}".format(*next(iter(target.items())))] = str(e)

    def logits(m):
        with torch.no_grad():  # MoE experts with biases modify a view in place: autograd refuses, the forward is fine
            out = mp.run_forward(m, case["batches"], collect=lambda o, t: o.clone(), shard_over_dp=False)
        return torch.cat([torch.cat(ctx.gather_over_tp(x), dim=-1) for x in out])  # vocabulary shards

    unpruned = logits(model)
    pruned, result = mp.prune(model, case["export_config"], forward_loop=loop, scores_path=f"{out}/layout-scores.pt")
    reused, _ = mp.prune(model, case["export_config"], scores_path=case["scores"])  # one process's statistics
    sizes = ModelShape.from_config(model.config).sizes()
    sorted_only, _ = mp.prune(model, sizes, scores_path=f"{out}/layout-scores.pt")  # every axis sorted, none sliced
    counted = inventory_of(model, ctx).count(result.export_config, kept_layers=result.plan.kept_layers)  # analytic
    record = {
        "unpruned_logits": unpruned, "logits": logits(pruned), "sorted_logits": logits(sorted_only),
        "weights": global_state_dict(pruned), "reused_weights": global_state_dict(reused),
        "hidden_order": result.orders.hidden, "layer_ranking": result.orders.layer_ranking,
        "layer_orders": {n: {AXES[a].alias: o.get(a) for a in LAYER_AXES} for n, o in result.orders.layers.items()},
        "params_before": result.params_before, "params_after": result.params_after,
        "counted": (counted.params, counted.active_params),
        "local_experts": len(pruned.decoder.layers[0].mlp.experts.local_experts), "errors": errors,
        "expert_fc1_rows": model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight.shape[0],
        "shared_fc1_rows": model.decoder.layers[0].mlp.shared_experts.linear_fc1.weight.shape[0],
    }  # fmt: skip
    if dist.get_rank() == 0:
        torch.save(record, f"{out}/layout.pt")
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6])
