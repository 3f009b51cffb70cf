"""FastNAS refuses bad input with a clear error before any score call, and leaves the input model untouched."""

import math

import pytest
import torch

from fastnas_nets import WithLeaf, build, images, randomize
from megatron_prune import fastnas
from megatron_prune.errors import PruneConfigError, PruneError, UnsupportedModelError

RULES = {"*": {"divisor": 8}}


class Counting:
    def __init__(self, value=0.5, fail_when=None):
        self.calls, self.value, self.fail_when = 0, value, fail_when

    def __call__(self, model):
        self.calls += 1
        if self.fail_when is not None and self.fail_when(model):
            raise RuntimeError("boom")
        return self.value(model) if callable(self.value) else self.value


def _prune(model=None, constraints=None, scorer=None, **kw):
    model = model if model is not None else build("residual")
    kw.setdefault("dummy_input", images(1))
    kw.setdefault("data_loader", [(images(4, seed=i), None) for i in range(2)])
    config = {"rules": RULES, "bn_batches": 2, "sensitivity_points": 1, "verbose": False, **kw.pop("config", {})}
    constraints = {"flops": "50%"} if constraints is None else constraints
    return fastnas.prune(model, constraints=constraints, score_func=scorer, config=config, **kw)


@pytest.mark.parametrize("constraints, message", [
    ({"flops": "60"}, r"string without '%' or a unit: pass a number \(60\) or a percentage \('60%'\)"),
    ({"flops": "abc%"}, r"'abc' before '%' is not a number"),
    ({"flops": "120%"}, r"strictly between 0% and 100%"),
    ({"params": -5}, r"must be a positive, finite number"),
    ({"params": True}, r"must be a number or a percentage"),
    ({"latency": 3}, r"unknown key\(s\) 'latency'; fastnas budgets are flops, params"),
    ({}, r"constraints is empty"),
    ({"flops": "1%"}, r"below the smallest reachable subnet's [\d,]+ FLOPs?|below the smallest reachable subnet's [\d,]+ \(\d"),
    ({"params": 10**9}, r"is not below the original model's"),
])
def test_bad_budgets(constraints, message):
    model, scorer = build("residual"), Counting()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneConfigError, match=message):
        _prune(model, constraints, scorer)
    assert scorer.calls == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreachable_budget_names_the_smallest_value():
    space = fastnas.profile(build("residual"), images(1), config={"rules": RULES}, verbose=False)
    smallest = space.count(space.smallest)["flops"]
    with pytest.raises(PruneConfigError, match=f"{smallest:,.0f}"):
        _prune(constraints={"flops": smallest - 1}, scorer=Counting())


@pytest.mark.parametrize("kwargs, message", [
    ({"dummy_input": torch.randn(1, 5, 16, 16)}, r"the model rejected dummy_input \(tensor \(1, 5, 16, 16\)"),
    ({"dummy_input": None}, r"dummy_input is required"),
    ({"data_loader": []}, r"data_loader is empty"),
    ({"data_loader": None}, r"data_loader is required"),
    ({"data_loader": 3}, r"data_loader must be iterable"),
    ({"config": {"bogus": 1}}, r"unknown option 'bogus'"),
    ({"config": {"criterion": "random"}}, r"criterion.*output_contribution, l2_norm"),
    ({"config": {"selectors": "greedy"}}, r"selectors"),
    ({"config": {"bn_batches": 0}}, r"bn_batches.*positive integer"),
    ({"config": {"rules": {"*": {"divisor": 0}}}}, r"divisor.*positive integer"),
    ({"config": {"rules": {"*": {"ratio": [0.5]}}}}, r"unknown field 'ratio'"),
    ({"mode": "gradnas"}, r"mode='gradnas'.*megatron_prune.gradnas"),
])
def test_bad_arguments_fail_before_scoring(kwargs, message):
    scorer = Counting()
    with pytest.raises(PruneConfigError, match=message):
        _prune(scorer=scorer, **kwargs)
    assert scorer.calls == 0


def test_missing_score_func():
    with pytest.raises(PruneConfigError, match="score_func is required"):
        _prune(scorer=None)


def test_untraceable_model_is_named_before_scoring():
    scorer = Counting()
    with pytest.raises(UnsupportedModelError, match=r"module 'gate'.*config=\{'leaf_modules': \['gate'\]\}"):
        _prune(randomize(WithLeaf()), scorer=scorer)
    assert scorer.calls == 0
    _, result = _prune(randomize(WithLeaf()), scorer=Counting(), config={"leaf_modules": ["gate"]})
    assert "a.0" in result.fixed and "gate" in result.fixed["a.0"]


def test_score_func_that_raises_or_returns_nan_names_the_subnet():
    narrowed = lambda m: m.b2[0][0].out_channels < 64  # noqa: E731
    with pytest.raises(PruneConfigError, match=r"score_func raised on subnet b2.0.0=\d+: RuntimeError: boom"):
        _prune(scorer=Counting(fail_when=narrowed))
    with pytest.raises(PruneConfigError, match=r"score_func returned nan on subnet b2.0.0=\d+"):
        _prune(scorer=Counting(value=lambda m: math.nan if narrowed(m) else 1.0))
    with pytest.raises(PruneConfigError, match=r"returned 'high' on subnet the original model"):
        _prune(scorer=Counting(value=lambda m: "high"))


def test_errors_share_one_base_class():
    assert issubclass(PruneConfigError, PruneError) and issubclass(UnsupportedModelError, PruneError)
