"""Write a pruned model as a Hugging Face folder and as a Megatron-Bridge checkpoint; read the latter back.

Both writers are collective (every rank calls them: the bridge gathers TP shards and PP stages) and write
into a directory the caller owns; `megatron_prune.minitron.output` makes the whole output directory atomic.

- HF: the bridge converts the pruned MCore tensors to HF names; global rank 0 writes safetensors shards,
  the bridge's artifacts (tokenizer, generation config, custom code) and the pruned config.
- Megatron: Megatron-Bridge's native format (`iter_0000000/` with a torch_dist checkpoint, the tokenizer and
  `run_config.yaml` holding the model provider), so `AutoBridge.load_megatron_model` and the Bridge's
  training/distillation recipes (`checkpoint.pretrained_checkpoint`) build the student from it unaided. The
  recorded config is made layout-free: no pipeline layout, the bridge's own (GPU) layer spec, no CPU init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import torch

from megatron_prune.minitron.bridge.checkpoint import load_megatron_model, save_bridge_checkpoint
from megatron_prune.minitron.bridge.compat import logged_progress
from megatron_prune.minitron.bridge.hf_config import pruned_hf_config
from megatron_prune.minitron.bridge.hf_import import ImportedModel
from megatron_prune.minitron.bridge.roundtrip import dtype_name
from megatron_prune.common.log import log
from megatron_prune.minitron.runtime.parallel import ParallelContext

_SHARD_BYTES = 2 * 1024**3


def save_hf(imported: ImportedModel, pruned: torch.nn.Module, kept_layers: Sequence[int], out_dir: str,
            ctx: Optional[ParallelContext] = None) -> None:
    """Write `pruned` (this rank's stage) as an HF model folder that `from_pretrained` loads without extra code."""
    ctx, out = ParallelContext.given(ctx), Path(out_dir)
    dtype = pruned.config.params_dtype  # every floating tensor goes out in it (the local spec keeps norms in fp32)
    config = pruned_hf_config(imported.bridge.hf_pretrained.config, pruned.config, kept_layers, dtype)
    ctx.on_main(lambda: _write_artifacts(imported, config, out))
    with logged_progress("exporting to Hugging Face"):
        tensors = imported.bridge.export_hf_weights([pruned], cpu=True, show_progress=True)
        if ctx.is_main:
            _write_safetensors(((n, t.to(dtype) if t.is_floating_point() else t) for n, t in tensors), out)
        else:
            for _ in tensors:  # the gathers are collective
                pass
    ctx.barrier()
    log(f"wrote Hugging Face model ({dtype_name(dtype)}) to {out}")


def save_megatron(imported: ImportedModel, pruned: torch.nn.Module, out_dir: str, tokenizer_path: str,
                  ctx: Optional[ParallelContext] = None) -> None:
    """Write `pruned` as a Megatron-Bridge checkpoint (weights + model config + tokenizer) in `out_dir`."""
    save_bridge_checkpoint(pruned, out_dir, tokenizer_path, imported.saved_layer_spec, ctx=ctx)


def load_megatron_checkpoint(path: str) -> torch.nn.Module:
    """This rank's stage of a Megatron checkpoint (`save_megatron`'s, or any `checkpoint.load_megatron_model` reads),
    at the parallel layout already initialised; on a machine without CUDA, megatron-core's local spec."""
    return load_megatron_model(path).model


def _write_artifacts(imported: ImportedModel, config, out: Path) -> None:
    """The bridge's artifacts (tokenizer, generation config, remote code), then the pruned config over its copy."""
    out.mkdir(parents=True, exist_ok=True)
    imported.bridge.hf_pretrained.save_artifacts(out)
    config.save_pretrained(out)


def _write_safetensors(tensors: Iterable[Tuple[str, torch.Tensor]], out: Path) -> None:
    """Shards of at most `_SHARD_BYTES`, with `model.safetensors.index.json` when there is more than one."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > _SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor.detach().contiguous().clone(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
