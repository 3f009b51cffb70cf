"""What megatron-prune refuses to prune, found before any work (`check_model(model, ctx)`), and the prunable
sizes of a model as built (`model_shape`).

Pipeline stages hold different modules, so the ranks agree on the verdict first: every rank raises the same
error (PruneConfigError for a setting to change, UnsupportedModelError for a module type the axis table does
not describe) and none is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_prune.errors import PruneConfigError, UnsupportedModelError
from megatron_prune.minitron.config import ModelShape, layer_symbols
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.model import block_spec_layers, hybrid_pattern_of
from megatron_prune.minitron.slicing.table import axes_of


def check_model(model: torch.nn.Module, ctx: ParallelContext, has_builder: bool = False) -> None:
    """Refuse what megatron-prune cannot prune. Pipeline stages hold different modules, so the ranks
    agree on the verdict first: every rank raises the same error and none is left waiting in a collective."""
    ctx.raise_first(_model_problem(model, ctx, has_builder))


def _model_problem(model: torch.nn.Module, ctx: ParallelContext, has_builder: bool):
    """(error class, message) for the first unsupported feature of this stage, or None."""
    from megatron.core.models.gpt import GPTModel

    if not isinstance(model, GPTModel) and not _is_mamba_model(model):
        return PruneConfigError, (
            f"model must be an unwrapped megatron.core GPTModel or MambaModel, got {type(model).__name__} "
            "(unwrap DDP/Float16Module first, e.g. megatron.core.utils.unwrap_model)"
        )
    cfg = model.config
    if ctx.tp_size > 1 and cfg.sequence_parallel:
        return PruneConfigError, (
            "config.sequence_parallel=True: calibrate with sequence parallelism off (it splits the sequence that "
            "per-sample statistics average over); TP itself is supported"
        )
    if (cfg.context_parallel_size or 1) > 1:
        return PruneConfigError, f"config.context_parallel_size={cfg.context_parallel_size}: prune with CP=1"
    if cfg.virtual_pipeline_model_parallel_size or getattr(model, "vp_stage", None) is not None:
        return PruneConfigError, "virtual pipeline parallelism (virtual_pipeline_model_parallel_size) is not supported"
    if getattr(cfg, "use_te_op_fuser", False):
        return PruneConfigError, "config.use_te_op_fuser=True (TEFusedMLP) is not supported: its linears are not called as modules"
    for flag in ("attention_output_gate", "heterogeneous_block_specs"):
        if getattr(cfg, flag, False):
            return PruneConfigError, f"config.{flag}=True is not supported yet by megatron-prune"
    if getattr(cfg, "multi_latent_attention", False) and getattr(cfg, "cache_mla_latents", False):
        return PruneConfigError, ("config.cache_mla_latents=True (MLA weight absorption for inference): calibrate with "
                                  "it off (the same weights; megatron-core absorbs them only when it runs inference)")  # fmt: skip
    if getattr(model, "mtp_process", False):
        return PruneConfigError, "multi-token-prediction layers are not supported: build the model without MTP"
    specs = block_spec_layers(getattr(model, "transformer_layer_spec", None))
    if not has_builder and specs is not None and specs != len(model.decoder.layers):
        return PruneConfigError, (
            f"the model's block spec has {specs} layer specs for the {len(model.decoder.layers)} layers of this "
            "stage: pass model_builder= to prune()"
        )
    if cfg.num_moe_experts and any("E" in s for s in layer_symbols(cfg, hybrid_pattern_of(model))):  # MoE layers
        problem = _moe_problem(cfg, ctx)
        if problem:
            return PruneConfigError, problem
    mixers = [layer.mixer for layer in model.decoder.layers if hasattr(layer, "mixer")]
    if mixers and mixers[0].D_has_hdim:
        return PruneConfigError, "Mamba mixers with D_has_hdim=True (a D per channel) are not supported yet"
    for name in model.state_dict():
        index, _, axes = axes_of(name)
        if not name.endswith("._extra_state") and axes is None:
            path = name.rpartition(".")[0]
            where = "" if index is None else f", layer {model.decoder.layers[index].layer_number}"
            return UnsupportedModelError, (
                f"unsupported module type {type(model.get_submodule(path)).__name__} at '{path}'{where} (tensor '{name}'): "
                "megatron-prune handles SelfAttention, MLASelfAttention (local spec), MLP, MoE (SequentialMLP experts, "
                "optional shared expert) and Mamba layers of GPT and hybrid models"
            )
    return None


def _is_mamba_model(model: torch.nn.Module) -> bool:
    if not hasattr(model, "mamba_stack_spec"):
        return False
    from megatron.core.models.mamba import MambaModel

    return isinstance(model, MambaModel)


def model_shape(model: torch.nn.Module, ctx: ParallelContext, pattern: Optional[str] = None) -> ModelShape:
    """The prunable sizes of the whole model: its config's, except `mamba_num_heads` when the config leaves it
    unset (megatron-core's MambaMixer then derives it from its expand factor): read from the mixers (a gather
    over pipeline stages, some of which may hold no Mamba layer)."""
    shape = ModelShape.from_config(model.config, pattern)
    if shape.mamba_head_dim is None or shape.mamba_num_heads is not None:
        return shape
    local = [int(layer.mixer.nheads) for layer in model.decoder.layers if hasattr(layer, "mixer")]
    heads = next(h for stage in ctx.gather_over_pp(local) for h in stage)
    return dataclasses.replace(shape, mamba_num_heads=heads)


def dispatcher_shows_sources(dispatcher: str, num_moe_experts: int, ctx: ParallelContext) -> bool:
    """Whether the token dispatcher lets calibration tell which rank's micro-batch each routed token came from, as
    it must when an expert's tokens come from several ranks (EP or expert-TP > 1): allgather always, alltoall
    unless each rank holds a single expert split over expert-TP ranks (hooks.ExpertTokens)."""
    if ctx.ep_size * ctx.etp_size == 1 or dispatcher == "allgather":
        return True
    return dispatcher == "alltoall" and not (ctx.etp_size > 1 and num_moe_experts == ctx.ep_size)


def calibration_dispatcher(cfg, ctx: ParallelContext) -> str:
    """The token dispatcher to build `cfg`'s MoE layers with at the layout of `ctx`: their own where it shows where
    tokens came from (`dispatcher_shows_sources`), else allgather (the same outputs)."""
    dispatcher = cfg.moe_token_dispatcher_type
    if not getattr(cfg, "num_moe_experts", None) or dispatcher_shows_sources(dispatcher, cfg.num_moe_experts, ctx):
        return dispatcher
    return "allgather"


def _moe_problem(cfg, ctx: ParallelContext) -> Optional[str]:
    """Why the MoE layers of `cfg` cannot be pruned at this layout (None if they can)."""
    if cfg.moe_grouped_gemm:
        return ("config.moe_grouped_gemm=True (grouped-GEMM experts, GroupedMLP/TEGroupedMLP) is not supported yet: build "
                "the model with moe_grouped_gemm=False (SequentialMLP experts; the weights are the same; megatron-core's "
                "distributed checkpoints share SequentialMLP's keys, plain state dicts convert with "
                "megatron_prune.minitron.slicing.grouped_experts.to_sequential)")  # fmt: skip
    if (cfg.expert_tensor_parallel_size or ctx.tp_size) != ctx.etp_size:
        return (f"config.expert_tensor_parallel_size={cfg.expert_tensor_parallel_size} but megatron-core's parallel state "
                f"splits experts over {ctx.etp_size} ranks: build the model with the layout it runs in")  # fmt: skip
    dispatcher = cfg.moe_token_dispatcher_type
    if not dispatcher_shows_sources(dispatcher, cfg.num_moe_experts, ctx):
        if dispatcher == "alltoall":
            return (f"moe_token_dispatcher_type='alltoall' with one expert per rank (num_moe_experts={cfg.num_moe_experts}, "
                    f"expert_model_parallel_size={ctx.ep_size}) at expert_tensor_parallel_size={ctx.etp_size}: the "
                    "dispatcher does not keep which rank each token came from there; calibrate with the 'allgather' "
                    "dispatcher (same weights, same outputs)")  # fmt: skip
        return (f"expert_model_parallel_size={ctx.ep_size}, expert_tensor_parallel_size={ctx.etp_size} with "
                f"moe_token_dispatcher_type={dispatcher!r}: calibrate with the 'allgather' or 'alltoall' dispatcher "
                "(same weights, same outputs; megatron-prune reads which rank's micro-batch each routed token came from "
                "through them), or prune with one rank per expert (EP=1, expert TP=1)")  # fmt: skip
    if getattr(cfg, "moe_latent_size", None):
        return f"config.moe_latent_size={cfg.moe_latent_size} (latent MoE) is not supported yet"
    return None
