"""The pruned model is stock Megatron: a pruned `TransformerConfig`, and a GPTModel rebuilt from it.

Owns: writing the target sizes into a copy of the config (an export config is a patch to
`TransformerConfig`), expressing which layers each pipeline stage keeps after depth pruning, and
rebuilding a `GPTModel` with the same constructor arguments as the original.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Mapping

import torch

from megatron_prune.config import ModelShape

_LAYOUT_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout")


def stage_layout(counts: List[int]) -> Dict[str, object]:
    """Config fields that make Megatron build `counts[i]` decoder layers on pipeline stage i.

    Even splits use Megatron's default; anything else an explicit `pipeline_model_parallel_layout`
    ("E" embedding, "t" a transformer layer, "L" loss, "|" between stages), e.g. [3, 2] -> "Ettt|ttL".
    """
    fields: Dict[str, object] = dict.fromkeys(_LAYOUT_FIELDS)
    if len(set(counts)) > 1:
        last = len(counts) - 1
        fields["pipeline_model_parallel_layout"] = "|".join(
            ("E" if i == 0 else "") + "t" * c + ("L" if i == last else "") for i, c in enumerate(counts)
        )
    return fields


def pruned_config(config, shape: ModelShape, target: Mapping[str, int], stage_counts: List[int]):
    """A new TransformerConfig with the target sizes; `kv_channels` is pinned to the original head dim."""
    changes = dict(target)
    changes["kv_channels"] = shape.kv_channels
    changes.update(stage_layout(stage_counts))
    with warnings.catch_warnings():  # __post_init__ re-runs and repeats deprecation notes the user has seen
        warnings.simplefilter("ignore")
        return dataclasses.replace(config, **changes)


def rebuild_gpt(model: torch.nn.Module, config) -> torch.nn.Module:
    """Build this stage of a GPTModel like `model` (same spec, vocab, embeddings, rope) from `config`.

    Weights are allocated without initialisation: the caller loads the sliced state dict.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = model.transformer_layer_spec
    if isinstance(spec, TransformerBlockSubmodules):
        specs = spec.layer_specs
        if any(s is not specs[0] and s != specs[0] for s in specs):
            raise ValueError("the model uses per-layer block specs; pass model_builder= to prune() to rebuild it")
        spec = specs[0]
    kwargs = dict(
        transformer_layer_spec=spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_sequence_length,
        pre_process=model.pre_process,
        post_process=model.post_process,
        fp16_lm_cross_entropy=model.fp16_lm_cross_entropy,
        parallel_output=model.parallel_output,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        rope_scaling=model.rotary_scaling,
        mtp_block_spec=model.mtp_block_spec,
        pg_collection=model.pg_collection,
        vp_stage=model.vp_stage,
    )
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is not None:
        kwargs["seq_len_interpolation_factor"] = rope.seq_len_interpolation_factor
    init = config.perform_initialization
    config.perform_initialization = False
    try:
        new = type(model)(config=config, **kwargs)
    finally:
        config.perform_initialization = init
    if rope is not None and not torch.equal(rope.inv_freq.cpu(), new.rotary_pos_emb.inv_freq.cpu()):
        raise ValueError("could not rebuild the rotary embedding identically (custom rope scaling?); "
                         "pass model_builder= to prune()")  # fmt: skip
    return new.to(next(model.parameters()).device)
