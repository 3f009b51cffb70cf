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

_LAYOUT_FIELDS = (
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage", "pipeline_model_parallel_layout",
    "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
)  # fmt: skip


def stage_layout(counts: List[int]) -> Dict[str, object]:
    """Config fields that make Megatron build `counts[i]` decoder layers on pipeline stage i.

    Even splits use Megatron's default; anything else an explicit `pipeline_model_parallel_layout`
    ("E" embedding, "t" a transformer layer, "L" loss, "|" between stages), e.g. [3, 2] -> "Ettt|ttL",
    [0, 4] -> "E|ttttL". Every other layout field is reset so that Megatron sees one description.
    """
    fields: Dict[str, object] = {f: False if f.startswith("account_for") else None for f in _LAYOUT_FIELDS}
    if len(set(counts)) > 1:
        last = len(counts) - 1
        fields["pipeline_model_parallel_layout"] = "|".join(
            ("E" if i == 0 else "") + "t" * c + ("L" if i == last else "") for i, c in enumerate(counts)
        )
    return fields


def per_layer_fields(config) -> Dict[str, list]:
    """Config fields that say something per layer, as explicit 0/1 lists over layers 1..L, so depth
    pruning can keep the entries of the surviving layers (Megatron reads them by layer number)."""
    layers = range(1, config.num_layers + 1)
    fields = {}
    window = config.window_attn_skip_freq  # 1 = sliding-window layer
    if isinstance(window, int):
        fields["window_attn_skip_freq"] = [int(n % window != 0) for n in layers]
    elif isinstance(window, list):
        fields["window_attn_skip_freq"] = list(window)
    no_rope = config.no_rope_freq  # 1 = layer without rope; __post_init__ already expanded an int
    if no_rope:
        fields["no_rope_freq"] = [int(n % no_rope == 0) for n in layers] if isinstance(no_rope, int) else list(no_rope)
    return fields


def pruned_config(config, shape: ModelShape, target: Mapping[str, int], stage_counts: List[int],
                  original_counts: List[int], kept_layers: List[int]):  # fmt: skip
    """A new TransformerConfig with the target sizes; `kv_channels` is pinned to the original head dim.

    The pipeline layout fields are kept as they are unless depth pruning changed what a stage holds;
    per-layer fields keep the entries of `kept_layers` (global 1-indexed numbers, ascending).
    """
    changes = dict(target)
    changes["kv_channels"] = shape.kv_channels
    if list(stage_counts) != list(original_counts):
        changes.update(stage_layout(stage_counts))
    if len(kept_layers) != config.num_layers:
        changes.update({f: [v[n - 1] for n in kept_layers] for f, v in per_layer_fields(config).items()})
    with warnings.catch_warnings():  # __post_init__ re-runs and repeats deprecation notes the user has seen
        warnings.simplefilter("ignore")
        new = dataclasses.replace(config, **changes)
        if callable(getattr(new, "finalize", None)):  # Megatron-Bridge providers defer __post_init__ to finalize()
            new.finalize()
        return new


def rebuild_gpt(model: torch.nn.Module, config, num_local_layers: int) -> torch.nn.Module:
    """Build this stage of a GPTModel like `model` (same spec, vocab, embeddings, rope) from `config`.

    A block spec (per-layer specs plus the final norm) is rebuilt with `num_local_layers` copies of its
    (homogeneous) layer spec and the same final norm. The rotary frequencies are copied from `model`, as
    they depend on constructor arguments (e.g. the rope scaling factor) that the model does not keep.
    Weights are allocated without initialisation: the caller loads the sliced state dict.
    """
    spec = _block_spec(model.transformer_layer_spec, num_local_layers)
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
    if rope is not None and hasattr(rope, "inv_freq"):
        new.rotary_pos_emb.inv_freq = rope.inv_freq.clone()
    return new.to(next(model.parameters()).device)


def _block_spec(spec, num_local_layers: int):
    """A layer spec stays as is; a block spec gets `num_local_layers` copies of its (single) layer spec."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    block = _block_submodules(spec)
    if block is None:
        return spec
    # layer specs are homogeneous (checked before calibration); a stage may hold none
    return TransformerBlockSubmodules(layer_specs=block.layer_specs[:1] * num_local_layers, layer_norm=block.layer_norm)


def block_spec_is_homogeneous(spec) -> bool:
    """True unless `spec` is a block spec whose layers have different specs (those need a model_builder)."""
    block = _block_submodules(spec)
    return block is None or all(layer == block.layer_specs[0] for layer in block.layer_specs)


def _block_submodules(spec):
    """The TransformerBlockSubmodules a GPTModel's `transformer_layer_spec` describes, or None for a layer spec."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    if isinstance(spec, ModuleSpec) and isinstance(spec.module, type) and issubclass(spec.module, TransformerBlock):
        spec = spec.submodules
    return spec if isinstance(spec, TransformerBlockSubmodules) else None
