"""`--load`: Megatron-LM and Megatron-Bridge checkpoints as input, at another layout than they were saved at,
written back in the format they came in (issue 17).

Real checkpoints written the way the frameworks write them (Megatron-LM: `args` in the common state, at TP=2 under
torchrun; Megatron-Bridge: its own writer), pruned by the command line at PP=2, saved, reloaded: the logits equal
those of pruning the same model in memory with the same statistics. The source checkpoint is never modified; bad
input fails before the weights are read, with nothing written.
"""

import json

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.cli import main
from megatron_prune.minitron.runtime.distributed import init_distributed
from tests.megatron_ckpt import build_mlm_model, mlm_args, tree_digest, write_mlm_checkpoint
from tests.tiny_hf import make_hf_model
from tests.torchrun import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

CALIB = ["--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2"]
WORKERS = REPO_ROOT / "tests" / "workers"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("tok") / "llama", "llama")  # its tokenizer: 128 tokens, as the model


def logits(model, tokens):
    return torch.cat(mp.run_forward(model, [tokens], collect=lambda out, _: out.detach().clone()))


def test_megatron_lm_checkpoint_saved_at_tp2_pruned_at_pp2_equals_pruning_in_memory(mcore, tokenizer, tmp_path):
    from megatron_prune.minitron.bridge.checkpoint import find_checkpoint, load_megatron_model

    source = tmp_path / "mlm"
    run_torchrun(WORKERS / "megatron_ckpt.py", 2, 2, 1, source, tokenizer, 10)  # TP=2
    digest = tree_digest(source)
    out, scores = tmp_path / "out", tmp_path / "scores.pt"
    run_torchrun(WORKERS / "cli.py", 2, "--load", source, "--pipeline-model-parallel-size", "2", "--output-dir", out,
                 "--target-ffn-hidden-size", "96", "--target-hidden-size", "48", "--layers-to-drop", "2", *CALIB,
                 "--scores-path", scores, "--no-report")  # fmt: skip
    assert tree_digest(source) == digest  # the source checkpoint is only read
    summary = json.loads((out / "prune_summary.json").read_text())
    assert summary["source_format"] == "megatron-lm" and summary["save_format"] == "megatron"
    assert summary["megatron_lm_flags"] == ["--num-layers", "3", "--hidden-size", "48", "--ffn-hidden-size", "96", "--kv-channels", "8"]
    assert [c["name"] for c in summary["roundtrip_checks"]] == ["pruned MCore vs reloaded checkpoint"]
    assert (out / "megatron" / "latest_checkpointed_iteration.txt").read_text() == "release"
    written = find_checkpoint(str(out / "megatron"))
    assert written.format == "megatron-lm" and written.iteration is None
    assert (written.args.num_layers, written.args.hidden_size, written.args.ffn_hidden_size) == (3, 48, 96)
    assert written.args.tensor_model_parallel_size == 1 and written.args.pipeline_model_parallel_size == 2

    # the same model in memory (loaded at TP=1, PP=1), pruned with the same statistics: the same logits
    original = load_megatron_model(str(source)).model
    expected, _ = mp.prune(original, {"ffn_hidden_size": 96, "hidden_size": 48}, scores_path=str(scores),
                           depth={"layers_to_drop": [2]})  # fmt: skip
    reloaded = load_megatron_model(str(out / "megatron")).model
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(reloaded, tokens), logits(expected, tokens))


@pytest.mark.parametrize("layout", [["--expert-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]],
                         ids=["ep2", "tp2"])  # fmt: skip
def test_megatron_lm_moe_checkpoint_pruned_at_ep2_and_tp2_equals_one_process(mcore, tokenizer, tmp_path, layout):
    """A Megatron-LM checkpoint of a MoE GPT (alltoall dispatcher) loaded at EP=2 or TP=2 (experts spread over the ranks
    or split), calibrated, pruned (experts renumbered and re-distributed) and saved: the checkpoint one process writes."""
    from megatron_prune.minitron.bridge.checkpoint import load_megatron_model

    source = tmp_path / "mlm"
    run_torchrun(WORKERS / "megatron_ckpt.py", 1, 1, 1, source, tokenizer, 10, "moe")
    argv = ["--load", source, "--target-num-moe-experts", "2", "--target-hidden-size", "48", *CALIB, "--no-report"]
    run_torchrun(WORKERS / "cli.py", 1, *argv, "--output-dir", tmp_path / "one")
    run_torchrun(WORKERS / "cli.py", 2, *argv, "--output-dir", tmp_path / "layout", *layout)
    one, here = (load_megatron_model(str(tmp_path / o / "megatron")).model for o in ("one", "layout"))
    assert one.config.num_moe_experts == here.config.num_moe_experts == 2
    weights = {k: v for k, v in one.state_dict().items() if not k.endswith("_extra_state")}
    assert weights.keys() == {k for k in here.state_dict() if not k.endswith("_extra_state")}
    for key, value in weights.items():
        assert torch.equal(here.state_dict()[key], value), key
    summary = json.loads((tmp_path / "layout" / "prune_summary.json").read_text())
    assert summary["source_format"] == "megatron-lm" and all(c["ok"] for c in summary["roundtrip_checks"])


def test_bridge_checkpoint_in_and_out_and_a_chosen_iteration(mcore, tokenizer, tmp_path):
    from megatron_prune.minitron.bridge.checkpoint import find_checkpoint, load_megatron_model, save_bridge_checkpoint

    hf = make_hf_model(tmp_path / "hf", "llama")
    bridge_out = tmp_path / "bridge-src"
    assert main(["--hf-model", str(hf), "--output-dir", str(bridge_out), "--target-ffn-hidden-size", "112", *CALIB,
                 "--save-format", "megatron", "--no-report", "--skip-roundtrip-check"]) == 0  # fmt: skip
    source = bridge_out / "megatron"
    digest = tree_digest(source)
    out = tmp_path / "out"
    scores = tmp_path / "scores.pt"
    assert main(["--load", str(source), "--output-dir", str(out), "--target-ffn-hidden-size", "96", *CALIB, "--no-report",
                 "--save-format", "both", "--scores-path", str(scores)]) == 0  # fmt: skip
    pp2 = tmp_path / "pp2"  # the same checkpoint pruned at PP=2 with the same statistics: the same model
    run_torchrun(WORKERS / "cli.py", 2, "--load", source, "--pipeline-model-parallel-size", "2", "--output-dir", pp2,
                 "--target-ffn-hidden-size", "96", *CALIB, "--no-report", "--scores-path", scores)  # fmt: skip
    assert tree_digest(source) == digest
    init_distributed(seed=1234)  # the command tore its process group down
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(logits(load_megatron_model(str(out / "megatron")).model, tokens),
                       logits(load_megatron_model(str(pp2 / "megatron")).model, tokens))
    summary = json.loads((out / "prune_summary.json").read_text())
    assert summary["source_format"] == "megatron-bridge" and all(c["ok"] for c in summary["roundtrip_checks"])
    assert [c["name"] for c in summary["roundtrip_checks"]] == ["pruned MCore vs reloaded checkpoint", "pruned MCore vs exported HF"]
    from transformers import AutoConfig  # the HF export: the architecture of the HF model the checkpoint names

    assert AutoConfig.from_pretrained(out / "hf").intermediate_size == 96
    info = find_checkpoint(str(out / "megatron"))
    assert info.format == "megatron-bridge" and info.config.ffn_hidden_size == 96
    assert load_megatron_model(str(out / "megatron")).model.config.ffn_hidden_size == 96
    card = (out / "distillation_run_card.yaml").read_text()
    assert str(source) in card  # the teacher is the loaded checkpoint

    # --ckpt-step picks an iteration; one that does not exist is named with those that do
    model = load_megatron_model(str(source)).model
    save_bridge_checkpoint(model, str(tmp_path / "two"), str(hf))
    (tmp_path / "two" / "iter_0000000").rename(tmp_path / "two" / "iter_0000005")
    assert find_checkpoint(str(tmp_path / "two"), step=5).iteration == 5
    with pytest.raises(mp.PruneConfigError, match="--ckpt-step 7: .* has no iter_0000007; it has iter_0000005"):
        find_checkpoint(str(tmp_path / "two"), step=7)


def test_bad_checkpoints_fail_before_any_weight_is_read(mcore, tokenizer, tmp_path, capsys, monkeypatch):
    args = mlm_args(tokenizer)
    good = tmp_path / "good"
    write_mlm_checkpoint(build_mlm_model(args), args, good, 10)

    def weights_read(*a, **k):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr("megatron_prune.minitron.bridge.checkpoint.load_megatron_model", weights_read)
    (tmp_path / "empty").mkdir()
    lacking = tmp_path / "lacking"
    del args.num_layers
    write_mlm_checkpoint(build_mlm_model(mlm_args(tokenizer)), args, lacking, 1)
    no_tokenizer = tmp_path / "notok"
    plain = mlm_args(tokenizer, tokenizer_type="NullTokenizer", tokenizer_model=None, vocab_size=127)
    write_mlm_checkpoint(build_mlm_model(plain), plain, no_tokenizer, 1)
    mla = tmp_path / "mla"
    with_mla = mlm_args(tokenizer, multi_latent_attention=True)
    write_mlm_checkpoint(build_mlm_model(mlm_args(tokenizer)), with_mla, mla, 1)
    out = tmp_path / "out"
    for argv, message in (
        (["--load", tmp_path / "missing"], "no such directory"),
        (["--load", tmp_path / "empty"], "is not a Megatron checkpoint: no latest_checkpointed_iteration.txt"),
        (["--load", good, "--ckpt-step", "3"], "--ckpt-step 3: "),
        (["--load", lacking], "the checkpoint's args lack num_layers"),
        (["--load", no_tokenizer], "names no Hugging Face tokenizer for the calibration text; pass --tokenizer-model"),
        (["--load", good, "--hf-model", tokenizer], "--load and --hf-model name two models"),
        (["--load", good, "--save-format", "hf"], "--save-format hf: a Hugging Face export needs the HF architecture"),
        (["--load", good, "--target-ffn-hidden-size", "200"], "ffn_hidden_size']=200 is larger"),
        (["--load", good, "--layers-to-drop", "9"], "layer 9 is out of range 1..4"),
        (["--load", mla], "multi-latent attention in a Megatron-LM checkpoint is not supported yet"),
    ):  # fmt: skip
        target = [] if any(str(a).startswith("--target") or str(a) == "--layers-to-drop" for a in argv) else ["--target-ffn-hidden-size", "96"]
        assert main([*map(str, argv), *target, "--output-dir", str(out), *CALIB]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not out.exists()


def test_prune_distill_prune_without_hugging_face(mcore, tokenizer, tmp_path):
    """Megatron-LM checkpoint -> prune -> distil (the CPU loop reads and writes Megatron-LM checkpoints) -> prune
    again, with no HF folder in between; each step's output is a Megatron-LM checkpoint of the expected sizes."""
    from megatron_prune.minitron.bridge.checkpoint import find_checkpoint
    from megatron_prune.minitron.distill.__main__ import main as distill_main

    args = mlm_args(tokenizer)
    source = tmp_path / "mlm"
    write_mlm_checkpoint(build_mlm_model(args), args, source, 10)
    first = tmp_path / "first"
    assert main(["--load", str(source), "--output-dir", str(first), "--target-ffn-hidden-size", "96", *CALIB, "--no-report"]) == 0
    dist = tmp_path / "distilled"
    assert distill_main(["--run-card", str(first / "distillation_run_card.yaml"), "--output-dir", str(dist),
                         "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "2",
                         "--lr-warmup-iters", "0", "--no-plot"]) == 0  # fmt: skip
    assert sorted(p.name for p in dist.iterdir()) == ["distill_summary.json", "loss_curve.csv", "megatron"]
    second = tmp_path / "second"
    assert main(["--load", str(dist / "megatron"), "--output-dir", str(second), "--target-hidden-size", "48", *CALIB,
                 "--no-report"]) == 0  # fmt: skip
    init_distributed(seed=1234)
    distilled, pruned = find_checkpoint(str(dist / "megatron")), find_checkpoint(str(second / "megatron"))
    assert distilled.format == pruned.format == "megatron-lm"
    assert (distilled.args.ffn_hidden_size, distilled.args.hidden_size) == (96, 64)
    assert (pruned.args.ffn_hidden_size, pruned.args.hidden_size) == (96, 48)


def test_nas_on_a_loaded_checkpoint(mcore, tokenizer, tmp_path):
    """A percent budget is resolved from the checkpoint's config before the weights are read, and held."""
    args = mlm_args(tokenizer)
    source = tmp_path / "mlm"
    write_mlm_checkpoint(build_mlm_model(args), args, source, 10)
    out = tmp_path / "nas"
    assert main(["--load", str(source), "--output-dir", str(out), "--target-params", "80%", "--top-k", "1",
                 "--hidden-size-divisor", "16", "--ffn-hidden-size-divisor", "32", *CALIB, "--no-report"]) == 0  # fmt: skip
    summary = json.loads((out / "prune_summary.json").read_text())
    assert summary["nas"]["budgets"] == {"params": pytest.approx(0.8 * summary["params_before"])}
    assert summary["params_after"] <= 0.8 * summary["params_before"] and summary["roundtrip_checks"][0]["ok"]


def test_args_of_a_gpu_run_load_on_cpu(mcore, tokenizer, tmp_path):
    """Megatron-LM's defaults (Transformer Engine, fused RoPE, persistent layer norm, fused softmax and biases) are
    what a real checkpoint's args hold: the model is built without those kernels on CPU, with the same weights."""
    from megatron_prune.minitron.bridge.checkpoint import find_checkpoint, load_megatron_model

    args = mlm_args(tokenizer)
    model = build_mlm_model(args)
    gpu = mlm_args(tokenizer, transformer_impl="transformer_engine", apply_rope_fusion=True, no_persist_layer_norm=False,
                   gradient_accumulation_fusion=True, masked_softmax_fusion=True, bias_swiglu_fusion=True,
                   bias_dropout_fusion=True)  # fmt: skip
    write_mlm_checkpoint(model, gpu, tmp_path / "gpu", 3)
    info = find_checkpoint(str(tmp_path / "gpu"))
    assert info.args.apply_rope_fusion and info.args.transformer_impl == "transformer_engine"  # recorded as saved
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(load_megatron_model(str(tmp_path / "gpu")).model, tokens), logits(model, tokens))

