"""MoE layers at parallel layouts (torchrun, gloo; the allgather and the alltoall token dispatchers), each from the
same weights, batches and target as one process:
  EP=2          each rank holds half the routed experts, the dense weights are data-parallel;
  TP=2          every linear split over the two ranks, routed experts' too (expert TP = 2);
  TP=2, ETP=1   attention, dense MLP and shared expert split, routed experts whole on both ranks;
  TP=2, EP=2    four ranks: experts spread over two EP ranks, each split over two expert-TP ranks.
Expert statistics are gathered over the expert-TP and EP ranks, each micro-batch counted once per expert (tokens
that several ranks hold are counted by one); kept experts are renumbered in importance order and re-distributed over
the EP ranks of the pruned model. Orders, pruned weights, logits and parameter counts equal one process's, and a
scores file serves every layout."""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import inventory_of
from tests.test_moe import batches, logits, make
from tests.stages import assert_same_orders_and_weights
from tests.torchrun import REPO_ROOT, run_torchrun
from tests.workers.moe_layouts import DISPATCHER

pytestmark = pytest.mark.heavy  # torchrun worlds

EXPORT = {"num_moe_experts": 2, "moe_ffn_hidden_size": 16, "hidden_size": 48, "num_layers": 3,
          "moe_shared_expert_intermediate_size": 32, "ffn_hidden_size": 64}  # fmt: skip
LAYOUTS = {  # name: (ranks, TP, EP, expert TP, token dispatcher)
    "ep2": (2, 1, 2, 1, "allgather"), "tp2": (2, 2, 1, 2, "allgather"), "tp2-etp1": (2, 2, 1, 1, "allgather"),
    "ep2-alltoall": (2, 1, 2, 1, "alltoall"), "tp2-alltoall": (2, 2, 1, 2, "alltoall"),
    "tp2-ep2": (4, 2, 2, 2, "allgather"), "tp2-ep2-alltoall": (4, 2, 2, 2, "alltoall"),
}  # fmt: skip


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process: the model, its logits, and its prune (statistics kept in OUT/one-scores.pt); OUT/case.pt for the
    workers."""
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    out = tmp_path_factory.mktemp("moe_layouts")
    model, data = make(**DISPATCHER), batches()
    scores = str(out / "one-scores.pt")
    pruned, result = mp.prune(model, EXPORT, forward_loop=mp.make_forward_loop(data, progress=False), scores_path=scores)
    torch.save({"state_dict": model.state_dict(), "export_config": EXPORT, "batches": data, "scores": scores},
               out / "case.pt")  # fmt: skip
    return {"model": model, "data": data, "out": out, "unpruned": logits(model, data), "pruned": pruned,
            "result": result, "logits": logits(pruned, data)}  # fmt: skip


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, one):
    out = one["out"] / request.param
    out.mkdir()
    ranks, *layout = LAYOUTS[request.param]
    run_torchrun(REPO_ROOT / "tests" / "workers" / "moe_layouts.py", ranks, one["out"] / "case.pt", out, *layout)
    return request.param, torch.load(out / "layout.pt", weights_only=False), out


def test_layout_prunes_moe_layers_exactly_as_one_process(one, layout):
    name, record, _ = layout
    result = one["result"]
    torch.testing.assert_close(record["unpruned_logits"], one["unpruned"], rtol=1e-5, atol=1e-5)  # the shards load
    torch.testing.assert_close(record["sorted_logits"], record["unpruned_logits"], rtol=1e-5, atol=1e-5)  # sort-only
    assert_same_orders_and_weights(record, result, one["pruned"])
    assert_same_orders_and_weights({**record, "weights": record["reused_weights"]}, result, one["pruned"])  # one process's scores
    assert any(not torch.equal(k.experts, torch.arange(2)) for k in result.plan.layers.values() if k.experts is not None)
    _, tp, ep, etp, _ = LAYOUTS[name]
    assert record["local_experts"] == 2 // ep  # 2 kept experts over the EP ranks
    assert record["expert_fc1_rows"] == 2 * 32 // etp and record["shared_fc1_rows"] == 2 * 48 // tp  # the layout's split
    torch.testing.assert_close(record["logits"], one["logits"], rtol=1e-5, atol=1e-5)
    assert (record["params_before"], record["params_after"]) == (result.params_before, result.params_after)
    single = inventory_of(one["model"], ParallelContext()).count(result.export_config, kept_layers=result.plan.kept_layers)
    assert record["counted"] == (single.params, single.active_params) and single.params == result.params_after  # analytic = live


def test_layout_statistics_equal_one_process(one, layout):
    """Every raw statistic of the layout's scores file equals one process's: expert statistics gathered over the
    expert-TP and EP ranks, each copy of a micro-batch that several ranks hold counted once (a double count would
    scale some statistics and not others), dense ones summed over data-parallel replicas."""
    from megatron_prune.minitron.importance.scores_file import read_scores_file

    mine, theirs = (read_scores_file(str(p))["statistics"] for p in (one["out"] / "one-scores.pt", layout[2] / "layout-scores.pt"))
    assert mine["sums"].keys() == theirs["sums"].keys() and mine["calls"] == theirs["calls"]
    assert any("expert" in k for k in mine["sums"])
    for key, value in mine["sums"].items():
        torch.testing.assert_close(theirs["sums"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    reused, _ = mp.prune(one["model"], EXPORT, scores_path=str(layout[2] / "layout-scores.pt"))  # serves one process
    for key, value in one["pruned"].state_dict().items():
        if not key.endswith("_extra_state"):
            assert torch.equal(reused.state_dict()[key], value), key


def test_sizes_a_layout_cannot_split_fail_before_calibration_on_every_rank(layout):
    name, record, _ = layout
    _, tp, ep, etp, _ = LAYOUTS[name]
    errors = record["errors"]
    assert "below moe_router_topk=2" in errors["num_moe_experts=1"], errors
    expected = {"num_moe_experts=3": "is not divisible by the expert-parallel size 2",
                "moe_ffn_hidden_size=15": "is not divisible by the expert tensor-parallel size 2",
                "moe_shared_expert_intermediate_size=47": "is not divisible by the tensor-parallel size 2"}  # fmt: skip
    applies = {"num_moe_experts=3": ep > 1, "moe_ffn_hidden_size=15": etp > 1, "moe_shared_expert_intermediate_size=47": tp > 1}
    for target, message in expected.items():
        assert (message in errors[target]) if applies[target] else target not in errors, (target, errors)


def test_dispatchers_that_hide_where_tokens_came_from_are_refused_with_the_fix(mcore):
    from megatron_prune.minitron.model_checks import _moe_problem
    from megatron_prune.minitron.runtime.parallel import ParallelContext
    from tests.tiny import tiny_moe_config

    ep2 = ParallelContext(ep_size=2, dp_size=2, dp_rank=0)
    message = _moe_problem(tiny_moe_config(moe_token_dispatcher_type="flex"), ep2)
    assert "calibrate with the 'allgather' or 'alltoall' dispatcher" in message
    assert _moe_problem(tiny_moe_config(moe_token_dispatcher_type="alltoall"), ep2) is None
    one_per_rank = ParallelContext(ep_size=4, etp_size=2, tp_size=2, dp_size=4, dp_rank=0)  # 4 experts over EP=4
    message = _moe_problem(tiny_moe_config(moe_token_dispatcher_type="alltoall", expert_tensor_parallel_size=2), one_per_rank)
    assert "one expert per rank" in message and "'allgather'" in message


CLI_LAYOUTS = {"ep2": ["--expert-model-parallel-size", "2"], "tp2": ["--tensor-model-parallel-size", "2"],
               "tp2-etp1": ["--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]}  # fmt: skip
CLI_MODELS = {  # Hugging Face family: (builder overrides, targets, layouts run)
    "qwen3_moe": ({}, ["--target-num-moe-experts", "2", "--target-moe-ffn-hidden-size", "16", "--target-hidden-size", "48"],
                  list(CLI_LAYOUTS)),
    "deepseek_v3": ({"num_hidden_layers": 3}, ["--target-num-moe-experts", "2", "--target-hidden-size", "48",
                                               "--target-num-attention-heads", "2"], ["ep2", "tp2"]),
}  # fmt: skip
CLI_ARGS = ["--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2", "--save-format", "hf", "--no-report"]


@pytest.fixture(scope="module")
def hf_moe(request, tmp_path_factory):
    """A tiny MoE Hugging Face model (Qwen3-MoE; DeepSeek-V3: MLA, a dense first layer, a shared expert) and its prune
    by one process on the command line."""
    from tests.tiny_hf import make_hf_model

    family = request.param
    overrides, targets, _ = CLI_MODELS[family]
    out = tmp_path_factory.mktemp(family)
    argv = ["--hf-model", make_hf_model(out / family, family, **overrides), *targets, *CLI_ARGS]
    run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 1, *argv, "--output-dir", out / "one")
    return family, argv, out


@pytest.mark.parametrize("hf_moe, layout", [(f, layout) for f in CLI_MODELS for layout in CLI_MODELS[f][2]],
                         indirect=["hf_moe"])  # fmt: skip
def test_command_line_prunes_a_moe_checkpoint_at_a_layout_as_one_process(hf_moe, layout):
    """The command line under torchrun on tiny MoE Hugging Face models at EP=2, TP=2 (experts split too) and TP=2 with
    whole experts: imported through Megatron-Bridge in that layout with the model's own token dispatcher (alltoall),
    calibrated, pruned (experts re-distributed at EP) and exported back to Hugging Face with the logits checked both
    ways: the same files as one process."""
    import json

    from safetensors.torch import load_file

    family, argv, out = hf_moe
    run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 2, *argv, "--output-dir", out / layout, *CLI_LAYOUTS[layout])
    one, here = (load_file(str(out / o / "hf" / "model.safetensors")) for o in ("one", layout))
    assert one.keys() == here.keys() and any(".experts.1." in k for k in one) and not any(".experts.2." in k for k in one)
    for key in one:
        assert torch.equal(one[key], here[key]), key
    summary = json.loads((out / layout / "prune_summary.json").read_text())
    assert all(c["ok"] for c in summary["roundtrip_checks"]) and len(summary["roundtrip_checks"]) == 2
