"""Megatron checkpoints as input and output: Megatron-Bridge's own format and Megatron-LM's, at any layout.

    ckpt = find_checkpoint("ckpts/llama", step=None)   # configs only, no weights: format, iteration, config, args
    loaded = load_megatron_model("ckpts/llama")        # this rank's stage at the layout initialised (resharded)
    save_megatron_lm(pruned, pruned_args, "out/megatron")   # args in the common state, as Megatron-LM writes them

Formats (both are MCore `torch_dist` distributed checkpoints; reading them is Megatron-Bridge's code,
`training.model_load_save.load_model_config` / `build_and_load_model`, not a second loader):
- Megatron-Bridge: `iter_NNNNNNN/` with `run_config.yaml` (the model provider) beside the weights.
- Megatron-LM: `latest_checkpointed_iteration.txt` (an iteration or "release") and `iter_NNNNNNN/` or `release/`
  whose common state (`common.pt`) holds Megatron-LM's `args` namespace.
Distributed checkpointing reshards on load, so a checkpoint saved at one TP/PP loads at another.

A pruned Megatron-LM checkpoint carries the pruned sizes in its `args` (`pruned_megatron_lm_args`) and is written
as `release/` (Megatron-LM's name for weights without training state: iteration, optimizer and RNG states are
not carried over; load it with `--finetune` or `--no-load-optim --no-load-rng`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_prune.minitron.axes import SUPPORTED_AXES, mlm_arg_names
from megatron_prune.errors import PruneConfigError, UnsupportedModelError
from megatron_prune.common.log import log
from megatron_prune.minitron.bridge.hf_import import ImportedModel, auto_bridge, cpu_layer_spec, provider_inventory, set_layout
from megatron_prune.minitron.bridge.roundtrip import compare_models
from megatron_prune.minitron.model_checks import calibration_dispatcher
from megatron_prune.minitron.runtime.parallel import ParallelContext
from megatron_prune.minitron.slicing.model import _LAYOUT_FIELDS

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
BRIDGE, MEGATRON_LM = "megatron-bridge", "megatron-lm"

# Pruned axes whose Megatron-LM argument is named otherwise than the TransformerConfig field (the rest: the same)
MLM_ARG_NAMES: Dict[str, str] = mlm_arg_names()  # TransformerConfig field -> Megatron-LM argument, where they differ
# Megatron-LM arguments without which the model cannot be built (megatron-core's defaults would be wrong)
_REQUIRED_MLM_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "padded_vocab_size",
                      "position_embedding_type")  # fmt: skip
# Fields Megatron-LM derives when unset and that must stay the original's in a pruned model
_KEPT_DERIVED = ("kv_channels",)
# TransformerConfig field -> Megatron-LM argument of every field a prune may change (num_layers first: the flags' order)
_PRUNED_FIELDS = {field: MLM_ARG_NAMES.get(field, field) for field in
                  ("num_layers", *(a for a in SUPPORTED_AXES if a != "num_layers"), *_KEPT_DERIVED, "hybrid_override_pattern")}


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, read from its configs alone."""

    root: Path  # the directory given
    path: Path  # the iteration directory (`iter_NNNNNNN/` or `release/`)
    iteration: Optional[int]  # None for "release"
    format: str  # BRIDGE | MEGATRON_LM
    config: object  # a Bridge model provider, or a TransformerConfig built from Megatron-LM's args
    args: Optional[argparse.Namespace]  # Megatron-LM's args (None for Bridge checkpoints)

    @property
    def model_type(self) -> str:
        hybrid = getattr(self.args, "hybrid_override_pattern", None) or getattr(self.args, "is_hybrid_model", False)
        return "mamba" if hybrid else "gpt"

    def tokenizer_path(self) -> Optional[str]:
        """An HF tokenizer that ships with the checkpoint: Megatron-LM's `--tokenizer-model` for an HF tokenizer, or
        the Bridge's `tokenizer/` folder."""
        if self.args is not None:
            if getattr(self.args, "tokenizer_type", None) == "HuggingFaceTokenizer" and getattr(self.args, "tokenizer_model", None):
                return str(self.args.tokenizer_model)
            return None
        return next((str(folder) for folder in (self.path / "tokenizer", self.root / "tokenizer") if folder.is_dir()), None)

    def hf_model(self) -> Optional[str]:
        """The Hugging Face model a Megatron-Bridge checkpoint was converted from (its provider's `hf_model_id`), when
        it is a local folder: the architecture an HF export needs. None otherwise."""
        hf = getattr(self.config, "hf_model_id", None) if self.args is None else None
        return str(hf) if hf and (Path(str(hf)) / "config.json").is_file() else None

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's weights, as its config records it."""
        if self.args is not None:
            return torch.bfloat16 if getattr(self.args, "bf16", False) else torch.float16 if getattr(self.args, "fp16", False) else torch.float32
        return torch.bfloat16 if getattr(self.config, "bf16", False) else getattr(self.config, "params_dtype", torch.float32)

    def vocab_size(self) -> int:
        """Rows of the embedding (padded, as saved)."""
        return int(self.args.padded_vocab_size if self.args is not None else self.config.vocab_size)

    def inventory(self, tp: int):
        """The analytic inventory (`search.counting`) of the model at TP=`tp`, from the configs alone (Megatron-LM:
        the saved padded vocabulary, padded again for `tp`)."""
        if self.args is None:
            return provider_inventory(self.config, tp)
        from megatron.bridge.utils.vocab_utils import calculate_padded_vocab_size

        from megatron_prune.minitron.search.counting import inventory_of_config

        a = self.args
        vocab = calculate_padded_vocab_size(a.padded_vocab_size, a.make_vocab_size_divisible_by, tp, logging_enabled=False)
        return inventory_of_config(self.config, vocab, not a.untie_embeddings_and_output_weights, a.position_embedding_type,
                                   a.max_position_embeddings)  # fmt: skip

    def max_positions(self) -> Optional[int]:
        if self.args is not None:
            return getattr(self.args, "max_position_embeddings", None)
        return getattr(self.config, "seq_length", None)


def find_checkpoint(path: str, step: Optional[int] = None) -> CheckpointInfo:
    """The checkpoint at `path` (a checkpoint root or one iteration directory), at iteration `step` (default: the
    latest), with its model config; no weights are read. Raises PruneConfigError naming what is wrong."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise PruneConfigError(f"--load {path!r}: no such directory")
    iteration_dir = _iteration_dir(root, step)
    if (iteration_dir / RUN_CONFIG).is_file():
        from megatron.bridge.training.model_load_save import load_model_config

        config, _ = load_model_config(str(iteration_dir))
        return _supported(CheckpointInfo(root, iteration_dir, _iteration_of(iteration_dir), BRIDGE, config, None), path)
    if not (iteration_dir / "common.pt").is_file():
        raise PruneConfigError(f"--load {path!r}: {iteration_dir} is neither a Megatron-Bridge checkpoint ({RUN_CONFIG}) "
                               "nor a Megatron-LM one (common.pt with the training args)")  # fmt: skip
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(iteration_dir))
    args = common.get("args") if isinstance(common, dict) else None
    if not isinstance(args, argparse.Namespace):
        raise PruneConfigError(f"--load {path!r}: {iteration_dir}/common.pt holds no Megatron-LM `args`; cannot build the model")
    _supported(CheckpointInfo(root, iteration_dir, None, MEGATRON_LM, None, args), path)  # before building a config
    return CheckpointInfo(root, iteration_dir, _iteration_of(iteration_dir), MEGATRON_LM, mlm_config(args, path), args)


_UNSUPPORTED = (("heterogeneous_layers_config_path", "heterogeneous layers"), ("mtp_num_layers", "multi-token prediction"))


def _supported(info: CheckpointInfo, where: str) -> CheckpointInfo:
    """Refuse, from the configs, architectures megatron-prune does not prune yet (UnsupportedModelError)."""
    for source in (info.args, info.config):
        for name, what in _UNSUPPORTED:
            value = getattr(source, name, None)
            if value:
                raise UnsupportedModelError(f"--load {where!r}: {what} ({name}={value!r}) is not supported yet by megatron-prune")
    if getattr(info.args, "multi_latent_attention", False):  # its MLA config from Megatron-LM arguments is untested
        raise UnsupportedModelError(f"--load {where!r}: multi-latent attention in a Megatron-LM checkpoint is not supported "
                                    "yet by megatron-prune (Megatron-Bridge checkpoints and Hugging Face models with MLA are)")  # fmt: skip
    return info


def mlm_config(args: argparse.Namespace, where: str = "the checkpoint"):
    """The TransformerConfig Megatron-Bridge builds from Megatron-LM's args; a missing field is named."""
    from megatron.bridge.training.mlm_compat.arguments import _transformer_config_from_args

    lacking = [name for name in _REQUIRED_MLM_ARGS if getattr(args, name, None) is None]
    try:
        if lacking:
            raise AttributeError(f"'Namespace' object has no attribute '{lacking[0]}'")
        return _transformer_config_from_args(cpu_args(args))
    except AttributeError as e:
        field = re.search(r"has no attribute '(\w+)'", str(e))
        raise PruneConfigError(f"--load {where!r}: the checkpoint's args lack {field.group(1) if field else e}, which the "
                               "model needs (was it written by Megatron-LM?)") from None  # fmt: skip
    except (ValueError, AssertionError, ArithmeticError) as e:
        raise PruneConfigError(f"--load {where!r}: megatron-core cannot build a config from the checkpoint's args: {e}") from None


# Megatron-LM's GPU defaults that megatron-core refuses (or cannot run) without CUDA and Transformer Engine
_GPU_ONLY_ARGS = {"transformer_impl": "local", "no_persist_layer_norm": True, "apply_rope_fusion": False,
                  "gradient_accumulation_fusion": False, "masked_softmax_fusion": False, "bias_gelu_fusion": False,
                  "bias_swiglu_fusion": False, "bias_dropout_fusion": False}  # fmt: skip


def cpu_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of Megatron-LM's `args`; on a machine without CUDA with the fused-kernel and Transformer Engine settings
    of a GPU run turned off (the model and its weights are the same; only the kernels differ)."""
    args = copy.deepcopy(args)
    if not torch.cuda.is_available():
        for name, value in _GPU_ONLY_ARGS.items():
            setattr(args, name, value)
    return args


def _iteration_dir(root: Path, step: Optional[int]) -> Path:
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and (p.name.startswith("iter_") or p.name == "release"))
    if step is not None:
        wanted = root / f"iter_{step:07d}"
        if not wanted.is_dir():
            raise PruneConfigError(f"--ckpt-step {step}: {root} has no {wanted.name}; it has {', '.join(available) or 'no iteration'}")
        return wanted
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None or not (root / name).is_dir():
            raise PruneConfigError(f"--load {str(root)!r}: {TRACKER} says {text!r}, but there is no such iteration directory")
        return root / name
    if available:
        return root / available[-1]
    if (root / RUN_CONFIG).is_file() or (root / "common.pt").is_file():
        return root  # an iteration directory itself
    raise PruneConfigError(f"--load {str(root)!r} is not a Megatron checkpoint: no {TRACKER}, iter_* or release directory, "
                           f"{RUN_CONFIG} or common.pt")  # fmt: skip


def _iteration_of(path: Path) -> Optional[int]:
    return int(path.name[len("iter_") :]) if path.name.startswith("iter_") else None


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # this rank's stage, eval mode
    info: CheckpointInfo


def load_megatron_model(path: str, step: Optional[int] = None, tokenizer_model: Optional[str] = None,
                        info: Optional[CheckpointInfo] = None, layout_of=None,
                        ctx: Optional[ParallelContext] = None) -> LoadedCheckpoint:  # fmt: skip
    """This rank's GPTModel (or MambaModel) stage of the checkpoint at `path`, built at the parallel layout already
    initialised (`init_distributed(tp, pp)`) and loaded by Megatron-Bridge (distributed checkpointing reshards);
    `layout_of`: a config whose pipeline split to use (e.g. a pruned model's uneven one; default: Megatron's even split).
    On a machine without CUDA: megatron-core's local spec, CPU initialisation. Collective."""
    from megatron.bridge.training.model_load_save import build_and_load_model
    from megatron.core.utils import unwrap_model

    from megatron_prune.minitron.runtime.cpu import apply_bridge_cpu_support

    apply_bridge_cpu_support()
    info = info or find_checkpoint(path, step)
    ctx = ParallelContext.given(ctx)
    cpu = not torch.cuda.is_available()
    config, args = copy.copy(info.config), cpu_args(info.args) if info.args is not None else None
    set_layout(config, ctx)
    config.moe_token_dispatcher_type = calibration_dispatcher(config, ctx)
    for name in _LAYOUT_FIELDS:  # the saved run's pipeline split is not this run's
        setattr(config, name, getattr(layout_of, name, None) if layout_of is not None else
                (False if name.startswith("account_for") else None))  # fmt: skip
    config.virtual_pipeline_model_parallel_size = None
    config.sequence_parallel = False
    config.perform_initialization = False
    if cpu:
        config.apply_rope_fusion = config.persist_layer_norm = config.gradient_accumulation_fusion = False
        config.masked_softmax_fusion = config.bias_activation_fusion = config.bias_dropout_fusion = False
        config.moe_shared_expert_overlap = False  # a CUDA stream (DeepSeek's providers); the same outputs
    if args is not None:
        set_layout(args, ctx)
        if getattr(args, "num_experts", None):
            args.moe_token_dispatcher_type = config.moe_token_dispatcher_type
        args.decoder_first_pipeline_num_layers = config.num_layers_in_first_pipeline_stage
        args.decoder_last_pipeline_num_layers = config.num_layers_in_last_pipeline_stage
        args.virtual_pipeline_model_parallel_size = None
        if tokenizer_model:
            args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", tokenizer_model
        # Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP, and the Bridge pads it again
        # for this run's TP: keep the saved rows (the embedding must keep its shape to load) by padding to them
        saved = int(args.padded_vocab_size)
        if saved % ctx.tp_size:
            raise PruneConfigError(f"--load {path!r}: the checkpoint's padded vocabulary ({saved} rows) does not divide over "
                                   f"TP={ctx.tp_size}")  # fmt: skip
        args.make_vocab_size_divisible_by = saved // ctx.tp_size
        config.params_dtype = info.dtype()
    elif cpu:
        config.transformer_layer_spec = cpu_layer_spec(config)
    log(f"loading the {info.format} checkpoint {info.path} at TP={ctx.tp_size} PP={ctx.pp_size}")
    with _module_cuda_is_a_no_op(cpu):  # Megatron-LM's model builder moves the model with .cuda()
        stages = build_and_load_model(str(info.path), config, model_type=info.model_type, megatron_args=args,
                                      use_cpu_init=cpu, skip_temp_dist_context=True)  # fmt: skip
    model = unwrap_model(stages if isinstance(stages, list) else [stages])[0].eval()
    return LoadedCheckpoint(model, info)


@contextlib.contextmanager
def _module_cuda_is_a_no_op(active: bool):
    """On a machine without CUDA, `nn.Module.cuda()` leaves the module where it is, while the block runs."""
    original = torch.nn.Module.cuda
    if active:
        torch.nn.Module.cuda = lambda self, device=None: self
    try:
        yield
    finally:
        torch.nn.Module.cuda = original


def pruned_megatron_lm_args(args: argparse.Namespace, original_config, pruned_config) -> argparse.Namespace:
    """A copy of Megatron-LM's `args` with the pruned sizes: every TransformerConfig field the prune changed (under
    its Megatron-LM name), the head dim kept explicit, no pipeline layout, no iteration."""
    new = copy.deepcopy(args)
    for field, name in _PRUNED_FIELDS.items():
        before, after = getattr(original_config, field, None), getattr(pruned_config, field, None)
        if after is not None and (before != after or field in _KEPT_DERIVED) and (hasattr(new, name) or field in _KEPT_DERIVED):
            setattr(new, name, after)
    if getattr(pruned_config, "num_query_groups", None) and pruned_config.num_query_groups != pruned_config.num_attention_heads:
        new.group_query_attention = True
    new.decoder_first_pipeline_num_layers = new.decoder_last_pipeline_num_layers = None
    for name in ("iteration", "consumed_train_samples", "consumed_valid_samples"):
        if hasattr(new, name):
            setattr(new, name, 0)
    return new


def megatron_lm_flags(args: argparse.Namespace, pruned: argparse.Namespace) -> List[str]:
    """["--num-layers", "26", "--ffn-hidden-size", "1024", ...]: the model flags a user changes to load `pruned`."""
    flags: List[str] = []
    for name in _PRUNED_FIELDS.values():
        after = getattr(pruned, name, None)
        if after is not None and (getattr(args, name, None) != after or name == "kv_channels"):
            flags += [f"--{name.replace('_', '-')}", str(after)]
    if getattr(pruned, "group_query_attention", False) and not getattr(args, "group_query_attention", False):
        flags.append("--group-query-attention")
    return flags


def save_bridge_checkpoint(model: torch.nn.Module, out_dir: str, tokenizer_path: Optional[str], layer_spec=None,
                           ctx: Optional[ParallelContext] = None) -> None:
    """Write `model` (this rank's stage) as a Megatron-Bridge checkpoint: Megatron-Bridge's own writer (weights,
    `run_config.yaml` with the model provider, the tokenizer), then the recorded config made layout-free: no
    pipeline layout, no CPU initialisation, and `layer_spec` (the bridge's own, Transformer Engine on GPU) even
    when this run used the local spec. Collective."""
    from megatron.bridge.training.model_load_save import save_megatron_model

    start = time.perf_counter()
    log(f"saving the Megatron checkpoint (torch_dist, Megatron-Bridge format) to {out_dir}")
    save_megatron_model([model], out_dir, hf_tokenizer_path=tokenizer_path,
                        hf_tokenizer_kwargs={"use_fast": True} if tokenizer_path else None)  # megatron's default is the slow one
    ParallelContext.given(ctx).on_main(lambda: _make_config_portable(Path(out_dir), layer_spec))
    log(f"wrote Megatron-Bridge checkpoint to {out_dir} in {time.perf_counter() - start:.1f}s")


def _make_config_portable(out: Path, layer_spec) -> None:
    """Rewrite the recorded model config so that it does not depend on how this machine ran the prune."""
    import yaml

    for run_config in out.glob("iter_*/run_config.yaml"):
        data = yaml.safe_load(run_config.read_text())
        model = data["model"]
        model["pipeline_model_parallel_layout"] = None  # stage boundaries of this run only; counts are global
        model["use_cpu_initialization"] = False
        if callable(layer_spec) and hasattr(layer_spec, "__qualname__"):
            model["transformer_layer_spec"] = {"_call_": False, "_target_": f"{layer_spec.__module__}.{layer_spec.__qualname__}"}
        tmp = run_config.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(tmp, run_config)


def save_megatron_lm(model: torch.nn.Module, args: argparse.Namespace, out_dir: str,
                     ctx: Optional[ParallelContext] = None) -> None:
    """Write this rank's stage as a Megatron-LM checkpoint: `release/` (a torch_dist checkpoint of `model.*` with
    `args`, `iteration` 0 and `checkpoint_version` in its common state) and the tracker file. Collective."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    ctx = ParallelContext.given(ctx)
    ctx.on_main(lambda: (out / "release").mkdir(parents=True, exist_ok=True))
    ctx.barrier()
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 0, "checkpoint_version": 3.0}
    dist_checkpointing.save(state, str(out / "release"))
    ctx.on_main(lambda: (out / TRACKER).write_text("release"))
    ctx.barrier()
    log(f"wrote Megatron-LM checkpoint to {out} (release/: weights and args; no optimizer or iteration state)")


def save_checkpoint_like(info: CheckpointInfo, original: torch.nn.Module, pruned: torch.nn.Module, out_dir: str,
                         tokenizer_path: Optional[str], ctx: Optional[ParallelContext] = None) -> dict:  # fmt: skip
    """Write `pruned` in the format `info` was read in; returns what the summary records (for Megatron-LM: the
    model flags that load it). Collective."""
    if info.format == BRIDGE:
        save_bridge_checkpoint(pruned, out_dir, tokenizer_path, getattr(info.config, "transformer_layer_spec", None), ctx=ctx)
        return {}
    args = pruned_megatron_lm_args(info.args, original.config, pruned.config)
    ctx = ParallelContext.given(ctx)
    set_layout(args, ctx)  # as saved
    save_megatron_lm(pruned, args, out_dir, ctx=ctx)
    flags = megatron_lm_flags(info.args, args)
    log("Megatron-LM loads it with the pruned model flags: " + " ".join(flags) + " (and --finetune: no optimizer state)")
    return {"megatron_lm_flags": flags}


def compare_with_reload(pruned: torch.nn.Module, out_dir: str, tokens: torch.Tensor, name: str, tokenizer_model: Optional[str] = None,
                        ctx: Optional[ParallelContext] = None):
    """The saved checkpoint loaded back (at this layout) against `pruned`: equal logits. Collective."""
    reloaded = load_megatron_model(out_dir, tokenizer_model=tokenizer_model, layout_of=pruned.config, ctx=ctx).model
    return compare_models(pruned, reloaded, tokens, name, ctx=ctx)


def hf_exporter(info: CheckpointInfo, model: torch.nn.Module):
    """What `export.save_hf` needs to write a model of `info`'s checkpoint as an HF folder: the bridge of the HF model
    the checkpoint names (`hf_model`; its config, tokenizer and name mapping; no HF weights are read). Raises
    PruneConfigError when the checkpoint names none, or holds another number of layers than that model."""
    hf = info.hf_model()
    if hf is None:
        raise PruneConfigError(f"--save-format hf: {info.path} names no local Hugging Face model (a Megatron-Bridge "
                               "checkpoint's hf_model_id) whose architecture the export could use; save as megatron")  # fmt: skip
    bridge = auto_bridge().from_hf_pretrained(hf)
    layers = getattr(bridge.hf_pretrained.config, "num_hidden_layers", None)
    if layers != info.config.num_layers:
        raise PruneConfigError(f"--save-format hf: the checkpoint has {info.config.num_layers} layers, its Hugging Face "
                               f"model {hf} {layers}: which layers it kept is not recorded; save as megatron")  # fmt: skip
    return ImportedModel(bridge=bridge, provider=info.config, model=model, source=hf,
                         saved_layer_spec=getattr(info.config, "transformer_layer_spec", None))

