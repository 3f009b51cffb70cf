"""Tier 2: pruning DeepSeek-style multi-latent attention (megatron-core's MLASelfAttention, local spec) on CPU, one
process.

MLA heads have their own K and V (up-projected from a shared latent), so they are ranked as one group; each kept
head keeps its (qk + rope) rows of the query projection, its (qk + v) rows of `linear_kv_up_proj` and its v columns
of `linear_proj`; the lora ranks, the shared rope key and the head dims stay. Invariants: sorting without slicing
keeps the logits; a pruned model equals a stock model built from its config; analytic counts (parameters, the
latent KV cache) equal the live model's; MLA targets that cannot be pruned are refused before calibration.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import MemorySpec, inventory_of_config
from tests.tiny import build_tiny_gpt, random_tokens, tiny_mla_config

VOCAB, SEQ = 128, 16

VARIANTS = {  # tiny_mla_config overrides
    "q-lora": dict(),
    "q-proj-no-qk-layernorm": dict(q_lora_rank=None, qk_layernorm=False),
    "moe": dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1],
                moe_grouped_gemm=False),  # DeepSeek's first dense layer, then MoE layers  # fmt: skip
}


def batches(n=3, b=2, seed=0):
    return [random_tokens(b, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def logits(model, data):
    with torch.no_grad():
        return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_mla_config(**overrides), vocab_size=VOCAB)


def loop(data):
    return mp.make_forward_loop(data, progress=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sorting_without_slicing_keeps_mla_logits(mcore, variant):
    model = make(**VARIANTS[variant])
    data = batches()
    before = logits(model, data)
    full = ModelShape.from_config(model.config).sizes()
    assert "num_query_groups" not in full and full["num_attention_heads"] == 4
    pruned, result = mp.prune(model, full, forward_loop=loop(data))
    heads = result.plan.layers[1].heads.reshape(-1)  # one group: every head ranked against every other
    assert sorted(heads.tolist()) == [0, 1, 2, 3] and heads.tolist() != [0, 1, 2, 3]  # a real permutation
    old, new = model.decoder.layers[0].self_attention, pruned.decoder.layers[0].self_attention
    assert not torch.equal(new.linear_kv_up_proj.weight, old.linear_kv_up_proj.weight)
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_mla_model_is_what_megatron_builds_and_counts_match(mcore, variant):
    model = make(**VARIANTS[variant])
    cfg, data = model.config, batches()
    target = dict(hidden_size=48, num_attention_heads=2, num_layers=2,
                  **({"moe_ffn_hidden_size": 16, "num_moe_experts": 2} if cfg.num_moe_experts else {"ffn_hidden_size": 64}))  # fmt: skip
    pruned, result = mp.prune(model, target, forward_loop=loop(data))
    for axis, value in target.items():
        assert getattr(result.config, axis) == value, axis
    kept = {k: getattr(result.config, k) for k in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")}
    assert kept == {k: getattr(cfg, k) for k in kept}  # the MLA dims are kept
    assert result.config.num_query_groups == 2  # megatron-core's MLA default: one K/V per head

    # the kept heads' blocks, in importance order: q (qk + rope rows), kv_up (qk + v rows), linear_proj (v columns)
    n = result.plan.kept_layers[0]
    heads, hidden = result.plan.layers[n].heads.reshape(-1), result.plan.hidden
    old, new = model.decoder.layers[n - 1].self_attention, pruned.decoder.layers[0].self_attention
    rows = lambda width: (heads[:, None] * width + torch.arange(width)).reshape(-1)  # noqa: E731
    torch.testing.assert_close(new.linear_kv_up_proj.weight, old.linear_kv_up_proj.weight[rows(16 + 12)], atol=0, rtol=0)
    torch.testing.assert_close(new.linear_proj.weight, old.linear_proj.weight[hidden][:, rows(12)], atol=0, rtol=0)
    torch.testing.assert_close(new.linear_kv_down_proj.weight, old.linear_kv_down_proj.weight[:, hidden], atol=0, rtol=0)
    q = "linear_q_up_proj" if cfg.q_lora_rank else "linear_q_proj"
    expected_q = getattr(old, q).weight[rows(16 + 8)]
    torch.testing.assert_close(getattr(new, q).weight, expected_q if cfg.q_lora_rank else expected_q[:, hidden], atol=0, rtol=0)

    fresh = build_tiny_gpt(result.config, vocab_size=VOCAB)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)

    ctx = ParallelContext.from_megatron()
    live = mp.inventory_of(model, ctx)
    assert live == inventory_of_config(cfg, VOCAB, share_embeddings_and_output_weights=True)  # stated = built
    counts = live.count(result.export_config, kept_layers=result.plan.kept_layers)
    assert counts.params == result.params_after == sum(p.numel() for p in fresh.parameters()) < result.params_before
    fresh_counts = mp.inventory_of(fresh, ctx).count(ModelShape.from_config(result.config).sizes())
    assert fresh_counts == counts  # the pruned model counted live, at its own sizes
    # KV cache: the compressed latent (kv_lora_rank + rope) per token and layer, whatever the heads and hidden size
    memory = MemorySpec(seq_length=10, batch_size=3, dtype_bytes=2, kv_cache_dtype_bytes=1)
    cache = live.count(result.export_config, memory, kept_layers=result.plan.kept_layers).memory_mb * 2**20 - 2 * counts.params
    assert cache == 2 * 3 * 10 * (24 + 8) * 1


def test_mla_targets_megatron_prune_keeps_are_refused_before_calibration(mcore):
    model = make()

    def never(m):
        raise AssertionError("calibration ran")

    with pytest.raises(PruneConfigError, match=r"num_query_groups.*multi-latent attention.*num_attention_heads alone"):
        mp.prune(model, {"num_query_groups": 2, "num_attention_heads": 2}, forward_loop=never)
    for dim in ("kv_lora_rank", "q_lora_rank", "v_head_dim", "qk_head_dim", "qk_pos_emb_head_dim"):
        with pytest.raises(PruneConfigError, match=rf"export_config\['{dim}'\]: megatron-prune keeps the MLA dims"):
            mp.prune(model, {dim: 8}, forward_loop=never)


def test_mla_head_statistics_use_the_value_head_dim(mcore):
    """The minitron head statistic is the L2 over each head's v_head_dim inputs of linear_proj, recomputed here from
    captured activations; a head whose linear_proj columns are scaled up ranks first by output contribution."""
    model = make()
    with torch.no_grad():
        model.decoder.layers[0].self_attention.linear_proj.weight[:, 2 * 12 : 3 * 12].mul_(50.0)
    data = batches()
    captured = []
    proj = model.decoder.layers[0].self_attention.linear_proj
    hook = proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone()))
    _, by_output = mp.prune(model, {"num_attention_heads": 2}, forward_loop=loop(data))
    hook.remove()
    assert by_output.plan.layers[1].heads.reshape(-1).tolist() == [2, by_output.plan.layers[1].heads.reshape(-1)[1].item()]
    _, by_input = mp.prune(model, {"num_attention_heads": 2}, forward_loop=loop(data), criteria="heads=minitron")
    x = torch.stack([c.float() for c in captured[: len(data)]])  # [calls, s, b, N*v]
    per_channel = (x.abs().mean(dim=(1, 2)) ** 2).sum(dim=0)  # sum over samples of each sample's mean |x_c|, squared
    heads = per_channel.sqrt().view(4, 12).norm(dim=1)
    assert by_input.plan.layers[1].heads.reshape(-1).tolist() == torch.argsort(heads, descending=True, stable=True)[:2].tolist()


def test_nas_searches_mla_heads_as_one_group_and_counts_the_winner_exactly(mcore):
    model = make()
    data = batches()
    search = dict(hidden_size_divisor=16, ffn_hidden_size_divisor=32, max_width_pruning=0.5, max_depth_pruning=0.2, top_k=1)
    pruned, result = mp.prune(model, constraints={"params": "75%"}, forward_loop=loop(data), search=search)
    assert result.search.space["num_attention_heads"] == [3, 4]  # every head its own choice: no query groups
    best = result.search.best
    assert best.counts.params == result.params_after == sum(p.numel() for p in pruned.parameters()) <= 0.75 * result.params_before
    assert result.config.num_query_groups == result.config.num_attention_heads
