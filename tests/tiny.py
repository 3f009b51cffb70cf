"""Test helpers (not tests): a tiny GPT (dense or MoE, GQA or multi-latent attention) built from megatron-core's
local (non-TE) layer specs."""

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig


def tiny_gpt_config(config_class=TransformerConfig, **overrides) -> TransformerConfig:
    """A 4-layer, 64-wide GQA GPT config in float32, for the parallel layout already initialised."""
    fields = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=None,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    fields.update(overrides)
    return config_class(**fields)


def tiny_mla_config(**overrides) -> MLATransformerConfig:
    """`tiny_gpt_config` with DeepSeek-style multi-latent attention: 4 heads of qk 16 + rope 8 query/key dims and
    value dim 12, q_lora_rank 32 (None: one query projection), kv_lora_rank 24, q/kv layernorms, plain RoPE; 3 layers."""
    fields = dict(num_layers=3, num_attention_heads=4, num_query_groups=None, q_lora_rank=32, kv_lora_rank=24,
                  qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True, rope_type="rope",
                  apply_rope_fusion=False)  # fmt: skip
    fields.update(overrides)
    return tiny_gpt_config(MLATransformerConfig, **fields)


def build_tiny_gpt(
    config: TransformerConfig,
    vocab_size: int = 128,
    max_seq_length: int = 32,
    tied: bool = True,
    position_embedding_type: str = "rope",
) -> GPTModel:
    """This pipeline stage's part of a tiny GPT, in eval mode. An MoE config (`num_moe_experts`) gets Megatron's
    block spec of this stage (local modules, SequentialMLP experts; MoE layers where `moe_layer_freq` says)."""
    if config.num_moe_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                          pp_rank=parallel_state.get_pipeline_model_parallel_rank())  # fmt: skip
    else:
        spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm,
                                        multi_latent_attention=config.multi_latent_attention)  # fmt: skip
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type=position_embedding_type,
    )
    return model.eval()


def random_tokens(batch: int, seq: int, vocab: int, seed: int) -> torch.LongTensor:
    """[batch, seq] token ids drawn from their own generator, so the global RNG is left alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def tiny_moe_config(**overrides) -> TransformerConfig:
    """`tiny_gpt_config` with MoE layers: 4 routed experts of FFN 32 (top-2), a gated shared expert of 48,
    aux-loss-free expert bias (sigmoid scores); layer 2 is dense (FFN 128)."""
    fields = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=48,
                  moe_shared_expert_gate=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_layer_freq=[1, 0, 1, 1], moe_grouped_gemm=False)  # fmt: skip
    fields.update(overrides)
    return tiny_gpt_config(**fields)
