"""Test helpers (not tests): move a full model's state dict onto a TP/PP shard, and back to global names."""

import torch

from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.table import is_tied_output_copy, layer_name, split_layer_name
from megatron_prune.minitron.slicing.tensor_parallel import logical, partitions, shard



def stage_state_dict(full: dict, model: torch.nn.Module) -> dict:
    """This rank's tensors from a full (TP=PP=1) state dict, decoder layers matched by global `layer_number`."""
    stage, parts, ctx = {}, partitions(model), ParallelContext.from_megatron()
    for key in model.state_dict():
        source = key
        index, inner = split_layer_name(key)
        if index is not None:
            source = layer_name(model.decoder.layers[index].layer_number - 1, inner)
        if source == "output_layer.weight" and source not in full:  # tied: the last stage holds a copy
            source = "embedding.word_embeddings.weight"
        stage[key] = full[source] if key not in parts else shard(full[source], parts[key], ctx)
    return stage


def global_state_dict(model: torch.nn.Module) -> dict:
    """This stage's tensors as in a TP=PP=1 model: TP shards gathered, decoder layers by global number,
    tied copies dropped. A collective when TP > 1."""
    out, parts, ctx = {}, partitions(model), ParallelContext.from_megatron()
    for key, value in model.state_dict().items():
        original = key
        if key.endswith("._extra_state"):
            continue
        if is_tied_output_copy(model, key):
            continue
        index, inner = split_layer_name(key)
        if index is not None:
            key = layer_name(model.decoder.layers[index].layer_number - 1, inner)
        out[key] = logical(value, parts.get(original), ctx).detach().clone()
    return out
