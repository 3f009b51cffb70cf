"""Tier 1: the NAS search space and candidate ordering, pure functions on hand-checked cases (no Megatron)."""

import warnings

import pytest

from megatron_prune.minitron.config import ModelShape, PruneConfigError, SearchConfig
from megatron_prune.minitron.search.counting import MB, Inventory
from megatron_prune.minitron.search.space import build_space, divisor_choices, search_candidates, truncate
from megatron_prune.minitron.slicing.table import FFN, HEAD_COLS, HIDDEN


def shape(H=160, F=640, N=32, G=8, L=8, d=8):
    return ModelShape(hidden_size=H, ffn_hidden_size=F, num_attention_heads=N, num_query_groups=G, kv_channels=d,
                      num_layers=L, gated_linear_unit=True)  # fmt: skip


# A hand-made inventory (an embedding, and per layer fc2 and linear_proj; d = 8) whose counts are easy to
# check by hand; inventories of real models are tested against Megatron in test_search_counting.py.
SMALL = Inventory(model={"embedding.word_embeddings.weight": (1000, HIDDEN)},
                  kinds=({"mlp.linear_fc2.weight": (HIDDEN, FFN), "self_attention.linear_proj.weight": (HIDDEN, HEAD_COLS)},),
                  layer_kinds=(0,) * 8, kv_channels=8, gated_linear_unit=True)  # fmt: skip


def by_hand(t):
    return 1000 * t["hidden_size"] + t["num_layers"] * t["hidden_size"] * (t["ffn_hidden_size"] + 8 * t["num_attention_heads"])


def test_divisor_choices():
    assert divisor_choices(4096, 256) == list(range(256, 4097, 256))
    assert divisor_choices(10, 4) == [4, 8, 10]  # the original size is always a choice
    assert divisor_choices(100, 256) == [100]  # smaller than the divisor: not configurable
    assert divisor_choices(8, 1) == list(range(1, 9))


@pytest.mark.parametrize("n, fraction, kept", [(5, 0.5, 3), (8, 0.25, 2), (4, 0.4, 2), (16, 0.4, 7), (16, 0.2, 4), (3, 0.0, 1), (7, 0.99, 7)])
def test_truncation_keeps_the_largest_choices(n, fraction, kept):
    choices = list(range(10, 10 * n + 1, 10))[::-1]  # order of the input does not matter
    assert truncate(choices, fraction) == sorted(choices)[-kept:]


def test_reference_example_space_and_product_order():
    """Algorithm §8.2: hidden [32..160], ffn [128..640], heads [8..32], layers [1..8] with 50% width, 25%
    depth and ffn skipped: 12 combinations from {96, 24, 7} to {160, 32, 8}, the last axis fastest."""
    config = SearchConfig(hidden_size_divisor=32, ffn_hidden_size_divisor=128, num_layers_divisor=1,
                          max_width_pruning=0.5, max_depth_pruning=0.25, axes_to_skip=("ffn_hidden_size",))  # fmt: skip
    space = build_space(shape(), config)
    assert space.display() == {"hidden_size": [96, 128, 160], "num_attention_heads": [24, 32], "num_layers": [7, 8]}
    assert space.size == 12 and space.axes == ("hidden_size", "num_attention_heads", "num_layers")
    combos = [(t["hidden_size"], t["num_attention_heads"], t["num_layers"]) for t in space.combinations()]
    assert combos[:3] == [(96, 24, 7), (96, 24, 8), (96, 32, 7)] and combos[-1] == (160, 32, 8) and len(combos) == 12
    assert all(t["ffn_hidden_size"] == 640 and t["num_query_groups"] == 8 for t in space.combinations())


def test_llama_8b_default_space():
    """Default divisors and fractions on Llama-3.1-8B shapes, checked by hand:
    hidden 16 choices -> top 7, FFN 28 -> 12, heads {8,16,24,32} -> 2, layers {2..32} -> 4."""
    space = build_space(shape(H=4096, F=14336, N=32, G=8, L=32, d=128), SearchConfig())
    assert space.display() == {
        "hidden_size": list(range(2560, 4097, 256)),
        "ffn_hidden_size": list(range(8704, 14337, 512)),
        "num_attention_heads": [24, 32],
        "num_layers": [26, 28, 30, 32],
    }
    assert space.size == 7 * 12 * 2 * 4 == 672


def test_single_choice_axes_are_not_searched():
    space = build_space(shape(H=64, F=128, N=8, G=8, L=4), SearchConfig())  # MHA, all sizes below the divisors
    assert space.choices == {} and space.size == 1


def test_query_groups_search_keeps_heads_a_multiple_of_the_groups():
    mha = build_space(shape(N=8, G=8), SearchConfig(search_query_groups=True, max_width_pruning=0.5))
    assert mha.choices == {"num_query_groups": [5, 6, 7, 8]}  # one head per group: heads are not searched
    assert mha.axes == ("num_attention_heads", "num_query_groups")  # but a group count sets the heads
    assert {(t["num_attention_heads"], t["num_query_groups"]) for t in mha.combinations()} == {(g, g) for g in range(5, 9)}
    gqa = build_space(shape(N=32, G=8), SearchConfig(search_query_groups=True))
    assert gqa.choices["num_attention_heads"] == [3, 4]  # per query group
    pairs = sorted({(t["num_query_groups"], t["num_attention_heads"]) for t in gqa.combinations()})
    assert pairs == [(g, g * q) for g in (5, 6, 7, 8) for q in (3, 4)]


def test_unknown_axis_to_skip_warns_and_names_it():
    with pytest.warns(UserWarning, match="'mamba_head_dim' not an axis of this model"):
        space = build_space(shape(), SearchConfig(axes_to_skip=("mamba_head_dim", "hidden_size")))
    assert "hidden_size" not in space.choices
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_space(shape(), SearchConfig(axes_to_skip=("num_query_groups",)))  # an axis of the model: no warning


def small_space(**kw):
    config = SearchConfig(hidden_size_divisor=32, ffn_hidden_size_divisor=128, num_layers_divisor=1,
                          max_width_pruning=0.5, max_depth_pruning=0.25, **kw)  # fmt: skip
    return build_space(shape(), config), config


def test_candidates_fit_every_budget_and_are_ordered_closest_first():
    space, config = small_space()
    budgets = {"params": 1_200_000, "memory_mb": 1_000_000 * 2 / MB}  # weights only: 2 bytes per parameter
    fit = search_candidates(space, SMALL, budgets, config, shape())
    counts = [(c.counts.params, c.counts.memory_mb) for c in fit.candidates]
    assert counts == [(by_hand(c.export_config), by_hand(c.export_config) * 2 / MB) for c in fit.candidates]
    expected = [t for t in space.combinations() if by_hand(t) <= 1_000_000]
    assert 0 < len(expected) < space.size
    expected.sort(key=lambda t: -by_hand(t))  # descending; stable, so ties keep product order
    assert [c.export_config for c in fit.candidates] == [{a: t[a] for a in space.axes} for t in expected]
    again = search_candidates(space, SMALL, budgets, config, shape())
    assert [c.export_config for c in again.candidates] == [c.export_config for c in fit.candidates]


def test_ties_keep_product_order():
    space, config = small_space()
    flat = Inventory(model={"embedding.word_embeddings.weight": (1000, 7)}, kinds=({},), layer_kinds=(0,) * 8, kv_channels=8,
                     gated_linear_unit=True)  # fmt: skip
    fit = search_candidates(space, flat, {"params": 7001}, config, shape())  # every candidate counts 7000
    assert [c.export_config for c in fit.candidates] == [{a: t[a] for a in space.axes} for t in space.combinations()]


def test_filter_invalid_and_smallest_reachable():
    space, config = small_space(candidate_filter=lambda sizes: sizes["hidden_size"] != 128)
    fit = search_candidates(space, SMALL, {"params": 1}, config, shape(), tp_size=16)
    # tp 16: heads 24 is not divisible -> invalid; hidden 128 rejected by the filter
    heads = [t["num_attention_heads"] for t in space.combinations()]
    assert fit.invalid == heads.count(24) * 1
    assert fit.filtered == sum(1 for t in space.combinations() if t["hidden_size"] == 128 and t["num_attention_heads"] != 24)
    assert fit.candidates == []
    smallest, sizes = fit.smallest["params"]
    first = {axis: choices[0] for axis, choices in space.choices.items()}
    assert first == {"hidden_size": 96, "ffn_hidden_size": 384, "num_attention_heads": 3, "num_layers": 7}
    assert sizes == {"hidden_size": 96, "ffn_hidden_size": 384, "num_attention_heads": 32, "num_layers": 7}  # heads 24: invalid
    assert smallest == by_hand(sizes) == 96 * 1000 + 7 * 96 * (384 + 8 * 32)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"max_width_pruning": 1.0}, r"search.max_width_pruning=1.0 must be a fraction in \[0, 1\)"),
        ({"max_depth_pruning": -0.1}, "max_depth_pruning=-0.1 must be a fraction"),
        ({"hidden_size_divisor": 0}, "search.hidden_size_divisor=0 must be a positive integer"),
        ({"top_k": 2.5}, "search.top_k=2.5 must be a positive integer"),
        ({"axes_to_skip": "hidden_size"}, "must be a list of axis names"),
        ({"candidate_filter": 3}, "candidate_filter must be a callable"),
    ],
)
def test_search_config_errors_name_the_field(fields, match):
    with pytest.raises(PruneConfigError, match=match):
        SearchConfig(**fields)


def test_search_config_from_dict():
    assert SearchConfig.of({"top_k": 3}).top_k == 3 and SearchConfig.of(None) == SearchConfig()
    with pytest.raises(PruneConfigError, match="unknown option.* topk"):
        SearchConfig.of({"topk": 3})


def test_space_of_a_hybrid_model_without_attention():
    """Mamba heads are chosen in multiples of the Mamba groups; a model without attention layers has no head axes."""
    hybrid = ModelShape(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                        num_layers=4, gated_linear_unit=False, attention=False, mamba_num_heads=8, mamba_head_dim=16,
                        mamba_num_groups=2, mamba_state_dim=16)  # fmt: skip
    config = SearchConfig(hidden_size_divisor=16, ffn_hidden_size_divisor=64, mamba_head_dim_divisor=4, max_width_pruning=0.5,
                          max_depth_pruning=0.0)  # fmt: skip
    space = build_space(hybrid, config)
    assert space.choices == {"hidden_size": [48, 64], "mamba_num_heads": [6, 8], "mamba_head_dim": [12, 16]}
    combinations = list(space.combinations())
    assert len(combinations) == 8 and all("num_attention_heads" not in t for t in combinations)
    assert combinations[0] == dict(hidden_size=48, ffn_hidden_size=128, mamba_num_heads=6, mamba_head_dim=12, num_layers=4)
