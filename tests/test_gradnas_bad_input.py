"""GradNAS refuses bad input with a clear error naming the field, before any gradient is taken, and leaves the input
model untouched (its state_dict, modes and hooks)."""

import pytest
import torch

from gradnas_models import batches, build, input_ids, same_state, state_hash
from megatron_prune import gradnas
from megatron_prune.errors import PruneConfigError, PruneError, UnsupportedModelError


class CountingLoss:
    def __init__(self, fn=lambda out, b: out.loss):
        self.calls, self.fn = 0, fn

    def __call__(self, out, batch):
        self.calls += 1
        return self.fn(out, batch)


def attempt(model=None, constraints=None, loss=None, **kw):
    model = model if model is not None else build("bert")
    kw.setdefault("data_loader", batches("bert", n=2))
    config = {"verbose": False, "rules": {"*.ffn": {"divisor": 8}}, **kw.pop("config", {})}
    return gradnas.prune(model, constraints={"params": "90%"} if constraints is None else constraints,
                         dummy_input=kw.pop("dummy_input", input_ids(2)), config=config, loss_func=loss, **kw)


def refused(error, match, model=None, **kw):
    model = model if model is not None else build("bert")
    saved, loss = state_hash(model), kw.pop("loss", None) or CountingLoss()
    with pytest.raises(error, match=match):
        attempt(model, loss=loss, **kw)
    assert same_state(model, saved) and not any(m._forward_pre_hooks for m in model.modules())
    return loss


@pytest.mark.parametrize("constraints, message", [
    ({"flops": "60"}, r"string without '%' or a unit: pass a number \(60\) or a percentage \('60%'\)"),
    ({"flops": "abc%"}, r"'abc' before '%' is not a number"),
    ({"params": "100%"}, r"strictly between 0% and 100%"),
    ({"params": -5}, r"must be a positive, finite number"),
    ({"latency": 3}, r"unknown key\(s\) 'latency'; gradnas budgets are flops, params"),
    ({}, r"constraints is empty"),
    ({"params": "5%"}, r"below the smallest reachable subnet's [\d,]+ \([\d.]+% of the original\); hidden size and embeddings"),
    ({"params": 10**9}, r"is not below the original model's"),
    (None, None),
])
def test_bad_budgets(constraints, message):
    if constraints is None:
        with pytest.raises(PruneConfigError, match="constraints is required"):
            gradnas.prune(build("bert"), dummy_input=input_ids(2), data_loader=batches("bert"), verbose=False)
        return
    assert refused(PruneConfigError, message, constraints=constraints).calls == 0


def test_unsupported_architecture_names_it_and_lists_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                     word_embed_proj_dim=16, max_position_embeddings=32)).eval()
    loss = refused(UnsupportedModelError, r"OPTForCausalLM \(model_type 'opt'\).*bert, roberta, distilbert, gpt2, gptj, "
                   r"llama, mistral, qwen2, qwen3", model=model)
    assert loss.calls == 0
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        gradnas.profile(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.zeros(1, 2))
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        attempt(build("gpt2", add_cross_attention=True))
    assert issubclass(UnsupportedModelError, PruneError)


def test_empty_or_non_iterable_loader():
    assert refused(PruneConfigError, "data_loader is empty", data_loader=[]).calls == 0
    assert refused(PruneConfigError, "data_loader is empty", data_loader=iter(())).calls == 0
    assert refused(PruneConfigError, "data_loader must be iterable", data_loader=3).calls == 0
    with pytest.raises(PruneConfigError, match="data_loader is required"):
        gradnas.prune(build("bert"), constraints={"params": "90%"}, dummy_input=input_ids(2), verbose=False)


@pytest.mark.parametrize("loss, message", [
    (lambda out, b: out.logits, r"loss_func returned a tensor of shape \(4, 3\) on batch 0: it must be a scalar"),
    (lambda out, b: out.loss.detach(), r"the loss has no gradient on batch 0"),
    (lambda out, b: torch.tensor(1.0, requires_grad=True), r"does not depend on any attention head or MLP channel"),
    (lambda out, b: out.loss.item(), r"loss_func returned float on batch 0: it must return a scalar tensor"),
    (lambda out, b: out.loss * float("nan"), r"the loss is nan on batch 0"),
])
def test_bad_losses_are_caught_on_the_first_batch(loss, message):
    model = build("bert")
    refused(PruneConfigError, message, model=model, loss=CountingLoss(loss))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_a_model_without_a_loss_needs_labels_or_a_loss_func():
    unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches("bert")]
    refused(PruneConfigError, r"the model returned no loss .*put labels in the batches", data_loader=unlabeled,
            loss=lambda out, b: gradnas.scores.default_loss(out, b))


@pytest.mark.parametrize("config, message", [
    ({"max_batches": 0}, r"config\['max_batches'\]=0 must be a positive integer"),
    ({"selectors": "greedy"}, r"config\['selectors'\]='greedy' must be a non-empty list of greedy, threshold, uniform"),
    ({"loss_function": 1}, r"unknown option 'loss_function'"),
    ({"prune_kv_groups": True}, r"bert has one K/V head per query head"),
    ({"uniform": "yes"}, r"config\['uniform'\]='yes' must be True or False"),
    ({"rules": {"*.ffn": {"divisor": 0}}}, r"must be a positive integer"),
    ({"collect_func": 3}, r"config\['collect_func'\] must be a callable"),
])
def test_bad_options(config, message):
    assert refused(PruneConfigError, message, config=config).calls == 0


def test_bad_mode_and_missing_dummy_input():
    with pytest.raises(PruneConfigError, match="megatron_prune.gradnas implements 'gradnas'"):
        gradnas.prune(build("bert"), mode="fastnas", constraints={"params": "90%"}, dummy_input=input_ids(2))
    assert refused(PruneConfigError, "dummy_input is required", dummy_input=None).calls == 0
