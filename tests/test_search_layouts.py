"""Tier 2, multi-rank: NAS under PP=2, TP=2 and DP=2 (real torchrun + gloo processes).

The analytic counts equal the live parameter count summed over all stages and TP shards; both score
functions give the single-process values; every rank reaches the same winner as one process, with the
same pruned weights; candidates whose depth would empty a pipeline stage are dropped.
"""

import json

import pytest
import torch

import megatron_prune as mp
from tests.stages import global_state_dict
from tests.test_search_nas import SEARCH
from tests.test_search_scores import QUESTIONS, CharTokenizer
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config
from tests.torchrun import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

LAYOUTS = ("pp2", "tp2", "dp2")
CONSTRAINTS = {"params": 110_000}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    out = tmp_path_factory.mktemp("search_layouts")
    questions = out / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "choices": c, "answer": i % len(c)}) + "\n" for i, (q, c) in enumerate(QUESTIONS)))
    torch.manual_seed(0)
    model = build_tiny_gpt(tiny_gpt_config(), vocab_size=128, max_seq_length=128)
    batches = [random_tokens(2, 16, 128, seed=i) for i in range(4)]
    held_out = [random_tokens(2, 16, 128, seed=100 + i) for i in range(4)]
    search = dict(SEARCH, top_k=4)
    case = {"state_dict": model.state_dict(), "batches": batches, "held_out": held_out, "questions": str(questions),
            "constraints": CONSTRAINTS, "search": search}  # fmt: skip
    torch.save(case, out / "case.pt")
    run_torchrun(REPO_ROOT / "tests/workers/search_layouts.py", 2, out / "case.pt", out, timeout=600)
    pruned, result = mp.prune(model, constraints=CONSTRAINTS, forward_loop=mp.make_forward_loop(batches, progress=False),
                              score_func=mp.lm_loss_score(held_out), search=search)  # fmt: skip
    reference = {
        "lm": mp.lm_loss_score(held_out)(model),
        "mc": mp.multiple_choice_score(str(questions), CharTokenizer(), batch_size=2)(model),
        "search": result.search,
        "weights": global_state_dict(pruned),
    }
    load = lambda name, r: torch.load(out / f"{name}-rank{r}.pt", weights_only=False)  # noqa: E731
    return {"reference": reference, "load": load}


@pytest.mark.parametrize("name", ["pp2", "tp2"])
def test_counts_equal_the_live_model_over_all_stages_and_shards(runs, name):
    rows = runs["load"](name, 0)["counts"]
    assert len(rows) == 12 and rows == runs["load"](name, 1)["counts"]
    for variant, sizes, analytic, live in rows:
        assert analytic == live, (variant, sizes)
    assert len({live for _, _, _, live in rows}) == 12  # every case is a different model


@pytest.mark.parametrize("name", LAYOUTS)
def test_score_functions_equal_one_process(runs, name):
    ref = runs["reference"]
    for rank in (0, 1):  # the same value on every rank, also on the first pipeline stage
        got = runs["load"](name, rank)
        assert got["lm"] == pytest.approx(ref["lm"], rel=1e-6)
        assert got["mc"] == pytest.approx(ref["mc"], abs=1e-12)


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_rank_reaches_the_single_process_winner(runs, name):
    ref = runs["reference"]["search"]
    a, b = runs["load"](name, 0), runs["load"](name, 1)
    assert a["nas"] == b["nas"]  # ranks agree on scores and winner
    assert [(c, n) for c, n, _ in a["nas"]["candidates"]] == [(c.export_config, c.counts.params) for c in ref.candidates]
    assert [s for _, _, s in a["nas"]["candidates"]] == pytest.approx([c.score for c in ref.candidates], rel=1e-6)
    assert a["nas"]["winner"] == ref.winner
    weights = a["weights"] if name != "pp2" else {**a["weights"], **b["weights"]}
    expected = runs["reference"]["weights"]
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(weights[key], value), key


def test_candidates_that_would_empty_a_stage_are_dropped(runs):
    got = runs["load"]("uneven", 0)
    assert got["ranking"][-1] == 1  # layer 1 (alone on stage 0) is an identity: the first to drop
    assert got["candidates"] and all(c["num_layers"] == 4 for c in got["candidates"])
    ref = [c.export_config for c in runs["reference"]["search"].candidates]
    assert any(c["num_layers"] == 3 for c in ref)  # one process keeps such candidates
    assert "num_layers']=3 would leave pipeline stage(s) [0] without layers" in got["error"]
