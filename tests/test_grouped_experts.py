"""Grouped-GEMM experts on weights alone (`slicing/grouped_experts.py`): megatron-core 0.16.1 cannot build a
grouped-GEMM MoE model without CUDA, so these tests check the layout map against megatron-core's own GroupedMLP
conversion (its constructor run with the `grouped_gemm` availability check lifted: the forward still needs the
kernel), the round trips, pruning grouped weights against pruning the SequentialMLP weights with the same plan,
and the errors for bad shapes.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.config import ModelShape
from megatron_prune.minitron.slicing.grouped_experts import (
    LEGACY_GROUPED, TE_GROUPED, grouped_layout, sliced_grouped_tensors, to_grouped, to_sequential,
)
from tests.tiny import build_tiny_gpt, random_tokens, tiny_moe_config

VOCAB, SEQ, E = 128, 16, 4
# expert biases (Megatron allows no linear biases with a shared expert or an expert bias)
NO_SHARED_BIASES = dict(add_bias_linear=True, moe_router_enable_expert_bias=False, moe_shared_expert_intermediate_size=None,
                        moe_shared_expert_gate=False)  # fmt: skip


def tensors(state):
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


def assert_same(a, b):
    a, b = tensors(a), tensors(b)
    assert list(a) == list(b) or sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def grouped_mlp(monkeypatch, config, experts_count=E):
    """megatron-core's legacy GroupedMLP of `experts_count` experts, built on CPU without the grouped_gemm package."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import experts

    monkeypatch.setattr(experts.gg, "assert_grouped_gemm_is_available", lambda: None)
    return experts.GroupedMLP(experts_count, config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


@pytest.mark.parametrize("gated", [True, False])
def test_legacy_layout_is_megatron_cores_own_conversion(mcore, monkeypatch, gated):
    """GroupedMLP.sharded_state_dict splits weight1/weight2 into SequentialMLP-compatible expert tensors (fc1 as its
    gate `_w` and up `_v` halves): `to_sequential` gives exactly those, `to_grouped` gives back the parameters."""
    module = grouped_mlp(monkeypatch, tiny_moe_config(moe_grouped_gemm=True, gated_linear_unit=gated))
    with torch.no_grad():
        for p in (module.weight1, module.weight2):
            p.copy_(torch.randn(p.shape))
    assert module.weight1.shape == (64, E * 32 * (2 if gated else 1)) and module.weight2.shape == (E * 32, 64)
    grouped = {f"mlp.experts.{k}": v.detach() for k, v in module.state_dict().items()}
    sequential = to_sequential(grouped, num_experts=E)

    sharded = module.sharded_state_dict(prefix="mlp.experts.", metadata={"singleton_local_shards": True})
    built = {w: sharded[f"mlp.experts.{w}"].build()["data"] for w in ("weight1", "weight2")}  # per-expert ShardedTensors
    for e in range(E):
        w1 = built["weight1"]
        fc1 = torch.cat([w1["w"][e].data, w1["v"][e].data]) if gated else w1[e].data
        assert torch.equal(sequential[f"mlp.experts.local_experts.{e}.linear_fc1.weight"], fc1)
        assert torch.equal(sequential[f"mlp.experts.local_experts.{e}.linear_fc2.weight"], built["weight2"][e].data)
    assert len(sequential) == 2 * E
    assert_same(to_grouped(sequential, LEGACY_GROUPED), grouped)


@pytest.mark.parametrize("layout,overrides", [(TE_GROUPED, NO_SHARED_BIASES), (TE_GROUPED, {}), (LEGACY_GROUPED, {})])
def test_round_trips_are_the_identity(mcore, layout, overrides):
    torch.manual_seed(0)
    state = build_tiny_gpt(tiny_moe_config(**overrides), vocab_size=VOCAB).state_dict()
    grouped = to_grouped(state, layout)
    assert grouped_layout(grouped) == layout and grouped_layout(state) is None
    assert not any(".local_experts." in k for k in grouped)
    if layout == TE_GROUPED:
        fc1 = "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"
        assert grouped["decoder.layers.0.mlp.experts.linear_fc1.weight3"] is state[fc1]
        assert ("decoder.layers.0.mlp.experts.linear_fc2.bias0" in grouped) == bool(overrides)
    else:
        assert grouped["decoder.layers.3.mlp.experts.weight1"].shape == (64, E * 2 * 32)
    assert list(tensors(grouped))[:3] == list(tensors(state))[:3]  # other entries stay where they were
    assert_same(to_sequential(grouped, num_experts=E), state)
    assert_same(to_grouped(to_sequential(grouped, num_experts=E), layout), grouped)


def logits(model, data):
    with torch.no_grad():
        return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


@pytest.mark.parametrize("layout", [TE_GROUPED, LEGACY_GROUPED])
def test_pruning_grouped_weights_equals_pruning_sequential_weights(mcore, monkeypatch, layout):
    """One plan (from calibrating the SequentialMLP model): pruning its weights in a grouped layout through the
    mapping gives the pruned SequentialMLP model's weights in that layout (experts dropped and renumbered, expert
    channels and hidden sliced); loaded into a stock model of the pruned config they give the pruned logits."""
    torch.manual_seed(0)
    model = build_tiny_gpt(tiny_moe_config(), vocab_size=VOCAB)
    data = [random_tokens(2, SEQ, VOCAB, seed=i) for i in range(3)]
    target = dict(hidden_size=48, num_moe_experts=3, moe_ffn_hidden_size=16, num_layers=3)
    pruned, result = mp.prune(model, target, forward_loop=mp.make_forward_loop(data, progress=False))
    assert any(keep.experts is not None and keep.experts.tolist() != [0, 1, 2] for keep in result.plan.layers.values())

    grouped = to_grouped(model.state_dict(), layout)
    layer_numbers = {i: layer.layer_number for i, layer in enumerate(model.decoder.layers)}
    pruned_grouped = sliced_grouped_tensors(grouped, layer_numbers, result.plan, ModelShape.from_config(model.config))
    assert grouped_layout(pruned_grouped) == layout
    assert_same(pruned_grouped, to_grouped(pruned.state_dict(), layout))

    fresh = build_tiny_gpt(result.config, vocab_size=VOCAB)
    missing, unexpected = fresh.load_state_dict(to_sequential(pruned_grouped, num_experts=3), strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)
    if layout == LEGACY_GROUPED:  # megatron-core's GroupedMLP of the pruned config takes the pruned tensors as they are
        stock = grouped_mlp(monkeypatch, result.config, experts_count=3)
        moe = next(i for i, layer in enumerate(pruned.decoder.layers) if hasattr(layer.mlp, "router"))
        stock.load_state_dict({k: pruned_grouped[f"decoder.layers.{moe}.mlp.experts.{k}"] for k in ("weight1", "weight2")})


def test_bad_layouts_name_the_tensor():
    w1, w2 = "mlp.experts.weight1", "mlp.experts.weight2"
    good = {w1: torch.zeros(8, E * 2 * 3), w2: torch.zeros(E * 3, 8)}  # H=8, F=3, gated
    assert to_sequential(good, num_experts=E)["mlp.experts.local_experts.3.linear_fc1.weight"].shape == (6, 8)
    cases = [
        (dict(good, **{w2: torch.zeros(E * 3 + 1, 8)}), "'mlp.experts.weight2' has shape \\(13, 8\\)"),
        (dict(good, **{w1: torch.zeros(8, E * 5)}), "'mlp.experts.weight1' has shape \\(8, 20\\)"),
        (dict(good, **{w1: torch.zeros(7, E * 6)}), "'mlp.experts.weight1' has shape \\(7, 24\\)"),
        (dict(good, **{w1: torch.zeros(8, E, 6)}), "'mlp.experts.weight1' has shape \\(8, 4, 6\\)"),
        ({w1: good[w1]}, "need both 'mlp.experts.weight1' and 'mlp.experts.weight2'"),
        ({"mlp.experts.linear_fc2.weight1": torch.zeros(8)}, "'mlp.experts.linear_fc2.weight1' has shape \\(8,\\)"),
        ({"mlp.experts.linear_fc1.weight0": torch.zeros(6, 8), **good}, "mixes TEGroupedMLP"),
    ]
    for state, message in cases:
        with pytest.raises(PruneConfigError, match=message):
            grouped_layout(state)
            to_sequential(state, num_experts=E)
    with pytest.raises(PruneConfigError, match="pass num_experts="):
        to_sequential(good)

    seq = to_sequential(good, num_experts=E)
    bad = dict(seq, **{"mlp.experts.local_experts.1.linear_fc1.weight": torch.zeros(4, 8)})
    with pytest.raises(PruneConfigError, match="'mlp.experts.local_experts.1.linear_fc1.weight' has shape \\(4, 8\\)"):
        to_grouped(bad, LEGACY_GROUPED)
    assert to_grouped(bad, TE_GROUPED)["mlp.experts.linear_fc1.weight1"].shape == (4, 8)  # one matrix per expert
    with pytest.raises(PruneConfigError, match="'mlp.experts.local_experts.0.linear_fc1.bias': GroupedMLP experts have no bias"):
        to_grouped(dict(seq, **{"mlp.experts.local_experts.0.linear_fc1.bias": torch.zeros(6)}), LEGACY_GROUPED)
    gap = {k: v for k, v in seq.items() if ".local_experts.2." not in k}
    with pytest.raises(PruneConfigError, match=r"local_experts.\*.linear_fc1.weight': experts \[0, 1, 3\] are not numbered"):
        to_grouped(gap, TE_GROUPED)
    with pytest.raises(PruneConfigError, match="layout='grouped'"):
        to_grouped(seq, "grouped")
