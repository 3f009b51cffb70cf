"""FastNAS on real pretrained nets (slow tier, about two minutes): the Fashion-MNIST MobileNetV2-style net and
ResNet whose weights are committed in benchmarks/fastnas/weights (trained by benchmarks/fastnas/fmnist.py), with
real images from the Debian package dataset-fashion-mnist (scripts/setup_env.sh unpacks it)."""

import sys
from pathlib import Path

import pytest
import torch

from megatron_prune import fastnas
from megatron_prune.common.choices import Rules
from megatron_prune.fastnas.space import build_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fastnas"))
import fmnist  # noqa: E402

pytestmark = pytest.mark.slow
RULES = {"*": {"divisor": 16}}


@pytest.fixture(scope="module")
def data():
    try:
        (xtr, ytr), (xte, yte) = fmnist.load_fmnist()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return {"calib": fmnist.batches(xtr[:2048], ytr[:2048], 64, shuffle_seed=0),
            "score": fmnist.batches(xtr[-500:], ytr[-500:], 500),
            "test": fmnist.batches(xte[:2000], yte[:2000], 1000)}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _maximal(space, widths, limits):
    """No single searchable group can take its next wider choice without breaking a budget."""
    for g, choices in space.searchable.items():
        i = choices.index(widths[g])
        if i + 1 < len(choices):
            wider = space.count({**widths, g: choices[i + 1]})
            assert any(wider[m] > lim for m, lim in limits.items()), f"{g} could still widen to {choices[i + 1]}"


@pytest.mark.parametrize("name,budget,points", [("mobilenetv2", {"flops": "50%"}, 2), ("resnet", {"params": "40%"}, 1)])
def test_pretrained_fmnist(name, budget, points, data, tmp_path):
    x = torch.randn(1, 1, 28, 28)
    teacher = fmnist.pretrained(name)
    before = _state(teacher)
    original_acc = fmnist.accuracy(teacher, data["test"])
    space = build_space(teacher, x, Rules.of(RULES))
    pruned, result = fastnas.prune(teacher, constraints=budget, dummy_input=x, data_loader=data["calib"],
                                   score_func=lambda m: fmnist.accuracy(m, data["score"]), checkpoint=tmp_path / "s.pt",
                                   config={"rules": RULES, "bn_batches": 6, "sensitivity_points": points, "verbose": False})
    # the source model is untouched
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # never over budget, and filled: one more step in any group breaks it
    (metric, limit), = result.limits.items()
    assert result.counts[metric] <= limit
    _maximal(space, result.widths, result.limits)
    # analytic counts are the pruned model's real counts (params: every parameter; FLOPs: re-traced)
    assert result.counts["params"] == sum(p.numel() for p in pruned.parameters())
    assert build_space(pruned, x).count()["flops"] == result.counts["flops"]
    assert result.counts[metric] < space.count()[metric]
    # plain layers only, and it still classifies: far above chance, close to the original before any fine-tune
    assert all(type(m).__module__.startswith("torch.nn") or m is pruned or type(m).__module__ == "fmnist"
               for m in pruned.modules())
    acc = fmnist.accuracy(pruned, data["test"])
    assert acc > 0.5, (acc, original_acc)
    assert result.score == pytest.approx(fmnist.accuracy(pruned, data["score"]))
    # save -> restore onto a freshly built original reproduces the outputs exactly
    fastnas.save(pruned, tmp_path / "pruned.pt", result)
    restored = fastnas.restore(fmnist.MODELS[name](), tmp_path / "pruned.pt").eval()
    batch = data["test"][0][0][:64]
    with torch.no_grad():
        assert torch.equal(restored(batch), pruned.eval()(batch))
        # an ordinary module: torch.export captures it and gives the same logits
        exported = torch.export.export(pruned, (batch,)).module()
        torch.testing.assert_close(exported(batch), pruned(batch))
        if name == "mobilenetv2":  # and torch.compile (inductor, CPU) runs it with the same logits
            torch.testing.assert_close(torch.compile(pruned)(batch), pruned(batch), atol=1e-4, rtol=1e-4)
    # a second run on the same checkpoint needs no score call and gives the same architecture
    again, second = fastnas.prune(teacher, constraints=budget, dummy_input=x, data_loader=data["calib"],
                                  score_func=lambda m: fmnist.accuracy(m, data["score"]), checkpoint=tmp_path / "s.pt",
                                  config={"rules": RULES, "bn_batches": 6, "sensitivity_points": points, "verbose": False})
    assert second.score_calls == 0 and second.widths == result.widths
