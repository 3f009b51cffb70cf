"""The axis registry and the geometry kinds: one record per axis read by every consumer, and each kind's index
map agreeing with its length (slicing and counting read the same kind). Pure logic, no Megatron model."""

import dataclasses
import itertools

import pytest
import torch

from megatron_prune.minitron import axes
from megatron_prune.minitron.axes import AXES, SUPPORTED_AXES, fits_parallel
from megatron_prune.minitron.config import ModelShape, PruneConfigError, validate_export_config
from megatron_prune.minitron.importance.criteria import CRITERIA, DEFAULT_CRITERIA, resolve_criteria
from megatron_prune.minitron.search.counting import Sizes
from megatron_prune.minitron.slicing.geometry import KINDS, MLADims
from megatron_prune.minitron.slicing.table import LAYER_ROLES, MODEL_ROLES


def test_every_axis_has_its_facts_once():
    assert SUPPORTED_AXES == tuple(AXES) and len(set(SUPPORTED_AXES)) == len(SUPPORTED_AXES)
    names = [n for a in AXES.values() for n in (a.alias, *a.aliases)]
    assert len(names) == len(set(names)), "a short name names two axes"
    for axis in AXES.values():
        assert axis.criterion in CRITERIA[axis.name], f"{axis.name}: default criterion {axis.criterion!r} is not one of its criteria"
        assert DEFAULT_CRITERIA[axis.name] == axis.criterion
        assert axes.axis_named(axis.alias) is axis and axes.axis_named(axis.name) is axis
        assert axis.flag == "--target-" + axis.name.replace("_", "-")
    hf = [h for a in AXES.values() for h in a.hf_names]
    assert len(hf) == len(set(hf)), "an HF config field is written from two axes"


def test_every_axis_the_table_slices_is_registered():
    used = {g.axis for roles in (LAYER_ROLES, MODEL_ROLES) for role in roles.values() for t in role.values()
            for g in t.dims.values()}  # fmt: skip
    assert used <= set(SUPPORTED_AXES) and {g.kind for roles in (LAYER_ROLES, MODEL_ROLES) for role in roles.values()
                                            for t in role.values() for g in t.dims.values()} <= set(KINDS)  # fmt: skip


def test_short_names_resolve_criteria_through_the_registry():
    assert resolve_criteria("ffn=output_contribution,kv_groups=minitron,depth=block_influence") == {
        **DEFAULT_CRITERIA, "ffn_hidden_size": "output_contribution", "num_query_groups": "minitron"}
    with pytest.raises(PruneConfigError, match="unknown axis 'mlp'"):
        resolve_criteria("mlp=minitron")


@pytest.mark.parametrize("n,p", list(itertools.product([1, 2, 3, 4, 6, 8], [1, 2, 4])))
def test_parallel_rules(n, p):
    assert fits_parallel("ffn_hidden_size", n, axes.TP, p, even=False) == (n % p == 0)
    assert fits_parallel("num_query_groups", n, axes.TP, p, even=False) == (n % p == 0 or p % n == 0)
    assert fits_parallel("num_query_groups", n, axes.TP, p) == (n % p == 0)  # a recipe: no KV replication
    assert fits_parallel("num_layers", n, axes.PP, p, even=False) == (n >= p)
    assert fits_parallel("num_layers", n, axes.PP, p) == (n % p == 0)
    assert fits_parallel("num_moe_experts", n, axes.EP, p) == (n % p == 0)
    assert fits_parallel("hidden_size", n, axes.TP, p)  # not split by TP


def test_validation_follows_the_registry_rules():
    """Every TP-split axis of a GPT model is refused at a size TP does not split, by its own rule."""
    shape = ModelShape(hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                       num_layers=4, gated_linear_unit=True)  # fmt: skip
    bad_at_tp4 = {"ffn_hidden_size": {"ffn_hidden_size": 90}, "num_attention_heads": {"num_attention_heads": 6,
                  "num_query_groups": 3}, "num_query_groups": {"num_query_groups": 3, "num_attention_heads": 6}}  # fmt: skip
    assert {a for a in axes.parallel_rules()[axes.TP] if shape.has(a)} == set(bad_at_tp4)
    for axis, target in bad_at_tp4.items():
        with pytest.raises(PruneConfigError, match="tensor-parallel size 4"):
            validate_export_config(target, shape, tp_size=4)
    validate_export_config({"num_query_groups": 2, "num_attention_heads": 4}, shape, tp_size=4)  # KV groups replicated
    with pytest.raises(PruneConfigError, match=r"num_layers'\]=1 is smaller than the pipeline-parallel size 2"):
        validate_export_config({"num_layers": 1}, shape, pp_size=2)


def _shape():
    return ModelShape(hidden_size=16, ffn_hidden_size=24, num_attention_heads=8, num_query_groups=4, kv_channels=4,
                      num_layers=2, gated_linear_unit=True, mamba_num_heads=8, mamba_head_dim=6, mamba_num_groups=2,
                      mamba_state_dim=3)  # fmt: skip


MLA = MLADims(qk_head_dim=5, qk_pos_emb_head_dim=3, v_head_dim=7, kv_lora_rank=6, q_lora_rank=None)


@pytest.mark.parametrize("kind,mla", [(k, MLA if k.startswith("mla") else None) for k in sorted(KINDS)] + [("head_cols", MLA)])
def test_kind_index_length_agree(kind, mla):
    """For random kept indices, every kind's index map has exactly the length the counters use, and keeping
    everything in order gives the original length (MLA kinds, and linear_proj's columns of v per head, at MLA dims)."""
    shape, g = dataclasses.replace(_shape(), mla=mla), torch.Generator().manual_seed(0)
    axis = {"channels": "ffn_hidden_size", "gated_rows": "ffn_hidden_size"}.get(kind, "num_attention_heads")
    if kind.startswith("mamba"):
        axis = "mamba_num_heads"
    for trial in range(5):
        G2 = 1 + trial % 4
        q2 = 1 + trial % 2
        groups = torch.randperm(4, generator=g)[:G2]
        heads = torch.stack([torch.randperm(2, generator=g)[:q2] for _ in range(G2)])
        nh2 = 2 * (1 + trial % 4)  # the same number of heads in each of the 2 groups
        mamba_heads = torch.cat([torch.randperm(4, generator=g)[: nh2 // 2] + 4 * i for i in range(2)])
        kept = {"ffn_hidden_size": torch.randperm(24, generator=g)[: 5 + trial], "num_query_groups": groups,
                "num_attention_heads": heads, "mamba_num_heads": mamba_heads,
                "mamba_head_dim": torch.randperm(6, generator=g)[: 1 + trial]}  # fmt: skip
        sizes = {"ffn_hidden_size": 5 + trial, "num_query_groups": G2, "num_attention_heads": G2 * q2,
                 "mamba_num_heads": nh2, "mamba_head_dim": 1 + trial}  # fmt: skip
        index = KINDS[kind].index(kept.get, shape, axis)
        length = KINDS[kind].length(Sizes(sizes, shape.kv_channels, True, 2, 3).size, Sizes(sizes, 4, True, 2, 3, mla=mla), axis)
        assert index.numel() == length and index.unique().numel() == length  # distinct rows, as many as counted
    full = Sizes({**shape.sizes(), "num_query_groups": 4, "mamba_num_heads": 8, "mamba_head_dim": 6}, 4, True, 2, 3, mla=mla)
    assert KINDS[kind].index(lambda a: None, shape, axis) is None  # nothing kept explicitly: all rows, in order
    everything = {"ffn_hidden_size": torch.arange(24), "num_query_groups": torch.arange(4),
                  "num_attention_heads": torch.arange(2).repeat(4, 1), "mamba_num_heads": torch.arange(8),
                  "mamba_head_dim": torch.arange(6)}  # fmt: skip
    index = KINDS[kind].index(everything.get, shape, axis)
    assert torch.equal(index, torch.arange(KINDS[kind].length(full.size, full, axis)))


def test_mamba_heads_follow_the_tp_rule():
    """Mamba heads are split evenly over TP ranks (each rank holds whole groups): a kept count TP does not split is
    refused before calibration, as one every group cannot keep equally is."""
    shape = ModelShape(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                       num_layers=4, gated_linear_unit=False, mamba_num_heads=16, mamba_head_dim=8, mamba_num_groups=4,
                       mamba_state_dim=8)  # fmt: skip
    validate_export_config({"mamba_num_heads": 8}, shape, tp_size=4)
    with pytest.raises(PruneConfigError, match=r"mamba_num_heads'\]=12 is not divisible by the tensor-parallel size 8"):
        validate_export_config({"mamba_num_heads": 12}, shape, tp_size=8)
    with pytest.raises(PruneConfigError, match=r"mamba_num_heads'\]=6 is not a multiple of mamba_num_groups=4"):
        validate_export_config({"mamba_num_heads": 6}, shape, tp_size=2)
