"""NAS bad input fails with an error naming the field before calibration, leaving nothing written."""

import os

import pytest
import torch

import megatron_prune as mp
from tests.test_bad_input import Recorder
from tests.test_search_nas import SEARCH, make, shape_score
from tests.tiny import build_tiny_gpt, tiny_gpt_config


@pytest.fixture()
def model(mcore):
    return make()


@pytest.mark.parametrize(
    "constraints, match",
    [
        ({"params": 0}, r"constraints\['params'\]=0 must be a positive number"),
        ({"params": -5e4}, r"constraints\['params'\]=-50000.0 must be a positive number"),
        ({"params": "1e5"}, r"constraints\['params'\]='1e5' must be a positive number"),
        ({"active_params": True}, r"constraints\['active_params'\]=True must be a positive number"),
        ({"memory_mb": float("nan")}, r"constraints\['memory_mb'\]=nan must be a positive number"),
        ({"memory_mb": float("inf")}, r"constraints\['memory_mb'\]=inf must be a positive number"),
        ({"flops": 1e9}, "unknown budget 'flops'; budgets are active_params, params, memory_mb"),
        ({}, "constraints is empty"),
        ([("params", 1e5)], "constraints must be a dict of budgets, got list"),
        ({"export_config": {"hidden_size": 32}}, "export_config cannot be combined with budgets"),
        ({"params": 1e9}, r"constraints\['params'\]=1.00B is not below the model's 156.22K parameters: nothing to prune"),
        ({"params": 1e5, "memory_mb": 50}, r"constraints\['memory_mb'\]=50.000 MB is not below the model's 2.298 MB of inference memory: nothing to prune"),
    ],
)
def test_bad_budgets(model, tmp_path, constraints, match):
    loop, path = Recorder(), tmp_path / "scores.pt"
    with pytest.raises(mp.PruneConfigError, match=match):
        mp.prune(model, constraints=constraints, forward_loop=loop, score_func=shape_score, search=SEARCH, scores_path=str(path))
    assert loop.calls == 0 and not os.listdir(tmp_path)


def test_budget_below_every_candidate_names_the_smallest_reachable(model):
    smallest = build_tiny_gpt(tiny_gpt_config(hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, kv_channels=8,
                                              num_layers=3), vocab_size=128)  # fmt: skip
    n = sum(p.numel() for p in smallest.parameters())
    loop = Recorder()
    expected = (f"no candidate fits constraints params <= 10.00K; the smallest reachable is {n / 1000:.2f}K parameters "
                r"\(hidden_size=32 ffn_hidden_size=64 num_attention_heads=4 num_layers=3\)")  # fmt: skip
    with pytest.raises(mp.PruneConfigError, match=expected):
        mp.prune(model, constraints={"params": 1e4}, forward_loop=loop, score_func=shape_score, search=SEARCH)
    with pytest.raises(mp.PruneConfigError, match="candidate_filter rejected 36 candidates"):
        mp.prune(model, constraints={"params": 1e5}, forward_loop=loop, score_func=shape_score,
                 search=dict(SEARCH, candidate_filter=lambda s: False))  # fmt: skip
    assert loop.calls == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(export_config={"hidden_size": 32}), "export_config cannot be combined with constraints"),
        (dict(score_func=None), r"score_func is required to compare the top_k=5 NAS candidates"),
        (dict(score_func="lm_loss"), "score_func must be a callable"),
        (dict(search=dict(SEARCH, topk=3)), "search: unknown option.* topk"),
        (dict(search=dict(SEARCH, max_width_pruning=1.5)), "search.max_width_pruning=1.5 must be a fraction"),
        (dict(search=dict(SEARCH, axes_to_skip=list(mp.SUPPORTED_AXES))), "the search space is empty"),
    ],
)
def test_bad_options(model, kwargs, match):
    loop = Recorder()
    args = dict(constraints={"params": 1e5}, forward_loop=loop, score_func=shape_score, search=SEARCH)
    with pytest.raises(mp.PruneConfigError, match=match):
        mp.prune(model, **{**args, **kwargs})
    assert loop.calls == 0


def test_nas_options_without_budgets(model):
    with pytest.raises(mp.PruneConfigError, match="score_func and search are NAS options: they need budgets in constraints="):
        mp.prune(model, {"hidden_size": 32}, forward_loop=Recorder(), score_func=shape_score)
    with pytest.raises(mp.PruneConfigError, match=r"give export_config= \(target sizes\) or constraints= \(NAS budgets\)"):
        mp.prune(model, forward_loop=Recorder())


def test_unknown_axis_to_skip_warns(model):
    with pytest.warns(UserWarning, match="axes_to_skip: 'num_moe_experts' not an axis of this model"):
        _, result = mp.prune(model, constraints={"params": 1.2e5}, forward_loop=mp.make_forward_loop([torch.zeros(1, 8, dtype=torch.long)]),
                             search=dict(SEARCH, top_k=1, axes_to_skip=["num_moe_experts"]))  # fmt: skip
    assert result.search.best.counts.params <= 1.2e5


def test_score_that_is_not_a_number_is_refused(model):
    with pytest.raises(mp.PruneConfigError, match=r"score_func returned nan on rank 0 \(last pipeline stage\): it must return a finite float"):
        mp.prune(model, constraints={"params": 1e5}, forward_loop=mp.make_forward_loop([torch.zeros(1, 8, dtype=torch.long)]),
                 score_func=lambda m: float("nan"), search=SEARCH)  # fmt: skip
