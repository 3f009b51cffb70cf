"""launch/: the torchrun wrappers' command lines, the pipeline plan, and the run card -> Megatron-Bridge config.

The shell scripts run in --dry-run mode (they print the torchrun command they would exec). The Megatron-Bridge
distillation config is built for real from a run card and two tiny HF models, and validated by Bridge itself
(`ConfigContainer.validate`); only `distill()` needs GPUs.
"""

import contextlib
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import types

import pytest

from tests.tiny_hf import make_hf_model
from tests.torchrun import REPO_ROOT

LAUNCH = REPO_ROOT / "launch"
sys.path.insert(0, str(LAUNCH))
import pipeline  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sh(script, *args, env=None):
    run = subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **(env or {})})  # fmt: skip
    return run.returncode, run.stdout, run.stderr


def test_prune_scripts_print_the_torchrun_command():
    gpus = {"NPROC_PER_NODE": "2"} if shutil.which("nvidia-smi") else {}  # default: TP x PP processes without GPUs
    code, out, _ = _sh("prune.sh", "--dry-run", "--hf-model", "m", "--output-dir", "o", "--target-num-layers", "3", env={"PP": "2", **gpus})
    argv = shlex.split(out)
    assert code == 0 and argv[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node"]
    assert argv[4] == "2" and "--standalone" in argv
    assert argv[argv.index("-m", 3) + 1] == "megatron_prune" and argv[-4:] == ["--tensor-model-parallel-size", "1",
                                                                                  "--pipeline-model-parallel-size", "2"]  # fmt: skip
    multi = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "6000", "NPROC_PER_NODE": "4"}
    code, out, _ = _sh("prune_nas.sh", "--dry-run", "--hf-model", "m", "--target-params", "6B", "--tensor-model-parallel-size", "8", env=multi)
    assert code == 0, out
    for pair in ("--nnodes 2", "--node-rank 1", "--rdzv-backend c10d", "--rdzv-endpoint node0:6000", "--nproc-per-node 4",
                 "--target-params 6B", "--tensor-model-parallel-size 8"):  # fmt: skip
        assert pair in out, (pair, out)

    code, out, _ = _sh("prune.sh", "--help")
    assert code == 0 and "NNODES" in out and "launch/prune_nas.sh" in out
    for script, args, env, message in [
        ("prune.sh", ["--hf-model", "m", "--target-params", "1B"], {}, "go to launch/prune_nas.sh"),
        ("prune_nas.sh", ["--hf-model", "m", "--target-num-layers", "3"], {}, "give a budget"),
        ("prune.sh", ["--hf-model", "m"], {"NPROC_PER_NODE": "3", "PP": "2"}, "world size 3"),
        ("prune.sh", ["--hf-model", "m", "--tensor-model-parallel-size", "2"], {"TP": "4"}, "contradicts"),
        ("prune.sh", ["--hf-model", "m"], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2"),
    ]:  # fmt: skip
        code, _, err = _sh(script, "--dry-run", *args, env=env)
        assert code == 2 and message in err, (script, args, err)


def test_distill_script_picks_bridge_on_gpu_and_the_cpu_loop_otherwise(tmp_path):
    card = tmp_path / "distillation_run_card.yaml"
    card.write_text("format: megatron-prune/distillation-run-card\n")
    code, out, _ = _sh("distill.sh", "--dry-run", "--cpu", card, "--output-dir", "kd", "--train-iters", "5")
    assert code == 0 and shlex.split(out) == [sys.executable, "-m", "megatron_prune.minitron.distill", "--run-card", str(card),
                                              "--output-dir", "kd", "--train-iters", "5"]  # fmt: skip
    code, out, _ = _sh("distill.sh", "--dry-run", "--gpu", card, "--output-dir", "kd", env={"NPROC_PER_NODE": "8", "NNODES": "2", "MASTER_ADDR": "n0"})
    argv = shlex.split(out)
    assert code == 0 and str(LAUNCH / "bridge_distill.py") in argv and "--rdzv-endpoint" in argv and argv[argv.index("--nproc-per-node") + 1] == "8"
    code, _, err = _sh("distill.sh", "--dry-run", tmp_path / "missing.yaml", "--output-dir", "kd")
    assert code == 2 and "no such file" in err
    code, _, err = _sh("distill.sh", "--dry-run", card)
    assert code == 2 and "--output-dir" in err


@pytest.fixture(scope="module")
def card_path(tmp_path_factory):
    """A run card for a tiny teacher and a pruned-shaped student (FFN 128 -> 96, 4 -> 3 layers), with a real blend."""
    from megatron_prune.minitron.distill.run_card import Checkpoint, Tokenizer, build_run_card, write_run_card

    root = tmp_path_factory.mktemp("card")
    teacher = make_hf_model(root / "teacher")
    student = make_hf_model(root / "student", intermediate_size=96, num_hidden_layers=3)
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16}
    card = build_run_card(
        Checkpoint(hf_checkpoint=str(student), config={**sizes, "ffn_hidden_size": 96, "num_layers": 3}),
        Checkpoint(hf_checkpoint=str(teacher), config={**sizes, "ffn_hidden_size": 128, "num_layers": 4}),
        Tokenizer(path=str(student), vocab_size=288),
        seq_length=64, global_batch_size=16, micro_batch_size=2, train_tokens=None, train_iters=300, lr_warmup_iters=30,
        data_blend=[{"path": "/data/a_text_document", "weight": 0.7}, {"path": "/data/b_text_document", "weight": 0.3}],
    )  # fmt: skip
    return write_run_card(root / "distillation_run_card.yaml", card)


@contextlib.contextmanager
def _without_energon():
    """Megatron-Bridge's config module imports megatron.energon (a multimodal data loader the NeMo container ships,
    absent from the CPU environment) for VLM datasets only: a stand-in is visible while Bridge is first imported."""
    class _Anything(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    added = "megatron.energon" not in sys.modules
    if added:
        sys.modules["megatron.energon"] = _Anything("megatron.energon")
    try:
        yield
    finally:
        if added:
            sys.modules.pop("megatron.energon", None)


@pytest.mark.heavy
def test_run_card_round_trips_into_the_bridge_distillation_config(card_path, tmp_path):
    from megatron_prune.minitron.distill.run_card import load_run_card
    from megatron_prune.minitron.runtime.cpu import apply_bridge_cpu_support

    bd = _load("bridge_distill")
    args = bd.build_parser().parse_args(["--run-card", str(card_path), "--output-dir", str(tmp_path / "kd"), "--lr", "2e-4",
                                         "--temperature", "2.0"])  # fmt: skip
    card = bd.card_with_overrides(load_run_card(card_path), args)
    settings = bd.bridge_settings(card, args.output_dir)
    assert settings["optimizer"]["lr"] == 2e-4 and settings["optimizer"]["min_lr"] == 1e-5  # a flag wins over the card
    assert settings["train"] == {"train_iters": 300, "global_batch_size": 16, "micro_batch_size": 2,
                                      "eval_interval": 100, "eval_iters": 32}  # fmt: skip
    assert settings["dataset"]["data_paths"] == ["0.7", "/data/a_text_document", "0.3", "/data/b_text_document"]
    printed = subprocess.run([sys.executable, str(LAUNCH / "bridge_distill.py"), "--run-card", str(card_path), "--output-dir",
                              str(tmp_path / "kd"), "--print-settings", "--lr", "2e-4", "--temperature", "2.0"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json.loads(json.dumps(settings))  # the CLI prints exactly these settings

    apply_bridge_cpu_support()
    with _without_energon():
        config = bd.build_config(settings)
        for name in ("apply_rope_fusion", "persist_layer_norm", "bias_dropout_fusion", "masked_softmax_fusion",
                     "bias_activation_fusion"):  # fused kernels need Transformer Engine / CUDA; the GPU run keeps them
            setattr(config.model, name, False)
        config.validate()  # Bridge's own checks, and it derives the schedule in samples
    opt, sched, train, model = config.optimizer, config.scheduler, config.train, config.model
    assert (opt.lr, opt.min_lr, opt.bf16) == (2e-4, 1e-5, True)
    assert (sched.lr_decay_style, sched.lr_warmup_iters, sched.lr_decay_iters) == ("linear", 30, 300)
    assert (sched.lr_warmup_steps, sched.lr_decay_steps) == (30 * 16, 300 * 16)
    assert (train.train_iters, train.global_batch_size, train.micro_batch_size) == (300, 16, 2)
    assert type(model).__name__ == "DistillationProvider" and model.kd_config.logit_kl_temperature == 2.0
    for provider, ffn, layers in ((model, 96, 3), (model.teacher, 128, 4)):  # shapes from the checkpoints' configs
        assert (provider.ffn_hidden_size, provider.num_layers, provider.seq_length) == (ffn, layers, 64)
        assert (provider.tensor_model_parallel_size, provider.pipeline_model_parallel_size) == (1, 1)
    assert config.dataset.seq_length == 64 and config.dataset.blend == (["/data/a_text_document", "/data/b_text_document"], [0.7, 0.3])
    assert config.tokenizer.vocab_size == 288 and config.checkpoint.save == str(tmp_path / "kd" / "checkpoints")


@pytest.mark.heavy
def test_bridge_distill_refuses_bad_input(card_path, tmp_path, capsys):
    bd = _load("bridge_distill")
    base = ["--run-card", str(card_path), "--output-dir", str(tmp_path / "kd")]
    for extra, message in [
        (["--tensor-model-parallel-size", "3"], "does not divide"),
        (["--train-iters", "20"], "lr_warmup_iters=30 must be smaller"),
        (["--micro-batch-size", "3"], "multiple of recipe.micro_batch_size"),
    ]:  # fmt: skip
        assert bd.main(base + extra) == 2
        assert message in capsys.readouterr().err, extra
    assert bd.main(["--run-card", str(tmp_path / "nothing.yaml"), "--output-dir", "kd"]) == 2
    assert "no such file" in capsys.readouterr().err
    text = card_path.read_text()
    student = card_path.parent / "student"
    (tmp_path / "student").mkdir()
    for f in student.iterdir():  # the student without its config.json
        if f.name != "config.json":
            (tmp_path / "student" / f.name).write_bytes(f.read_bytes())
    for edit, message in [
        (("vocab_size: 288", "vocab_size: 300"), "share one vocabulary"),
        ((str(card_path.parent / "teacher"), str(tmp_path / "no-teacher")), "teacher.hf_checkpoint"),
        ((f"hf_checkpoint: {student}", f"hf_checkpoint: {tmp_path / 'student'}"), "has no config.json"),
    ]:  # fmt: skip
        assert edit[0] in text, edit
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(*edit))
        assert bd.main(["--run-card", str(bad), "--output-dir", "kd", "--mock-data"]) == 2
        assert message in capsys.readouterr().err, edit
    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(card_path.read_text().replace("/data/a_text_document", "PLACEHOLDER/path/to/tokenized_text_document"))
    assert bd.main(["--run-card", str(placeholder), "--output-dir", "kd"]) == 2
    assert "placeholder" in capsys.readouterr().err


def test_step_targets_reach_the_final_sizes_evenly():
    original = {"hidden_size": 4096, "ffn_hidden_size": 14336, "num_layers": 32, "num_attention_heads": 32, "num_query_groups": 8}
    final = {"hidden_size": 3072, "ffn_hidden_size": 9216, "num_layers": 24, "num_attention_heads": 24, "num_query_groups": 4}
    steps = pipeline.size_steps(original, final, 2)
    assert steps == [{"hidden_size": 3584, "ffn_hidden_size": 11776, "num_layers": 28, "num_attention_heads": 32, "num_query_groups": 8},
                     final]  # fmt: skip
    assert pipeline.size_steps({"ffn_hidden_size": 128, "num_layers": 4}, {"ffn_hidden_size": 64, "num_layers": 2}, 2)[0] == \
        {"ffn_hidden_size": 96, "num_layers": 3}  # fmt: skip
    assert pipeline.budget_steps(1000, 250, 2) == ["500", "250"]  # each step keeps half of its input
    with pytest.raises(pipeline.PipelineError, match="ffn_hidden_size=20000"):
        pipeline.size_steps(original, {"ffn_hidden_size": 20000}, 2)
    with pytest.raises(pipeline.PipelineError, match="not in the model"):
        pipeline.size_steps(original, {"num_moe_experts": 4}, 2)


def test_plan_chains_each_step_into_the_next(tmp_path):
    plan = pipeline.build_plan("/models/m", tmp_path, [{"num_layers": 3}, "80M"], distill="bridge", pp=2, distill_nproc=8,
                               distill_args=["--train-iters", "10"])  # fmt: skip
    names = [c.name for c in plan.commands]
    assert names == ["prune1", "distill1", "evaluate1", "prune2", "distill2", "evaluate2"]
    prune1, distill1, evaluate1, prune2, distill2, _ = plan.commands
    assert prune1.args[:6] == ["--hf-model", "/models/m", "--output-dir", str(tmp_path / "step1" / "pruned"), "--target-num-layers", "3"]
    assert prune1.nproc == 2 and "--pipeline-model-parallel-size" in prune1.args
    assert distill1.args[:2] == ["--run-card", str(tmp_path / "step1" / "pruned" / "distillation_run_card.yaml")]
    assert distill1.script == str(LAUNCH / "bridge_distill.py") and distill1.nproc == 8 and distill1.args[-2:] == ["--train-iters", "10"]
    assert evaluate1.args[:2] == ["--hf-model", str(tmp_path / "step1" / "distilled" / "hf")]
    assert prune2.args[1] == str(tmp_path / "step1" / "distilled" / "hf") and prune2.args[4:6] == ["--target-params", "80M"]
    assert distill2.args[1] == str(tmp_path / "step2" / "pruned" / "distillation_run_card.yaml")
    with pytest.raises(pipeline.PipelineError, match="cpu or bridge"):
        pipeline.build_plan("/models/m", tmp_path, [{"num_layers": 3}], distill="gpu")
