"""Test helpers (not tests): move a full model's state dict onto a TP/PP/EP shard, and back to global names."""

import torch

from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.table import (
    expert_name, is_tied_output_copy, layer_name, split_expert_name, split_layer_name,
)
from megatron_prune.minitron.slicing.tensor_parallel import logical, partitions, shard


def _global_inner(model: torch.nn.Module, inner: str, ctx: ParallelContext) -> str:
    """A name inside a layer with its routed expert numbered globally (EP rank r holds experts r*E/ep ...)."""
    expert, role = split_expert_name(inner)
    if expert is None or ctx.ep_size == 1:
        return inner
    return expert_name(ctx.ep_rank * model.config.num_moe_experts // ctx.ep_size + expert, role)


def stage_state_dict(full: dict, model: torch.nn.Module) -> dict:
    """This rank's tensors from a full (TP=PP=EP=1) state dict, decoder layers matched by global `layer_number`."""
    stage, parts, ctx = {}, partitions(model), ParallelContext.from_megatron()
    for key in model.state_dict():
        source = key
        index, inner = split_layer_name(key)
        if index is not None:
            source = layer_name(model.decoder.layers[index].layer_number - 1, _global_inner(model, inner, ctx))
        if source == "output_layer.weight" and source not in full:  # tied: the last stage holds a copy
            source = "embedding.word_embeddings.weight"
        stage[key] = full[source] if key not in parts else shard(full[source], parts[key], ctx)
    return stage


def global_state_dict(model: torch.nn.Module) -> dict:
    """This stage's tensors as in a TP=PP=EP=1 model: TP shards gathered, decoder layers and routed experts by
    global number, tied copies dropped. A collective when TP > 1 or EP > 1."""
    out, parts, ctx = {}, partitions(model), ParallelContext.from_megatron()
    for key, value in model.state_dict().items():
        original = key
        if key.endswith("._extra_state"):
            continue
        if is_tied_output_copy(model, key):
            continue
        index, inner = split_layer_name(key)
        if index is not None:
            key = layer_name(model.decoder.layers[index].layer_number - 1, _global_inner(model, inner, ctx))
        out[key] = logical(value, parts.get(original), ctx).detach().clone()
    return {k: v for part in ctx.gather_objects_over_ep(out) for k, v in part.items()}


def assert_same_orders_and_weights(recorded: dict, result, pruned: torch.nn.Module) -> None:
    """A multi-rank run's record (`hidden_order`, `layer_ranking`, `layer_orders` by short axis name, `weights` of
    the pruned model in global names) equals one process's `result` and pruned model, bit for bit."""
    from megatron_prune.minitron.axes import AXES, LAYER_AXES

    assert torch.equal(recorded["hidden_order"], result.orders.hidden)
    assert recorded["layer_ranking"] == result.orders.layer_ranking
    for n, orders in recorded["layer_orders"].items():
        for axis in LAYER_AXES:
            expected, got = result.orders.layers[n].get(axis), orders[AXES[axis].alias]
            assert (got is None and expected is None) or torch.equal(got, expected), (n, axis)
    one = {k: v for k, v in pruned.state_dict().items() if not k.endswith("_extra_state")}
    assert recorded["weights"].keys() == one.keys()
    for key, value in one.items():
        assert torch.equal(recorded["weights"][key], value), key


def prune_here_and_in_a_world(model: torch.nn.Module, batches, export_config: dict, out, worker: str, *worker_args,
                              nproc: int = 2):  # fmt: skip
    """Prune `model` in this process (one process's world already initialised; statistics written to OUT/tp1-scores.pt),
    then run `tests/workers/<worker> OUT/case.pt OUT *worker_args` under torchrun on the same weights, batches and
    target. Returns (pruned, result)."""
    import megatron_prune as mp
    from tests.torchrun import REPO_ROOT, run_torchrun

    scores = str(out / "tp1-scores.pt")
    pruned, result = mp.prune(model, export_config, forward_loop=mp.make_forward_loop(batches, progress=False),
                              scores_path=scores)  # fmt: skip
    torch.save({"state_dict": model.state_dict(), "export_config": export_config, "batches": batches, "scores": scores},
               out / "case.pt")  # fmt: skip
    run_torchrun(REPO_ROOT / "tests" / "workers" / worker, nproc, out / "case.pt", out, *worker_args)
    return pruned, result
