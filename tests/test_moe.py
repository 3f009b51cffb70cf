"""Tier 2: pruning MoE layers of real tiny MCore GPT models on CPU, one process.

The model mixes dense and MoE layers (`moe_layer_freq`), its MoE layers have SequentialMLP experts, a gated
shared expert and an aux-loss-free expert bias. Invariants: sorting every axis without slicing keeps the
logits (router rows, expert bias and experts permuted together); a pruned model equals a fresh stock model
built from its config and loaded with its weights, trains, and has the analytic parameter count; expert
statistics equal values recomputed from captured expert outputs; a dominant expert ranks first.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.config import ModelShape, validate_export_config
from megatron_prune.minitron.runtime.parallel import ParallelContext
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config, tiny_moe_config

VOCAB, SEQ = 128, 16


def batches(n=4, b=2, seed=0):
    return [random_tokens(b, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def logits(model, data):
    with torch.no_grad():  # MoE experts with biases modify a view in place: autograd refuses, the forward is fine
        return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_tiny_gpt(tiny_moe_config(**overrides), vocab_size=VOCAB)
    with torch.no_grad():  # routing bias away from zero, so that slicing it in the wrong order shows
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is not None and router.expert_bias is not None:
                router.expert_bias.copy_(torch.randn(router.expert_bias.shape) * 0.05)
    return model


def loop(data):
    return mp.make_forward_loop(data, progress=False)


SORT_VARIANTS = {  # tiny_moe_config overrides
    "shared-gate-expert-bias": dict(),
    "linear-biases-router-bias-softmax": dict(add_bias_linear=True, moe_router_enable_expert_bias=False,  # Megatron: no
                                              moe_router_score_function="softmax", moe_shared_expert_intermediate_size=None,
                                              moe_shared_expert_gate=False),  # shared expert with biases  # fmt: skip
}  # fmt: skip


@pytest.mark.parametrize("variant", SORT_VARIANTS)
def test_sorting_every_moe_axis_keeps_logits(mcore, variant):
    model = make(**SORT_VARIANTS[variant])
    data = batches()
    before = logits(model, data)
    full = ModelShape.from_config(model.config).sizes()
    assert {"num_moe_experts", "moe_ffn_hidden_size", "ffn_hidden_size"} <= set(full)
    pruned, result = mp.prune(model, full, forward_loop=loop(data))
    moe_layers = [n for n, keep in result.plan.layers.items() if keep.experts is not None]
    assert moe_layers == [1, 3, 4] and all(sorted(result.plan.layers[n].experts.tolist()) == [0, 1, 2, 3] for n in moe_layers)
    n = next(n for n in moe_layers if result.plan.layers[n].experts.tolist() != [0, 1, 2, 3])  # a real permutation
    experts, hidden = result.plan.layers[n].experts, result.plan.hidden
    old, new = model.decoder.layers[n - 1].mlp, pruned.decoder.layers[n - 1].mlp
    assert torch.equal(new.router.weight, old.router.weight[experts][:, hidden])
    for name in ("expert_bias", "bias"):  # aux-loss-free routing bias (buffer), or the router's linear bias
        if getattr(old.router, name) is not None:
            assert torch.equal(getattr(new.router, name), getattr(old.router, name)[experts]), name
    if old.shared_experts is not None and old.shared_experts.use_shared_expert_gate:
        assert torch.equal(new.shared_experts.gate_weight, old.shared_experts.gate_weight[:, hidden])
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


def test_pruned_moe_model_is_what_megatron_builds_and_trains(mcore):
    model = make()
    with torch.no_grad():  # layer 3 (MoE) adds nothing to the residual stream: the layer to drop
        layer = model.decoder.layers[2]
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.shared_experts.linear_fc2.weight.zero_()
        for expert in layer.mlp.experts.local_experts:
            expert.linear_fc2.weight.zero_()
    data = batches()
    target = dict(hidden_size=48, ffn_hidden_size=64, num_attention_heads=4, num_moe_experts=3, moe_ffn_hidden_size=16,
                  moe_shared_expert_intermediate_size=32, num_layers=3)  # fmt: skip
    pruned, result = mp.prune(model, target, forward_loop=loop(data))
    assert result.plan.kept_layers == [1, 2, 4]
    for axis, value in target.items():
        assert getattr(result.config, axis) == value, axis
    assert result.config.moe_layer_freq == [1, 0, 1]  # the surviving layers' entries
    assert [type(layer.mlp).__name__ for layer in pruned.decoder.layers] == ["MoELayer", "MLP", "MoELayer"]
    assert pruned.decoder.layers[2].mlp.router.weight.shape == (3, 48)
    assert len(pruned.decoder.layers[2].mlp.experts.local_experts) == 3
    fresh = build_tiny_gpt(result.config, vocab_size=VOCAB)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)

    ctx = ParallelContext.from_megatron()
    counts = mp.inventory_of(model, ctx).count(result.export_config, kept_layers=result.plan.kept_layers)
    assert counts.params == result.params_after == sum(p.numel() for p in fresh.parameters()) < result.params_before

    pruned.train()
    tokens = data[0]
    pruned(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None, labels=tokens).mean().backward()
    grads = {n: p.grad for n, p in pruned.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_expert_statistics_and_a_dominant_expert(mcore):
    """Expert importance is the mean per-token output norm of the expert (its outputs carry the router
    probability); expert 2 of layer 1, its fc2 scaled by 50, must rank first. Each expert's channels are
    ranked on its own fc2 input, one sample per call."""
    model = make()
    experts = model.decoder.layers[0].mlp.experts
    with torch.no_grad():
        experts.local_experts[2].linear_fc2.weight.mul_(50.0)
    captured = {"out": [], "fc2": {e: [] for e in range(4)}}
    hooks = [experts.register_forward_hook(lambda m, a, o: captured["out"].append((o[0].clone(), a[1].clone())))]
    for e, expert in enumerate(experts.local_experts):
        hooks.append(expert.linear_fc2.register_forward_pre_hook(lambda m, a, e=e: captured["fc2"][e].append(a[0].clone())))
    data = batches()
    logits(model, data)
    for h in hooks:
        h.remove()
    _, result = mp.prune(model, {"num_moe_experts": 2, "moe_ffn_hidden_size": 16}, forward_loop=loop(data))

    norms, counts = torch.zeros(4), torch.zeros(4)
    for out, per_expert in captured["out"]:
        for e, rows in enumerate(out.split(per_expert.tolist())):
            norms[e] += rows.norm(dim=-1).sum()
            counts[e] += len(rows)
    assert counts.sum() == 4 * 2 * SEQ * 2  # every token of every batch reaches its top-2 experts
    imp = result.importance.experts[1]
    torch.testing.assert_close(imp, norms / (counts + 1e-8), rtol=1e-5, atol=0)
    assert int(imp.argmax()) == 2 and result.plan.layers[1].experts[0] == 2
    for e in range(4):
        per_call = [x.abs().mean(0) for x in captured["fc2"][e] if len(x)]
        torch.testing.assert_close(result.importance.moe_ffn[1][e], torch.stack(per_call).pow(2).sum(0).sqrt())
    kept = result.plan.layers[1]
    assert torch.equal(kept.moe_ffn[2], torch.argsort(result.importance.moe_ffn[1][2], descending=True, stable=True)[:16])


def test_every_layer_moe_has_no_ffn_axis_and_counts_active_params(mcore):
    """All layers MoE: `ffn_hidden_size` follows no tensor. Active parameters: top-2 of the routed experts."""
    model = make(moe_layer_freq=1, moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False)
    shape = ModelShape.from_config(model.config)
    assert "ffn_hidden_size" not in shape.sizes()
    with pytest.raises(mp.PruneConfigError, match="'ffn_hidden_size' is not an axis of this model"):
        mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=loop(batches()))
    counts = mp.inventory_of(model, ParallelContext.from_megatron()).count(shape.sizes())
    per_expert = sum(p.numel() for p in model.decoder.layers[0].mlp.experts.local_experts[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert counts.params == total and counts.active_params == total - 4 * (4 - 2) * per_expert


@pytest.mark.parametrize(
    "export_config, match",
    [
        ({"num_moe_experts": 1}, r"num_moe_experts'\]=1 is below moe_router_topk=2"),
        ({"num_moe_experts": 5}, r"num_moe_experts'\]=5 is larger than the model's num_moe_experts=4"),
        ({"moe_ffn_hidden_size": 0}, r"moe_ffn_hidden_size'\]=0 must be at least 1"),
        ({"moe_shared_expert_intermediate_size": 49}, r"is larger than the model's moe_shared_expert_intermediate_size=48"),
    ],
)
def test_moe_targets_are_checked(export_config, match):
    shape = ModelShape(hidden_size=64, ffn_hidden_size=128, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                       num_layers=4, gated_linear_unit=True, num_moe_experts=4, moe_ffn_hidden_size=32,
                       moe_shared_expert_intermediate_size=48, moe_router_topk=2)  # fmt: skip
    with pytest.raises(mp.PruneConfigError, match=match):
        validate_export_config(export_config, shape)
    with pytest.raises(mp.PruneConfigError, match=r"num_moe_experts'\]=3 is not divisible by the expert-parallel size 2"):
        validate_export_config({"num_moe_experts": 3}, shape, ep_size=2)
    with pytest.raises(mp.PruneConfigError, match=r"moe_ffn_hidden_size'\]=15 is not divisible by the tensor-parallel size 2"):
        validate_export_config({"moe_ffn_hidden_size": 15}, shape, tp_size=2)


def test_moe_model_errors_name_the_field_before_calibration(mcore):
    calls = []
    dense = build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)
    with pytest.raises(mp.PruneConfigError, match="'num_moe_experts' is not an axis of this model"):
        mp.prune(dense, {"num_moe_experts": 2}, forward_loop=calls.append)
    grouped = make(moe_router_num_groups=2, moe_router_group_topk=1)  # Megatron's own rule for the pruned config
    with pytest.raises(mp.PruneConfigError, match=r"megatron-core rejects the pruned config .*num_moe_experts \(3\) should be divisible by moe_router_num_groups \(2\)"):
        mp.prune(grouped, {"num_moe_experts": 3}, forward_loop=calls.append)
    model = make()
    model.config.moe_grouped_gemm = True
    with pytest.raises(mp.PruneConfigError, match="moe_grouped_gemm=True .* build the model with moe_grouped_gemm=False"):
        mp.prune(model, {"num_moe_experts": 2}, forward_loop=calls.append)
    assert calls == []


def active_params(model) -> int:
    """Parameters one token runs through: all but the routed experts, plus top-k of them per MoE layer."""
    total = sum(p.numel() for p in model.parameters())
    for layer in model.decoder.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.local_experts[0].parameters())
            total -= (len(experts.local_experts) - model.config.moe_router_topk) * per_expert
    return total


def test_nas_counts_moe_candidates_with_the_layers_they_keep(mcore):
    """Dense and MoE layers differ in size, so a depth-pruned candidate's count depends on which layers the
    ranking drops: after calibration every candidate is counted with those layers, exactly."""
    model = make()
    with torch.no_grad():  # layer 3 (MoE) is an identity: depth pruning drops it first
        layer = model.decoder.layers[2]
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.shared_experts.linear_fc2.weight.zero_()
        for expert in layer.mlp.experts.local_experts:
            expert.linear_fc2.weight.zero_()
    search = dict(num_moe_experts_divisor=1, moe_ffn_hidden_size_divisor=8, num_layers_divisor=1, max_width_pruning=0.5,
                  max_depth_pruning=0.3, top_k=4)  # experts {3, 4} x expert FFN {24, 32} x layers {3, 4}
    ctx = ParallelContext.from_megatron()
    inventory = mp.inventory_of(model, ctx)
    full = ModelShape.from_config(model.config).sizes()
    three = {**full, "num_layers": 3}
    # a token runs through fewer parameters in an MoE layer than in the dense one: before calibration the
    # bound keeps 2 MoE layers and the dense one; the ranking keeps [1, 2, 4], whose count is a bit larger
    budget = inventory.count(three, kept_layers=[1, 2, 4]).active_params - 500
    assert inventory.smallest(three).active_params < budget
    pruned, result = mp.prune(model, constraints={"active_params": budget}, forward_loop=loop(batches()),
                              score_func=mp.lm_loss_score(batches(2, seed=100)), search=search)  # fmt: skip
    assert result.search.space == {"num_moe_experts": [3, 4], "moe_ffn_hidden_size": [24, 32], "num_layers": [3, 4]}
    assert result.orders.layer_ranking[-1] == 3
    for c in result.search.candidates:
        sizes = {**full, **c.export_config}
        kept = sorted(result.orders.layer_ranking[: sizes["num_layers"]])
        assert c.counts == inventory.count(sizes, kept_layers=kept) and c.counts.active_params <= budget
    # experts of FFN 32 fit the bound but not the exact count: only FFN 24 (3 or 4 experts, 3 layers) remain
    assert sorted(c.export_config["num_moe_experts"] for c in result.search.candidates) == [3, 4]
    assert all(c.export_config["moe_ffn_hidden_size"] == 24 and c.export_config["num_layers"] == 3 for c in result.search.candidates)
    best = result.search.best.counts
    assert best.params == result.params_after == sum(p.numel() for p in pruned.parameters())
    assert best.active_params == active_params(pruned) < best.params


def test_hf_config_of_a_pruned_moe_model():
    """Expert count and size are written where the family has them; the router's top-k stays; Qwen3-MoE's
    dense layers (`mlp_only_layers`, 0-indexed) are renumbered to the surviving layers."""
    from types import SimpleNamespace

    from transformers import Qwen3MoeConfig

    from megatron_prune.minitron.bridge import pruned_hf_config

    hf = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1, 3])  # fmt: skip
    pruned = SimpleNamespace(hidden_size=48, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                             num_layers=3, num_moe_experts=6, moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=None)  # fmt: skip
    out = pruned_hf_config(hf, pruned, kept_layers=[1, 2, 4])
    assert (out.num_experts, out.moe_intermediate_size, out.num_experts_per_tok) == (6, 24, 2)
    assert out.mlp_only_layers == [1, 2] and out.num_hidden_layers == 3 and out.hidden_size == 48
    assert hf.num_experts == 8 and hf.mlp_only_layers == [1, 3]  # the original is not modified
