"""Worker: prune a MoE GPT (4 routed experts, top-2, shared expert, allgather dispatcher) at expert-parallel size 2
(each rank holds 2 experts; dense weights are data-parallel) from the same weights as one process.

    torchrun --nproc-per-node 2 tests/workers/moe_ep.py CASE.pt OUT_DIR
CASE.pt: {"state_dict": the one-process model's, "export_config", "batches", "scores": a scores file written by one
process}. Rank 0 saves: orders, the pruned model's weights (experts by global number), logits, counts.
"""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import megatron_prune as mp
from megatron_prune.minitron.axes import AXES, LAYER_AXES
from megatron_prune.minitron.runtime.cpu import apply_cpu_support
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import inventory_of
from megatron_prune.minitron.slicing.table import expert_name, split_expert_name, split_layer_name
from tests.test_moe import make

DISPATCHER = {"moe_token_dispatcher_type": "allgather"}


def global_name(name: str, ctx: ParallelContext, experts: int) -> str:
    """A state-dict name with its routed expert numbered globally (rank r holds experts r*E/ep ...)."""
    index, inner = split_layer_name(name)
    expert, role = split_expert_name(inner) if index is not None else (None, None)
    if expert is None:
        return name
    return name.replace(inner, expert_name(ctx.ep_rank * experts // ctx.ep_size + expert, role))


def global_state(model, ctx: ParallelContext) -> dict:
    experts = model.config.num_moe_experts
    local = {global_name(k, ctx, experts): v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = {}
    for part in ctx.gather_objects_over_ep(local):
        out.update(part)
    return out


def main(case_path: str, out: str) -> None:
    case = torch.load(case_path, weights_only=False)
    apply_cpu_support()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    ctx = ParallelContext.from_megatron()
    model = make(**DISPATCHER)
    full, experts = case["state_dict"], model.config.num_moe_experts
    model.load_state_dict({k: full[global_name(k, ctx, experts)] for k in model.state_dict()
                           if not k.endswith("_extra_state")}, strict=False)  # fmt: skip
    loop = mp.make_forward_loop(case["batches"], progress=False)  # data-parallel: each rank forwards half
    errors = []
    for bad in ({"num_moe_experts": 3}, {"num_moe_experts": 1}):  # not divisible by EP; below the router's top-k
        try:
            mp.prune(model, bad, forward_loop=loop)
        except mp.PruneConfigError as e:
            errors.append(str(e))
    with torch.no_grad():  # MoE experts with biases modify a view in place: autograd refuses, the forward is fine
        unpruned = mp.run_forward(model, case["batches"], collect=lambda o, t: o.clone(), shard_over_dp=False)
    pruned, result = mp.prune(model, case["export_config"], forward_loop=loop, scores_path=f"{out}/ep2-scores.pt")
    reused, _ = mp.prune(model, case["export_config"], scores_path=case["scores"])  # one process's statistics
    with torch.no_grad():
        logits = mp.run_forward(pruned, case["batches"], collect=lambda o, t: o.clone(), shard_over_dp=False)
    counted = inventory_of(model, ctx).count(result.export_config, kept_layers=result.plan.kept_layers)  # analytic, EP=2
    record = {
        "unpruned_logits": torch.cat(unpruned), "logits": torch.cat(logits),
        "weights": global_state(pruned, ctx), "reused_weights": global_state(reused, ctx),
        "hidden_order": result.orders.hidden, "layer_ranking": result.orders.layer_ranking,
        "layer_orders": {n: {AXES[a].alias: o.get(a) for a in LAYER_AXES} for n, o in result.orders.layers.items()},
        "params_before": result.params_before, "params_after": result.params_after,
        "counted": (counted.params, counted.active_params),
        "local_experts": len(pruned.decoder.layers[0].mlp.experts.local_experts), "errors": errors,
    }  # fmt: skip
    if dist.get_rank() == 0:
        torch.save(record, f"{out}/ep2.pt")
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
