"""The distillation run card: defaults from the published guideline, YAML round trip, and every bad input named.

Config-level only (tiny HF folders on disk, no model built): a card is validated without reading weights.
"""

import dataclasses
import json
import math
import shutil

import pytest
import yaml

from megatron_prune.minitron.distill.run_card import (
    FILE_NAME, PLACEHOLDER, Checkpoint, Parallelism, Pruning, Recipe, RunCardError, Tokenizer, build_run_card,
    fitting_size, load_run_card, main, override_recipe, write_run_card,
)  # fmt: skip
from tests.tiny_hf import make_hf_model

STUDENT_SIZES = {"hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2, "num_layers": 3}
TEACHER_SIZES = {**STUDENT_SIZES, "ffn_hidden_size": 128, "num_layers": 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    teacher = make_hf_model(root / "teacher", "llama")
    student = make_hf_model(root / "student", "llama", intermediate_size=96, num_hidden_layers=3)
    return root, student, teacher


def _card(student, teacher, **recipe):
    return build_run_card(Checkpoint(hf_checkpoint=str(student), config=dict(STUDENT_SIZES), params=100),
                          Checkpoint(hf_checkpoint=str(teacher), config=dict(TEACHER_SIZES), params=150),
                          Tokenizer(path=str(student), vocab_size=288), Pruning({"ffn_hidden_size": 96}, 150, 100, 0.3333),
                          **recipe)  # fmt: skip


def test_recipe_defaults_follow_the_minitron_guideline(folders):
    _, student, teacher = folders
    r = Recipe()
    assert (r.global_batch_size, r.lr, r.min_lr, r.lr_decay_style, r.lr_warmup_iters) == (768, 1e-4, 1e-5, "linear", 100)
    assert (r.seq_length, r.train_tokens, r.kd.loss) == (4096, 80_000_000_000, "logits_kl")
    card = _card(student, teacher)
    assert card.recipe.seq_length == 128  # capped at the student's max_position_embeddings
    assert card.recipe.train_iters == math.ceil(80e9 / (768 * 128))
    assert card.recipe.data_blend[0]["path"] == PLACEHOLDER


def test_card_round_trips_through_yaml_and_resolves_relative_paths(folders, capsys):
    root, student, teacher = folders
    card = _card(student, teacher, seq_length=64, global_batch_size=16, train_tokens=10_000, lr_warmup_iters=2)
    path = write_run_card(root / FILE_NAME, card)
    assert path.read_text().startswith("# Distillation run card") and not list(root.glob(f".{FILE_NAME}.tmp-*"))
    loaded = load_run_card(path)
    assert loaded.to_dict() == card.to_dict() and loaded.recipe.train_iters == math.ceil(10_000 / (16 * 64))

    data = yaml.safe_load(path.read_text())  # a card moved with its checkpoints: paths relative to the card
    data["student"]["hf_checkpoint"] = data["tokenizer"]["path"] = "student"
    data["teacher"]["hf_checkpoint"] = "./teacher"
    (root / "relative.yaml").write_text(yaml.safe_dump(data))
    relative = load_run_card(root / "relative.yaml")
    assert relative.student.hf_checkpoint == str(student) and relative.teacher.hf_checkpoint == str(teacher)

    assert main([str(path), "--get", "recipe.train_iters"]) == 0  # what shell launch scripts read
    assert capsys.readouterr().out.strip() == str(loaded.recipe.train_iters)
    assert main([str(path), "--get", "recipe.data_blend"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"path": PLACEHOLDER, "weight": 1.0}]
    assert main([str(path), "--get", "recipe.nope"]) == 2 and "no field 'recipe.nope'" in capsys.readouterr().err


def test_overrides_rederive_the_budget():
    r = override_recipe(Recipe(seq_length=128), train_iters=10, lr_warmup_iters=2, temperature=2.0)
    assert (r.train_iters, r.train_tokens, r.kd.temperature) == (10, 10 * 768 * 128, 2.0)
    r = override_recipe(r, global_batch_size=8)  # a new batch shape keeps the token budget
    assert r.train_iters == math.ceil(10 * 768 * 128 / (8 * 128))
    with pytest.raises(RunCardError, match="recipe.lr_warmup_iters=100 must be smaller than recipe.train_iters=5"):
        override_recipe(Recipe(), train_iters=5)


def _edited(root, student, teacher, edit):
    data = _card(student, teacher).to_dict()
    edit(data)
    path = root / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(path, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()
BAD = [
    ("format", "other/format", "format 'other/format' is not"),
    ("version", 2, "version 2 is not supported"),
    ("student.config.hidden_size", _DELETE, "student.config.hidden_size is missing"),
    ("student.config.ffn_hidden_size", 80, "student.config.ffn_hidden_size=80 disagrees with intermediate_size=96"),
    ("student.hf_checkpoint", None, "give student.hf_checkpoint or student.megatron_checkpoint"),
    ("teacher.hf_checkpoint", None, "teacher: missing"),
    ("teacher.hf_checkpoint", "/nonexistent/teacher", "teacher.hf_checkpoint '/nonexistent/teacher': no such file"),
    ("tokenizer.vocab_size", 320, "must share one vocabulary"),
    ("parallelism.tensor_model_parallel_size", 3, "parallelism.tensor_model_parallel_size=3 does not divide student.config.num_attention_heads=4"),
    ("parallelism.pipeline_model_parallel_size", 2, "does not divide student.config.num_layers=3"),
    ("parallelism.context_parallel_size", 0, "parallelism.context_parallel_size=0 must be an integer >= 1"),
    ("recipe.train_iters", 7, "recipe.train_iters=7 disagrees with recipe.train_tokens"),
    ("recipe.global_batch_size", 0, "recipe.global_batch_size=0 must be a positive integer"),
    ("recipe.lr", 1e-6, "0 <= min_lr <= lr"),
    ("recipe.kd.loss", "mse", "only logits_kl"),
    ("recipe.warmup", 5, "unknown field(s) recipe.warmup"),
    ("student", "hf", "field 'student' must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize("field,value,match", BAD, ids=[b[0] + ("-del" if b[1] is _DELETE else "") for b in BAD])
def test_bad_cards_name_the_field(folders, field, value, match):
    root, student, teacher = folders
    with pytest.raises(RunCardError, match=_literal(match)):
        load_run_card(_edited(root, student, teacher, _set(field, value)))


def test_checkpoints_without_config_and_foreign_tokenizers_are_refused(folders, tmp_path):
    root, student, teacher = folders
    bare = tmp_path / "bare"  # a student folder without its config.json
    shutil.copytree(student, bare)
    (bare / "config.json").unlink()
    with pytest.raises(RunCardError, match="student.hf_checkpoint .* has no config.json"):
        load_run_card(_edited(root, student, teacher, _set("student.hf_checkpoint", str(bare))))
    megatron = tmp_path / "megatron" / "iter_0000000"  # a Megatron checkpoint without run_config.yaml
    megatron.mkdir(parents=True)
    with pytest.raises(RunCardError, match="has no iter_\\*/run_config.yaml"):
        load_run_card(_edited(root, student, teacher, _set("student.megatron_checkpoint", str(megatron.parent))))

    other = make_hf_model(tmp_path / "vocab", "llama", vocab_size=320)  # a teacher with another vocabulary size
    with pytest.raises(RunCardError, match="teacher vocab_size .*=320"):
        load_run_card(_edited(root, student, teacher, _set("teacher.hf_checkpoint", str(other))))
    foreign = tmp_path / "foreign"  # same size, other tokens
    shutil.copytree(teacher, foreign)
    tok = json.loads((foreign / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (foreign / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(RunCardError, match="tokenizers of student, teacher, tokenizer differ"):
        load_run_card(_edited(root, student, teacher, _set("teacher.hf_checkpoint", str(foreign))))
    with pytest.raises(RunCardError, match="no such file"):
        load_run_card(tmp_path / "missing.yaml")


def test_suggested_layout_fits_both_models():
    configs = {"student": STUDENT_SIZES, "teacher": TEACHER_SIZES}
    assert fitting_size("pipeline_model_parallel_size", 2, configs) == 1  # 3 student layers
    assert fitting_size("tensor_model_parallel_size", 4, configs) == 2  # 2 query groups
    assert fitting_size("expert_model_parallel_size", 8, configs) == 8  # no experts


def test_hub_teacher_is_kept_as_an_id(folders):
    root, student, teacher = folders
    card = load_run_card(_edited(root, student, teacher, _set("teacher.hf_checkpoint", "HuggingFaceTB/SmolLM2-135M")))
    assert card.teacher.hf_checkpoint == "HuggingFaceTB/SmolLM2-135M"
    assert dataclasses.asdict(card.parallelism) == dataclasses.asdict(Parallelism())


def _literal(text: str) -> str:
    import re

    return re.escape(text).replace("\\.\\*", ".*")


def test_prune_command_names_its_own_warmup_flag():
    """A short --distill-train-tokens on the prune command: the warm-up error names --distill-lr-warmup-iters
    (the prune command's flag), and passing it makes the recipe valid."""
    import argparse
    from types import SimpleNamespace

    from megatron_prune.minitron.distill.args import add_run_card_arguments, run_card_options_from_args
    from megatron_prune.minitron.distill.run_card import RunCardError

    parser = argparse.ArgumentParser()
    add_run_card_arguments(parser)
    hf_config = SimpleNamespace(max_position_embeddings=8192)
    short = ["--distill-train-tokens", "10M"]
    with pytest.raises(RunCardError, match=r"lr_warmup_iters=100 must be smaller .* pass --distill-lr-warmup-iters \(e.g. 0\)"):
        run_card_options_from_args(parser.parse_args(short), hf_config, {})
    _, recipe = run_card_options_from_args(parser.parse_args(short + ["--distill-lr-warmup-iters", "1"]), hf_config, {})
    assert recipe == {"train_tokens": 10_000_000, "lr_warmup_iters": 1}
