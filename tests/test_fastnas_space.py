"""FastNAS search space: channel groups from tracing, fixed groups with reasons, choices, counting, slicing.

Invariants on every tiny net of `fastnas_nets`: permuting every group's channels at full width leaves the
outputs unchanged (every tensor a group runs through is sliced consistently); a subnet's predicted params and
FLOPs equal the recount of the sliced model and its real parameter count.
"""

import copy

import pytest
import torch
import torch.nn as nn

from fastnas_nets import NETS, Blocked, WithLeaf, build, images, randomize
from megatron_prune import fastnas
from megatron_prune.common.choices import Rules, make_divisible, width_choices
from megatron_prune.common.slicing import slice_model
from megatron_prune.errors import UnsupportedModelError
from megatron_prune.fastnas.space import build_space

RULES = Rules.of({"*": {"divisor": 8}})


def _random_kept(space, widths, seed=0):
    """Random units per group at `widths` (whole blocks for GroupNorm groups), in random order."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for name, full in space.full.items():
        block = space.analysis.groups[name].block
        blocks = torch.randperm(full // block, generator=g)[: widths[name] // block]
        kept[name] = (blocks[:, None] * block + torch.arange(block)).reshape(-1)
    return kept


@pytest.mark.parametrize("name", list(NETS))
def test_permuting_every_group_at_full_width_keeps_outputs(name):
    model, x = build(name), images()
    space = build_space(model, x, RULES)
    kept = {g: k if g not in space.fixed else torch.arange(space.full[g]) for g, k in _random_kept(space, space.full).items()}
    assert any(not torch.equal(k, torch.arange(len(k))) for k in kept.values())
    permuted = slice_model(copy.deepcopy(model), space.analysis.tensors, kept, space.analysis.depthwise)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_predicted_counts_equal_the_sliced_model(name):
    model, x = build(name), images()
    space = build_space(model, x, RULES)
    for pick in (0, 1, -2):
        widths = {g: c[pick] if len(c) > 1 else c[0] for g, c in space.choices.items()}
        kept = {g: k.sort().values for g, k in _random_kept(space, widths, seed=pick + 5).items()}
        pruned = slice_model(copy.deepcopy(model), space.analysis.tensors, kept, space.analysis.depthwise)
        with torch.no_grad():
            out = pruned(x)
        assert out.shape == model(x).shape
        predicted = space.count(widths)
        assert predicted == build_space(pruned, x, RULES).count({})
        assert predicted["params"] == sum(p.numel() for p in pruned.parameters())
        assert all(type(m).__module__.startswith("torch.nn") or m is pruned or isinstance(m, nn.Sequential)
                   or not list(m.parameters(recurse=False)) for m in pruned.modules())


def test_flops_equal_a_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4)).eval()
    space = build_space(model, torch.randn(2, 3, 8, 8), Rules.of({"*": {"divisor": 2}}))
    # convolution: 2 images x 8x8 positions x 8 outputs x 27 inputs; linear: 2 x 4 x 8 (multiply-adds, x2)
    assert space.count() == {"flops": 2 * (2 * 64 * 8 * 27 + 2 * 4 * 8), "params": 8 * 27 + 8 + 16 + 32 + 4 + 8}
    assert space.count({"0": 4})["flops"] == 2 * (2 * 64 * 4 * 27 + 2 * 4 * 4)


def test_residual_groups_merge_and_flatten_feeds_the_linear():
    space = build_space(build("residual"), images(), RULES)
    groups = space.analysis.groups
    assert set(groups["stem.0"].modules) >= {"stem.0", "stem.1", "b1.0.0", "b1.1", "b1.2", "b2.0.0", "down.0"}
    assert set(groups["b2.1"].modules) >= {"b2.1", "b2.2", "down.0", "down.1", "fc1"}
    fc1 = space.analysis.tensors[("fc1", "weight")][1]
    assert [(s.group, s.units, s.repeat) for s in fc1.segments] == [("b2.1", 64, 16)]
    assert "b2.1" in space.searchable and space.fixed == {"fc2": "its channels reach the model's output (node 'output')"}


def test_concatenated_branches_stay_separate_groups():
    space = build_space(build("dense"), images(), RULES)
    mix = space.analysis.tensors[("mix.0", "weight")][1]
    assert [(s.group, s.units) for s in mix.segments] == [("a.0", 48), ("stem.0", 32), ("b.0", 64)]
    assert {"a.0", "stem.0", "b.0", "mix.0"} <= set(space.searchable)
    kept = {"a.0": torch.tensor([1, 5]), "stem.0": torch.tensor([0]), "b.0": torch.tensor([3, 4]), "mix.0": torch.arange(64), "head": torch.arange(5)}
    assert mix.indices(kept).tolist() == [1, 5, 48, 80 + 3, 80 + 4]


def test_depthwise_follows_se_merges_grouped_conv_is_fixed_and_named():
    space = build_space(build("mobile"), images(), RULES)
    expand = space.analysis.groups["expand.0"]
    assert {"dw.0", "dw.1", "se_expand", "project.0"} <= set(expand.modules)
    assert "dw.0" in space.analysis.depthwise and "se_reduce" in space.searchable
    assert "grouped Conv2d 'grouped' (groups=4)" in space.fixed["stem.0"]
    assert "grouped Conv2d 'grouped'" in space.fixed["grouped"]


def test_group_norm_prunes_whole_groups_and_channels_last_block_follows_permute():
    model, x = build("norms"), images()
    space = build_space(model, x, RULES)
    stem = space.analysis.groups["stem"]
    assert stem.block == 8 and all(w % 8 == 0 for w in space.choices["stem"])
    assert {"gn", "dw", "ln", "pw2", "", "head_in"} <= set(stem.modules)  # "" holds the layer-scale vector
    kept = {g: torch.arange(space.full[g]) for g in space.full} | {"stem": torch.arange(24)}
    pruned = slice_model(copy.deepcopy(model), space.analysis.tensors, kept, space.analysis.depthwise)
    assert (pruned.gn.num_groups, pruned.gn.num_channels, pruned.ln.normalized_shape, pruned.gamma.shape) == (3, 24, (24,), (24,))
    pruned(x)


def test_channels_reaching_unknown_ops_are_fixed_with_the_node_named():
    space = build_space(randomize(Blocked()), images(), RULES)
    assert space.fixed["a.0"] == "they are indexed at node 'getitem'"
    assert "matmul" in space.fixed["b.0"] and "'matmul'" in space.fixed["b.0"]
    assert list(space.searchable) == ["c.0"]


def test_untraceable_module_is_named_with_the_leaf_hint_and_leaves_work():
    model = randomize(WithLeaf())
    with pytest.raises(UnsupportedModelError, match=r"cannot trace module 'gate' \(Gate\).*leaf_modules': \['gate'\]"):
        build_space(model, images(), RULES)
    for leaf in (["gate"], ["ga*"], [WithLeaf.Gate]):
        space = build_space(model, images(), RULES, leaf_modules=leaf)
        assert "module 'gate' (Gate)" in space.fixed["a.0"] and "b.0" in space.searchable


def test_choices_match_model_optimizers_rounding_table():
    # the widths Model Optimizer's FastNAS searches by default (its 20 ratios, divisor 32)
    assert width_choices(48) == [32, 48] and width_choices(100) == [32, 64, 96, 100] and width_choices(32) == [32]
    assert width_choices(768) == [64, 96, 128, 160, 192, 224, 256, 320, 352, 384, 416, 448, 512, 544, 576, 608, 640, 704, 736, 768]
    assert width_choices(3072)[:4] == [160, 320, 448, 608] and make_divisible(38.4, 32) == 64


def test_rules_by_pattern_freeze_and_model_optimizer_form():
    model, x = build("residual"), images()
    space = build_space(model, x, Rules.of({"*": {"divisor": 16}, "b1.*": None, "fc1": {"ratios": [0.5, 1.0]}}))
    assert space.fixed["b1.0.0"] == "the rules freeze module 'b1.0.0'"
    assert space.choices["fc1"] == [32, 48] and space.choices["b2.0.0"] == [16, 32, 48, 64]
    assert space.choices["b2.1"] == [32, 64]  # fc1 reads this group: its rule restricts it too
    mo = Rules.of({"nn.Conv2d": {"*": {"channels_ratio": [0.25, 0.5, 1.0], "channel_divisor": 8, "kernel_size": ()}},
                   "nn.BatchNorm2d": {"*": {"features_ratio": [0.25, 0.5, 1.0], "feature_divisor": 8}}})
    assert build_space(model, x, mo).choices["b2.0.0"] == [16, 32, 64]


def test_profile_prints_groups_fixed_reasons_and_cost_range(capsys):
    space = fastnas.profile(build("mobile"), images(), config={"rules": {"*": {"divisor": 8}}})
    out = capsys.readouterr().out
    assert "FIXED: they enter grouped Conv2d 'grouped'" in out and "smallest subnet" in out and "2 searchable groups" in out
    assert space.count(space.smallest)["flops"] < space.count()["flops"]
