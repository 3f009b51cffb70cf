"""Depth controls: explicit layers to drop, protected layers, iterative (SLEB-style) depth scoring.

Invariants: the layers dropped are exactly the ones asked for; a protected layer survives every prune and every
NAS candidate; the layer ranking is a permutation with protected layers first and dropped ones last; iterative
scoring drops a planted identity layer first and re-scores after each drop; bad input fails before calibration.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.depth import DepthOptions, parse_layer_list
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB, SEQ = 128, 16


def batches(n=3, seed=0):
    return [random_tokens(2, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def make(num_layers=6, seed=0):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_gpt_config(num_layers=num_layers), vocab_size=VOCAB)


def loop(data=None):
    return mp.make_forward_loop(data or batches(), progress=False)


def no_forward(model):
    raise AssertionError("calibration ran although the input is invalid")


def layer_weights(model, n):
    """The weights of layer n (1-indexed position in the decoder)."""
    return {k: v for k, v in model.decoder.layers[n - 1].state_dict().items() if torch.is_tensor(v)}


# --- pure logic -----------------------------------------------------------------------------------------------


def test_resolve_words_negatives_and_ranking_invariant():
    symbols = list("M*M-M*")  # a hybrid: attention at layers 2 and 6
    d = DepthOptions(layers_to_drop=(3,), protected_layers=("first", -1, "attention")).resolve(6, symbols)
    assert d.protected == (1, 2, 6) and d.layers_to_drop == (3,)
    ranking = d.ranking([3, 5, 6, 1, 4, 2])
    assert ranking == [6, 1, 2, 5, 4, 3]  # protected first (in ranking order), dropped last, the rest in order
    assert sorted(ranking) == list(range(1, 7))
    assert d.check_target(6, None) == 5
    assert parse_layer_list("1,5-7, last -2") == [1, 5, 6, 7, "last", -2]
    assert DepthOptions.of({"protected_layers": "last", "layers_to_drop": 2}).resolve(6, symbols).protected == (6,)


@pytest.mark.parametrize("options, message", [
    ({"layers_to_drop": [0]}, r"depth.layers_to_drop: layer 0 is out of range 1..6"),
    ({"layers_to_drop": [7]}, r"layer 7 is out of range"),
    ({"layers_to_drop": [2, 2]}, r"layer 2 is listed twice"),
    ({"layers_to_drop": [2], "protected_layers": [2]}, r"layers \[2\] are both protected and in layers_to_drop"),
    ({"protected_layers": ["middle"]}, r"'middle' is not a layer number or one of first, last, attention"),
    ({"protected_layers": [-7]}, r"layer -7 is out of range"),
    ({"layers_to_drop": [1, 2, 3, 4, 5, 6]}, r"would drop all 6 layers"),
    ({"protected_layers": ["attention"]}, None),  # a GPT: every layer has attention
    ({"depth": 3}, r"depth: unknown option\(s\) depth; known: iterative, layers_to_drop, protected_layers"),
])  # fmt: skip
def test_bad_depth_options(options, message):
    if message is None:
        assert DepthOptions.of(options).resolve(6, ["*-"] * 6).protected == (1, 2, 3, 4, 5, 6)
        return
    with pytest.raises(PruneConfigError, match=message):
        DepthOptions.of(options).resolve(6, ["*-"] * 6)


def test_attention_word_needs_attention_layers():
    with pytest.raises(PruneConfigError, match="no attention layers"):
        DepthOptions(protected_layers=("attention",)).resolve(3, list("M-M"))


# --- prune ----------------------------------------------------------------------------------------------------


def test_layers_to_drop_drops_exactly_those_layers(mcore):
    model = make()
    pruned, result = mp.prune(model, {}, loop(), depth={"layers_to_drop": [2, 5]})
    assert result.plan.dropped_layers == [2, 5] and result.config.num_layers == 4
    assert result.depth["layers_to_drop"] == [2, 5]
    for new, old in zip(range(1, 5), (1, 3, 4, 6)):  # sort-free here: only depth was pruned
        for k, v in layer_weights(pruned, new).items():
            assert torch.equal(v, layer_weights(model, old)[k]), (new, old, k)
    same, _ = mp.prune(model, {"num_layers": 4}, loop(), depth={"layers_to_drop": [2, 5]})  # an agreeing target
    assert same.config.num_layers == 4


def test_protected_layer_survives_where_the_ranking_would_drop_it(mcore):
    model = make()
    _, plain = mp.prune(model, {"num_layers": 4}, loop())
    victim = plain.plan.dropped_layers[0]
    _, guarded = mp.prune(model, {"num_layers": 4}, loop(), depth={"protected_layers": [victim, "last"]})
    assert victim in guarded.plan.kept_layers and 6 in guarded.plan.kept_layers
    assert len(guarded.plan.dropped_layers) == 2 and victim not in guarded.plan.dropped_layers
    assert guarded.depth["protected_layers"] == sorted({victim, 6})


@pytest.mark.parametrize("kwargs, depth, message", [
    (dict(export_config={"num_layers": 3}), {"layers_to_drop": [1, 2]}, r"export_config\['num_layers'\]=3 disagrees with depth.layers_to_drop"),
    (dict(export_config={"num_layers": 2}), {"protected_layers": [1, 2, 3]}, r"num_layers'\]=2 is fewer than the 3 protected layers"),
    (dict(constraints={"params": "80%"}, search={"top_k": 1}), {"layers_to_drop": [2]}, r"layers_to_drop fixes the depth, which NAS searches"),
    (dict(export_config={"num_layers": 4}, scores_path="/nonexistent/none.pt"), {"iterative": True}, None),
])  # fmt: skip
def test_bad_depth_input_fails_before_calibration(mcore, tmp_path, kwargs, depth, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    if message is None:  # iterative scoring needs forward passes: forward_loop is required
        with pytest.raises(PruneConfigError, match="depth.iterative .* needs forward_loop"):
            mp.prune(model, kwargs["export_config"], None, depth=depth)
    else:
        with pytest.raises(PruneConfigError, match=message):
            mp.prune(model, kwargs.pop("export_config", None), no_forward, depth=depth, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if torch.is_tensor(v))


def plant_identity(model, n):
    """Make layer n an identity: its attention and MLP output projections write zeros to the residual stream."""
    layer = model.decoder.layers[n - 1]
    with torch.no_grad():
        layer.self_attention.linear_proj.weight.zero_()
        layer.mlp.linear_fc2.weight.zero_()


def test_iterative_scoring_drops_a_planted_identity_first_and_rescores(mcore):
    model = make(seed=3)
    plant_identity(model, 4)
    calls = []
    data = batches()
    base = loop(data)

    def counting(m):
        calls.append(1)
        base(m)

    counting.calibration = base.calibration
    pruned, result = mp.prune(model, {"num_layers": 3}, counting, depth={"iterative": True})
    cost = result.depth["iterative_scoring"]
    assert cost["drop_order"][0] == 4 and cost["passes"] == 3 and len(calls) == 1 + 3  # calibration + 3 passes
    assert sorted(result.plan.dropped_layers) == sorted(cost["drop_order"])
    assert result.orders.layer_ranking[-1] == 4  # the first dropped is the least important
    # every pass after the first scored the model without the layers dropped so far: the re-scored ranking of the
    # survivors is what a one-shot calibration of the pruned-so-far model gives
    _, oneshot = mp.prune(model, {"num_layers": 3}, loop(data))
    assert 4 in oneshot.plan.dropped_layers


def test_iterative_ranking_equals_rescoring_by_hand(mcore):
    """After dropping layer v, the next pass's scores equal the block influence of a model whose layer v is an
    identity, computed independently."""
    from megatron_prune.minitron.depth import iterative_ranking
    from megatron_prune.minitron.importance.hooks import collect_statistics
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    model, data = make(seed=5), batches()
    ctx = ParallelContext.from_megatron()
    ranking, cost = iterative_ranking(model, loop(data), ctx, [1, 2, 3, 4, 5, 6], (), 4)
    first, second = cost["drop_order"]

    def influence(skip):
        hooks = [model.decoder.layers[n - 1].register_forward_hook(lambda m, a, k, out: (k["hidden_states"], *out[1:]), with_kwargs=True) for n in skip]  # noqa: E501
        try:
            stats = collect_statistics(model, loop(data), ("block",))
        finally:
            for h in hooks:
                h.remove()
        return {n: float(stats[f"layer{n}/block"]) for n in range(1, 7) if n not in skip}

    one = influence([])
    assert first == min(one, key=one.get)
    two = influence([first])
    assert second == min(two, key=two.get)
    assert ranking[-2:] == [second, first] and sorted(ranking) == [1, 2, 3, 4, 5, 6]


def test_nas_never_drops_a_protected_layer(mcore):
    model, data = make(), batches()
    _, plain = mp.prune(model, constraints={"params": "85%"}, forward_loop=loop(data), search={"top_k": 1, "max_depth_pruning": 0.5})
    assert plain.plan.dropped_layers, "the budget should make NAS drop layers"
    protect = plain.plan.dropped_layers
    _, guarded = mp.prune(model, constraints={"params": "85%"}, forward_loop=loop(data),
                          search={"top_k": 1, "max_depth_pruning": 0.5}, depth={"protected_layers": protect})  # fmt: skip
    assert not set(protect) & set(guarded.plan.dropped_layers)


# --- command line ---------------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_command_line_depth_flags(tmp_path, capsys, monkeypatch):
    """--layers-to-drop drops exactly those layers and exports a model of that depth; --protect-layers and
    --iterative-depth reach the prune and the summary; bad lists fail with exit 2 before the model is imported."""
    import json

    from megatron_prune.minitron.cli import main
    from tests.tiny_hf import make_hf_model

    source = make_hf_model(tmp_path / "llama", "llama", num_hidden_layers=5)
    common = ["--hf-model", str(source), "--calib-samples", "4", "--seq-length", "32", "--micro-batch-size", "2",
              "--save-format", "hf", "--no-report"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "a"), "--layers-to-drop", "2,4"]) == 0
    summary = json.loads((tmp_path / "a" / "prune_summary.json").read_text())
    assert summary["depth"]["layers_to_drop"] == [2, 4]
    assert json.loads((tmp_path / "a" / "hf" / "config.json").read_text())["num_hidden_layers"] == 3
    assert main([*common, "--output-dir", str(tmp_path / "b"), "--target-num-layers", "3", "--protect-layers", "first,-1",
                 "--iterative-depth", "--skip-roundtrip-check"]) == 0  # fmt: skip
    depth = json.loads((tmp_path / "b" / "prune_summary.json").read_text())["depth"]
    assert depth["protected_layers"] == [1, 5] and depth["iterative"] and depth["iterative_scoring"]["passes"] == 2
    assert not {1, 5} & set(depth["iterative_scoring"]["drop_order"])
    capsys.readouterr()

    def weights_read(*args, **kwargs):
        raise AssertionError("the model's weights were read before the input was checked")

    monkeypatch.setattr("megatron_prune.minitron.bridge.import_hf_model", weights_read)
    for flags, message in ((["--layers-to-drop", "6"], "layer 6 is out of range 1..5"),
                           (["--layers-to-drop", "2", "--protect-layers", "2"], "both protected and in layers_to_drop"),
                           (["--layers-to-drop", "2", "--target-num-layers", "3"], "disagrees with depth.layers_to_drop"),
                           (["--layers-to-drop", "last"], "--layers-to-drop 'last': give layer numbers"),
                           (["--layers-to-drop", "2", "--target-params", "80%"], "--layers-to-drop fixes the depth")):  # fmt: skip
        assert main([*common, "--output-dir", str(tmp_path / "c"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
