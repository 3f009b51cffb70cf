"""MoE layers at expert parallelism 2 (torchrun, gloo, the allgather token dispatcher): each rank holds half the
routed experts and the dense weights are data-parallel. Expert statistics are gathered over the EP ranks (each
expert's own tokens from every rank) and summed over the expert's replicas; the kept experts are renumbered in
importance order and re-distributed over the EP ranks of the pruned model. Orders, pruned weights, logits and
parameter counts equal one process's, and a scores file serves both layouts."""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.search.counting import inventory_of
from tests.test_moe import batches, logits, make
from tests.stages import assert_same_orders_and_weights, prune_here_and_in_a_world
from tests.torchrun import REPO_ROOT, run_torchrun
from tests.workers.moe_ep import DISPATCHER

pytestmark = pytest.mark.heavy  # a torchrun world

EXPORT = {"num_moe_experts": 2, "moe_ffn_hidden_size": 16, "hidden_size": 48, "num_layers": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    out = tmp_path_factory.mktemp("moe_ep")
    model, data = make(**DISPATCHER), batches()
    before = logits(model, data)
    pruned, result = prune_here_and_in_a_world(model, data, EXPORT, out, "moe_ep.py")
    from_ep2, _ = mp.prune(model, EXPORT, scores_path=str(out / "ep2-scores.pt"))  # EP=2's statistics, one process
    return {"model": model, "unpruned": before, "pruned": pruned, "result": result, "logits": logits(pruned, data),
            "from_ep2": from_ep2, "ep2": torch.load(out / "ep2.pt", weights_only=False)}  # fmt: skip


def test_ep2_prunes_moe_layers_exactly_as_one_process(runs):
    ep2, result = runs["ep2"], runs["result"]
    torch.testing.assert_close(ep2["unpruned_logits"], runs["unpruned"], rtol=1e-5, atol=1e-5)  # the shards load
    assert_same_orders_and_weights(ep2, result, runs["pruned"])
    assert_same_orders_and_weights({**ep2, "weights": ep2["reused_weights"]}, result, runs["pruned"])  # one process's scores, reused
    assert any(not torch.equal(k.experts, torch.arange(2)) for k in result.plan.layers.values() if k.experts is not None)
    assert ep2["local_experts"] == 1  # 2 kept experts over 2 EP ranks
    torch.testing.assert_close(ep2["logits"], runs["logits"], rtol=1e-5, atol=1e-5)
    assert (ep2["params_before"], ep2["params_after"]) == (result.params_before, result.params_after)
    one = inventory_of(runs["model"], ParallelContext()).count(result.export_config, kept_layers=result.plan.kept_layers)
    assert ep2["counted"] == (one.params, one.active_params) and one.params == result.params_after  # analytic = live


def test_ep2_statistics_serve_one_process(runs):
    """The scores file written at EP=2 (experts gathered, dense statistics summed over the two data-parallel
    replicas) prunes one process's model to the same weights (up to float summation order of the DP sum)."""
    for key, value in runs["pruned"].state_dict().items():
        if not key.endswith("_extra_state"):
            assert torch.equal(runs["from_ep2"].state_dict()[key], value), key


def test_bad_expert_targets_at_ep2_fail_before_calibration_on_every_rank(runs):
    errors = runs["ep2"]["errors"]
    assert len(errors) == 2 and "not divisible by the expert-parallel size 2" in errors[0], errors
    assert "below moe_router_topk=2" in errors[1], errors


def test_alltoall_dispatcher_at_ep_is_refused_with_the_fix():
    from megatron_prune.minitron.model_checks import _moe_problem
    from megatron_prune.minitron.runtime.parallel import ParallelContext
    from tests.tiny import tiny_moe_config

    message = _moe_problem(tiny_moe_config(moe_token_dispatcher_type="alltoall"), ParallelContext(ep_size=2, dp_size=2, dp_rank=0))
    assert "calibrate with the 'allgather' dispatcher" in message


def test_command_line_prunes_a_qwen3_moe_checkpoint_at_ep2_as_at_ep1(tmp_path):
    """`--expert-model-parallel-size 2` under torchrun on a tiny Qwen3-MoE Hugging Face model: imported through
    Megatron-Bridge with its experts split over the two ranks, calibrated, pruned (experts re-distributed) and
    exported back to Hugging Face with the logits checked both ways: the same files as a run at EP=1."""
    from safetensors.torch import load_file

    from tests.tiny_hf import make_hf_model

    source = make_hf_model(tmp_path / "qwen3_moe", "qwen3_moe")
    argv = ["--hf-model", source, "--target-num-moe-experts", "2", "--target-moe-ffn-hidden-size", "16",
            "--target-hidden-size", "48", "--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2",
            "--save-format", "hf", "--no-report"]  # fmt: skip
    run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 2, *argv, "--output-dir", tmp_path / "ep2",
                 "--expert-model-parallel-size", "2")  # fmt: skip
    run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 1, *argv, "--output-dir", tmp_path / "ep1")
    ep1, ep2 = (load_file(str(tmp_path / o / "hf" / "model.safetensors")) for o in ("ep1", "ep2"))
    assert ep1.keys() == ep2.keys() and any(".experts.1." in k for k in ep1) and not any(".experts.2." in k for k in ep1)
    for key in ep1:
        assert torch.equal(ep1[key], ep2[key]), key
    import json

    summary = json.loads((tmp_path / "ep2" / "prune_summary.json").read_text())
    assert all(c["ok"] for c in summary["roundtrip_checks"]) and len(summary["roundtrip_checks"]) == 2
