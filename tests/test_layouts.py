"""Tier 2, multi-rank: pruning does not depend on the parallel layout (real torchrun + gloo processes).

The same model and calibration data at TP=PP=1 (in this process), PP=2 (even and uneven stages), DP=2 and
TP=2 give identical orders and identical pruned weights (TP shards gathered), also for an MoE model (dense
and MoE layers mixed, at PP=2 and DP=2) and a hybrid Mamba model (PP=2, uneven); the pruned PP=2 and TP=2
models, stock Megatron models built from the pruned config, give the single-process pruned model's logits;
scores written at PP=2 or TP=2 are reused at TP=PP=1.
"""

import pytest
import torch

import megatron_prune as mp
from tests.stages import global_state_dict
from tests.test_hybrid import make as make_hybrid
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config, tiny_moe_config
from tests.torchrun import REPO_ROOT, run_torchrun
from tests.workers.prune_layouts import TAYLOR, TAYLOR_LAYOUTS

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

VOCAB, SEQ = 128, 16
EXPORT = {"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2, "num_layers": 3}
MOE_EXPORT = {"hidden_size": 48, "num_moe_experts": 3, "moe_ffn_hidden_size": 16, "moe_shared_expert_intermediate_size": 32,
              "ffn_hidden_size": 64, "num_layers": 3}  # fmt: skip
HYBRID_EXPORT = {"hidden_size": 48, "mamba_num_heads": 4, "mamba_head_dim": 8, "num_attention_heads": 2, "num_moe_experts": 3,
                 "num_layers": 4}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    out = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    model = build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)
    batches = [random_tokens(2, SEQ, VOCAB, seed=i) for i in range(6)]
    torch.manual_seed(2)
    mqa = build_tiny_gpt(tiny_gpt_config(num_query_groups=1), vocab_size=VOCAB)
    torch.manual_seed(1)
    moe = build_tiny_gpt(tiny_moe_config(), vocab_size=VOCAB)
    hybrid = make_hybrid()
    with torch.no_grad():  # layer 4 (Mamba) is an identity: dropped, stage 1 keeps one layer
        hybrid.decoder.layers[3].mixer.out_proj.weight.zero_()
    case = {"state_dict": model.state_dict(), "config": {}, "vocab": VOCAB, "batches": batches, "export_config": EXPORT,
            "moe_state_dict": moe.state_dict(), "moe_export_config": MOE_EXPORT, "mqa_state_dict": mqa.state_dict(),
            "hybrid_state_dict": hybrid.state_dict(), "hybrid_export_config": HYBRID_EXPORT}  # fmt: skip
    torch.save(case, out / "case.pt")
    run_torchrun(REPO_ROOT / "tests/workers/prune_layouts.py", 2, out / "case.pt", out, timeout=600)

    def reference(model, export_config, **kwargs):
        backward = "criteria" in kwargs  # Taylor criteria: a loop that runs backward
        loop = mp.make_forward_loop(batches, progress=False, backward=backward)
        pruned, result = mp.prune(model, export_config, forward_loop=loop, **kwargs)
        logits = torch.cat(mp.run_forward(pruned, batches, collect=lambda o, t: o.clone()))
        return {"weights": global_state_dict(pruned), "result": result, "logits": logits}

    load = lambda name, r: torch.load(out / f"{name}-rank{r}.pt", weights_only=False)  # noqa: E731
    return {"out": out, "model": model, "batches": batches, "reference": reference(model, EXPORT), "moe": reference(moe, MOE_EXPORT),
            "hybrid": reference(hybrid, HYBRID_EXPORT), "load": load,
            "taylor": reference(model, EXPORT, criteria=TAYLOR), "mqa": mqa}  # fmt: skip


def merged_weights(runs, name):
    a, b = runs["load"](name, 0)["weights"], runs["load"](name, 1)["weights"]
    if name in ("dp2", "tp2", "moe-dp2"):  # replicas (DP) or both holding the gathered full tensors (TP)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        return a
    return {**a, **b}


PP_LAYOUTS = {  # name: original global layer numbers on stage 0
    "pp2": {1, 2},
    "pp2-uneven": {1},
    "pp2-account": {1, 2},  # embedding and loss each count as a layer: [E t t | t t L]
    "pp2-empty-first": set(),  # "E|ttttL": stage 0 holds only the embedding, and keeps holding only that
}


@pytest.mark.parametrize("name", [*PP_LAYOUTS, "dp2", "tp2", "moe-pp2", "moe-dp2", "hybrid-pp2"])
def test_same_orders_and_weights_as_one_process(runs, name):
    ref = runs[name.split("-")[0] if name.startswith(("moe-", "hybrid-")) else "reference"]
    rank0 = runs["load"](name, 0)
    assert torch.equal(rank0["hidden_order"], ref["result"].orders.hidden)
    assert rank0["layer_orders"].keys() == ref["result"].orders.layers.keys()
    for n, orders in rank0["layer_orders"].items():  # ffn, heads, groups; routed experts and their channels
        for field, value in orders.items():
            expected = getattr(ref["result"].orders.layers[n], field)
            assert (value is None and expected is None) or torch.equal(value, expected), (n, field)
    weights = merged_weights(runs, name)
    assert weights.keys() == ref["weights"].keys()
    for key, value in ref["weights"].items():
        assert torch.equal(weights[key], value), key
    if name in ("dp2", "tp2", "moe-dp2"):  # float summation order differs (replica sums, TP all-reduce): equal up to rounding
        for n, s in rank0["layer_scores"].items():
            assert s == pytest.approx(ref["result"].importance.layers[n], rel=1e-5)
    else:  # a pipeline split changes no summation: bit-identical scores
        assert rank0["layer_scores"] == ref["result"].importance.layers


@pytest.mark.parametrize("name", TAYLOR_LAYOUTS)
def test_taylor_criteria_give_the_orders_of_one_process(runs, name):
    """Gradients reach the hooks through the schedule's backward (p2p at PP=2; TP-local inputs at TP=2)."""
    ref = runs["taylor"]["result"].orders.layers
    rank0 = runs["load"](name, 0)["taylor_orders"]
    assert rank0.keys() == ref.keys()
    for n, orders in rank0.items():
        for field in ("ffn", "groups", "heads"):
            assert torch.equal(orders[field], getattr(ref[n], field)), (name, n, field)


def test_fewer_kv_groups_than_tp_ranks_rank_heads_as_one_process(runs):
    loop = mp.make_forward_loop(runs["batches"], progress=False, backward=True)
    for spec, heads in runs["load"]("mqa-tp2", 0).items():
        ref = mp.prune(runs["mqa"], {"num_attention_heads": 4}, loop, criteria=spec)[1].orders.layers
        assert all(torch.equal(heads[n], ref[n].heads) for n in ref), spec


@pytest.mark.parametrize("name", PP_LAYOUTS)
def test_pruned_pipeline_model_matches_and_keeps_survivors_on_their_stage(runs, name):
    ref = runs["reference"]
    kept = ref["result"].plan.kept_layers
    first_stage = PP_LAYOUTS[name]
    expected = [[n for n in kept if n in first_stage], [n for n in kept if n not in first_stage]]
    rank1 = runs["load"](name, 1)
    assert rank1["stage_layers"] == expected
    counts = [len(s) for s in expected]
    layout = "None" if counts[0] == counts[1] else f"E{'t' * counts[0]}|{'t' * counts[1]}L"
    assert rank1["config_layout"] == layout
    assert rank1["params_after"] == ref["result"].params_after
    torch.testing.assert_close(rank1["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_pruned_moe_pipeline_model_matches(runs):
    ref = runs["moe"]
    rank1 = runs["load"]("moe-pp2", 1)
    assert rank1["stage_layers"] == [[n for n in ref["result"].plan.kept_layers if n <= 2], [n for n in ref["result"].plan.kept_layers if n > 2]]
    assert rank1["params_after"] == ref["result"].params_after
    torch.testing.assert_close(rank1["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_pruned_hybrid_pipeline_model_matches(runs):
    """Stage 0 holds "M*-", stage 1 "ME"; layer 4 (Mamba) is dropped, so the pruned stages hold 3 and 1 layers
    (MambaStack reads num_layers_in_first/last_pipeline_stage) and the pattern is "M*-E"."""
    ref = runs["hybrid"]
    assert ref["result"].plan.kept_layers == [1, 2, 3, 5]
    rank1 = runs["load"]("hybrid-pp2", 1)
    assert rank1["stage_layers"] == [[1, 2, 3], [5]]
    assert rank1["params_after"] == ref["result"].params_after
    torch.testing.assert_close(rank1["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_pruned_tensor_parallel_model_matches(runs):
    rank0 = runs["load"]("tp2", 0)
    assert rank0["params_after"] == runs["reference"]["result"].params_after
    torch.testing.assert_close(rank0["logits"], runs["reference"]["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["pp2", "tp2"])
def test_scores_from_another_layout_are_reused_at_one_process(runs, name):
    def must_not_run(model):
        raise AssertionError("calibration ran although scores exist")

    scores = str(runs["out"] / f"{name}-scores.pt")
    pruned, result = mp.prune(runs["model"], EXPORT, forward_loop=must_not_run, scores_path=scores)
    assert not result.calibrated
    for key, value in runs["reference"]["weights"].items():
        assert torch.equal(global_state_dict(pruned)[key], value), key


def test_a_stage_with_unsupported_modules_fails_every_stage_alike(runs):
    messages = [(runs["out"] / f"unsupported-error-rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == "(raised on rank 1) " + messages[1]  # rank 0 says where the error came from
    assert "unsupported module type Linear at 'decoder.layers.0.mlp.adapter', layer 3" in messages[0]
