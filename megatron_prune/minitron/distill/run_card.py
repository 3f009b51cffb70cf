"""The distillation run card: what a pruned checkpoint needs to be distilled, as one YAML file.

`megatron-prune` writes `distillation_run_card.yaml` next to every pruned checkpoint; the CPU loop
(`python -m megatron_prune.minitron.distill`) and the GPU launch scripts (`launch/`) read it with `load_run_card`.
Owns the schema, its defaults (the published guideline) and its validation; reads configs only, never weights.

    format: megatron-prune/distillation-run-card
    version: 1
    student:                       # the pruned model
      hf_checkpoint: /abs/OUT/hf   # HF folder (config.json + weights), or null
      megatron_checkpoint: /abs/OUT/megatron   # Megatron-Bridge checkpoint (iter_*/run_config.yaml), or null
      config: {hidden_size: .., ffn_hidden_size: .., num_attention_heads: .., num_query_groups: .., kv_channels: ..,
               num_layers: .., (MoE / Mamba sizes when the model has them)}   # TransformerConfig names
      params: 97351488
      dtype: float32               # of the checkpoint's weights
    teacher:                       # the model before pruning
      hf_checkpoint: /abs/SOURCE or org/name (hub id)
      megatron_checkpoint: null
      config: {...}                # its sizes, as for the student
      params: 134515008
    tokenizer: {path: /abs/OUT/hf, vocab_size: 49152}       # shared by student and teacher
    parallelism: {tensor_model_parallel_size: 1, pipeline_model_parallel_size: 1, context_parallel_size: 1,
                  expert_model_parallel_size: 1}            # suggested for distillation; checked against both models
    recipe:
      seq_length: 4096             # 8192 if the data has long sequences (capped at max_position_embeddings)
      micro_batch_size: 1          # as large as GPU memory allows
      global_batch_size: 768
      lr: 1.0e-4                   # peak, for 30-50% pruning: more compression -> higher, larger model -> lower
      min_lr: 1.0e-5
      lr_decay_style: linear
      lr_warmup_iters: 100
      train_tokens: 80000000000    # 80-100B tokens recommended
      train_iters: 25432           # = ceil(train_tokens / (global_batch_size * seq_length))
      data_blend: [{path: PLACEHOLDER..., weight: 1.0}]     # Megatron-tokenized prefixes; replace the placeholder
      kd: {loss: logits_kl, temperature: 1.0, kd_loss_scale: 1.0, skip_lm_loss: true}
      seed: 1234
    pruning: {export_config: {...}, params_before: .., params_after: .., compression: 0.276}

Recipe defaults follow NVIDIA Model Optimizer's Minitron "Pruning Guidelines › Distillation Hyperparameters"
(https://github.com/NVIDIA/Model-Optimizer/tree/main/examples/pruning#pruning-guidelines): sequence length 8192
(4096 for shorter sequences), GBS 768, LR 1e-4 -> 1e-5 linear decay for 30-50% pruning, 100 warm-up steps,
max steps = tokens / (seq len x GBS) with 80-100B tokens. The default seq_length 4096 is also the default of
Model Optimizer's Megatron-Bridge `examples/megatron_bridge/distill.py`.

Relative paths in a card are read relative to the card's folder. Every error is a `RunCardError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, get_type_hints

from megatron_prune.minitron.axes import fits_parallel, hf_name_of, parallel_rules
from megatron_prune.errors import RunCardError  # noqa: F401  (raised here; importable from here too)

FORMAT = "megatron-prune/distillation-run-card"
VERSION = 1
FILE_NAME = "distillation_run_card.yaml"
GUIDELINE = "https://github.com/NVIDIA/Model-Optimizer/tree/main/examples/pruning#pruning-guidelines"
PLACEHOLDER = "PLACEHOLDER/path/to/tokenized_text_document"  # a Megatron-tokenized data prefix to fill in
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# HF config.json names of the sizes a card records (TransformerConfig names), to catch a stale card
_HF_NAMES = {axis: hf_name_of(axis) for axis in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                                                  "num_query_groups")}  # fmt: skip
# the model sizes each parallel dimension splits, by the axis registry's rules (a suggested recipe assumes pipeline
# stages of equal depth: uneven stages need a custom layout)
PARALLEL_RULES = parallel_rules()


@dataclass
class Checkpoint:
    """A model: its checkpoint(s) and sizes (TransformerConfig names)."""

    hf_checkpoint: Optional[str] = None
    megatron_checkpoint: Optional[str] = None
    config: Dict[str, int] = field(default_factory=dict)
    params: Optional[int] = None
    dtype: Optional[str] = None  # of the checkpoint's weights, e.g. bfloat16 (None: not recorded)


@dataclass
class Tokenizer:
    path: Optional[str]
    vocab_size: int  # rows of the embedding (the model's vocab_size)


@dataclass
class Parallelism:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1


@dataclass
class KD:
    loss: str = "logits_kl"  # KL(teacher || student) on the output logits
    temperature: float = 1.0
    kd_loss_scale: float = 1.0
    skip_lm_loss: bool = True  # distil on the KD loss only (Model Optimizer's default)


@dataclass
class Recipe:
    """A starting recipe (see the module docstring for the guideline each default follows)."""

    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 768
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 100
    train_tokens: Optional[int] = 80_000_000_000
    train_iters: Optional[int] = None  # None: derived from train_tokens
    data_blend: List[Dict[str, Any]] = field(default_factory=lambda: [{"path": PLACEHOLDER, "weight": 1.0}])
    kd: KD = field(default_factory=KD)
    seed: int = 1234

    @property
    def tokens_per_iter(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass
class Pruning:
    export_config: Dict[str, int] = field(default_factory=dict)
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    compression: Optional[float] = None  # 1 - params_after / params_before


@dataclass
class RunCard:
    student: Checkpoint
    teacher: Checkpoint
    tokenizer: Tokenizer
    parallelism: Parallelism = field(default_factory=Parallelism)
    recipe: Recipe = field(default_factory=Recipe)
    pruning: Pruning = field(default_factory=Pruning)
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format": data.pop("format"), "version": data.pop("version"), **data}


def build_run_card(student: Checkpoint, teacher: Checkpoint, tokenizer: Tokenizer, pruning: Optional[Pruning] = None,
                   parallelism: Optional[Parallelism] = None, **recipe: Any) -> RunCard:  # fmt: skip
    """A validated card. `recipe` overrides `Recipe` defaults; train_iters is derived from train_tokens, and
    seq_length defaults to min(4096, max_position_embeddings of the student's, else the teacher's, HF config)."""
    if "seq_length" not in recipe:
        limit = (_hf_config(student.hf_checkpoint) or _hf_config(teacher.hf_checkpoint) or {}).get("max_position_embeddings")
        recipe["seq_length"] = min(Recipe.seq_length, limit) if isinstance(limit, int) else Recipe.seq_length
    card = RunCard(student, teacher, tokenizer, parallelism or Parallelism(), Recipe(**recipe), pruning or Pruning())
    return validate_run_card(card)


def write_run_card(path, card: RunCard) -> Path:
    """Write `card` as YAML at `path` (atomically: a temporary file renamed), with a header naming the guideline."""
    import yaml

    path = Path(path)
    header = (f"# Distillation run card written by megatron-prune. Consumed by `python -m megatron_prune.minitron.distill "
              f"--run-card {path.name}` (CPU, small models)\n# and by launch/distill.sh (Megatron-Bridge on GPUs). "
              f"Recipe: a starting point following {GUIDELINE}\n# (edit it; `train_iters: null` is derived from "
              f"train_tokens). Replace the data_blend placeholder with Megatron-tokenized data.\n")  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(card.to_dict(), sort_keys=False, default_flow_style=None, width=120))
    os.replace(tmp, path)
    return path


def load_run_card(path) -> RunCard:
    """Read and validate a card; relative checkpoint paths are resolved against the card's folder."""
    import yaml

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise RunCardError(f"run card {str(path)!r}: no such file (megatron-prune writes {FILE_NAME} in its --output-dir)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunCardError(f"run card {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RunCardError(f"run card {str(path)!r} must be a YAML mapping, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise RunCardError(f"run card {str(path)!r}: format {data.get('format')!r} is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise RunCardError(f"run card {str(path)!r}: version {data.get('version')!r} is not supported (this megatron-prune reads version {VERSION})")
    card = _from_dict(RunCard, data, "")
    for model in (card.student, card.teacher):
        model.hf_checkpoint = _resolve(model.hf_checkpoint, path.parent)
        model.megatron_checkpoint = _resolve(model.megatron_checkpoint, path.parent)
    card.tokenizer.path = _resolve(card.tokenizer.path, path.parent)
    return validate_run_card(card)


def validate_run_card(card: RunCard) -> RunCard:
    """Check `card` (configs only) and fill in recipe.train_iters / train_tokens; returns it. Raises RunCardError."""
    _check_student(card.student)
    _check_teacher(card.teacher)
    _check_vocabulary(card)
    check_parallelism(card.parallelism, {"student": card.student.config, "teacher": card.teacher.config}, card.recipe)
    _check_recipe(card.recipe)
    return card


def override_recipe(recipe: Recipe, **changes: Any) -> Recipe:
    """A validated copy of `recipe` with `changes` (None values ignored; `temperature` sets recipe.kd's). A new
    train_iters re-derives train_tokens; a new batch shape or train_tokens re-derives train_iters."""
    changes = {k: v for k, v in changes.items() if v is not None}
    temperature = changes.pop("temperature", None)
    new = dataclasses.replace(recipe, **changes)
    if temperature is not None:
        new.kd = dataclasses.replace(recipe.kd, temperature=temperature)
    if "train_iters" in changes:
        new.train_tokens = None
    elif {"train_tokens", "seq_length", "global_batch_size"} & changes.keys():
        new.train_iters = None
    _check_recipe(new)
    return new


def fitting_size(name: str, at_most: int, configs: Dict[str, Dict[str, int]]) -> int:
    """The largest parallel size <= `at_most` for `name` (a `Parallelism` field) that divides every model's sizes."""
    return next(d for d in range(max(at_most, 1), 0, -1) if not misfits(name, d, configs))


def misfits(name: str, size: int, configs: Dict[str, Dict[str, int]]) -> List[Tuple[str, str, int]]:
    """(model, config key, value) of every size in `configs` ({model: sizes}) that parallel size `size` of `name`
    (a `Parallelism` field) does not divide: Megatron splits them evenly over that parallel dimension."""
    return [(model, k, c[k]) for model, c in configs.items() for k in PARALLEL_RULES.get(name, ())
            if c.get(k) and not fits_parallel(k, c[k], name, size)]  # fmt: skip


def data_paths(recipe: Recipe) -> List[str]:
    """The blend as Megatron's flat `weight path weight path ...` list (`get_blend_from_list`'s input)."""
    return [str(x) for part in recipe.data_blend for x in (part.get("weight", 1.0), part["path"])]


def has_placeholder_data(recipe: Recipe) -> bool:
    return any(PLACEHOLDER in str(part.get("path", "")) for part in recipe.data_blend)


def _check_student(student: Checkpoint) -> None:
    if not student.hf_checkpoint and not student.megatron_checkpoint:
        raise RunCardError("student: give student.hf_checkpoint or student.megatron_checkpoint (both are empty)")
    for key in ("hidden_size", "num_layers"):
        if not isinstance(student.config.get(key), int):
            raise RunCardError(f"student.config.{key} is missing: the card must carry the pruned sizes (TransformerConfig names)")
    if student.hf_checkpoint:
        if not Path(student.hf_checkpoint).is_dir():
            raise RunCardError(f"student.hf_checkpoint {student.hf_checkpoint!r}: no such directory")
        hf = _hf_config(student.hf_checkpoint, "student.hf_checkpoint", required=True)
        for key, hf_key in _HF_NAMES.items():
            if key in student.config and hf_key in hf and hf[hf_key] != student.config[key]:
                raise RunCardError(f"student.config.{key}={student.config[key]} disagrees with {hf_key}={hf[hf_key]} in "
                                   f"{student.hf_checkpoint}/config.json: the card does not describe this checkpoint")  # fmt: skip
    if student.megatron_checkpoint:
        root = Path(student.megatron_checkpoint)
        if not root.is_dir():
            raise RunCardError(f"student.megatron_checkpoint {student.megatron_checkpoint!r}: no such directory")
        bridge = list(root.glob("iter_*/run_config.yaml")) or (root / "run_config.yaml").is_file()
        megatron_lm = list(root.glob("*/common.pt")) or (root / "common.pt").is_file()  # args in the common state
        if not bridge and not megatron_lm:
            raise RunCardError(f"student.megatron_checkpoint {student.megatron_checkpoint!r} has no iter_*/run_config.yaml "
                               "(Megatron-Bridge) or common.pt (Megatron-LM): a checkpoint without its model config cannot be "
                               "rebuilt")  # fmt: skip


def _check_teacher(teacher: Checkpoint) -> None:
    if not teacher.hf_checkpoint and not teacher.megatron_checkpoint:
        raise RunCardError("teacher: missing; give teacher.hf_checkpoint (the unpruned model's HF folder or hub id)")
    for name in ("hf_checkpoint", "megatron_checkpoint"):
        value = getattr(teacher, name)
        if value and _looks_local(value) and not Path(value).exists():
            raise RunCardError(f"teacher.{name} {value!r}: no such file or directory")
    _hf_config(teacher.hf_checkpoint, "teacher.hf_checkpoint", required=True)  # a local folder must hold config.json


def _check_vocabulary(card: RunCard) -> None:
    """Student, teacher and tokenizer must share one vocabulary: KD compares their logits token by token."""
    sizes = {"tokenizer.vocab_size": card.tokenizer.vocab_size}
    for name in ("student", "teacher"):
        hf = _hf_config(getattr(card, name).hf_checkpoint) or {}
        if "vocab_size" in hf:
            sizes[f"{name} vocab_size ({getattr(card, name).hf_checkpoint}/config.json)"] = hf["vocab_size"]
    if len(set(sizes.values())) > 1:
        raise RunCardError("student and teacher must share one vocabulary (KD compares logits token by token): "
                           + ", ".join(f"{k}={v}" for k, v in sizes.items()))  # fmt: skip
    folders = {"student": card.student.hf_checkpoint, "teacher": card.teacher.hf_checkpoint, "tokenizer": card.tokenizer.path}
    vocabs = {name: _tokenizer_vocab(folder) for name, folder in folders.items()}
    vocabs = {name: vocab for name, vocab in vocabs.items() if vocab is not None}
    if len({json.dumps(v, sort_keys=True) for v in vocabs.values()}) > 1:
        raise RunCardError(f"the tokenizers of {', '.join(vocabs)} differ (tokenizer.json vocabularies): "
                           "the student must be distilled from a teacher with its own tokenizer")  # fmt: skip


def check_parallelism(par: Parallelism, configs: Dict[str, Dict[str, int]], recipe: Optional[Recipe] = None) -> None:
    """Sizes Megatron splits over ranks must divide evenly in every model of `configs` ({name: sizes})."""
    for name, value in dataclasses.asdict(par).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RunCardError(f"parallelism.{name}={value!r} must be an integer >= 1")
    for par_name in PARALLEL_RULES:
        size = getattr(par, par_name)
        bad = misfits(par_name, size, configs)
        if bad:
            model, key, value = bad[0]
            raise RunCardError(f"parallelism.{par_name}={size} does not divide {model}.config.{key}={value}: "
                               f"choose a divisor of {value}")  # fmt: skip
    cp = par.context_parallel_size
    if cp > 1 and recipe is not None and recipe.seq_length % (2 * cp):
        raise RunCardError(f"parallelism.context_parallel_size={cp} needs recipe.seq_length ({recipe.seq_length}) "
                           f"divisible by 2 x {cp}")  # fmt: skip


def _check_recipe(r: Recipe) -> None:
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "lr_warmup_iters", "seed"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name in ("lr_warmup_iters", "seed") else 1):
            raise RunCardError(f"recipe.{name}={value!r} must be a positive integer")
    if r.global_batch_size % r.micro_batch_size:
        raise RunCardError(f"recipe.global_batch_size={r.global_batch_size} must be a multiple of recipe.micro_batch_size={r.micro_batch_size}")
    if not (isinstance(r.lr, (int, float)) and isinstance(r.min_lr, (int, float)) and 0 <= r.min_lr <= r.lr and r.lr > 0):
        raise RunCardError(f"recipe.lr={r.lr!r} and recipe.min_lr={r.min_lr!r} must be numbers with 0 <= min_lr <= lr, lr > 0")
    if r.lr_decay_style not in ("linear", "cosine", "constant", "inverse-square-root"):
        raise RunCardError(f"recipe.lr_decay_style={r.lr_decay_style!r}: use linear, cosine, constant or inverse-square-root")
    if r.train_iters is None and r.train_tokens is None:
        raise RunCardError("recipe: give recipe.train_tokens or recipe.train_iters")
    derived = math.ceil(r.train_tokens / r.tokens_per_iter) if r.train_tokens is not None else None
    if r.train_iters is None:
        r.train_iters = derived
    elif r.train_tokens is None:
        r.train_tokens = r.train_iters * r.tokens_per_iter
    elif r.train_iters != derived:
        raise RunCardError(f"recipe.train_iters={r.train_iters} disagrees with recipe.train_tokens={r.train_tokens} / "
                           f"(global_batch_size x seq_length = {r.tokens_per_iter}) = {derived}: set one of them to null")  # fmt: skip
    if r.train_iters < 1 or r.lr_warmup_iters >= r.train_iters:
        raise RunCardError(f"recipe.lr_warmup_iters={r.lr_warmup_iters} must be smaller than recipe.train_iters={r.train_iters}: "
                           f"for a run this short pass --lr-warmup-iters (e.g. {max(r.train_iters // 10, 0)})")  # fmt: skip
    if not r.data_blend or any(not isinstance(p, dict) or "path" not in p for p in r.data_blend):
        raise RunCardError(f"recipe.data_blend must be a list of {{path, weight}} entries, got {r.data_blend!r}")
    if r.kd.loss != "logits_kl" or not r.kd.temperature > 0:
        raise RunCardError(f"recipe.kd: loss {r.kd.loss!r} (only logits_kl) with temperature {r.kd.temperature!r} > 0")


def _from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, recursing into dataclass fields; unknown or missing keys name the field."""
    if not isinstance(data, dict):
        raise RunCardError(f"run card field {where.rstrip('.') or 'root'!r} must be a mapping, got {data!r}")
    hints, names = get_type_hints(cls), {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RunCardError(f"run card: unknown field(s) {', '.join(f'{where}{k}' for k in unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            nested = dataclasses.is_dataclass(hints[f.name])
            kwargs[f.name] = _from_dict(hints[f.name], data[f.name], f"{where}{f.name}.") if nested else data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RunCardError(f"run card: missing field {where}{f.name}")
    return cls(**kwargs)


def _hf_config(folder: Optional[str], field_name: str = "", required: bool = False) -> Optional[dict]:
    """config.json of a local HF folder as a dict; None for a hub id or (unless `required`) a folder without one."""
    if not folder or not Path(folder).exists():
        return None
    config = Path(folder) / "config.json"
    if not config.is_file():
        if required:
            raise RunCardError(f"{field_name} {folder!r} has no config.json: a checkpoint without its config cannot be loaded")
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunCardError(f"{field_name or folder}: cannot read {config}: {e}") from None


def _tokenizer_vocab(folder: Optional[str]) -> Optional[dict]:
    """The token -> id map (plus added tokens) of a local folder's tokenizer.json; None if it has none."""
    path = Path(folder) / "tokenizer.json" if folder else None
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {"model": data.get("model", {}).get("vocab"), "added": added}


def _looks_local(value: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ~, or with more than one slash."""
    return value.startswith(("/", ".", "~")) or not _HUB_ID.match(value)


def _resolve(value: Optional[str], base: Path) -> Optional[str]:
    if not value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = base / expanded
    return str(candidate.resolve()) if candidate.exists() or _looks_local(value) else value  # a hub id stays as is


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m megatron_prune.minitron.distill.run_card CARD [--get recipe.train_iters]`: validate a card and print it as
    JSON (paths resolved, train_iters derived), or one field (lists/mappings as JSON) for shell scripts."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m megatron_prune.minitron.distill.run_card", description=main.__doc__)
    p.add_argument("card")
    p.add_argument("--get", default=None, help="a dotted field, e.g. student.hf_checkpoint")
    args = p.parse_args(argv)
    try:
        value: Any = load_run_card(args.card).to_dict()
        for key in args.get.split(".") if args.get else []:
            if not isinstance(value, dict) or key not in value:
                raise RunCardError(f"run card has no field {args.get!r}")
            value = value[key]
    except RunCardError as e:
        print(f"run card: error: {e}", file=sys.stderr)
        return 2
    print(value if args.get and not isinstance(value, (dict, list)) else json.dumps(value, indent=None if args.get else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
