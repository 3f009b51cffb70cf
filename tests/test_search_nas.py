"""Tier 2: NAS end to end on a tiny real MCore GPT (one process): the winner is the best-scoring candidate
among the closest fits (checked by brute force over models Megatron builds), it is applied by the same
machinery as a manual prune, candidates live one at a time, and an interrupted search resumes where it stopped."""

import itertools
import weakref

import pytest
import torch

import megatron_prune as mp
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB, SEQ = 128, 16
# hidden {16..64}/16 -> top 3, FFN {32..128}/32 -> top 3, heads per group {1, 2} -> both, layers {1..4} -> top 2
SEARCH = dict(hidden_size_divisor=16, ffn_hidden_size_divisor=32, num_layers_divisor=1, max_width_pruning=0.6,
              max_depth_pruning=0.5, top_k=5)  # fmt: skip
CHOICES = dict(hidden_size=[32, 48, 64], ffn_hidden_size=[64, 96, 128], num_attention_heads=[4, 8], num_layers=[3, 4])
BUDGET = {"params": 110_000}


def make(seed=0):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)


def loop(seed=0):
    return mp.make_forward_loop([random_tokens(2, SEQ, VOCAB, seed=seed + i) for i in range(4)], progress=False)


def sizes_of(model):
    """A candidate's sizes read from its tensors (not from its config)."""
    layer = model.decoder.layers[0]
    return dict(hidden_size=model.embedding.word_embeddings.weight.shape[1], ffn_hidden_size=layer.mlp.linear_fc2.weight.shape[1],
                num_attention_heads=layer.self_attention.linear_proj.weight.shape[1] // 8, num_layers=len(model.decoder.layers))  # fmt: skip


def preference(s):
    """A deterministic score that does not simply follow the parameter count."""
    return -abs(s["hidden_size"] - 48) / 16 - abs(s["ffn_hidden_size"] - 96) / 32 + s["num_attention_heads"] / 8 + s["num_layers"] / 4


def shape_score(model):
    return preference(sizes_of(model))


class Scorer:
    """`shape_score`, recording what it scored; raises on call number `fail_at` (a pre-empted job)."""

    def __init__(self, fail_at=None):
        self.scored, self.fail_at = [], fail_at

    def __call__(self, model):
        self.scored.append(sizes_of(model))
        if len(self.scored) == self.fail_at:
            raise RuntimeError("pre-empted")
        return shape_score(model)


def brute_force(budget, top_k):
    """Top-k by live parameter count of every combination Megatron builds, and the expected winner."""
    fits = []
    for values in itertools.product(*CHOICES.values()):
        s = dict(zip(CHOICES, values))
        model = build_tiny_gpt(tiny_gpt_config(**s, kv_channels=8), vocab_size=VOCAB)
        n = sum(p.numel() for p in model.parameters())
        if n <= budget:
            fits.append((n, s))
    fits.sort(key=lambda f: -f[0])  # stable: ties keep product order
    top = fits[:top_k]
    return top, max(range(len(top)), key=lambda i: (preference(top[i][1]), -i))


def test_winner_is_the_best_scoring_of_the_closest_fits(mcore, tmp_path):
    model = make()
    scorer = Scorer()
    path = str(tmp_path / "scores.pt")
    pruned, result = mp.prune(model, constraints=BUDGET, forward_loop=loop(), score_func=scorer, search=SEARCH, scores_path=path)
    top, winner = brute_force(BUDGET["params"], SEARCH["top_k"])
    assert winner > 0  # the closest fit is not the best: the scores decide
    found = result.search
    assert [c.export_config for c in found.candidates] == [s for _, s in top]
    assert [c.counts.params for c in found.candidates] == [n for n, _ in top]
    assert scorer.scored == [s for _, s in top]  # each candidate built as its config says, scored once, in order
    assert [c.score for c in found.candidates] == [preference(s) for _, s in top]
    assert found.winner == winner and found.best.export_config == top[winner][1]
    assert found.space == CHOICES and found.space_size == 36 and found.budgets == {"params": 110_000.0}
    assert sizes_of(pruned) == top[winner][1] and result.params_after == top[winner][0] == found.best.counts.params
    # the winner is exactly the manual prune of its export config (same statistics, same machinery)
    manual, _ = mp.prune(model, top[winner][1], scores_path=path)
    assert manual.state_dict().keys() == pruned.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(manual.state_dict().values(), pruned.state_dict().values()) if a is not None)


def test_interrupted_search_resumes_at_the_next_candidate(mcore, tmp_path):
    model = make()
    path = str(tmp_path / "scores.pt")
    first = Scorer(fail_at=3)
    with pytest.raises(RuntimeError, match="pre-empted"):
        mp.prune(model, constraints=BUDGET, forward_loop=loop(), score_func=first, search=SEARCH, scores_path=path)
    (entry,) = torch.load(path, weights_only=True)["search"].values()
    assert [c["score"] is not None for c in entry["candidates"]] == [True, True, False, False, False]

    def must_not_run(model):
        raise AssertionError("calibration ran again")

    second = Scorer()
    _, resumed = mp.prune(model, constraints=BUDGET, forward_loop=must_not_run, score_func=second, search=SEARCH, scores_path=path)
    assert second.scored == first.scored[2:] + [c.export_config for c in resumed.search.candidates[3:]]
    assert len(second.scored) == 3
    _, whole = mp.prune(model, constraints=BUDGET, forward_loop=loop(), score_func=Scorer(), search=SEARCH)
    assert resumed.search.winner == whole.search.winner
    assert [(c.export_config, c.score) for c in resumed.search.candidates] == [(c.export_config, c.score) for c in whole.search.candidates]
    third = Scorer()  # everything cached: nothing is built for scoring
    _, again = mp.prune(model, constraints=BUDGET, score_func=third, search=SEARCH, scores_path=path)
    assert third.scored == [] and again.search.best.export_config == whole.search.best.export_config
    other = Scorer()  # another budget is another search
    _, tighter = mp.prune(model, constraints={"params": 90_000}, score_func=other, search=SEARCH, scores_path=path)
    assert len(other.scored) == len(tighter.search.candidates) > 0
    assert len(torch.load(path, weights_only=True)["search"]) == 2


def test_one_candidate_model_at_a_time(mcore):
    alive = []

    def score(model):
        assert all(ref() is None for ref in alive), "a previous candidate is still in memory"
        alive.append(weakref.ref(model))
        return shape_score(model)

    mp.prune(make(), constraints=BUDGET, forward_loop=loop(), score_func=score, search=SEARCH)
    assert len(alive) == SEARCH["top_k"]


def test_budgets_combine_and_top_1_needs_no_score_function(mcore):
    model = make()
    search = dict(SEARCH, top_k=1)
    _, by_params = mp.prune(model, constraints={"params": 110_000}, forward_loop=loop(), search=search)
    assert by_params.search.best.score is None and by_params.search.best.counts.params == brute_force(110_000, 1)[0][0][0]
    memory = by_params.search.best.counts.memory_mb
    _, both = mp.prune(model, constraints={"memory_mb": memory - 0.01, "params": 110_000}, forward_loop=loop(),
                       search=search)  # fmt: skip
    best = both.search.best.counts
    assert best.memory_mb <= memory - 0.01 and best.params <= 110_000
    assert list(both.search.budgets) == ["params", "memory_mb"]  # priority order: params is the primary budget


def test_candidate_filter_and_skipped_axes(mcore):
    scorer = Scorer()
    search = dict(SEARCH, axes_to_skip=["num_layers"], candidate_filter=lambda s: s["hidden_size"] != 48)
    _, result = mp.prune(make(), constraints=BUDGET, forward_loop=loop(), score_func=scorer, search=search)
    assert "num_layers" not in result.search.space
    assert all(s["hidden_size"] != 48 and s["num_layers"] == 4 for s in scorer.scored)
    assert result.config.num_layers == 4


def test_plot_candidates(mcore, tmp_path):
    _, result = mp.prune(make(), constraints=BUDGET, forward_loop=loop(), score_func=shape_score, search=SEARCH)
    out = mp.plot_candidates(result, str(tmp_path / "candidates.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs the result of a NAS prune"):
        mp.plot_candidates(mp.prune(make(), {"hidden_size": 48}, forward_loop=loop())[1], str(tmp_path / "x.png"))


def test_scores_files_without_a_search_section_still_work(mcore, tmp_path):
    """Files written before NAS existed have no "search" entry: they load, and NAS adds one."""
    path = tmp_path / "scores.pt"
    model = make()
    mp.prune(model, {"ffn_hidden_size": 64}, forward_loop=loop(), scores_path=str(path))
    payload = torch.load(path, weights_only=True)
    del payload["search"]
    torch.save(payload, path)
    _, result = mp.prune(model, constraints=BUDGET, score_func=shape_score, search=SEARCH, scores_path=str(path))
    assert not result.calibrated and len(torch.load(path, weights_only=True)["search"]) == 1
    mp.prune(model, {"ffn_hidden_size": 64}, scores_path=str(path))  # manual prunes read the file as before
    mp.calibrate(model, loop(seed=10), scores_path=str(path), extend=True)
    assert torch.load(path, weights_only=True)["search"] == {}  # new statistics: cached scores are stale
