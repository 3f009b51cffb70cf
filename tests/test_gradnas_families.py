"""GradNAS's family table against real (tiny, random) Hugging Face models of every supported family: the tensor map
is complete (permuting every group's units leaves the outputs unchanged), a pruned model equals the original with
the dropped units gated to zero, the analytic counts equal the pruned model's, and the exports reload."""

import copy

import pytest
import torch

from gradnas_models import FAMILIES, build, input_ids, logits
from megatron_prune import gradnas
from megatron_prune.common.slicing import slice_model
from megatron_prune.gradnas import export
from megatron_prune.gradnas.space import build_space

ALL = list(FAMILIES)


def random_scores(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(grp.units, generator=g, dtype=torch.float64) for name, grp in space.groups.items()}


def narrower(space, seed=0):
    """A per-layer mix of widths: every searchable group one or two steps below full, differing by layer."""
    widths = dict(space.full)
    for i, g in enumerate(space.searchable):
        c = space.choices[g]
        widths[g] = c[max(0, len(c) - 2 - (i + seed) % 2)]
    return widths


def permutation(grp, seed):
    """A random order of a group's units that keeps grouped-query heads inside their KV group (K/V stay)."""
    g = torch.Generator().manual_seed(seed)
    per = grp.units // grp.blocks
    return torch.cat([b * per + torch.randperm(per, generator=g) for b in range(grp.blocks)])


@pytest.mark.parametrize("family, kv_mode", [(f, False) for f in ALL] + [("llama", True), ("qwen3", True)])
def test_permuting_every_unit_keeps_the_outputs(family, kv_mode):
    model, ids = build(family), input_ids(3, seed=5)
    space = build_space(model, input_ids(2), prune_kv_groups=kv_mode)
    kept = {g: permutation(grp, seed=i) for i, (g, grp) in enumerate(space.groups.items())}
    assert any(not torch.equal(k, torch.arange(len(k))) for k in kept.values())
    permuted = slice_model(copy.deepcopy(model), space.tensors, kept)
    torch.testing.assert_close(logits(permuted, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    wrong = dict(kept)  # a map missing one tensor would go unnoticed only if the test could not fail: it can
    (module, attr), dims = next((k, v) for k, v in space.tensors.items() if k[1] == "weight")
    partial = slice_model(copy.deepcopy(model), {k: v for k, v in space.tensors.items() if k != (module, attr)}, wrong)
    assert not torch.allclose(logits(partial, ids), logits(model, ids), atol=1e-4)


def gated_logits(model, space, kept, ids):
    """The original model with every dropped unit's input to its output / down projection set to zero."""
    handles = []
    for site, (module, units) in space.sites.items():
        layer, kind = site.split(".")[1], site.split(".")[2]
        keep_mask = torch.zeros(units)
        if kind == "ffn":
            keep_mask[kept[f"layers.{layer}.ffn"]] = 1
        elif f"layers.{layer}.heads" in kept:
            keep_mask[kept[f"layers.{layer}.heads"]] = 1
        else:
            grp = space.groups[f"layers.{layer}.kv_groups"]
            keep_mask.view(grp.units, grp.members)[kept[f"layers.{layer}.kv_groups"]] = 1

        def hook(m, args, keep_mask=keep_mask, units=units):
            x = args[0]
            return ((x.reshape(*x.shape[:-1], units, -1) * keep_mask[:, None]).reshape(x.shape),)
        handles.append(model.get_submodule(module).register_forward_pre_hook(hook))
    try:
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ALL)
def test_pruned_model_equals_the_original_with_dropped_units_gated_off(family):
    model, ids = build(family), input_ids(3, seed=6)
    space = build_space(model, input_ids(2))
    scores, widths = random_scores(space), narrower(space)
    pruned, _, _ = export.build(model, space, scores, widths)
    kept = export.kept_units(space, scores, widths)
    torch.testing.assert_close(logits(pruned, ids), gated_logits(model, space, kept, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(pruned, ids), logits(model, ids), atol=1e-4)


@pytest.mark.parametrize("family", ALL)
def test_counts_equal_the_pruned_models_count(family):
    model = build(family)
    dummy = input_ids(2, seq=10)
    space = build_space(model, dummy)
    assert space.count() == gradnas.count(model, dummy)
    assert space.count()["params"] == sum(p.numel() for p in model.parameters())
    for seed in range(2):
        widths = narrower(space, seed)
        pruned, _, _ = export.build(model, space, random_scores(space, seed), widths)
        measured = gradnas.count(pruned, dummy)
        assert space.count(widths) == measured == space.cost.fast()(widths)
        assert measured["params"] == sum(p.numel() for p in pruned.parameters()) < space.count()["params"]


def test_flops_convention_by_hand():
    """Llama: 2 x MACs of every projection and the LM head at B x S positions, plus 4 B S^2 heads head_dim."""
    model, (b, s) = build("llama"), (2, 10)
    c = FAMILIES["llama"][2]
    h, kv, d, f, layers = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["num_hidden_layers"]
    hidden = c["hidden_size"]
    per_token = layers * (hidden * h * d * 2 + hidden * kv * d * 2 + 3 * hidden * f) + hidden * model.config.vocab_size
    expected = 2 * b * s * per_token + layers * 4 * b * s * s * h * d
    assert gradnas.count(model, input_ids(b, seq=s))["flops"] == expected


@pytest.mark.parametrize("family", ALL)
def test_archfile_restores_per_layer_sizes_onto_a_fresh_original(family, tmp_path):
    model, ids = build(family), input_ids(3, seed=7)
    space = build_space(model, input_ids(2))
    pruned, _, _ = export.build(model, space, random_scores(space), narrower(space))
    gradnas.save(pruned, tmp_path / "pruned.pt")
    restored = gradnas.restore(build(family, seed=123), tmp_path / "pruned.pt")
    torch.testing.assert_close(logits(restored, ids), logits(pruned, ids), rtol=0, atol=0)
    assert gradnas.count(restored, input_ids(2)) == gradnas.count(pruned, input_ids(2))


def uniform_widths(space, drop_heads: bool):
    """One FFN width for every layer; heads per layer (pruned_heads families) or one count (Llama-style)."""
    widths = dict(space.full)
    for g, grp in space.groups.items():
        c = space.choices[g]
        if grp.kind == "ffn":
            widths[g] = c[-2]
        elif drop_heads and len(c) > 1:
            widths[g] = c[-2] if (grp.layer == 0 or space.family.config_heads == "num_attention_heads") else c[-1]
    return widths


@pytest.mark.parametrize("family", ALL)
def test_from_pretrained_loads_what_the_config_states(family, tmp_path):
    model, ids = build(family), input_ids(3, seed=8)
    space = build_space(model, input_ids(2))
    pruned, update, loadable = export.build(model, space, random_scores(space), uniform_widths(space, family != "gptj"))
    assert loadable and update
    pruned.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=0)
    if space.family.config_heads == "pruned_heads":  # heads differ by layer: layer 0 lost one, layer 1 none
        assert list(reloaded.config.pruned_heads) == [0] and len(reloaded.config.pruned_heads[0]) == 1


@pytest.mark.parametrize("family", ["llama", "gptj", "bert"])
def test_sizes_the_config_cannot_state_are_reported(family):
    model = build(family)
    space = build_space(model, input_ids(2))
    widths = uniform_widths(space, True)
    first_ffn = next(g for g, grp in space.groups.items() if grp.kind == "ffn")
    widths[first_ffn] = space.choices[first_ffn][0]  # FFN differs by layer: no config field states that
    assert export.build(model, space, random_scores(space), widths)[2] is False
    if family == "gptj":  # GPT-J: any pruned head
        heads = {g: w for g, w in uniform_widths(space, False).items()}
        heads["layers.0.heads"] = space.choices["layers.0.heads"][-2]
        assert export.build(model, space, random_scores(space), heads)[2] is False


def test_kv_group_export_reloads(tmp_path):
    model, ids = build("qwen2"), input_ids(3, seed=9)
    space = build_space(model, input_ids(2), prune_kv_groups=True)
    assert {grp.kind for grp in space.groups.values()} == {"kv_groups", "ffn"}
    widths = {g: (1 if grp.kind == "kv_groups" else space.full[g]) for g, grp in space.groups.items()}
    pruned, update, loadable = export.build(model, space, random_scores(space), widths)
    assert loadable and update == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    pruned.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=0)
