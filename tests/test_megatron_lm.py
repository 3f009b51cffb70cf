"""The Megatron-LM integration (`megatron_prune.minitron.megatron_lm`): the pruning flags on a Megatron-LM-style argument
namespace, the model built by Megatron-LM's builder as Megatron-Bridge's mlm_compat reproduces it, pruned and saved
with the pruned args; Megatron-LM's loader (through mlm_compat) rebuilds it from those args alone."""

import argparse

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.bridge.checkpoint import find_checkpoint, load_megatron_model
from megatron_prune.minitron.megatron_lm import add_prune_args, prune_megatron_lm_model
from tests.megatron_ckpt import build_mlm_model, mlm_args
from tests.tiny_hf import make_hf_model


def parse(tokenizer, *argv):
    """What `initialize_megatron(extra_args_provider=add_prune_args)` gives: Megatron-LM's args plus ours."""
    parser = add_prune_args(argparse.ArgumentParser())
    return parser.parse_args(list(argv), namespace=mlm_args(tokenizer, seq_length=32, micro_batch_size=2))


@pytest.mark.heavy  # Megatron-Bridge loads the checkpoint back
def test_prune_saves_a_checkpoint_megatron_lm_rebuilds_from_its_args(mcore, tmp_path):
    tokenizer = make_hf_model(tmp_path / "tok", "llama")
    args = parse(tokenizer, "--target-ffn-hidden-size", "96", "--layers-to-drop", "2", "--protect-layers", "first",
                 "--calib-size", "8", "--pruning-scores-path", str(tmp_path / "scores.pt"))  # fmt: skip
    args.save = str(tmp_path / "out")  # Megatron-LM's --save
    model = [build_mlm_model(args)]  # as get_model returns it
    pruned, result, pruned_args = prune_megatron_lm_model(model, args)
    assert result.plan.dropped_layers == [2] and result.config.ffn_hidden_size == 96
    assert (pruned_args.num_layers, pruned_args.ffn_hidden_size, pruned_args.kv_channels) == (3, 96, 8)
    assert (args.num_layers, args.ffn_hidden_size) == (4, 128)  # the caller's args are not modified
    info = find_checkpoint(str(tmp_path / "out"))
    assert info.format == "megatron-lm" and info.config.ffn_hidden_size == 96 and info.config.num_layers == 3
    reloaded = load_megatron_model(str(tmp_path / "out")).model
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    run = lambda m: torch.cat(mp.run_forward(m, [tokens], collect=lambda out, _: out.detach().clone()))  # noqa: E731
    assert torch.equal(run(reloaded), run(pruned))


def test_flags_that_cannot_work_are_refused(mcore, tmp_path):
    tokenizer = make_hf_model(tmp_path / "tok", "llama")
    model = build_mlm_model(mlm_args(tokenizer))
    with pytest.raises(mp.PruneConfigError, match="nothing to prune"):
        prune_megatron_lm_model(model, parse(tokenizer))
    with pytest.raises(mp.PruneConfigError, match="sizes and NAS budgets"):
        prune_megatron_lm_model(model, parse(tokenizer, "--target-hidden-size", "32", "--target-params", "80%"))
    with pytest.raises(SystemExit):
        parse(tokenizer, "--target-params", "lots")
