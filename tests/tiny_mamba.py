"""Test helpers (not tests): a tiny hybrid Mamba model (`MambaModel`) built from megatron-core's local (non-TE)
modules. Importing it applies megatron_prune's CPU support on a machine without a GPU: there,
`megatron.core.ssm.mamba_mixer` is importable only with the reference kernels (`install_mamba_kernels()`)."""

from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_prune.minitron.runtime.cpu import apply_cpu_support
from tests.tiny import tiny_gpt_config

apply_cpu_support()  # before the Mamba imports below; nothing happens with a GPU

from megatron.core.models.mamba import MambaModel  # noqa: E402
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules  # noqa: E402
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules  # noqa: E402
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules  # noqa: E402
from megatron.core.ssm.mlp_layer import MLPLayer  # noqa: E402

HYBRID_PATTERN = "M*M-"  # Mamba, attention, Mamba, MLP


def tiny_mamba_config(**overrides) -> TransformerConfig:
    """A 4-layer, 64-wide hybrid config in float32, for the parallel layout already initialised.

    Mamba layers: 8 heads of 16 (d_inner 128), 2 groups of state 16; attention: 4 heads, 2 query groups.
    """
    fields = dict(
        num_layers=len(HYBRID_PATTERN),
        num_attention_heads=4,
        num_query_groups=2,
        gated_linear_unit=False,
        mamba_num_heads=8,
        mamba_head_dim=16,
        mamba_state_dim=16,
        mamba_num_groups=2,
    )
    fields.update(overrides)
    return tiny_gpt_config(**fields)


def tiny_mamba_stack_spec(chunk_size: int = 128) -> ModuleSpec:
    """A `MambaStack` of local modules: norms are `WrappedTorchNorm` (not fused into the next linear). MoE layers
    ("E", for configs with `num_moe_experts`) have 4 routed experts."""
    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(
                module=MambaMixer,
                params={"chunk_size": chunk_size},
                submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            ),
            mamba_bda=get_bias_dropout_add,
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    moe_layer = ModuleSpec(  # "E": a TransformerLayer holding only an MoE layer (SequentialMLP experts)
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer, moe_layer=moe_layer
        ),
    )


def build_tiny_mamba(
    config: TransformerConfig,
    vocab_size: int = 128,
    max_seq_length: int = 32,
    hybrid_pattern: str = HYBRID_PATTERN,
    chunk_size: int = 128,
) -> MambaModel:
    """This pipeline stage's part of a tiny hybrid Mamba model (untied embeddings, no position embedding), in
    eval mode. `chunk_size` is the Mamba scan's; megatron's default is 128."""
    model = MambaModel(
        config=config,
        mamba_stack_spec=tiny_mamba_stack_spec(chunk_size),
        vocab_size=vocab_size,
        max_sequence_length=max_seq_length,
        hybrid_override_pattern=hybrid_pattern,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="none",
    )
    return model.eval()
