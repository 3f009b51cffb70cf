"""GradNAS end to end on tiny HF models: every budget held and filled, grouped-query heads kept per KV group, whole
KV groups on request, uniform layers that `from_pretrained` loads, candidates scored by `score_func`, Model
Optimizer's call shape, and the profile table."""

import pytest
import torch

from gradnas_models import batches, build, input_ids, logits, same_state, state_hash
from megatron_prune import gradnas
from megatron_prune.common.choices import Rules
from megatron_prune.gradnas.search import keep
from megatron_prune.gradnas.space import build_space

RULES = {"*.ffn": {"divisor": 8}}


def run(family, constraints, model=None, **config):
    model = model if model is not None else build(family)
    pruned, result = gradnas.prune(model, constraints=constraints, dummy_input=input_ids(2),
                                   data_loader=batches(family, n=3, batch=4),
                                   config={"rules": RULES, "verbose": False, **config})
    return model, pruned, result


@pytest.mark.parametrize("family, constraints", [
    ("bert", {"params": "85%"}), ("gpt2", {"flops": "60%"}), ("llama", {"flops": "70%", "params": "80%"}),
    ("distilbert", {"flops": 700_000}), ("qwen3", {"params": "90%"}),
])
def test_every_budget_is_held_and_filled(family, constraints):
    model = build(family)
    saved = state_hash(model)
    _, pruned, r = run(family, constraints, model=model)
    space = build_space(model, input_ids(2), Rules.of(RULES))
    assert same_state(model, saved) and type(pruned) is type(model)
    assert r.counts == gradnas.count(pruned, input_ids(2)) == space.count(r.widths)
    assert all(r.counts[m] <= limit for m, limit in r.limits.items())
    for var, choices in space.searchable.items():  # maximal: widening any variable one step breaks a budget
        i = choices.index(r.widths[space.variables[var][0]])
        if i + 1 < len(choices):
            wider = space.count(space.expand({v: r.widths[gs[0]] for v, gs in space.variables.items()} | {var: choices[i + 1]}))
            assert any(wider[m] > limit for m, limit in r.limits.items()), var
    assert [c.selector for c in r.candidates] == ["greedy"] and r.score_calls == 0


def test_grouped_query_heads_are_kept_per_kv_group():
    model, pruned, r = run("llama", {"flops": "94%"}, rules={"*.ffn": None})  # only heads can go
    heads = {g: w for g, w in r.widths.items() if g.endswith("heads")}
    assert any(w < 4 for w in heads.values()) and all(w % 2 == 0 for w in heads.values())
    for i, layer in enumerate(pruned.model.layers):
        attn = layer.self_attn
        assert attn.num_key_value_groups * 2 * 8 == attn.q_proj.out_features == heads[f"layers.{i}.heads"] * 8
        assert attn.k_proj.out_features == 16
        kept = keep(torch.tensor(r.scores[f"layers.{i}.heads"]), heads[f"layers.{i}.heads"], 2)
        groups = [int(h) // 2 for h in kept]  # query heads 0-1 share KV head 0, heads 2-3 KV head 1
        assert groups.count(0) == groups.count(1) == len(kept) // 2
    assert logits(pruned, input_ids(2)).isfinite().all()


def test_whole_kv_groups_on_request():
    _, pruned, r = run("qwen3", {"flops": "90%"}, prune_kv_groups=True, rules={"*.ffn": None})
    assert all(g.endswith(("kv_groups", "ffn")) for g in r.widths)
    assert any(w == 1 for g, w in r.widths.items() if g.endswith("kv_groups"))
    for i, layer in enumerate(pruned.model.layers):
        kv = r.widths[f"layers.{i}.kv_groups"]
        assert layer.self_attn.k_proj.out_features == kv * 8 and layer.self_attn.q_proj.out_features == kv * 2 * 8


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_uniform_layers_load_with_from_pretrained(family, tmp_path):
    _, pruned, r = run(family, {"params": "80%"}, uniform=True)
    ffn = {w for g, w in r.widths.items() if g.endswith("ffn")}
    assert len(ffn) == 1 and r.hf_loadable
    if family == "llama":
        assert len({w for g, w in r.widths.items() if g.endswith("heads")}) == 1
    pruned.save_pretrained(tmp_path)
    reloaded = type(pruned).from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded, input_ids(3)), logits(pruned, input_ids(3)), rtol=0, atol=0)


def test_uniform_gptj_keeps_heads_and_says_why():
    space = gradnas.profile(build("gptj"), input_ids(2), config={"uniform": True}, verbose=False)
    assert all("config cannot state a pruned head count" in space.fixed[g] for g in space.groups if g.endswith("heads"))
    assert list(space.variables) == ["ffn"]


def test_score_func_picks_the_best_candidate_and_is_cached(tmp_path):
    ids = input_ids(4, seed=11)
    reference = logits(build("gpt2"), ids)
    calls = []

    def score(m):
        calls.append(1)
        return -float((logits(m, ids) - reference).pow(2).mean())

    _, _, r = run("gpt2", {"flops": "60%"}, score_func=score, checkpoint=tmp_path / "c.pt")
    assert [c.selector for c in r.candidates] == ["greedy", "threshold", "uniform"]
    assert r.score_calls == len(calls) == len({tuple(sorted(c.widths.items())) for c in r.candidates})
    assert r.selector == max(r.candidates, key=lambda c: c.score).selector
    assert r.widths == next(c for c in r.candidates if c.selector == r.selector).widths
    _, _, again = run("gpt2", {"flops": "60%"}, score_func=score, checkpoint=tmp_path / "c.pt")
    assert again.score_calls == 0 and again.widths == r.widths


def test_model_optimizer_call_shape():
    import megatron_prune.gradnas as mtp

    model = build("bert")
    pruned, result = mtp.prune(model=model, mode="gradnas", constraints={"params": "85%"}, dummy_input=input_ids(2),
                               config={"data_loader": batches("bert", n=2), "collect_func": lambda b: (b,),
                                       "loss_func": lambda out, b: out.loss, "max_iter_data_loader": 1,
                                       "verbose": False, "num_iters": 5000})
    assert result.batches == 1 and result.counts["params"] <= result.limits["params"]
    assert pruned.config.pruned_heads or pruned.config.intermediate_size < 96


def test_profile_table_names_groups_and_what_is_fixed():
    space = gradnas.profile(build("llama"), input_ids(2), constraints={"params": "80%"},
                            config={"rules": {"layers.1.ffn": None}}, verbose=False)
    table = space.table()
    assert "layers.0.heads" in table and "[2, 4]" in table and "FIXED: the rules freeze it" in table
    assert "hidden size, embeddings, norms and output heads are not pruned" in table
    assert list(space.searchable) == ["layers.0.ffn", "layers.0.heads", "layers.1.heads"]
