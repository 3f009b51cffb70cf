"""GradNAS gradient scores: the chosen architecture does not depend on the loss scale, the number of passes over the
data or the batch size; the scores find units that do not matter; nothing is left behind on the model (no
`.grad`, no hooks, the train/eval mode of every module), also on error; frozen models work; checkpoints resume."""

import pytest
import torch

from gradnas_models import batches, build, input_ids, rebatch, same_state, state_hash
from megatron_prune import gradnas
from megatron_prune.errors import PruneConfigError

RULES = {"*.ffn": {"divisor": 8}}


def run(model, family, constraints=None, loader=None, **config):
    return gradnas.prune(model, constraints=constraints or {"flops": "60%"}, dummy_input=input_ids(2),
                         data_loader=loader if loader is not None else batches(family, n=4, batch=4),
                         config={"rules": RULES, "verbose": False, **config})


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_architecture_does_not_depend_on_loss_scale_passes_or_batch_size(family):
    model, data = build(family), batches(family, n=4, batch=4)
    _, base = run(model, family, loader=data)
    variants = {
        "loss x 1000": run(model, family, loader=data, loss_func=lambda out, b: out.loss * 1000)[1],
        "the loader twice": run(model, family, loader=data + data)[1],
        "batches of 8": run(model, family, loader=rebatch(data, 8))[1],
        "batches of 2": run(model, family, loader=rebatch(data, 2))[1],
        "batches of 6, 1, 9": run(model, family, loader=rebatch(data, [6, 1, 9]))[1],
    }
    assert any(w < base.original_widths[g] for g, w in base.widths.items())
    for name, r in variants.items():
        assert r.widths == base.widths, name
        for site, values in base.scores.items():
            torch.testing.assert_close(torch.tensor(r.scores[site]), torch.tensor(values), rtol=1e-5, atol=1e-9, msg=name)
    assert variants["the loader twice"].samples == 2 * base.samples == 32
    assert sum(sum(v) for v in base.scores.values()) == pytest.approx(1.0)


def test_a_unit_that_cannot_change_the_loss_scores_zero_and_goes_first():
    model = build("llama")
    with torch.no_grad():  # head 1 of layer 0 and FFN channel 5 of layer 1 write nothing to the residual stream
        model.model.layers[0].self_attn.o_proj.weight[:, 8:16] = 0
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0
    _, r = run(model, "llama", constraints={"params": "97%"}, rules={"*.ffn": {"divisor": 1, "ratios": None}})
    assert r.scores["layers.0.heads"][1] == 0 and r.scores["layers.1.ffn"][5] == 0
    assert min(r.scores["layers.0.heads"][i] for i in (0, 2, 3)) > 0
    assert r.penalties["layers.1.ffn"][95] == 0 < r.penalties["layers.1.ffn"][94]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_nothing_is_left_on_the_model(family):
    model = build(family)
    model.train()
    model.get_submodule(next(n for n, m in model.named_modules() if n.endswith("layers.0") or n.endswith("layer.0"))).eval()
    modes = {n: m.training for n, m in model.named_modules()}
    first = next(model.parameters())
    first.grad = torch.full_like(first, 3.0)  # a user's gradient stays as it was
    saved = state_hash(model)
    run(model, family)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in list(model.parameters())[1:]) and all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert same_state(model, saved)


def test_hooks_modes_and_flags_are_restored_when_the_loss_fails():
    model = build("gpt2").train()
    calls = []

    def loss(out, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return out.loss

    with pytest.raises(RuntimeError, match="boom"):
        run(model, "gpt2", loss_func=loss)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_frozen_parameters_are_fine():
    model, reference = build("bert"), build("bert")
    for p in model.parameters():
        p.requires_grad_(False)
    pruned, r = run(model, "bert")
    assert r.widths == run(reference, "bert")[1].widths
    assert not any(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in pruned.parameters())


def test_resume_after_an_interruption_gives_the_same_result(tmp_path):
    model, ckpt = build("llama"), tmp_path / "grads.pt"
    _, full = run(model, "llama")
    seen = []

    def interrupted(out, batch):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return out.loss

    with pytest.raises(KeyboardInterrupt):
        run(model, "llama", checkpoint=ckpt, loss_func=interrupted)
    _, resumed = run(model, "llama", checkpoint=ckpt)
    assert resumed.reused_batches == 2 and resumed.batches == 4
    assert resumed.widths == full.widths and resumed.scores == full.scores
    _, again = run(model, "llama", checkpoint=ckpt, loss_func=lambda out, b: 1 / 0)  # every batch from the file
    assert again.reused_batches == 4 and again.scores == full.scores
    _, uniform = run(model, "llama", checkpoint=ckpt, uniform=True, loss_func=lambda out, b: 1 / 0)  # search settings
    assert uniform.reused_batches == 4 and uniform.scores == full.scores                            # share the gradients


def test_a_checkpoint_of_another_model_or_other_data_is_refused(tmp_path):
    ckpt = tmp_path / "grads.pt"
    run(build("llama"), "llama", checkpoint=ckpt)
    with pytest.raises(PruneConfigError, match="another model"):
        run(build("llama", seed=1), "llama", checkpoint=ckpt)
    with pytest.raises(PruneConfigError, match="other batches"):
        run(build("llama"), "llama", checkpoint=ckpt, loader=batches("llama", n=4, batch=4, seed=3))
