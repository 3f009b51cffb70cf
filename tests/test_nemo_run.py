"""launch/nemo_run/experiment.py: prune -> distill -> evaluate as one NeMo-Run experiment, run locally to completion.

A tiny HF Llama goes through the real commands (megatron-prune, the CPU distillation loop, the perplexity
evaluation), each a NeMo-Run task under the torchrun launcher of a LocalExecutor. The distillation must take its
student, teacher and recipe from the run card the prune step wrote. The iterative plan and the Slurm executor
are checked without running them.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.tiny_hf import make_hf_model
from tests.torchrun import REPO_ROOT

pytestmark = pytest.mark.heavy  # processes (torchrun / CLI / NeMo-Run) or Megatron-Bridge round trips

pytest.importorskip("nemo_run")
EXPERIMENT = REPO_ROOT / "launch" / "nemo_run" / "experiment.py"
TINY = ["--prune-args", "--calib-samples 8 --seq-length 32 --micro-batch-size 2 --no-report",
        "--distill-args", "--train-iters 3 --lr-warmup-iters 1 --seq-length 32 --global-batch-size 4 --micro-batch-size 2 --no-plot",
        "--eval-args", "--samples 4 --seq-length 32"]  # fmt: skip


def _experiment(*args, home):
    env = dict(os.environ, NEMORUN_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(EXPERIMENT), *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def test_experiment_runs_prune_distill_evaluate_locally(tmp_path):
    source = make_hf_model(tmp_path / "llama")
    work = tmp_path / "work"
    run = _experiment("--hf-model", source, "--work-dir", work, "--target", '{"ffn_hidden_size": 96, "num_layers": 3}',
                      "--distill", "cpu", *TINY, home=tmp_path / "nemo_run")  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for task in ("prune1", "distill1", "evaluate1"):
        assert f"[experiment] {task}: SUCCEEDED" in run.stdout, run.stdout[-2000:]
    # full log paths, and a status command that finds the run (NeMo-Run's own omits the NEMORUN_HOME it needs)
    logs = [line.split("(log: ")[1].rstrip(")") for line in run.stdout.splitlines() if line.startswith("[experiment] prune1:")]
    assert logs and os.path.isfile(logs[0]) and "..." not in logs[0] and "done in" in open(logs[0]).read()
    assert f"NEMORUN_HOME={tmp_path / 'nemo_run'} nemo experiment status megatron-prune_" in run.stdout
    assert "# You can inspect this experiment at a later point" not in run.stdout

    step = work / "step1"
    card = step / "pruned" / "distillation_run_card.yaml"
    summary = json.loads((step / "distilled" / "distill_summary.json").read_text())
    assert summary["run_card"] == str(card)  # the distill task consumed the prune task's run card
    assert summary["student"] == str(step / "pruned" / "hf") and summary["teacher"] == str(source)
    assert summary["recipe"]["train_iters"] == 3 and summary["recipe"]["global_batch_size"] == 4
    config = json.loads((step / "distilled" / "hf" / "config.json").read_text())
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (96, 3)  # the pruned shape, from the card
    result = json.loads((step / "eval.json").read_text())
    assert result["hf_model"] == str(step / "distilled" / "hf") and 1 < result["perplexity"] < 1e4
    logs = list((tmp_path / "nemo_run" / "experiments" / "megatron-prune").rglob("stdout.log"))
    assert logs and (tmp_path / "nemo_run" / ".local_jobs.json").is_file()  # NeMo-Run's files stay under NEMORUN_HOME


def test_iterative_plan_and_slurm_executor(tmp_path):
    source = make_hf_model(tmp_path / "llama")
    run = _experiment("--hf-model", source, "--work-dir", tmp_path / "w", "--target", '{"ffn_hidden_size": 64, "num_layers": 2}',
                      "--steps", "2", "--distill", "cpu", "--dry-run", home=tmp_path / "nr")  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["prune1", "distill1", "evaluate1", "prune2", "distill2", "evaluate2"]
    assert "--target-ffn-hidden-size 96 --target-num-layers 3" in lines[0]  # halfway, then the final sizes
    assert f"--hf-model {tmp_path / 'w' / 'step1' / 'distilled' / 'hf'}" in lines[3] and "--target-ffn-hidden-size 64" in lines[3]
    assert f"--run-card {tmp_path / 'w' / 'step2' / 'pruned' / 'distillation_run_card.yaml'}" in lines[4]

    sys.path.insert(0, str(EXPERIMENT.parent))
    import experiment

    slurm = experiment.slurm_executor("acct", "batch", "registry/megatron-prune:latest", nodes=2, gpus_per_node=8,
                                      container_mounts=["/lustre:/lustre"])  # fmt: skip
    assert (slurm.nnodes(), slurm.nproc_per_node(), slurm.container_image) == (2, 8, "registry/megatron-prune:latest")
    assert type(slurm.get_launcher()).__name__ == "Torchrun"
    evaluate = experiment.executor_for(experiment.pipeline.Command("evaluate1", "evaluate", []), slurm)
    assert (evaluate.nnodes(), evaluate.nproc_per_node(), slurm.nnodes()) == (1, 1, 2)  # a clone, sized to the task
    bad = _experiment("--hf-model", source, "--work-dir", tmp_path / "w", "--target-params", "50%", "--slurm-account", "a",
                      "--dry-run", home=tmp_path / "nr")  # fmt: skip
    assert bad.returncode == 2 and "--container-image" in bad.stderr
