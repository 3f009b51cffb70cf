"""Importance criteria: selection, the statistics each one reads, and what they rank (real tiny MCore models).

Invariants: each criterion's importance equals its formula recomputed from captured activations (output
contribution) or from the gradient of the loss with respect to a per-sample mask (Taylor); a head whose
output-projection columns are zero gets the lowest output-contribution score although its inputs are among
the largest (the case the reference's criterion gets wrong); bad criteria, a loop without backward for a
Taylor criterion, and a scores file without the needed statistic fail before calibrating, naming what is wrong.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.importance.criteria import CRITERIA, DEFAULT_CRITERIA, REFERENCE_CRITERIA, resolve_criteria
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB, SEQ = 128, 16
N, G, D = 8, 4, 8  # tiny_gpt_config: 8 heads in 4 query groups of head dim 8, hidden 64


def make(seed=0):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)


def batches(n=3, b=2):
    return [random_tokens(b, SEQ, VOCAB, seed=i) for i in range(n)]


def test_criteria_resolve_with_aliases_defaults_and_reference():
    chosen = resolve_criteria("heads=taylor, ffn=output_contribution")
    assert chosen == {**DEFAULT_CRITERIA, "num_attention_heads": "taylor", "ffn_hidden_size": "output_contribution"}
    assert resolve_criteria({"num_query_groups": "minitron"})["num_query_groups"] == "minitron"
    assert resolve_criteria("reference") == REFERENCE_CRITERIA and set(REFERENCE_CRITERIA.values()) == {"minitron", "block_influence"}
    assert set(DEFAULT_CRITERIA) == set(CRITERIA)


@pytest.mark.parametrize("spec, match", [
    ("tails=minitron", r"unknown axis 'tails'; valid axes: .*num_attention_heads.*heads"),
    ("heads=psychic", r"unknown criterion 'psychic' for heads; valid: minitron, output_contribution, taylor"),
    ("hidden=taylor", r"valid: minitron$"),
    ("heads", r"'heads' is not AXIS=CRITERION"),
])  # fmt: skip
def test_bad_criteria_are_named_with_the_valid_ones(spec, match):
    with pytest.raises(mp.PruneConfigError, match=match):
        resolve_criteria(spec)


def test_output_contribution_equals_explicit_products_of_captured_inputs(mcore):
    model, data = make(), batches()
    inputs = {"proj": [], "fc2": []}
    layer = model.decoder.layers[1]
    hooks = [layer.self_attention.linear_proj.register_forward_pre_hook(lambda m, a: inputs["proj"].append(a[0].detach().clone())),
             layer.mlp.linear_fc2.register_forward_pre_hook(lambda m, a: inputs["fc2"].append(a[0].detach().clone()))]  # fmt: skip
    mp.run_forward(model, data)
    for h in hooks:
        h.remove()
    _, result = mp.prune(model, {"num_attention_heads": 4, "ffn_hidden_size": 96}, mp.make_forward_loop(data, progress=False),
                         criteria="heads=output_contribution,groups=output_contribution,ffn=output_contribution")  # fmt: skip
    x, W = torch.cat(inputs["proj"]).flatten(0, 1), layer.self_attention.linear_proj.weight  # [T, N*d], [H, N*d]
    heads = torch.stack([(x[:, h * D : (h + 1) * D] @ W[:, h * D : (h + 1) * D].T).norm(dim=1).sum() for h in range(N)])
    q = N // G
    groups = torch.stack([(x[:, g * q * D : (g + 1) * q * D] @ W[:, g * q * D : (g + 1) * q * D].T).norm(dim=1).sum() for g in range(G)])
    torch.testing.assert_close(result.importance.heads[2], heads.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.importance.groups[2], groups.detach(), rtol=1e-4, atol=1e-5)
    f, W2 = torch.cat(inputs["fc2"]).flatten(0, 1), layer.mlp.linear_fc2.weight  # [T, F], [H, F]
    torch.testing.assert_close(result.importance.ffn[2], (f.abs().sum(0) * W2.norm(dim=0)).detach(), rtol=1e-4, atol=1e-5)
    assert result.criteria["num_attention_heads"] == "output_contribution"


def test_taylor_equals_the_gradient_of_a_per_sample_mask(mcore):
    """Taylor statistic of head h: sum over samples b of |dL/dm[b, h]|, where m multiplies head h's input of
    linear_proj in sample b and L is the sample's micro-batch's mean next-token loss (whatever the number of
    micro-batches or their split over data-parallel replicas)."""
    model, data = make(), batches()
    _, result = mp.prune(model, {"num_attention_heads": 4}, mp.make_forward_loop(data, progress=False, backward=True),
                         criteria="heads=taylor,groups=taylor,ffn=taylor")  # fmt: skip
    proj = model.decoder.layers[0].self_attention.linear_proj
    expected = torch.zeros(N)
    for tokens in data:
        mask = torch.ones(tokens.shape[0], N, requires_grad=True)  # [B, N]
        hook = proj.register_forward_pre_hook(lambda m, a: (a[0] * mask.repeat_interleave(D, dim=1).unsqueeze(0),))
        losses = model(tokens, torch.arange(SEQ).expand_as(tokens), attention_mask=None, labels=torch.roll(tokens, -1, 1))
        losses[:, :-1].mean().backward()
        hook.remove()
        expected += mask.grad.abs().sum(0)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(result.importance.heads[1], expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradients behind


def test_zeroed_head_has_the_lowest_output_contribution_despite_the_largest_inputs(mcore):
    model, data = make(), batches()
    layer, h = model.decoder.layers[0], 2  # head 2: first head of query group 1
    with torch.no_grad():
        qkv = layer.self_attention.linear_qkv.weight.view(G, N // G + 2, D, -1)
        qkv[1, N // G + 1] *= 10  # group 1's V rows: its heads' inputs to linear_proj are 10x the others'
        layer.self_attention.linear_proj.weight[:, h * D : (h + 1) * D] = 0  # head 2 adds nothing to the residual
    loop = mp.make_forward_loop(data, progress=False)
    _, ref = mp.prune(model, {"num_attention_heads": 4}, loop, criteria="reference")
    _, ours = mp.prune(model, {"num_attention_heads": 4}, loop)  # the default: output_contribution
    minitron, contribution = ref.importance.heads[1], ours.importance.heads[1]
    others = [i for i in range(N) if i // (N // G) != 1]
    assert minitron[h] > 3 * minitron[others].max()  # the reference sees the largest inputs...
    assert contribution[h] == 0 and int(contribution.argmin()) == h  # ...but the head contributes nothing
    assert ours.orders.layers[1].heads[1].tolist() == [1, 0]  # within group 1 it ranks last


def test_taylor_needs_a_loop_that_runs_backward_before_calibrating(mcore):
    model, calls = make(), []

    def forward_only(m):
        calls.append(1)

    with pytest.raises(mp.PruneConfigError, match=r"num_attention_heads=taylor need gradients.*make_forward_loop\(batches, backward=True\)"):
        mp.prune(model, {"num_attention_heads": 4}, forward_only, criteria="heads=taylor")
    assert not calls
    with pytest.raises(mp.PruneConfigError, match="cannot be combined with criteria"):
        mp.prune(model, {"num_attention_heads": 4}, forward_only, criteria="heads=taylor", importance=object())


def test_scores_file_without_the_statistic_names_it_and_asks_to_recalibrate(mcore, tmp_path):
    model, data, scores = make(), batches(), str(tmp_path / "scores.pt")
    mp.calibrate(model, mp.make_forward_loop(data, progress=False), scores_path=scores)  # forward only: no Taylor sums
    _, result = mp.prune(model, {"num_query_groups": 2, "num_attention_heads": 4}, scores_path=scores, criteria="groups=minitron")  # switch: no pass
    assert not result.calibrated
    with pytest.raises(mp.ScoresFileError, match=r"num_attention_heads=taylor needs statistic 'proj_heads_taylor'.*"
                                                 r"Calibration must run again with a forward loop that runs backward"):
        mp.prune(model, {"num_attention_heads": 4}, scores_path=scores, criteria="heads=taylor")


def test_zeroed_units_of_moe_and_mamba_layers_contribute_nothing(mcore):
    """Output contribution of routed experts, expert and shared-expert FFN channels and Mamba heads: a unit
    whose output-projection columns are zero scores exactly 0, the lowest of its layer."""
    from tests.test_hybrid import make as make_hybrid
    from tests.test_moe import make as make_moe

    moe, data = make_moe(), batches()
    mlp = moe.decoder.layers[0].mlp  # layer 1: MoE with a shared expert
    with torch.no_grad():
        mlp.experts.local_experts[2].linear_fc2.weight.zero_()  # expert 2
        mlp.experts.local_experts[0].linear_fc2.weight[:, 5] = 0  # channel 5 of expert 0
        mlp.shared_experts.linear_fc2.weight[:, 7] = 0  # channel 7 of the shared expert
    _, result = mp.prune(moe, {"num_moe_experts": 3}, mp.make_forward_loop(data, progress=False),
                         criteria="experts=output_contribution,moe_ffn=output_contribution,shared_ffn=output_contribution")  # fmt: skip
    imp = result.importance
    for values, unit in ((imp.experts[1], 2), (imp.moe_ffn[1][0], 5), (imp.shared_ffn[1], 7)):
        assert values[unit] == 0 and int(values.argmin()) == unit and values.max() > 0
    assert 2 not in result.plan.layers[1].experts.tolist()

    hybrid = make_hybrid()  # layer 1: Mamba, 8 heads of dim 16 in 2 groups
    with torch.no_grad():
        hybrid.decoder.layers[0].mixer.out_proj.weight[:, 5 * 16 : 6 * 16] = 0  # head 5 (group 1)
    _, result = mp.prune(hybrid, {"mamba_num_heads": 4}, mp.make_forward_loop(data, progress=False),
                         criteria="mamba_heads=output_contribution")  # fmt: skip
    heads = result.importance.mamba_heads[1]
    assert heads[5] == 0 and int(heads.argmin()) == 5 and 5 not in result.plan.layers[1].mamba_heads.tolist()


def test_nas_candidates_are_ranked_by_the_chosen_criteria_and_cached_per_criteria(mcore, tmp_path):
    """A candidate keeps what the chosen criteria rank first (the winner equals a manual prune to its sizes
    with the same criteria), and cached candidate scores are kept apart per criteria."""
    from tests.stages import global_state_dict

    model, data, scores = make(), batches(), str(tmp_path / "scores.pt")
    loop = mp.make_forward_loop(data, progress=False, backward=True)
    search = dict(hidden_size_divisor=16, ffn_hidden_size_divisor=32, num_layers_divisor=1, max_width_pruning=0.6,
                  max_depth_pruning=0.5, top_k=2)  # fmt: skip
    seen = []

    def score(m):
        seen.append(1)
        return float(m.decoder.layers[0].self_attention.linear_proj.weight.abs().sum())  # depends on the heads kept

    for spec in ("heads=taylor,ffn=taylor", "heads=minitron"):
        pruned, result = mp.prune(model, constraints={"params": 110_000}, forward_loop=loop, scores_path=scores,
                                  score_func=score, search=search, criteria=spec)  # fmt: skip
        manual, _ = mp.prune(model, result.search.best.export_config, scores_path=scores, criteria=spec)
        assert all(torch.equal(a, b) for a, b in zip(global_state_dict(pruned).values(), global_state_dict(manual).values()))
    assert len(seen) == 4  # the second criteria's candidates were scored afresh, not read from the first's cache
    mp.prune(model, constraints={"params": 110_000}, scores_path=scores, score_func=score, search=search, criteria="heads=minitron")
    assert len(seen) == 4  # ...and its own cache serves a rerun


def test_taylor_calibration_frees_each_micro_batchs_activations(mcore):
    """The gradient hooks must not keep the inputs they score alive after backward (a reference cycle
    through autograd's hook table that gc cannot collect grew memory by a micro-batch's activations each)."""
    import gc
    import weakref

    from megatron_prune.minitron.importance.hooks import LAYER_SITES, collect_statistics

    model, refs = make(), []
    spy = model.decoder.layers[0].self_attention.linear_proj.register_forward_pre_hook(lambda m, a: refs.append(weakref.ref(a[0])))
    collect_statistics(model, mp.make_forward_loop(batches(), progress=False, backward=True), [s.name for s in LAYER_SITES])
    spy.remove()
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)


def test_taylor_sums_do_not_depend_on_how_the_batches_are_split(mcore, tmp_path):
    """One calibration over 3 micro-batches equals a calibration over 2 extended by one over the third (as DP
    replicas or a resumed job split them); a loop that claims to run backward but does not, and extending a
    file with the other kind of loop, are errors."""
    model, data, scores = make(), batches(), str(tmp_path / "scores.pt")
    whole = mp.calibrate(model, mp.make_forward_loop(data, progress=False, backward=True))
    mp.calibrate(model, mp.make_forward_loop(data[:2], progress=False, backward=True), scores_path=scores)
    parts = mp.calibrate(model, mp.make_forward_loop(data[2:], progress=False, backward=True), scores_path=scores, extend=True)
    for key in ("layer1/proj_heads_taylor", "layer2/fc2_taylor", "layer3/proj_groups_taylor"):
        torch.testing.assert_close(parts[key], whole[key], rtol=1e-5, atol=1e-9)
    with pytest.raises(mp.PruneConfigError, match="calibrated with a backward pass: extend it with a forward loop that runs backward"):
        mp.calibrate(model, mp.make_forward_loop(data, progress=False), scores_path=scores, extend=True)

    def pretends(m):
        mp.run_forward(m, data)

    pretends.runs_backward = True
    with pytest.raises(mp.PruneConfigError, match="no gradient reached the model's layers"):
        mp.prune(model, {"num_attention_heads": 4}, pretends, criteria="heads=taylor")


def test_calibration_computes_each_gram_once(mcore, monkeypatch):
    """The column Gram blocks of linear_proj (for heads and groups) are computed once per layer for a whole
    calibration, not once per micro-batch (recomputing them cost as much as linear_proj itself)."""
    import megatron_prune as mp
    from megatron_prune.minitron.importance import statistics as S

    calls = []
    gram = S.gram_blocks
    monkeypatch.setattr(S, "gram_blocks", lambda w, q, d: calls.append(d) or gram(w, q, d))
    model = build_tiny_gpt(tiny_gpt_config())
    mp.prune(model, {"num_attention_heads": 4}, mp.make_forward_loop([random_tokens(2, 16, 128, seed=i) for i in range(5)], progress=False))
    assert len(calls) == 4  # one per layer (heads and groups share it), for 5 micro-batches
