"""Tier 2: manual pruning of real tiny MCore GPT models on CPU, one process.

Invariants, not examples: sorting without slicing keeps logits; a pruned model equals a fresh stock
model built from its config and loaded with its weights; the statistics equal values recomputed from
captured activations; scores reuse is bit-identical; the input model is never touched.
"""

import copy

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.ranking import descending
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB, SEQ = 128, 16


def batches(n=4, b=2, seed=0):
    return [random_tokens(b, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def logits(model, data):
    return torch.cat(mp.run_forward(model, data, collect=lambda out, tokens: out.detach().clone()))


def make(tied=True, pos="rope", **overrides):
    torch.manual_seed(overrides.pop("seed", 0))
    return build_tiny_gpt(tiny_gpt_config(**overrides), vocab_size=VOCAB, tied=tied, position_embedding_type=pos)


def full_sizes(model):
    """Every axis of the model at its full size."""
    from megatron_prune.minitron.config import ModelShape

    return ModelShape.from_config(model.config).sizes()


VARIANTS = {
    "gqa-rmsnorm-swiglu-tied-rope": dict(),
    "mha-layernorm-bias-untied-learned": dict(num_query_groups=8, normalization="LayerNorm", add_bias_linear=True,
                                              gated_linear_unit=False, tied=False, pos="learned_absolute"),
    "qk-layernorm-kv-channels": dict(qk_layernorm=True, kv_channels=16, num_attention_heads=4, num_query_groups=2),
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_sorting_without_slicing_keeps_logits(mcore, variant):
    model = make(**VARIANTS[variant])
    data = batches()
    before = logits(model, data)
    pruned, result = mp.prune(model, full_sizes(model), forward_loop=mp.make_forward_loop(data, progress=False))
    # the permutations are real (not identities), yet the function is the same
    assert not torch.equal(result.plan.hidden, torch.arange(model.config.hidden_size))
    assert not torch.equal(pruned.decoder.layers[0].mlp.linear_fc2.weight, model.decoder.layers[0].mlp.linear_fc2.weight)
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruned_model_is_what_megatron_builds_from_its_config(mcore, variant, tmp_path):
    opts = dict(VARIANTS[variant])
    model = make(**opts)
    data = batches()
    cfg = model.config
    groups, q = cfg.num_query_groups // 2, cfg.num_attention_heads // cfg.num_query_groups
    target = dict(hidden_size=48, ffn_hidden_size=64, num_layers=3, num_query_groups=groups,
                  num_attention_heads=groups * max(1, q // 2))  # fmt: skip
    pruned, result = mp.prune(model, target, forward_loop=mp.make_forward_loop(data, progress=False))
    for axis, value in target.items():
        assert getattr(result.config, axis) == value
    assert result.config.kv_channels == (cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads)
    fresh = build_tiny_gpt(result.config, vocab_size=VOCAB, tied=opts.get("tied", True),
                           position_embedding_type=opts.get("pos", "rope"))  # fmt: skip
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)
    assert result.params_after == sum(p.numel() for p in fresh.parameters()) < result.params_before


def test_statistics_equal_values_recomputed_from_captured_activations(mcore):
    model = make()
    data = batches()
    captured = {"fc2": [], "proj": [], "io": [], "norms": {}}
    for i, l in enumerate(model.decoder.layers):
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            captured["norms"][i, name] = []
            getattr(l, name).register_forward_hook(lambda m, a, o, key=(i, name): captured["norms"][key].append(o.clone()))
    layer = model.decoder.layers[1]
    hooks = [
        layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, a: captured["fc2"].append(a[0].clone())),
        layer.self_attention.linear_proj.register_forward_pre_hook(lambda m, a: captured["proj"].append(a[0].clone())),
        layer.register_forward_hook(lambda m, a, k, o: captured["io"].append((k["hidden_states"].clone(), o[0].clone())),
                                    with_kwargs=True),
    ]  # fmt: skip
    logits(model, data)
    for h in hooks:
        h.remove()
    for m in model.modules():
        m._forward_hooks.clear()
    loop = mp.make_forward_loop(data, progress=False)
    _, result = mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=loop, criteria="reference")
    imp = result.importance

    def minitron(xs):  # sqrt( sum over samples of (mean over sequence of |x|)^2 ), xs: list of [S, B, C]
        return torch.cat([x.abs().mean(0) for x in xs]).pow(2).sum(0).sqrt()

    torch.testing.assert_close(imp.ffn[2], minitron(captured["fc2"]))
    # hidden: a *sum* over every pre-sublayer norm output of its own L2-of-mean-abs statistic
    hidden = sum(minitron(outputs) for outputs in captured["norms"].values())
    torch.testing.assert_close(imp.hidden, hidden)
    heads = minitron(captured["proj"]).view(8, -1).norm(dim=1)
    torch.testing.assert_close(imp.heads[2], heads)
    cos = [torch.nn.functional.cosine_similarity(i, o, dim=-1).mean() for i, o in captured["io"]]
    assert imp.layers[2] == pytest.approx(sum(1 - c.item() for c in cos), rel=1e-5)
    # kept FFN channels are the top-64 by importance, in importance order
    assert torch.equal(result.plan.layers[2].ffn, descending(imp.ffn[2])[:64])


def test_heads_kept_are_the_top_of_each_group_and_groups_rank_by_importance(mcore):
    model = make()  # 8 heads in 4 groups (q = 2)
    data = batches()
    _, r = mp.prune(model, {"num_attention_heads": 4}, forward_loop=mp.make_forward_loop(data, progress=False))
    imp = r.importance.heads[1].view(4, 2)
    keep = r.plan.layers[1]
    assert keep.groups.tolist() == [0, 1, 2, 3]  # groups untouched when only heads are pruned
    assert keep.heads.view(-1).tolist() == imp.argmax(dim=1).tolist()
    _, r = mp.prune(model, {"num_attention_heads": 2, "num_query_groups": 2}, forward_loop=mp.make_forward_loop(data, progress=False))
    keep = r.plan.layers[1]
    assert keep.groups.tolist() == descending(imp.norm(dim=1))[:2].tolist()
    assert keep.heads.view(-1).tolist() == imp[keep.groups].argmax(dim=1).tolist()


def test_mha_model_can_lose_heads_by_pruning_query_groups(mcore):
    model = make(num_query_groups=8)  # MHA: every head is its own group
    data = batches()
    pruned, r = mp.prune(model, {"num_attention_heads": 5, "num_query_groups": 5},
                         forward_loop=mp.make_forward_loop(data, progress=False))  # fmt: skip
    assert r.config.num_attention_heads == r.config.num_query_groups == 5
    assert pruned.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] == 5 * 3 * 8
    assert torch.isfinite(logits(pruned, data)).all()


def test_depth_pruning_drops_an_identity_layer_first(mcore):
    model = make()
    with torch.no_grad():  # layer 3 adds nothing to the residual stream: block influence 0
        model.decoder.layers[2].self_attention.linear_proj.weight.zero_()
        model.decoder.layers[2].mlp.linear_fc2.weight.zero_()
    data = batches()
    before = logits(model, data)
    pruned, r = mp.prune(model, {"num_layers": 3}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert r.importance.layers[3] == pytest.approx(0.0, abs=1e-6)
    assert r.plan.dropped_layers == [3] and r.plan.kept_layers == [1, 2, 4]
    assert [layer.layer_number for layer in pruned.decoder.layers] == [1, 2, 3]
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)  # dropping an identity is exact


def test_scores_file_reuse_is_bit_identical_and_skips_calibration(mcore, tmp_path):
    model = make()
    data = batches()
    path = str(tmp_path / "scores.pt")
    target = {"hidden_size": 40, "ffn_hidden_size": 96, "num_layers": 3}
    first, r1 = mp.prune(model, target, forward_loop=mp.make_forward_loop(data, progress=False), scores_path=path)
    assert r1.calibrated

    def must_not_run(model):
        raise AssertionError("calibration ran although the scores file exists")

    second, r2 = mp.prune(model, target, forward_loop=must_not_run, scores_path=path)
    assert not r2.calibrated and r2.calibration_calls == len(data)
    a, b = first.state_dict(), second.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    other, _ = mp.prune(model, {"num_attention_heads": 4}, scores_path=path)  # another target, no forward_loop
    assert other.config.num_attention_heads == 4


def test_scores_file_of_another_model_is_refused(mcore, tmp_path):
    path = str(tmp_path / "scores.pt")
    data = batches()
    mp.prune(make(seed=0), {"ffn_hidden_size": 64}, forward_loop=mp.make_forward_loop(data, progress=False), scores_path=path)
    with pytest.raises(mp.ScoresFileError, match="different weights"):
        mp.prune(make(seed=1), {"ffn_hidden_size": 64}, scores_path=path)
    with pytest.raises(mp.ScoresFileError, match="ffn_hidden_size: file 128 vs model 256"):
        mp.prune(make(ffn_hidden_size=256), {"ffn_hidden_size": 64}, scores_path=path)
    with pytest.raises(mp.ScoresFileError, match="layernorm_epsilon: file 1e-05 vs model 0.01"):
        mp.prune(make(layernorm_epsilon=1e-2), {"ffn_hidden_size": 64}, scores_path=path)  # same weights
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a torch file")
    with pytest.raises(mp.ScoresFileError, match="not a readable megatron-prune scores file"):
        mp.prune(make(), {"ffn_hidden_size": 64}, scores_path=str(bogus))


def test_input_model_is_not_modified_and_pruned_model_trains(mcore):
    model = make()
    snapshot = copy.deepcopy(model.state_dict())
    data = batches()
    pruned, _ = mp.prune(model, {"hidden_size": 32, "ffn_hidden_size": 32, "num_attention_heads": 4},
                         forward_loop=mp.make_forward_loop(data, progress=False))  # fmt: skip
    for k, v in model.state_dict().items():
        assert v is None or torch.equal(v, snapshot[k]), k
    assert model.config.hidden_size == 64 and model.config.ffn_hidden_size == 128
    pruned.train()
    tokens = data[0]
    out = pruned(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None, labels=tokens)
    out.mean().backward()
    grads = [p.grad for p in pruned.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_calibration_resumes_by_adding_raw_sums(mcore, tmp_path):
    model = make()
    data = batches(n=6)
    path = str(tmp_path / "scores.pt")
    whole = mp.calibrate(model, mp.make_forward_loop(data, progress=False))
    mp.calibrate(model, mp.make_forward_loop(data[:2], progress=False), scores_path=path)
    with pytest.raises(mp.PruneConfigError, match="exists: pass extend=True"):
        mp.calibrate(model, mp.make_forward_loop(data[2:], progress=False), scores_path=path)
    resumed = mp.calibrate(model, mp.make_forward_loop(data[2:], progress=False), scores_path=path, extend=True)
    assert resumed.calls == whole.calls == 6
    for key in whole.keys():
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-6, atol=0)
    _, from_file = mp.prune(model, {"ffn_hidden_size": 64}, scores_path=path)
    _, direct = mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert torch.equal(from_file.plan.layers[1].ffn, direct.plan.layers[1].ffn)


def test_fused_norm_mapping_gives_the_local_spec_statistics(mcore):
    """Transformer Engine fuses the pre-sublayer norms into linear_qkv / linear_fc1 (`layer_norm_weight`).

    Emulate that layout on the local spec (move each norm's weight into the following linear, which then
    normalises its own input) and check the hidden statistics are those of the separate-norm model.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_prune.minitron.importance.hooks import collect_statistics
    from megatron_prune.minitron.importance.statistics import rms_norm

    def fuse_norms(model):  # the TE layout, emulated on the local spec
        for layer in model.decoder.layers:
            for norm_name, linear in (("input_layernorm", layer.self_attention.linear_qkv), ("pre_mlp_layernorm", layer.mlp.linear_fc1)):
                linear.layer_norm_weight = getattr(layer, norm_name).weight
                eps = linear.config.layernorm_epsilon
                linear.forward = (lambda f, w: lambda x, *a, **k: f(rms_norm(x, w, eps), *a, **k))(linear.forward, linear.layer_norm_weight)
                setattr(layer, norm_name, IdentityOp())
        return model

    model = make()
    data = batches()
    local = collect_statistics(model, mp.make_forward_loop(data, progress=False))
    fused = fuse_norms(make())  # same seed, same weights
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in fused.state_dict()
    torch.testing.assert_close(logits(fused, data), logits(model, data), atol=1e-5, rtol=0)
    emulated = collect_statistics(fused, mp.make_forward_loop(data, progress=False))
    for key in local.keys():
        torch.testing.assert_close(emulated[key], local[key], rtol=1e-4, atol=1e-6)
    # slicing the fused norm weights (the table's TE entries) gives the local-spec pruned model
    target = {"hidden_size": 40, "ffn_hidden_size": 64, "num_attention_heads": 4}
    loop = mp.make_forward_loop(data, progress=False)
    pruned_local, _ = mp.prune(model, target, forward_loop=loop)
    builder = lambda cfg: fuse_norms(build_tiny_gpt(cfg, vocab_size=VOCAB))  # noqa: E731
    pruned_fused, _ = mp.prune(fused, target, forward_loop=loop, model_builder=builder)
    torch.testing.assert_close(logits(pruned_fused, data), logits(pruned_local, data), atol=1e-5, rtol=0)


def test_block_spec_model_keeps_its_final_norm(mcore):
    """A model built from a block spec (per-layer specs + a final-norm spec) is rebuilt with that spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    def build(config):
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec = TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=IdentityOp)
        return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope").eval()

    torch.manual_seed(0)
    model = build(tiny_gpt_config())
    assert "decoder.final_layernorm.weight" not in model.state_dict()
    data = batches()
    pruned, result = mp.prune(model, {"num_layers": 3, "ffn_hidden_size": 64}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert isinstance(pruned.decoder.final_layernorm, IdentityOp) and len(pruned.decoder.layers) == 3
    fresh = build(result.config)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)


def test_block_spec_with_a_spec_per_layer_keeps_the_specs_of_the_surviving_layers(mcore):
    """Layers 1 and 3 have q/k layernorms, 2 and 4 not; layer 2 is an identity and is dropped: the pruned
    model holds layers of specs [qk, qk, plain], computes the same function, and is what Megatron builds."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    specs = [get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=i % 2 == 0) for i in range(4)]

    def build(config, layers):
        block = TransformerBlockSubmodules(layer_specs=[specs[n - 1] for n in layers])
        return GPTModel(config, block, vocab_size=VOCAB, max_sequence_length=32, position_embedding_type="rope").eval()

    torch.manual_seed(0)
    model = build(tiny_gpt_config(), [1, 2, 3, 4])
    with torch.no_grad():
        model.decoder.layers[1].self_attention.linear_proj.weight.zero_()
        model.decoder.layers[1].mlp.linear_fc2.weight.zero_()
    data = batches()
    pruned, result = mp.prune(model, {"num_layers": 3}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert result.plan.kept_layers == [1, 3, 4]
    has_qk_norm = [not isinstance(layer.self_attention.q_layernorm, IdentityOp) for layer in pruned.decoder.layers]
    assert has_qk_norm == [True, True, False]
    torch.testing.assert_close(logits(pruned, data), logits(model, data), atol=1e-5, rtol=0)
    fresh = build(result.config, [1, 3, 4])
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, data), logits(pruned, data), atol=0, rtol=0)


def test_rope_scaling_survives_the_rebuild(mcore):
    """Llama-3.x style rope scaling (a constructor argument the model does not keep) is reproduced."""
    torch.manual_seed(0)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(tiny_gpt_config(), get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                     max_sequence_length=32, position_embedding_type="rope", rope_scaling=True,
                     rope_scaling_factor=32.0, rotary_base=500000).eval()  # fmt: skip
    data = batches()
    before = logits(model, data)
    pruned, _ = mp.prune(model, full_sizes(model), forward_loop=mp.make_forward_loop(data, progress=False))
    assert torch.equal(pruned.rotary_pos_emb.inv_freq, model.rotary_pos_emb.inv_freq)
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


def test_module_train_eval_flags_follow_their_modules(mcore):
    model = make()
    with torch.no_grad():  # layer 2 is an identity, so depth pruning drops it
        model.decoder.layers[1].self_attention.linear_proj.weight.zero_()
        model.decoder.layers[1].mlp.linear_fc2.weight.zero_()
    model.train()
    model.decoder.layers[3].eval()  # a user choice the pruning must not overwrite
    data = batches()
    pruned, r = mp.prune(model, {"num_layers": 3}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert r.plan.kept_layers == [1, 3, 4]
    assert model.training and not model.decoder.layers[3].training and model.decoder.layers[2].training
    flags = [layer.training for layer in pruned.decoder.layers]
    assert flags == [True, True, False]  # old layer 4, now at position 2, is the one in eval mode
    assert pruned.training and pruned.output_layer.training and pruned.decoder.final_layernorm.training


def test_bf16_model_keeps_its_dtypes_and_statistics_are_float32(mcore):
    model = make(params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert torch.bfloat16 in dtypes.values()
    data = batches()
    before = logits(model, data).float()
    pruned, result = mp.prune(model, full_sizes(model), forward_loop=mp.make_forward_loop(data, progress=False))
    assert {n: p.dtype for n, p in pruned.named_parameters()} == dtypes
    assert result.importance.hidden.dtype == torch.float32 and result.importance.ffn[1].dtype == torch.float32
    torch.testing.assert_close(logits(pruned, data).float(), before, atol=2e-2, rtol=0)


@pytest.mark.parametrize("per_layer", [{"no_rope_freq": [0, 0, 1, 0]}, {"window_size": (3, 0), "window_attn_skip_freq": 2}])
def test_per_layer_config_fields_follow_the_surviving_layers(mcore, per_layer):
    """Megatron reads these fields by layer number: after dropping layer 2 the old layer 3 is layer 2."""
    model = make(**per_layer)
    with torch.no_grad():
        model.decoder.layers[1].self_attention.linear_proj.weight.zero_()
        model.decoder.layers[1].mlp.linear_fc2.weight.zero_()
    data = batches()
    before = logits(model, data)
    pruned, r = mp.prune(model, {"num_layers": 3}, forward_loop=mp.make_forward_loop(data, progress=False))
    assert r.plan.kept_layers == [1, 3, 4]
    field = next(iter(k for k in per_layer if k.endswith("freq")))
    expected = {"no_rope_freq": [0, 1, 0], "window_attn_skip_freq": [1, 1, 0]}[field]
    assert getattr(r.config, field) == expected
    torch.testing.assert_close(logits(pruned, data), before, atol=1e-5, rtol=0)


def test_scores_survive_vocabulary_padding(mcore, tmp_path):
    """Megatron pads the vocabulary to a multiple of TP: the same checkpoint reloaded at another TP has
    extra embedding rows. Its scores file must still be accepted."""
    path = str(tmp_path / "scores.pt")
    torch.manual_seed(0)
    a = build_tiny_gpt(tiny_gpt_config(), vocab_size=1100)
    mp.prune(a, {"ffn_hidden_size": 64}, forward_loop=mp.make_forward_loop(batches(), progress=False), scores_path=path)
    b = build_tiny_gpt(tiny_gpt_config(), vocab_size=1152)
    state = a.state_dict()
    padded = b.state_dict()["embedding.word_embeddings.weight"].clone()
    padded[:1100] = state["embedding.word_embeddings.weight"]
    b.load_state_dict({**state, "embedding.word_embeddings.weight": padded})
    _, r = mp.prune(b, {"ffn_hidden_size": 64}, scores_path=path)
    assert not r.calibrated


def test_given_importance_ranks_without_calibration(mcore):
    """`importance=` (e.g. a baseline) replaces the statistics: no forward_loop is needed, and the kept
    channels, heads and layers are exactly the top of the given importance."""
    from megatron_prune.errors import PruneConfigError
    from megatron_prune.minitron.ranking import Importance

    model = build_tiny_gpt(tiny_gpt_config())
    g = torch.Generator().manual_seed(0)
    imp = Importance.of(
        hidden=torch.rand(64, generator=g),
        ffn={n: torch.rand(128, generator=g) for n in range(1, 5)},
        heads={n: torch.rand(8, generator=g) for n in range(1, 5)},
        layers={1: 0.4, 2: 0.1, 3: 0.9, 4: 0.3},
    )
    target = {"hidden_size": 32, "ffn_hidden_size": 64, "num_layers": 3}
    pruned, result = mp.prune(model, target, importance=imp)
    assert result.plan.kept_layers == [1, 3, 4] and not result.calibrated
    assert torch.equal(result.plan.hidden, torch.argsort(imp.hidden, descending=True, stable=True)[:32])
    assert torch.equal(result.plan.layers[3].ffn, torch.argsort(imp.ffn[3], descending=True, stable=True)[:64])
    assert pruned.config.hidden_size == 32
    bad = Importance.of(hidden=imp.hidden[:10], ffn=imp.ffn, heads=imp.heads, layers=imp.layers)
    with pytest.raises(PruneConfigError, match=r"importance.hidden has shape \(10,\), expected \(64,\)"):
        mp.prune(model, target, importance=bad)
