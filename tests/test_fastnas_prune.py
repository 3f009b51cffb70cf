"""FastNAS end to end on tiny nets: budgets held and filled, real BatchNorm recalibration, resume, save/restore,
export, Model Optimizer's call shape, and the input model left untouched."""

import copy

import pytest
import torch
import torch.nn as nn

from fastnas_nets import build, images
from megatron_prune import fastnas
from megatron_prune.errors import PruneConfigError
from megatron_prune.fastnas.subnet import recalibrate_batchnorm

RULES = {"*": {"divisor": 8}}


class Scorer:
    """Minus the MSE between a subnet's logits and the original's on held-out images; counts its calls."""

    def __init__(self, model, fail_at=None):
        self.val = [images(8, seed=100 + i) for i in range(2)]
        with torch.no_grad():
            reference = copy.deepcopy(model).eval()
            self.ref = [reference(v) for v in self.val]
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, m):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        with torch.no_grad():
            return -sum(torch.nn.functional.mse_loss(m(v), r).item() for v, r in zip(self.val, self.ref))


def loader():
    return [(images(8, seed=i), torch.zeros(8, dtype=torch.long)) for i in range(4)]


def run(model, constraints, **kw):
    scorer = kw.pop("scorer", None) or Scorer(model)
    config = {"rules": RULES, "bn_batches": 4, "sensitivity_points": 2, "verbose": False, **kw.pop("config", {})}
    pruned, result = fastnas.prune(model, constraints=constraints, dummy_input=images(1), data_loader=loader(),
                                   score_func=scorer, config=config, **kw)
    return pruned, result, scorer


@pytest.mark.parametrize("constraints", [{"flops": "50%"}, {"params": "35%"}, {"flops": "60%", "params": "50%"}])
def test_result_is_within_every_budget_and_fills_it(constraints):
    model = build("residual").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, result, _ = run(model, constraints)
    space = fastnas.profile(build("residual"), images(1), config={"rules": RULES}, verbose=False)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert all(result.counts[m] <= limit for m, limit in result.limits.items())
    widths = {**space.full, **result.widths}
    assert space.count(widths) == result.counts == fastnas.profile(pruned, images(1), verbose=False).count()
    assert result.counts["params"] == sum(p.numel() for p in pruned.parameters())
    for g, choices in space.searchable.items():  # maximal: no group can be widened by one step within budget
        i = choices.index(widths[g])
        if i + 1 < len(choices):
            wider = space.count({**widths, g: choices[i + 1]})
            assert any(wider[m] > limit for m, limit in result.limits.items()), g
    assert type(pruned) is type(model) and not pruned.training
    assert {type(m) for m in pruned.modules()} <= {type(m) for m in model.modules()}
    assert len(result.candidates) == 3 and result.score == max(c.score for c in result.candidates)


def test_batchnorm_statistics_are_recalibrated_on_the_subnet():
    model = build("residual")
    pruned, result, _ = run(model, {"flops": "40%"})
    batches = [x for x, _ in loader()]
    means = {}
    probe = copy.deepcopy(pruned)
    for name, m in probe.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, a, o, name=name: means.setdefault(name, []).append(a[0].mean((0, 2, 3))))
    assert recalibrate_batchnorm(probe, batches, lambda m, x: m(x)) > 0
    for name, m in pruned.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, torch.stack(means[name]).mean(0), rtol=1e-4, atol=1e-5)
    # the statistics really changed: the consumer of a narrowed group no longer matches the original's
    assert not torch.allclose(pruned.b2[2].running_mean, model.b2[2].running_mean[: len(pruned.b2[2].running_mean)])


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    model = build("residual")
    _, reference, scorer = run(model, {"flops": "50%"}, checkpoint=str(tmp_path / "a.pt"))
    total = scorer.calls
    with pytest.raises(KeyboardInterrupt):
        run(model, {"flops": "50%"}, checkpoint=str(tmp_path / "b.pt"), scorer=Scorer(model, fail_at=7))
    _, resumed, scorer = run(model, {"flops": "50%"}, checkpoint=str(tmp_path / "b.pt"))
    assert resumed.widths == reference.widths and resumed.score == reference.score
    assert scorer.calls == total - 6 and resumed.reused_scores >= 6
    _, again, scorer = run(model, {"flops": "45%"}, checkpoint=str(tmp_path / "b.pt"))  # another budget: sensitivities reused
    assert scorer.calls <= 3 and again.counts["flops"] <= again.limits["flops"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run(build("residual"), {"flops": "50%"}, checkpoint=str(tmp_path / "c.pt"), config={"selectors": ["greedy"]})
    scorer = Scorer(build("residual", seed=3))
    with pytest.raises(PruneConfigError, match="for another model"):
        run(build("residual", seed=3), {"flops": "50%"}, checkpoint=str(tmp_path / "c.pt"), scorer=scorer)
    assert scorer.calls == 0


def test_save_restore_torch_save_and_export_reproduce_outputs(tmp_path):
    model = build("mobile")
    pruned, result, _ = run(model, {"flops": "70%"})
    x = images(3, seed=9)
    with torch.no_grad():
        expected = pruned(x)
    fastnas.save(pruned, tmp_path / "pruned.pt", result)
    restored = fastnas.restore(build("mobile", seed=5), tmp_path / "pruned.pt").eval()
    torch.save(pruned, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    exported = torch.export.export(pruned, (x,)).module()
    with torch.no_grad():
        for other in (restored, loaded, exported):
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    with pytest.raises(PruneConfigError, match="not a"):
        fastnas.restore(build("residual"), tmp_path / "pruned.pt")


def test_model_optimizer_call_shape_and_rules():
    model = build("residual")
    scorer = Scorer(model)
    rules = {"nn.Conv2d": {"*": {"channels_ratio": [0.5, 1.0], "channel_divisor": 8}},
             "nn.BatchNorm2d": {"*": {"features_ratio": [0.5, 1.0], "feature_divisor": 8}},
             "nn.Linear": {"*": {"features_ratio": [0.5, 1.0], "feature_divisor": 8}}}
    pruned, result = fastnas.prune(model=model, mode=[("fastnas", rules)], constraints={"flops": "60%"},
                                   dummy_input=images(1), config={"data_loader": loader(), "score_func": scorer,
                                                                  "max_iter_data_loader": 2, "verbose": False, "num_iters": 5000})
    assert all(w in (result.original_widths[g] // 2, result.original_widths[g]) for g, w in result.widths.items())
    assert result.settings["bn_batches"] == 2 and result.counts["flops"] <= result.limits["flops"]
