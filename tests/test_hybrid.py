"""Pruning hybrid Mamba models (`MambaModel`: Mamba, attention, MLP and MoE layers) on CPU, one process.

Tier 1: the Mamba index geometry on arange tensors, and layer patterns sliced by depth pruning (pipeline
separators and an MTP suffix included). Tier 2 on real tiny models: sorting every axis without slicing keeps
the logits; a pruned model equals a fresh stock MambaModel built from its config and sliced pattern, trains,
and has the analytic parameter and memory counts; Mamba statistics equal values recomputed from captured
in_proj outputs; bad targets fail naming the field.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.config import ModelShape, hybrid_layer_symbols, validate_export_config
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import MB, MemorySpec
from megatron_prune.minitron.slicing.geometry import mamba_conv_channels, mamba_in_rows, mamba_inner
from megatron_prune.minitron.slicing.model import hybrid_pattern_of, slice_hybrid_pattern
from tests.tiny import random_tokens
from tests.tiny_mamba import build_tiny_mamba, tiny_mamba_config

VOCAB, SEQ = 128, 16
PATTERN = "M*-ME"  # all four layer kinds; Mamba: 8 heads of 16 in 2 groups, state 16
MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_grouped_gemm=False)


def test_mamba_geometry_worked_example():
    # nh=4 heads of hd=2 in ng=2 groups (heads 0,1 | 2,3), bc = 2*ng*ds = 4. Keep head 1 of group 0 and
    # head 3 of group 1, channel 1 then 0 of each head.
    heads, dims = torch.tensor([1, 3]), torch.tensor([1, 0])
    assert mamba_inner(heads, dims, head_dim=2).tolist() == [3, 2, 7, 6]
    # in_proj rows [z 0..7, x 8..15, B C 16..19, dt 20..23]
    assert mamba_in_rows(heads, dims, nheads=4, head_dim=2, bc=4).tolist() == [3, 2, 7, 6, 11, 10, 15, 14, 16, 17, 18, 19, 21, 23]
    assert mamba_conv_channels(heads, dims, nheads=4, head_dim=2, bc=4).tolist() == [3, 2, 7, 6, 8, 9, 10, 11]
    everything = mamba_in_rows(torch.arange(4), torch.arange(2), nheads=4, head_dim=2, bc=4)
    assert everything.tolist() == list(range(2 * 8 + 4 + 4))


@pytest.mark.parametrize(
    "pattern, kept, expected",
    [
        ("M*M-", [1, 3, 4], "MM-"),
        ("M*|M-", [1, 3, 4], "M|M-"),  # survivors stay on their stage
        ("M*|M-|E*", [2, 3, 6], "*|M|*"),
        ("M*M-/MM", [2, 4], "*-/MM"),  # the MTP suffix is not a decoder layer: kept as it is
        ("ME*|-M/*", [1, 2, 3, 4, 5], "ME*|-M/*"),
    ],
)
def test_hybrid_pattern_follows_the_surviving_layers(pattern, kept, expected):
    assert slice_hybrid_pattern(pattern, kept) == expected
    assert hybrid_layer_symbols(expected) == "".join(hybrid_layer_symbols(pattern)[n - 1] for n in kept)


def test_unknown_pattern_symbol_is_named():
    with pytest.raises(mp.PruneConfigError, match=r"hybrid layer pattern 'M\*G-': unknown symbol\(s\) \['G'\]"):
        hybrid_layer_symbols("M*G-")


def batches(n=4, b=2, seed=0):
    return [random_tokens(b, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def logits(model, data):
    return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


def make(pattern=PATTERN, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_mamba_config(num_layers=len(hybrid_layer_symbols(pattern)), **MOE, **overrides)
    return build_tiny_mamba(config, vocab_size=VOCAB, hybrid_pattern=pattern, chunk_size=8)


def loop(data):
    return mp.make_forward_loop(data, progress=False)


def full_sizes(model):
    return ModelShape.from_config(model.config, hybrid_pattern_of(model)).sizes()


def test_sorting_every_axis_of_a_hybrid_model_keeps_logits(mcore):
    model = make()
    data = batches()
    before = logits(model, data)
    full = full_sizes(model)
    assert {"mamba_num_heads", "mamba_head_dim", "num_attention_heads", "ffn_hidden_size", "num_moe_experts"} <= set(full)
    pruned, result = mp.prune(model, full, forward_loop=loop(data))
    keep = result.plan.layers[1]
    assert sorted(keep.mamba_heads[:4].tolist()) == [0, 1, 2, 3] and sorted(keep.mamba_heads[4:].tolist()) == [4, 5, 6, 7]
    assert keep.mamba_heads.tolist() != list(range(8)) and keep.mamba_head_dim.tolist() != list(range(16))  # real permutations
    old, new = model.decoder.layers[0].mixer, pruned.decoder.layers[0].mixer
    assert torch.equal(new.A_log, old.A_log[keep.mamba_heads])
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


def test_pruned_hybrid_model_is_what_megatron_builds_and_trains(mcore):
    model = make()
    with torch.no_grad():  # layer 4 (Mamba) adds nothing to the residual stream: the layer to drop
        model.decoder.layers[3].mixer.out_proj.weight.zero_()
    data = batches()
    target = dict(hidden_size=48, mamba_num_heads=4, mamba_head_dim=8, num_attention_heads=2, ffn_hidden_size=64,
                  num_moe_experts=3, num_layers=4)  # fmt: skip
    pruned, result = mp.prune(model, target, forward_loop=loop(data))
    assert result.plan.kept_layers == [1, 2, 3, 5]
    assert pruned.hybrid_override_pattern == "M*-E"
    for axis, value in target.items():
        assert getattr(result.config, axis) == value, axis
    mixer = pruned.decoder.layers[0].mixer
    assert (mixer.nheads, mixer.headdim, mixer.in_proj.weight.shape) == (4, 8, (2 * 32 + 64 + 4, 48))
    fresh = build_tiny_mamba(result.config, vocab_size=VOCAB, hybrid_pattern="M*-E", chunk_size=8)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)

    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    counts = inventory.count({**full_sizes(model), **target}, kept_layers=result.plan.kept_layers)
    assert counts.params == result.params_after == sum(p.numel() for p in fresh.parameters())

    pruned.train()
    tokens = data[0]
    pruned(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None, labels=tokens).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())


def test_mamba_statistics_equal_values_recomputed_from_captured_outputs(mcore):
    """Only the x segment of in_proj's output counts; head_dim is ranked by its L2 over all heads, heads by
    their L2 over their channels within their group."""
    model = make()
    captured = []
    mixer = model.decoder.layers[0].mixer
    hook = mixer.in_proj.register_forward_hook(lambda m, a, o: captured.append(o[0][..., 128:256].clone()))
    data = batches()
    logits(model, data)
    hook.remove()
    _, result = mp.prune(model, {"mamba_num_heads": 4, "mamba_head_dim": 12}, forward_loop=loop(data))
    x = torch.cat([c.abs().mean(0) for c in captured]).pow(2).sum(0).sqrt().view(8, 16)  # [nh, hd]
    torch.testing.assert_close(result.importance.mamba_head_dim[1], x)
    keep = result.plan.layers[1]
    assert keep.mamba_head_dim.tolist() == torch.argsort(x.norm(dim=0), descending=True, stable=True)[:12].tolist()
    per_group = x.norm(dim=1).view(2, 4)
    expected = [g * 4 + int(h) for g in range(2) for h in torch.argsort(per_group[g], descending=True, stable=True)[:2]]
    assert keep.mamba_heads.tolist() == expected


@pytest.mark.parametrize("pattern", ["M*-ME", "M-M*"])
def test_hybrid_counts_equal_the_live_model_with_mamba_state(mcore, pattern):
    model = make(pattern)
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    full = full_sizes(model)
    memory = MemorySpec(seq_length=64, batch_size=3, dtype_bytes=2)
    seen = set()
    for target, kept in (({}, None), ({"mamba_num_heads": 2, "mamba_head_dim": 4, "hidden_size": 32, "num_layers": 3}, [1, 2, 4])):
        sizes = {**full, **target}
        kept = kept or list(range(1, len(pattern) + 1))
        counts = inventory.count(sizes, memory, kept_layers=kept)
        sliced = slice_hybrid_pattern(pattern, kept)
        config = tiny_mamba_config(**MOE, **{k: v for k, v in sizes.items() if k in ("hidden_size", "mamba_num_heads", "mamba_head_dim")},
                                   num_layers=len(kept), kv_channels=16)  # fmt: skip
        built = build_tiny_mamba(config, vocab_size=VOCAB, hybrid_pattern=sliced)
        assert counts.params == sum(p.numel() for p in built.parameters()), (pattern, sizes)
        # by hand: per sequence, each Mamba layer keeps (D + 2 ng ds) x (k - 1) conv and nh x hd x ds SSM values;
        # each attention layer K and V of 2 groups x 16 channels per token
        D = sizes["mamba_num_heads"] * sizes["mamba_head_dim"]  # nh x hd
        mamba_state = (D + 2 * 2 * 16) * 3 + D * 16
        n_mamba, n_attention = sliced.count("M"), sliced.count("*")
        state = 3 * (n_mamba * mamba_state + n_attention * 64 * 2 * 2 * 16)
        assert counts.memory_mb == pytest.approx((counts.params * 2 + state * 2) / MB, abs=1e-12)
        seen.add(counts.params)
    assert len(seen) == 2


def test_hybrid_targets_are_checked(mcore):
    model = make("M-M-")  # no attention layer
    shape = ModelShape.from_config(model.config, "M-M-")
    assert "num_attention_heads" not in shape.sizes() and "num_moe_experts" not in shape.sizes()
    with pytest.raises(mp.PruneConfigError, match=r"mamba_num_heads'\]=3 is not a multiple of mamba_num_groups=2"):
        validate_export_config({"mamba_num_heads": 3}, shape)
    with pytest.raises(mp.PruneConfigError, match=r"mamba_head_dim'\]=17 is larger than the model's mamba_head_dim=16"):
        validate_export_config({"mamba_head_dim": 17}, shape)
    with pytest.raises(mp.PruneConfigError, match=r"mamba_num_heads'\]=2 is not divisible by the tensor-parallel size 4"):
        validate_export_config({"mamba_num_heads": 2}, shape, tp_size=4)
    calls = []
    with pytest.raises(mp.PruneConfigError, match="'num_attention_heads' is not an axis of this model"):
        mp.prune(model, {"num_attention_heads": 2}, forward_loop=calls.append)
    assert calls == []


def test_mamba_num_heads_left_to_the_mixers_is_read_from_them(mcore):
    """megatron-core lets `mamba_num_heads` be None (MambaMixer derives 2 x 64 / 16 = 8 heads): the heads are read
    from the model, sorting every axis keeps the logits, and the pruned config records the pruned head count."""
    model = make(mamba_num_heads=None)
    assert model.config.mamba_num_heads is None and model.decoder.layers[0].mixer.nheads == 8
    data = batches()
    before = logits(model, data)
    sorted_model, _ = mp.prune(model, {"mamba_num_heads": 8}, forward_loop=loop(data))
    torch.testing.assert_close(logits(sorted_model, data), before, atol=1e-5, rtol=0)
    pruned, result = mp.prune(model, {"mamba_num_heads": 4}, forward_loop=loop(data))
    assert result.config.mamba_num_heads == 4 and pruned.decoder.layers[0].mixer.nheads == 4
    assert result.params_after == sum(p.numel() for p in pruned.parameters())


def test_nas_searches_mamba_heads_per_group(mcore):
    """Mamba heads are searched in multiples of the groups; the winner is built like a manual prune and has
    the analytic counts (memory with the Mamba state)."""
    model = make()
    search = dict(hidden_size_divisor=16, mamba_head_dim_divisor=4, max_width_pruning=0.5, max_depth_pruning=0.0, top_k=2,
                  seq_length=64)  # hidden {48, 64} x Mamba heads {6, 8} x head dim {12, 16}; other axes keep one choice
    full = full_sizes(model)
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    memory = MemorySpec(seq_length=64, batch_size=1, dtype_bytes=2)
    budget = inventory.count({**full, "hidden_size": 48, "mamba_num_heads": 6, "mamba_head_dim": 12}, memory).memory_mb
    pruned, result = mp.prune(model, constraints={"memory_mb": budget}, forward_loop=loop(batches()),
                              score_func=mp.lm_loss_score(batches(2, seed=100)), search=search)  # fmt: skip
    assert result.search.space == {"hidden_size": [48, 64], "mamba_num_heads": [6, 8], "mamba_head_dim": [12, 16]}
    for c in result.search.candidates:
        assert c.counts == inventory.count({**full, **c.export_config}, memory) and c.counts.memory_mb <= budget
    best = result.search.best
    assert result.params_after == best.counts.params == sum(p.numel() for p in pruned.parameters())
    assert pruned.decoder.layers[0].mixer.nheads == best.export_config["mamba_num_heads"]


def test_nas_ties_keep_search_space_order_after_the_exact_recount(mcore):
    """Layers differ in kind, so candidates are pre-sorted by lower bounds and recounted exactly once the layer
    ranking is known. Dropping the MLP layer (it adds nothing) makes FFN 64 and FFN 128 at 4 layers tie exactly,
    while their lower bounds differ: the tie straddles top_k=1, and the first in search-space order must win."""
    model = make("M*M-")
    with torch.no_grad():  # the MLP layer 4 is an identity: the layer block influence drops
        model.decoder.layers[3].mlp.linear_fc2.weight.zero_()
    full = full_sizes(model)
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    budget = inventory.count({**full, "num_layers": 3}, kept_layers=[1, 2, 3]).params
    search = dict(ffn_hidden_size_divisor=64, num_layers_divisor=1, max_width_pruning=0.6, max_depth_pruning=0.5,
                  axes_to_skip=("mamba_num_heads", "mamba_head_dim", "num_attention_heads"), top_k=1)  # FFN {64, 128} x layers {3, 4}
    _, result = mp.prune(model, constraints={"params": budget}, forward_loop=loop(batches()), search=search)
    assert result.plan.kept_layers == [1, 2, 3]
    assert result.search.space == {"ffn_hidden_size": [64, 128], "num_layers": [3, 4]}
    lower = {f: inventory.smallest({**full, "ffn_hidden_size": f, "num_layers": 3}).params for f in (64, 128)}
    assert lower[64] < lower[128] <= budget  # the lower bounds alone would put FFN 128 first
    assert result.search.best.export_config == {"ffn_hidden_size": 64, "num_layers": 3}
    assert result.search.best.counts.params == budget


def test_mamba_state_is_counted_at_the_weights_dtype_like_the_reference(mcore):
    """The KV cache is counted in kv_cache_dtype_bytes, the Mamba conv and SSM state in mamba_state_dtype_bytes,
    which defaults to the weights' dtype_bytes (the reference's rule), not to the KV cache's."""
    model = make("M*M-")
    inventory = mp.inventory_of(model, ParallelContext.from_megatron())
    full = full_sizes(model)
    D = full["mamba_num_heads"] * full["mamba_head_dim"]
    mamba_state = 2 * ((D + 2 * 2 * 16) * 3 + D * 16)  # two Mamba layers: conv window + SSM state, one sequence
    kv = 64 * 2 * 2 * 16  # one attention layer: K and V of 2 groups x 16 channels, 64 tokens
    params = inventory.count(full).params
    fp8_kv = MemorySpec(64, 1, 2, kv_cache_dtype_bytes=1)
    assert inventory.count(full, fp8_kv).memory_mb == pytest.approx((params * 2 + kv * 1 + mamba_state * 2) / MB, abs=1e-12)
    fp32_state = MemorySpec(64, 1, 2, kv_cache_dtype_bytes=1, mamba_state_dtype_bytes=4)
    assert inventory.count(full, fp32_state).memory_mb == pytest.approx((params * 2 + kv * 1 + mamba_state * 4) / MB, abs=1e-12)
    with pytest.raises(mp.PruneConfigError, match="search.mamba_state_dtype_bytes=0 must be a positive integer"):
        mp.SearchConfig(mamba_state_dtype_bytes=0)
