"""The `megatron-prune` CLI end to end on a tiny local model (PP=1 and PP=2), and its input checks.

The end-to-end runs are real processes (torchrun at PP=2). Pruning at PP=1 and at PP=2, each calibrating
on its own, must export identical weights. Every bad input fails before calibration with a message that
names the flag, and leaves no output directory behind.
"""

import json
import subprocess
import sys

import pytest
import torch

from megatron_prune.minitron.cli import main
from tests.tiny_hf import file_digests, make_hf_model
from tests.torchrun import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

TARGETS = ["--target-hidden-size", "48", "--target-ffn-hidden-size", "96", "--target-num-attention-heads", "2",
           "--target-num-layers", "3"]  # fmt: skip
CALIB = ["--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("src") / "llama", "llama")


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_cli_pp1_pp2_and_tp2_export_identical_models(source, tmp_path):
    untouched = file_digests(source)
    out1, out2, out3 = tmp_path / "pp1", tmp_path / "pp2", tmp_path / "tp2"
    cmd = [sys.executable, "-m", "megatron_prune", "--hf-model", str(source), "--output-dir", str(out1), *TARGETS, *CALIB]
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "HF source vs imported MCore" in run.stdout and "pruned MCore vs exported HF" in run.stdout
    assert "samples/s" in run.stdout and "layers dropped" in run.stdout  # progress and the before/after tables
    assert "Apex" not in run.stderr and "Falling back" not in run.stderr  # third-party notices: only with --verbose
    pp2 = run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 2, "--hf-model", source, "--output-dir", out2,
                       "--pipeline-model-parallel-size", "2", "--verbose", *TARGETS, *CALIB)  # fmt: skip
    # with --verbose third-party notices once (rank 0), plain progress lines, and why the run card's layout differs
    assert pp2.stderr.count("Falling back to Torch optimizers") == 1 and "━" not in pp2.stdout + pp2.stderr
    assert all(line in pp2.stdout for line in ("importing weights: ", "exporting to Hugging Face: ", "saving the Megatron checkpoint"))
    assert "run card: pipeline_model_parallel_size 1, not the prune's 2: 2 does not divide student num_layers=3" in pp2.stdout
    run_torchrun(REPO_ROOT / "tests" / "workers" / "cli.py", 2, "--hf-model", source, "--output-dir", out3,
                 "--tensor-model-parallel-size", "2", "--save-format", "hf", *TARGETS, *CALIB)  # fmt: skip

    for out in (out1, out2):
        names = sorted(p.name for p in out.iterdir())
        assert names == ["distillation_run_card.yaml", "hf", "importance_scores.pt", "megatron", "prune_report.png",
                         "prune_summary.json"], names  # fmt: skip
        assert not list(out.parent.glob(f".{out.name}.partial-*"))
    s1, s2 = (json.loads((o / "prune_summary.json").read_text()) for o in (out1, out2))
    assert s1["kept_layers"] == s2["kept_layers"] and len(s1["kept_layers"]) == 3
    assert s1["params_after"] == s2["params_after"] < s1["params_before"]
    assert all(c["ok"] for c in s1["roundtrip_checks"] + s2["roundtrip_checks"]) and len(s2["roundtrip_checks"]) == 2
    w1, w2, w3 = _weights(out1 / "hf"), _weights(out2 / "hf"), _weights(out3 / "hf")
    assert w1.keys() == w2.keys() == w3.keys()
    for name in w1:  # TP=2: the bridge scatters and gathers shards; statistics are concatenated over TP
        assert torch.equal(w1[name], w2[name]) and torch.equal(w1[name], w3[name]), name
    assert file_digests(source) == untouched


def _fails(capsys, *argv, match):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert match in err, err
    return err


def test_bad_inputs_fail_early_and_write_nothing(source, tmp_path, capsys, monkeypatch):
    def weights_read(*args, **kwargs):
        raise AssertionError("the model's weights were read before the input was checked")

    monkeypatch.setattr("megatron_prune.minitron.bridge.import_hf_model", weights_read)
    out = tmp_path / "out"
    common = ["--output-dir", out, *CALIB]
    _fails(capsys, "--hf-model", tmp_path / "missing", *common, *TARGETS, match="no such directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, "--hf-model", tmp_path / "empty", *common, *TARGETS, match="no config.json")
    _fails(capsys, "--hf-model", source, *common, match="no target given")
    _fails(capsys, "--hf-model", source, *common, "--target-num-attention-heads", "3", match="num_attention_heads")
    _fails(capsys, "--hf-model", source, *common, "--export-config", "{bad", match="--export-config is not valid JSON")
    _fails(capsys, "--hf-model", source, *common, "--export-config", '{"hidden_size": 40}', "--target-hidden-size", "48",
           match="contradicts")  # fmt: skip
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    _fails(capsys, "--hf-model", source, *common, *TARGETS, "--calib-data", short, match="needs 256")
    _fails(capsys, "--hf-model", source, *common, *TARGETS, "--calib-samples", "7", match="multiple of --micro-batch-size")
    _fails(capsys, "--hf-model", source, *common, *TARGETS, "--importance", "heads=psychic",
           match="unknown criterion 'psychic' for heads; valid: minitron, output_contribution, taylor")  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "3")
    _fails(capsys, "--hf-model", source, *common, *TARGETS, "--tensor-model-parallel-size", "2", match="world size 3")
    monkeypatch.delenv("WORLD_SIZE")
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _fails(capsys, "--hf-model", source, *common, *TARGETS, match="exists and is not empty")
    assert (out / "keep.txt").read_text() == "user data"
    (out / "old.scores.pt").write_text("statistics")  # --overwrite would replace a directory holding an input
    _fails(capsys, "--hf-model", source, *common, *TARGETS, "--overwrite", "--scores-path", out / "old.scores.pt",
           match="overlaps --scores-path")  # fmt: skip
    _fails(capsys, "--hf-model", source, "--output-dir", source / "pruned", *CALIB, *TARGETS, match="overlaps --hf-model")
    assert not (source / "pruned").exists() and (out / "old.scores.pt").read_text() == "statistics"


def test_unsupported_architectures_are_named_before_weights_are_read(tmp_path, capsys):
    from transformers import LlamaConfig, Qwen3MoeConfig

    foo = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    foo.architectures = ["FooForCausalLM"]
    foo.save_pretrained(tmp_path / "foo")  # a config only: the check must not need weights
    _fails(capsys, "--hf-model", tmp_path / "foo", "--output-dir", tmp_path / "o", *TARGETS, match="'FooForCausalLM']")
    moe = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)  # fmt: skip
    moe.architectures = ["Qwen3MoeForCausalLM"]
    moe.save_pretrained(tmp_path / "moe")  # every layer MoE: no dense FFN to prune, said from the config alone
    _fails(capsys, "--hf-model", tmp_path / "moe", "--output-dir", tmp_path / "o", *TARGETS,
           match="'ffn_hidden_size' is not an axis of this model")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_cli_nas_applies_the_best_scored_candidate(source, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "nas"
    search = ["--target-params", "120000", "--top-k", "3", "--hidden-size-divisor", "16", "--ffn-hidden-size-divisor", "32",
              "--num-layers-divisor", "1", "--max-depth-pruning", "0.5", "--score-samples", "4"]  # fmt: skip
    assert main(["--hf-model", str(source), "--output-dir", str(out), "--save-format", "hf", *CALIB, *search]) == 0
    record = json.loads((out / "prune_summary.json").read_text())
    nas = record["nas"]
    assert len(nas["candidates"]) == 3 and all(c["params"] <= 120000 for c in nas["candidates"])
    scores = [c["score"] for c in nas["candidates"]]
    assert nas["winner"] == scores.index(max(scores))
    winner = nas["candidates"][nas["winner"]]
    assert record["params_after"] == winner["params"]  # the analytic count is the live count
    config = AutoConfig.from_pretrained(out / "hf")
    sizes = {"hidden_size": config.hidden_size, "ffn_hidden_size": config.intermediate_size, "num_layers": config.num_hidden_layers}
    assert {k: sizes[k] for k in winner["export_config"]} == winner["export_config"]
    assert (out / "nas_candidates.png").is_file() and all(c["ok"] for c in record["roundtrip_checks"])


def test_cli_taylor_criteria_calibrate_with_gradients_and_reuse_the_statistics(source, tmp_path):
    """--importance with a Taylor criterion runs the calibration backward through the bridge-imported model; the
    statistics then serve a forward-only criterion without calibrating (same scores file)."""
    scores = tmp_path / "scores.pt"
    common = ["--hf-model", str(source), "--save-format", "hf", "--skip-roundtrip-check", "--no-report", *CALIB,
              "--target-num-attention-heads", "2", "--scores-path", str(scores)]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "taylor"), "--importance", "heads=taylor,ffn=taylor"]) == 0
    record = json.loads((tmp_path / "taylor" / "prune_summary.json").read_text())
    assert record["importance_criteria"]["num_attention_heads"] == "taylor" and record["calibrated"]
    assert main([*common, "--output-dir", str(tmp_path / "reference"), "--importance", "reference"]) == 0
    record = json.loads((tmp_path / "reference" / "prune_summary.json").read_text())
    assert record["importance_criteria"]["num_attention_heads"] == "minitron" and not record["calibrated"]


def test_cli_prunes_a_deepseek_v3_model_and_refuses_query_groups(tmp_path, capsys):
    """DeepSeek-V3 (multi-latent attention) from Hugging Face through the CLI: heads, hidden size and a layer pruned (the
    dense first layer protected), exported, checked against transformers; query groups, which MLA does not have, are
    refused before any weight is read."""
    from transformers import AutoConfig

    source = make_hf_model(tmp_path / "deepseek", "deepseek_v3", num_hidden_layers=3)
    AutoConfig.from_pretrained(source).save_pretrained(tmp_path / "config_only")  # the check must not need weights
    _fails(capsys, "--hf-model", tmp_path / "config_only", "--output-dir", tmp_path / "groups", *CALIB,
           "--target-num-query-groups", "2", match="export_config['num_query_groups']: this model has multi-latent attention")  # fmt: skip
    assert not (tmp_path / "groups").exists()
    out = tmp_path / "out"
    argv = ["--hf-model", str(source), "--output-dir", str(out), "--save-format", "hf", *CALIB, "--target-hidden-size", "48",
            "--target-num-attention-heads", "2", "--target-num-layers", "2", "--protect-layers", "1"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "prune_summary.json").read_text())
    assert record["roundtrip_checks"] and all(c["ok"] for c in record["roundtrip_checks"])  # import and export vs transformers
    config = AutoConfig.from_pretrained(out / "hf")
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers, config.first_k_dense_replace) == (48, 2, 2, 1)
    assert (config.kv_lora_rank, config.q_lora_rank, config.v_head_dim) == (24, 32, 12)
