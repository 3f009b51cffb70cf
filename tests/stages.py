"""Test helpers (not tests): move a full model's state dict onto a pipeline stage, and back to global names."""

import re

import torch

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def stage_state_dict(full: dict, model: torch.nn.Module) -> dict:
    """This stage's tensors from a full (PP=1) state dict, decoder layers matched by global `layer_number`."""
    stage = {}
    for key in model.state_dict():
        source = key
        layer = _LAYER.fullmatch(key)
        if layer:
            source = f"decoder.layers.{model.decoder.layers[int(layer[1])].layer_number - 1}.{layer[2]}"
        if source == "output_layer.weight" and source not in full:  # tied: the last stage holds a copy
            source = "embedding.word_embeddings.weight"
        stage[key] = full[source]
    return stage


def global_state_dict(model: torch.nn.Module) -> dict:
    """This stage's tensors keyed as in a PP=1 model (decoder layers by global number); tied copies dropped."""
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("._extra_state"):
            continue
        if key == "output_layer.weight" and model.share_embeddings_and_output_weights and not model.pre_process:
            continue
        layer = _LAYER.fullmatch(key)
        if layer:
            key = f"decoder.layers.{model.decoder.layers[int(layer[1])].layer_number - 1}.{layer[2]}"
        out[key] = value.detach().clone()
    return out
