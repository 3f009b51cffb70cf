"""The distillation hand-off end to end on a tiny pruned Llama: `megatron-prune` writes the run card, the CPU
distillation CLI consumes it, and logit KD through Megatron-core's schedule and optimizer lowers the KL.
"""

import json

import pytest
import torch
import yaml

from megatron_prune.minitron.cli import main as prune_main
from megatron_prune.minitron.distill.__main__ import main as distill_main
from megatron_prune.minitron.distill.run_card import FILE_NAME, load_run_card
from tests.tiny_hf import make_hf_model

pytestmark = pytest.mark.heavy  # a prune, then the distillation CLI and the CPU pipeline

PRUNE = ["--target-hidden-size", "48", "--target-ffn-hidden-size", "64", "--target-num-layers", "3",
         "--calib-samples", "8", "--seq-length", "32", "--micro-batch-size", "2", "--no-report",
         "--distill-global-batch-size", "64", "--distill-train-tokens", "1M"]  # fmt: skip
STEPS = ["--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--log-interval", "1"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    source = make_hf_model(root / "teacher", "llama")
    assert prune_main(["--hf-model", str(source), "--output-dir", str(root / "pruned"), *PRUNE]) == 0
    return source, root / "pruned"


def test_run_card_round_trips_into_the_distillation_cli(pruned, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source, out = pruned
    card = load_run_card(out / FILE_NAME)
    summary = json.loads((out / "prune_summary.json").read_text())
    assert card.student.hf_checkpoint == str(out / "hf") and card.student.megatron_checkpoint == str(out / "megatron")
    assert card.teacher.hf_checkpoint == str(source) and card.tokenizer.vocab_size == 288
    assert card.student.params == summary["params_after"] and card.teacher.params == summary["params_before"]
    assert {k: card.student.config[k] for k in ("hidden_size", "ffn_hidden_size", "num_layers")} == {
        "hidden_size": 48, "ffn_hidden_size": 64, "num_layers": 3}
    assert card.pruning.export_config == {"hidden_size": 48, "ffn_hidden_size": 64, "num_layers": 3}
    assert (card.recipe.global_batch_size, card.recipe.train_tokens) == (64, 1_000_000)  # the --distill-* flags
    assert card.recipe.train_iters == -(-1_000_000 // (64 * card.recipe.seq_length))

    dist = tmp_path / "distilled"
    argv = ["--run-card", str(out / FILE_NAME), "--output-dir", str(dist), *STEPS, "--train-iters", "4",
            "--lr-warmup-iters", "1", "--save-interval", "2", "--no-plot"]  # fmt: skip
    assert distill_main(argv) == 0
    assert sorted(p.name for p in dist.iterdir()) == ["checkpoints", "distill_summary.json", "hf", "loss_curve.csv"]
    assert sorted(p.name for p in (dist / "checkpoints").iterdir()) == ["iter_0000002.pt", "iter_0000004.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled"]  # no partial or checkpoint siblings left
    record = json.loads((dist / "distill_summary.json").read_text())
    assert record["tokens_seen"] == 4 * 4 * 32 and record["recipe"]["train_iters"] == 4
    assert len((dist / "loss_curve.csv").read_text().splitlines()) == 1 + 4

    model = AutoModelForCausalLM.from_pretrained(dist / "hf")  # the next prune's --hf-model
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (48, 64, 3)
    before, after = load_file(str(out / "hf" / "model.safetensors")), load_file(str(dist / "hf" / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    logits = model(torch.arange(16).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_kd_lowers_the_kl_within_a_few_steps(pruned, mcore):
    from transformers import AutoTokenizer

    from megatron_prune.minitron.bridge import import_hf_model
    from megatron_prune.minitron.data.calibration import token_rows
    from megatron_prune.minitron.distill.kd import Distiller, Schedule, kd_loss, replica_batches, run
    from megatron_prune.minitron.runtime.parallel import ParallelContext

    source, out = pruned
    teacher, student = import_hf_model(str(source)).model, import_hf_model(str(out / "hf")).model
    rows = token_rows("default", AutoTokenizer.from_pretrained(source), 32, 8)  # [8, 32]
    positions = torch.arange(32).expand_as(rows)

    def kl() -> float:
        with torch.no_grad():
            return kd_loss(student(rows, positions, attention_mask=None), teacher(rows, positions, attention_mask=None)).mean().item()

    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items() if not k.endswith("_extra_state")}
    before = kl()
    schedule = Schedule(train_iters=12, micro_batch_size=2, global_batch_size=4, lr=2e-3, min_lr=2e-4, lr_warmup_iters=0)
    distiller = Distiller(student, teacher, schedule, vocab_size=288)
    history = run(distiller, replica_batches(rows, schedule, ParallelContext.from_megatron(), seed=0), log_interval=4)
    student.eval()
    after = kl()
    assert after < 0.5 * before, (before, after)  # needs gradients to reach the student's weights (measured: 0.27x)
    assert sum(h["kd_loss"] for h in history[-2:]) < sum(h["kd_loss"] for h in history[:2])
    assert [h["lr"] for h in history][:2] == pytest.approx([2e-3, 2e-3 - 1.8e-3 / 12])  # linear decay lr -> min_lr
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is frozen


def test_distill_cli_bad_inputs_fail_before_weights_are_read(pruned, tmp_path, capsys, monkeypatch):
    def weights_read(*args, **kwargs):
        raise AssertionError("a model's weights were read before the input was checked")

    monkeypatch.setattr("megatron_prune.minitron.bridge.import_hf_model", weights_read)
    monkeypatch.setattr("megatron_prune.minitron.api.prune", weights_read)
    source, out = pruned
    card = out / FILE_NAME

    def fails(*argv, match):
        assert distill_main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert match in err, err

    dist = tmp_path / "d"
    fails("--run-card", card, "--output-dir", dist, *STEPS, "--train-iters", "5", match="recipe.lr_warmup_iters=100 must be smaller")
    fails("--run-card", tmp_path / "none.yaml", "--output-dir", dist, match="no such file")
    fails("--run-card", card, "--output-dir", out / "hf" / "x", *STEPS, "--train-iters", "5", "--lr-warmup-iters", "1",
          match="overlaps student.hf_checkpoint")  # fmt: skip
    prune = ["--hf-model", source, "--output-dir", dist, *PRUNE[:-4]]  # the prune CLI checks its --distill-* flags first
    assert prune_main([str(a) for a in prune + ["--distill-tensor-model-parallel-size", "3"]]) == 2
    assert "parallelism.tensor_model_parallel_size=3 does not divide teacher.config.num_attention_heads=4" in capsys.readouterr().err
    assert prune_main([str(a) for a in prune + ["--distill-global-batch-size", "6", "--distill-micro-batch-size", "4"]]) == 2
    assert "recipe.global_batch_size=6 must be a multiple of recipe.micro_batch_size=4" in capsys.readouterr().err

    data = yaml.safe_load(card.read_text())
    data["student"]["hf_checkpoint"] = data["student"]["megatron_checkpoint"] = None  # (a Megatron-only student works)
    (tmp_path / "no_student.yaml").write_text(yaml.safe_dump(data))
    fails("--run-card", tmp_path / "no_student.yaml", "--output-dir", dist, match="student: give student.hf_checkpoint or")
    assert not dist.exists()


def test_short_runs_name_the_warm_up_flag_and_the_cpu_pipeline_distils_a_guideline_card(pruned, tmp_path, capsys):
    """The card's recipe is the GPU guideline (100 warm-up steps, global batch 768): a 50-step run says which flag
    fits the warm-up, and the pipeline's CPU distillation step brings a CPU-sized recipe, so a finished prune is
    not followed by a distillation that cannot run."""
    import sys

    from tests.torchrun import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "launch"))
    import pipeline

    source, out = pruned
    data = yaml.safe_load((out / FILE_NAME).read_text())
    data["recipe"].update(global_batch_size=768, train_tokens=80_000_000_000, train_iters=None, lr_warmup_iters=100)
    card = tmp_path / FILE_NAME
    card.write_text(yaml.safe_dump(data))
    assert distill_main(["--run-card", str(card), "--output-dir", str(tmp_path / "x"), "--train-iters", "50"]) == 2
    assert "lr_warmup_iters=100 must be smaller than recipe.train_iters=50: for a run this short pass --lr-warmup-iters (e.g. 5)" in capsys.readouterr().err
    plan = pipeline.build_plan(str(source), tmp_path / "work", [{"num_layers": 3}], distill="cpu",
                               distill_args=["--train-iters", "3", "--no-plot"])  # fmt: skip
    distill = next(c for c in plan.commands if c.kind == "distill")
    args = distill.args[distill.args.index("--output-dir") + 2 :]
    assert args == ["--train-iters", "3", "--no-plot", "--lr-warmup-iters", "0", "--global-batch-size", "8",
                    "--micro-batch-size", "2", "--seq-length", "128"]  # the model has 128 positions
    assert distill_main(["--run-card", str(card), "--output-dir", str(tmp_path / "d"), *args]) == 0
    record = json.loads((tmp_path / "d" / "distill_summary.json").read_text())
    assert record["recipe"]["global_batch_size"] == 8 and record["tokens_seen"] == 3 * 8 * 128
