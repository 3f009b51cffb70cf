"""The pruned config is the original one patched, and Megatron must be able to build a model from it.

Attributes a model builder set on the `TransformerConfig` instance (not dataclass fields, e.g. YaRN rope
settings) survive into the pruned config; a config from which the pruned model cannot be built fails before any
calibration forward pass (a dry run of the rebuild on the meta device).
"""

import pytest
import torch
from megatron.core.models.gpt import GPTModel

import megatron_prune as mp
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

YARN = dict(yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=8, yarn_beta_fast=32.0,
            yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=0.0, yarn_correction_range_round_to_int=True)  # fmt: skip


def batches(n=3):
    return [random_tokens(2, 16, 128, seed=i) for i in range(n)]


def logits(model, data):
    return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


class CountingLoop:
    """make_forward_loop's loop, counting the calibration passes it ran."""

    def __init__(self, data):
        self.loop, self.calls = mp.make_forward_loop(data, progress=False), 0

    def __call__(self, model):
        self.calls += 1
        self.loop(model)


def test_config_attributes_set_on_the_instance_survive_the_prune(mcore):
    """YaRN rope: GPTModel reads `config.yarn_*`, which are not TransformerConfig fields; builders set them on the
    instance. Sorting every axis keeps the logits, and a real prune builds (the attributes are carried over)."""
    torch.manual_seed(0)
    config = tiny_gpt_config()
    for name, value in YARN.items():
        setattr(config, name, value)
    model = build_tiny_gpt(config, position_embedding_type="yarn")
    data = batches()
    before = logits(model, data)
    full = {"hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 8, "num_query_groups": 4, "num_layers": 4}
    sorted_model, result = mp.prune(model, full, mp.make_forward_loop(data, progress=False))
    assert {name: getattr(result.config, name, None) for name in YARN} == YARN
    torch.testing.assert_close(logits(sorted_model, data), before, atol=1e-5, rtol=0)
    pruned, result = mp.prune(model, {"ffn_hidden_size": 64, "num_layers": 3}, mp.make_forward_loop(data, progress=False))
    assert pruned.rotary_pos_emb.scaling_factor == 4.0 and result.params_after == sum(p.numel() for p in pruned.parameters())


class SmallOnlyGPT(GPTModel):
    """A model whose constructor refuses an FFN narrower than 96 (a stand-in for any config Megatron cannot
    build): the prune must fail before calibration, not after it."""

    def __init__(self, config, **kwargs):
        if config.ffn_hidden_size < 96:
            raise ValueError(f"ffn_hidden_size={config.ffn_hidden_size} is below 96")
        super().__init__(config, **kwargs)


def test_a_pruned_config_that_cannot_be_built_fails_before_calibration(mcore, tmp_path):
    model = build_tiny_gpt(tiny_gpt_config())
    model.__class__ = SmallOnlyGPT
    loop = CountingLoop(batches())
    with pytest.raises(mp.PruneConfigError, match=r"cannot be built from the pruned config \(ValueError: ffn_hidden_size=64 is below 96\)"):
        mp.prune(model, {"ffn_hidden_size": 64}, loop, scores_path=str(tmp_path / "scores.pt"))
    assert loop.calls == 0 and not (tmp_path / "scores.pt").exists()
    _, result = mp.prune(model, {"ffn_hidden_size": 96}, loop)  # buildable: unchanged behaviour
    assert loop.calls == 1 and result.config.ffn_hidden_size == 96
