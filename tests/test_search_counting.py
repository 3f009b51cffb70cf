"""Tier 2: the analytic counters equal the parameter count of the model Megatron builds (one process;
PP=2 in test_search_layouts.py), and hand-checked memory figures."""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import MemorySpec
from tests.tiny import build_tiny_gpt, tiny_gpt_config

VOCAB, MAX_SEQ = 128, 32
VARIANTS = {  # TransformerConfig overrides; "tied" and "pos" go to the GPTModel
    "gqa-swiglu-tied": dict(),
    "gqa-plain-tied": dict(gated_linear_unit=False),
    "mha-swiglu-untied": dict(num_query_groups=8, tied=False),
    "mha-plain-untied-layernorm-bias-learned": dict(num_query_groups=8, gated_linear_unit=False, normalization="LayerNorm",
                                                    add_bias_linear=True, tied=False, pos="learned_absolute"),
    "gqa-qk-layernorm-kv-channels-qkv-bias": dict(qk_layernorm=True, kv_channels=16, num_attention_heads=4,
                                                  num_query_groups=2, add_qkv_bias=True),
}  # fmt: skip
TARGETS = [  # applied to each variant (heads/groups scaled to the variant below)
    dict(hidden_size=48),
    dict(ffn_hidden_size=64, num_layers=3),
    dict(hidden_size=32, ffn_hidden_size=96, num_layers=2, heads_per_group=1, groups=0.5),
]


def split(variant):
    opts = dict(VARIANTS[variant])
    return opts, dict(tied=opts.pop("tied", True), pos=opts.pop("pos", "rope"))


def build(config_overrides, tied, pos, seed=0):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_gpt_config(**config_overrides), vocab_size=VOCAB, max_seq_length=MAX_SEQ, tied=tied,
                          position_embedding_type=pos)  # fmt: skip


def live(model):
    return mp.count_params(model, ParallelContext.from_megatron())


def complete(model, target):
    """Complete target sizes from a TARGETS entry, heads and groups scaled to the model."""
    cfg = model.config
    sizes = dict(hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                 num_query_groups=cfg.num_query_groups, num_layers=cfg.num_layers)  # fmt: skip
    target = dict(target)
    groups = max(1, int(cfg.num_query_groups * target.pop("groups", 1)))
    per_group = target.pop("heads_per_group", cfg.num_attention_heads // cfg.num_query_groups)
    sizes.update(target, num_query_groups=groups, num_attention_heads=groups * per_group)
    return sizes


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_equal_the_live_model_megatron_builds(mcore, variant):
    opts, model_args = split(variant)
    model = build(opts, **model_args)
    ctx = ParallelContext.from_megatron()
    inventory = mp.inventory_of(model, ctx)
    from_config = mp.inventory_of_config(model.config, VOCAB, model_args["tied"], model_args["pos"], MAX_SEQ)
    assert from_config == inventory  # the same tensors with the same shapes, read from the config alone
    d = model.config.kv_channels
    for target in [{}, *TARGETS]:
        sizes = complete(model, target)
        counts = inventory.count(sizes)
        pruned = build({**opts, **sizes, "kv_channels": d}, **model_args)  # what Megatron builds for the candidate
        assert counts.params == counts.active_params == live(pruned), sizes
        assert from_config.count(sizes) == counts


def test_block_spec_without_final_norm_is_counted_as_built(mcore):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = TransformerBlockSubmodules(layer_specs=[get_gpt_layer_local_spec(normalization="RMSNorm")] * 4, layer_norm=IdentityOp)
    model = GPTModel(tiny_gpt_config(), spec, vocab_size=VOCAB, max_sequence_length=MAX_SEQ)
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    assert "decoder.final_layernorm.weight" not in inventory.model
    assert inventory.count(complete(model, {})).params == live(model)


def test_layers_holding_different_tensors_are_counted_by_kind(mcore):
    """Layers of different kinds: a count needs the surviving layers (known after calibration); before it,
    `smallest` is the lower bound over every choice of surviving layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    specs = [get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=i == 2) for i in range(4)]

    def build(layers):
        config = tiny_gpt_config(num_layers=len(layers))
        return GPTModel(config, TransformerBlockSubmodules(layer_specs=[specs[n - 1] for n in layers]), vocab_size=VOCAB,
                        max_sequence_length=MAX_SEQ)  # fmt: skip

    model = build([1, 2, 3, 4])
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    assert inventory.layer_kinds == (0, 0, 1, 0) and not inventory.uniform
    sizes = complete(model, {})
    assert inventory.count(sizes).params == live(model)
    with pytest.raises(ValueError, match="the layers differ"):
        inventory.count({**sizes, "num_layers": 3})
    counts = {tuple(kept): inventory.count({**sizes, "num_layers": 3}, kept_layers=kept).params for kept in ([1, 2, 4], [1, 3, 4])}
    for kept, params in counts.items():
        assert params == live(build(kept)), kept
    assert counts[(1, 2, 4)] < counts[(1, 3, 4)]  # the qk-norm layer holds more
    assert inventory.smallest({**sizes, "num_layers": 3}).params == counts[(1, 2, 4)]


def llama_8b_config():
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                             num_query_groups=8, kv_channels=128, gated_linear_unit=True, normalization="RMSNorm",
                             add_bias_linear=False)  # fmt: skip


def test_llama_3_1_8b_counts_by_hand():
    """Llama-3.1-8B has 8,030,261,248 parameters (untied 128256-token vocabulary). Its bf16 KV cache for
    one 4096-token sequence: 32 layers x (K, V) x 8 groups x 128 channels x 4096 tokens x 2 bytes = 512 MiB."""
    inventory = mp.inventory_of_config(llama_8b_config(), 128256, share_embeddings_and_output_weights=False)
    sizes = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8, num_layers=32)
    counts = inventory.count(sizes)
    assert counts.params == counts.active_params == 8_030_261_248
    assert counts.memory_mb == pytest.approx(8_030_261_248 * 2 / 2**20 + 512, abs=1e-9)
    fp8_kv = inventory.count(sizes, MemorySpec(seq_length=8192, batch_size=4, dtype_bytes=2, kv_cache_dtype_bytes=1))
    assert fp8_kv.memory_mb == pytest.approx(8_030_261_248 * 2 / 2**20 + 512 * 2 * 4 / 2, abs=1e-9)
    # pruned by hand: 28 layers of hidden 3072, FFN 9216, 24 heads in 8 groups (d = 128 stays)
    layer = 2 * 3072 + (24 + 16) * 128 * 3072 + 3072 * 24 * 128 + 3 * 3072 * 9216
    pruned = inventory.count(dict(hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=24, num_query_groups=8, num_layers=28))
    assert pruned.params == 2 * 128256 * 3072 + 3072 + 28 * layer
    assert pruned.memory_mb == pytest.approx(pruned.params * 2 / 2**20 + 512 * 28 / 32, abs=1e-9)


MOE_VARIANTS = {  # tiny_moe_config overrides (4 experts of 32, top-2; layer 2 dense unless every layer is MoE)
    "mixed-shared-gate-expert-bias": dict(),
    "every-layer-bias-untied": dict(moe_layer_freq=1, moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False,
                                    add_bias_linear=True, moe_router_enable_expert_bias=False, moe_router_score_function="softmax",
                                    tied=False),
}  # fmt: skip
MOE_TARGETS = [  # (export sizes, surviving layers)
    ({}, [1, 2, 3, 4]),
    ({"num_moe_experts": 2, "moe_ffn_hidden_size": 16}, [1, 2, 3, 4]),
    ({"hidden_size": 48, "num_moe_experts": 3, "num_layers": 3}, [1, 3, 4]),
    ({"hidden_size": 32, "moe_ffn_hidden_size": 8, "num_layers": 2}, [2, 4]),
]


def active_params(model) -> int:
    """Parameters one token runs through: everything but the routed experts, plus top-k of them per MoE layer."""
    cfg, total = model.config, sum(p.numel() for p in model.parameters())
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.local_experts[0].parameters())
            total -= (len(experts.local_experts) - cfg.moe_router_topk) * per_expert
    return total


@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_moe_counts_equal_the_live_model_megatron_builds(mcore, variant):
    from megatron_prune.minitron.config import ModelShape, moe_layer_pattern
    from tests.tiny import tiny_moe_config

    opts = dict(MOE_VARIANTS[variant])
    tied = opts.pop("tied", True)
    torch.manual_seed(0)
    model = build_tiny_gpt(tiny_moe_config(**opts), vocab_size=VOCAB, max_seq_length=MAX_SEQ, tied=tied)
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    assert mp.inventory_of_config(model.config, VOCAB, tied, "rope") == inventory
    pattern = moe_layer_pattern(model.config)
    seen = set()
    for target, kept in MOE_TARGETS:
        sizes = {**ModelShape.from_config(model.config).sizes(), **target}
        counts = inventory.count(sizes, kept_layers=kept)
        freq = [int(pattern[n - 1]) for n in kept] if isinstance(model.config.moe_layer_freq, list) else 1
        pruned = build_tiny_gpt(tiny_moe_config(**{**opts, **sizes, "kv_channels": 8, "moe_layer_freq": freq}), vocab_size=VOCAB,
                                max_seq_length=MAX_SEQ, tied=tied)  # fmt: skip
        assert counts.params == live(pruned), (sizes, kept)
        assert counts.active_params == active_params(pruned), (sizes, kept)
        assert (counts.active_params < counts.params) == (sizes["num_moe_experts"] > 2)  # top-2 of E experts
        assert inventory.smallest(sizes).params <= counts.params
        seen.add(counts.params)
    assert len(seen) == len(MOE_TARGETS)
