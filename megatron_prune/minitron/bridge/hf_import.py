"""A Hugging Face causal LM -> this rank's MCore `GPTModel` stage, through Megatron-Bridge's `AutoBridge`.

`check_hf_source` reads only the config (no weights) and refuses, with the reason, what cannot work: a path
that is not a model folder, an architecture the bridge has no mapping for, a model megatron-prune cannot
prune. `import_hf_model` then loads the weights at the TP/PP already initialised (`init_distributed`).

On a machine without CUDA the model is built from megatron-core's local layer spec (Transformer Engine
cannot run there); the provider still records the bridge's own spec, so a saved Megatron checkpoint builds
the Transformer Engine model on a GPU (distributed checkpoints do not depend on the spec).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_prune.errors import PruneConfigError, UnsupportedModelError
from megatron_prune.common.log import log
from megatron_prune.minitron.bridge.compat import apply_bridge_compat, logged_progress
from megatron_prune.minitron.bridge.roundtrip import dtype_name
from megatron_prune.minitron.model_checks import calibration_dispatcher
from megatron_prune.minitron.runtime.parallel import ParallelContext

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "org/name" or "name": what `from_pretrained` resolves on the hub


@dataclass
class ImportedModel:
    """The bridge, the provider (a `TransformerConfig`) and this rank's unwrapped GPTModel stage, in eval mode."""

    bridge: object
    provider: object
    model: torch.nn.Module
    source: str
    saved_layer_spec: Callable  # the layer spec a saved checkpoint records (the bridge's, i.e. TE on GPU)


def check_hf_source(source: str, trust_remote_code: bool = False):
    """The HF config of `source` (a local folder, or a hub id when no such path exists), checked.

    Raises PruneConfigError for a path that is not an HF model folder, UnsupportedModelError for an
    architecture Megatron-Bridge cannot convert or a model megatron-prune cannot prune. Returns
    (hf_config, provider) where the provider holds the Megatron config the model will be built from.
    """
    from transformers import AutoConfig

    path = Path(os.path.expanduser(str(source)))
    if path.exists() or not _HUB_ID.match(str(source)):
        if not path.is_dir():
            raise PruneConfigError(f"--hf-model {source!r}: no such directory (an HF model folder holds config.json)")
        if not (path / "config.json").is_file():
            raise PruneConfigError(f"--hf-model {source!r} is not a Hugging Face model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - unreadable or unknown config: say which and why
        raise PruneConfigError(f"--hf-model {source!r}: cannot read its config: {type(e).__name__}: {e}") from e
    provider = _provider_from_config(config, source)
    _check_prunable(provider, config)
    return config, provider


def import_hf_model(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                    ctx: Optional[ParallelContext] = None) -> ImportedModel:
    """Load `source` through the bridge into this rank's GPTModel stage at the initialised TP/PP.

    Collective: every rank calls it. The HF weights are read by every rank (the bridge scatters TP shards).
    """
    from megatron.core.utils import unwrap_model

    start = time.perf_counter()
    ctx = ParallelContext.given(ctx)
    log(f"importing {source} through Megatron-Bridge (TP={ctx.tp_size}, PP={ctx.pp_size}, {dtype_name(dtype)})")
    bridge = auto_bridge().from_hf_pretrained(str(source), torch_dtype=dtype, trust_remote_code=trust_remote_code)
    provider = bridge.to_megatron_provider(load_weights=True)
    saved_spec = _configure(provider, ctx, dtype)
    provider.finalize()
    with logged_progress("importing weights"):
        stages = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=not torch.cuda.is_available(), mixed_precision_wrapper=None
        )
    model = unwrap_model(stages)[0].eval()
    log(f"imported in {time.perf_counter() - start:.1f}s")
    return ImportedModel(bridge=bridge, provider=provider, model=model, source=str(source), saved_layer_spec=saved_spec)


def provider_inventory(provider, tp: int):
    """The analytic inventory (`search.counting`) of the model the bridge builds from `provider` at TP=`tp`, from
    the config alone: for budgets and search-space checks before any weight is read. The vocabulary is padded
    as the provider pads it."""
    from megatron.bridge.utils.vocab_utils import calculate_padded_vocab_size

    from megatron_prune.minitron.search.counting import inventory_of_config

    vocab = provider.vocab_size
    if getattr(provider, "should_pad_vocab", False):
        vocab = calculate_padded_vocab_size(vocab, provider.make_vocab_size_divisible_by, tp, logging_enabled=False)
    return inventory_of_config(provider, vocab, bool(provider.share_embeddings_and_output_weights),
                               provider.position_embedding_type, provider.seq_length)  # fmt: skip


def finalized_provider(provider, ctx: ParallelContext, dtype: torch.dtype):
    """A finalized copy of `provider` configured as `import_hf_model` configures it at the layout of `ctx`: the
    TransformerConfig the model will be built from, known before any weight is read."""
    config = copy.deepcopy(provider)
    _configure(config, ctx, dtype)
    config.finalize()
    return config


def _configure(provider, ctx: ParallelContext, dtype: torch.dtype) -> Callable:
    """Set the layout of `ctx` and the precision on the provider; MoE experts as a SequentialMLP (one MLP per expert,
    the layout megatron-prune slices; the weights are the grouped-GEMM ones), spread over EP or expert-TP ranks through
    the model's token dispatcher, or the allgather one where that one does not show calibration where tokens came
    from (same outputs); on CPU, the local layer spec. Returns the spec to save."""
    set_layout(provider, ctx)
    provider.params_dtype = provider.pipeline_dtype = dtype
    provider.bf16, provider.fp16 = dtype == torch.bfloat16, dtype == torch.float16
    provider.sequence_parallel = False  # statistics average over whole sequences
    if getattr(provider, "num_moe_experts", None):
        provider.moe_grouped_gemm = False
        provider.moe_token_dispatcher_type = calibration_dispatcher(provider, ctx)
    saved = provider.transformer_layer_spec
    if not torch.cuda.is_available():
        provider.transformer_layer_spec = cpu_layer_spec(provider)
        provider.apply_rope_fusion = provider.persist_layer_norm = provider.gradient_accumulation_fusion = False
        provider.moe_permute_fusion = False  # a Transformer Engine kernel
        provider.moe_shared_expert_overlap = False  # a CUDA stream (DeepSeek's providers); the same outputs
    return saved


def set_layout(config, ctx: ParallelContext) -> None:
    """The parallel sizes of this run on a provider, TransformerConfig or Megatron-LM args (a saved run's are not
    this one's)."""
    config.tensor_model_parallel_size, config.pipeline_model_parallel_size = ctx.tp_size, ctx.pp_size
    config.expert_model_parallel_size, config.expert_tensor_parallel_size = ctx.ep_size, ctx.etp_size


def auto_bridge():
    """Megatron-Bridge's `AutoBridge`, with the CPU support (`runtime.cpu`) and the bridge fixes (`compat`) applied."""
    from megatron_prune.minitron.runtime.cpu import apply_bridge_cpu_support

    apply_bridge_cpu_support()
    apply_bridge_compat()
    from megatron.bridge import AutoBridge

    return AutoBridge


def cpu_layer_spec(provider) -> Callable:
    """The layer spec a model is built with on a machine without CUDA: Megatron-Bridge's `local_layer_spec` (local
    modules), or for multi-latent attention megatron-core's local block spec (`local_layer_spec` knows neither MLA nor
    DeepSeek's dense-then-MoE `moe_layer_freq`)."""
    if getattr(provider, "multi_latent_attention", False):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        return functools.partial(get_gpt_decoder_block_spec, use_transformer_engine=False)
    from megatron.bridge.models.gpt_provider import local_layer_spec

    return local_layer_spec


def _provider_from_config(config, source: str):
    """The bridge's provider for `config` without weights; architecture problems become UnsupportedModelError."""
    AutoBridge = auto_bridge()
    architectures = list(getattr(config, "architectures", None) or [])
    try:
        AutoBridge._validate_config(config, str(source))
    except ValueError:
        supported = ", ".join(AutoBridge.list_supported_models())
        raise UnsupportedModelError(
            f"--hf-model {source!r}: architecture {architectures or '(none in config.json)'} is not supported by "
            f"Megatron-Bridge {_bridge_version()} (it converts: {supported})"
        ) from None
    return AutoBridge.from_hf_config(config).to_megatron_provider(load_weights=False)


def _check_prunable(provider, config) -> None:
    """Refuse, before any weights are read, the model families megatron-prune does not prune yet."""
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if not isinstance(provider, GPTModelProvider):
        raise UnsupportedModelError(f"{arch}: Megatron-Bridge builds a {type(provider).__name__}; megatron-prune prunes GPT models")
    mtp = getattr(provider, "mtp_num_layers", None)
    if mtp:
        raise UnsupportedModelError(f"{arch}: multi-token prediction (mtp_num_layers={mtp}) is not supported yet by megatron-prune")


def _bridge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-bridge")
    except PackageNotFoundError:
        return "(version unknown)"
