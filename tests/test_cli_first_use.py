"""The command line as a new user meets it (issue 12): dtypes, stale statistics, early checks, interrupts, budgets.

Real processes on tiny local Hugging Face models: a bf16 source is pruned and exported in bf16 with a config that
says so; statistics of other calibration data are refused before the import, naming the flag; problems found from
files and configs fail before any weight is read; Ctrl-C (a real SIGINT) exits 130 with one line, publishes
nothing even when a library swallows it, and the same command resumes the calibration; percent budgets work.
"""

import json
import subprocess
import sys

import pytest
import torch

from megatron_prune.minitron.cli import build_parser, main
from tests.tiny_hf import make_hf_model
from tests.torchrun import REPO_ROOT

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

CALIB = ["--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2"]
FAST = ["--save-format", "hf", "--no-report"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-use")
    fp32 = make_hf_model(root / "llama", "llama")
    bf16 = make_hf_model(root / "llama-bf16", "llama")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).to(torch.bfloat16).save_pretrained(bf16)
    return fp32, bf16


def _cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "megatron_prune", *map(str, argv)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _worker(*argv, timeout=600):
    return subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "workers" / "interrupt.py"), *map(str, argv)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip


def _fails(capsys, *argv, match):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert match in captured.err, captured.err
    return captured


def test_bf16_source_is_pruned_and_exported_in_bf16_and_stale_statistics_are_refused(models, tmp_path):
    """Item 1: by default the prune runs in the source's dtype and the exported weights and config agree; an explicit
    --dtype float32 gets a float32 config. Item 2: statistics of other calibration settings are refused before the
    import, naming the flag; --reuse-scores reuses them and the summary records what they were computed on."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    _, source = models
    scores = tmp_path / "scores.pt"
    run = _cli("--hf-model", source, "--output-dir", tmp_path / "bf16", "--target-ffn-hidden-size", "96", *CALIB,
               *FAST, "--scores-path", scores)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "bf16" / "hf"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert (out / "model.safetensors").stat().st_size < (source / "model.safetensors").stat().st_size
    summary = json.loads((tmp_path / "bf16" / "prune_summary.json").read_text())
    assert summary["dtype"] == summary["source_dtype"] == "bfloat16"
    assert "dtype: bfloat16" in (tmp_path / "bf16" / "distillation_run_card.yaml").read_text()
    assert summary["calibration"]["samples"] == 8 and summary["statistics_from"] == "calibration"

    other = ["--hf-model", source, "--target-ffn-hidden-size", "96", "--calib-samples", "16", "--seq-length", "32",
             "--micro-batch-size", "2", *FAST, "--scores-path", scores, "--dtype", "float32"]  # fmt: skip
    stale = _cli(*other, "--output-dir", tmp_path / "stale")
    assert stale.returncode == 2 and "--calib-samples 8 in the file, 16 now" in stale.stderr and "--reuse-scores" in stale.stderr
    assert "importing" not in stale.stdout  # refused before the model import
    reused = _cli(*other, "--output-dir", tmp_path / "fp32", "--reuse-scores")
    assert reused.returncode == 0, reused.stdout + reused.stderr
    summary = json.loads((tmp_path / "fp32" / "prune_summary.json").read_text())
    assert summary["calibration"]["samples"] == 8 and summary["statistics_from"] == f"scores file {scores}"
    assert summary["dtype"] == "float32" and AutoConfig.from_pretrained(tmp_path / "fp32" / "hf").dtype == torch.float32
    assert {t.dtype for t in load_file(str(tmp_path / "fp32" / "hf" / "model.safetensors")).values()} == {torch.float32}


def test_problems_found_in_files_and_configs_fail_before_any_weight_is_read(models, tmp_path, capsys, monkeypatch):
    """Items 8, 9, 11, 12: each fails with exit 2 and a message naming the flag or file, before the import."""
    import shutil

    source, _ = models
    common = ["--output-dir", tmp_path / "out", *CALIB]
    target = ["--target-ffn-hidden-size", "96"]
    other = make_hf_model(tmp_path / "wide", "llama", intermediate_size=192)  # statistics of another model
    scores = tmp_path / "other.scores.pt"
    assert main(["--hf-model", str(other), "--output-dir", str(tmp_path / "o1"), *CALIB, *FAST, *target,
                 "--scores-path", str(scores), "--skip-roundtrip-check"]) == 0  # fmt: skip
    capsys.readouterr()

    def weights_read(*args, **kwargs):
        raise AssertionError("the model's weights were read before the input was checked")

    monkeypatch.setattr("megatron_prune.minitron.bridge.import_hf_model", weights_read)
    # item 8: an output directory that cannot be created; budgets that cannot work; a scores file of another model
    (tmp_path / "file").write_text("x")
    _fails(capsys, "--hf-model", source, "--output-dir", tmp_path / "file" / "out", *CALIB, *target, match="is not writable")
    _fails(capsys, "--hf-model", source, *common, "--target-params", "50000", "--top-k", "1", "--ffn-hidden-size-divisor", "64",
           "--max-width-pruning", "0.6", match="no candidate fits constraints params <= 50.00K; the smallest reachable")  # fmt: skip
    _fails(capsys, "--hf-model", source, *common, "--target-params", "200000", match="is not below the model's 166.46K parameters")
    _fails(capsys, "--hf-model", source, *common, *target, "--scores-path", scores, match="ffn_hidden_size: file 192 vs model 128")
    # item 9: a truncated weight file, a config.json without a size field, a too-long sequence, a mistyped path
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, "--hf-model", broken, *common, *target, match="weight file model.safetensors is truncated")
    (broken / "model.safetensors").write_bytes(data)
    config = json.loads((broken / "config.json").read_text())
    del config["vocab_size"]
    (broken / "config.json").write_text(json.dumps(config))
    _fails(capsys, "--hf-model", broken, *common, *target, match="config.json does not set vocab_size (transformers used 32000)")
    _fails(capsys, "--hf-model", source, *common, *target, "--seq-length", "256", match="--seq-length 256 exceeds the model's max_position_embeddings=128")
    _fails(capsys, "--hf-model", source, *common, *target, "--calib-data", "calib.jsonl", match="'calib.jsonl' does not exist")
    # item 12: a user model without --calib-data hears which text it is calibrated on
    captured = _fails(capsys, "--hf-model", source, *common, *target, "--scores-path", tmp_path / "file", match="not a readable")
    assert "warning: no --calib-data: calibrating on the packaged Jargon File excerpt" in captured.out
    assert not (tmp_path / "out").exists()


def test_the_default_job_is_announced(models, tmp_path, capsys, monkeypatch):
    """Item 12: without --hf-model the offline demo model is pruned, and the command says so in one line."""
    import shutil

    source, _ = models
    cache = tmp_path / "cache"
    shutil.copytree(source, cache / "SmolLM2-135M-Instruct")  # a stand-in folder: the check below fails before import
    monkeypatch.setenv("MEGATRON_PRUNE_CACHE", str(cache))
    captured = _fails(capsys, "--output-dir", tmp_path / "out", *CALIB, match="ffn_hidden_size']=1024 is larger")
    assert "no --hf-model: pruning the offline demo model SmolLM2-135M-Instruct to ffn_hidden_size=1024, num_layers=26" in captured.out


def test_help_describes_every_flag_and_megatron_lm_spellings_work():
    """Item 13: every flag has help text (and its default shown); item 11: Megatron-LM's spellings are aliases."""
    parser = build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    text = parser.format_help()
    assert "(default: 64)" in text and "(default: auto)" in text and "(default: 1)" in text
    args = parser.parse_args(["--output-dir", "o", "--calib-size", "1024", "--pruning-scores-path", "s.pt",
                              "--pretrained-model-path", "m", "--target-params", "60%"])  # fmt: skip
    assert (args.calib_samples, args.scores_path, args.hf_model, args.target_params) == (1024, "s.pt", "m", "60%")


def test_ctrl_c_exits_130_publishes_nothing_and_the_same_command_resumes(models, tmp_path):
    """Item 10: a real SIGINT during calibration: one line, exit 130, no output directory, the statistics of the
    micro-batches done are kept; the same command forwards only the rest. A SIGINT that a library swallows (raised in
    a weakref callback during the export) still stops the job before anything is published."""
    source, _ = models
    out = tmp_path / "out"
    argv = ["--hf-model", source, "--output-dir", out, "--target-ffn-hidden-size", "96", "--calib-samples", "16",
            "--seq-length", "32", "--micro-batch-size", "2", *FAST]  # fmt: skip
    stopped = _worker("calibration", 4, *argv)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("megatron-prune: interrupted: nothing was published")
    assert "Traceback" not in stopped.stderr and not out.exists()
    assert (tmp_path / ".out.importance_scores.pt.partial").is_file()  # micro-batches 1..3 saved (one per step)
    resumed = _cli(*argv)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming calibration after micro-batch 3 of 8" in resumed.stdout
    assert "calibration: 5 micro-batches" in resumed.stdout  # only the rest was forwarded
    assert json.loads((out / "prune_summary.json").read_text())["calibration_micro_batches"] == 8
    assert not (tmp_path / ".out.importance_scores.pt.partial").exists()

    swallowed = _worker("swallowed", *argv[:3], tmp_path / "out2", *argv[4:])
    assert "Exception ignored" in swallowed.stderr  # Python swallowed the KeyboardInterrupt...
    assert swallowed.returncode == 130 and not (tmp_path / "out2").exists()  # ...the job stopped all the same


def test_percent_budgets_on_the_command_line(models, tmp_path):
    """Item 11: --target-params 80% is resolved against the model's own parameter count, counted from its config
    before the import, and equals the live count the search then uses."""
    source, _ = models
    run = _cli("--hf-model", source, "--output-dir", tmp_path / "nas", "--target-params", "80%", "--top-k", "1",
               "--hidden-size-divisor", "16", "--ffn-hidden-size-divisor", "32", *CALIB, *FAST, "--skip-roundtrip-check")  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "nas" / "prune_summary.json").read_text())
    assert summary["nas"]["budgets"] == {"params": pytest.approx(0.8 * summary["params_before"])}
    assert summary["params_after"] <= 0.8 * summary["params_before"]


def test_failed_round_trip_check_is_one_error_line_and_publishes_nothing(models, tmp_path, capsys):
    """A round-trip check beyond its tolerance ends as `megatron-prune: error: round-trip check failed ...` (exit 2,
    the flags to use named), not a traceback; nothing is written."""
    source, _ = models
    out = tmp_path / "out"
    captured = _fails(capsys, "--hf-model", source, "--output-dir", out, "--target-ffn-hidden-size", "96", *CALIB, *FAST,
                      "--roundtrip-tolerance", "1e-12", match="megatron-prune: error: round-trip check failed: HF source vs imported MCore")  # fmt: skip
    assert "--roundtrip-tolerance" in captured.err and "Traceback" not in captured.err
    assert not out.exists()
