"""Tier 1: streaming a sliced state dict into a model is as strict as load_state_dict(strict=True)."""

import pytest
import torch

from megatron_prune.minitron.slicing.state_dict import load_streaming


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))


def test_copies_every_tensor():
    src, dst = model(), torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    load_streaming(dst, iter(src.state_dict().items()))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_refuses_unknown_missing_and_misshapen_tensors():
    items = dict(model().state_dict())
    with pytest.raises(KeyError, match="unexpected key 'extra.weight'"):
        load_streaming(model(), iter({**items, "extra.weight": torch.zeros(1)}.items()))
    with pytest.raises(KeyError, match=r"nothing was sliced for: \['1.bias'\]"):
        load_streaming(model(), iter({k: v for k, v in items.items() if k != "1.bias"}.items()))
    with pytest.raises(ValueError, match=r"size mismatch for '0.weight': sliced \(2, 2\), model \(2, 3\)"):
        load_streaming(model(), iter({**items, "0.weight": torch.zeros(2, 2)}.items()))
