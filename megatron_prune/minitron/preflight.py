"""The command line's checks that read files and configs but no weights: the last ones before the import.

    check_weight_files(source, hf_config)        every safetensors file complete, shaped as config.json says
    check_sequence_length(seq_length, hf_config) calibration rows within the model's positions
    resolve_dtype(name, hf_config)               "auto": the source checkpoint's dtype

Each raises PruneConfigError naming the flag or the file and saying what to do; nothing here reads a weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.common.log import log

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# config.json fields that decide tensor shapes: named when one is missing and transformers filled in a default
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts", "shared_expert_intermediate_size")  # fmt: skip


def resolve_dtype(name: str, hf_config) -> torch.dtype:
    """The dtype to prune in: `name`, or for "auto" the source's own (its config's dtype; float16 sources are
    pruned in float32, which megatron-prune supports on every machine)."""
    if name != "auto":
        return DTYPES[name]
    from megatron_prune.minitron.bridge.roundtrip import dtype_name, folder_dtype

    dtype = folder_dtype(hf_config)
    if dtype not in DTYPES.values():
        log(f"the source's weights are {dtype_name(dtype)}: pruning in float32 (--dtype bfloat16 for bf16)")
        return torch.float32
    return dtype


def check_sequence_length(seq_length: int, hf_config, flag: str = "--seq-length") -> None:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_length > limit:
        raise PruneConfigError(f"{flag} {seq_length} exceeds the model's max_position_embeddings={limit} (config.json): "
                               f"use at most {limit} tokens per sample")  # fmt: skip


def check_weight_files(source: str, hf_config, trust_remote_code: bool = False) -> None:
    """A local HF folder's safetensors: each complete (its size covers what its header describes), and their
    tensors shaped as the model `config.json` describes would hold them. Hub ids are left to transformers."""
    folder = Path(source)
    if not folder.is_dir():
        return
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        named = sorted({folder / f for f in json.loads(index.read_text()).get("weight_map", {}).values()})
        missing = [f.name for f in named if not f.is_file()]
        if missing:
            raise PruneConfigError(f"--hf-model {source!r}: {index.name} names missing weight files {missing[:4]}")
    shapes = {name: shape for f in files for name, shape in _safetensors_shapes(f, source).items()}
    if shapes:
        _check_shapes(source, hf_config, shapes, trust_remote_code)


def _safetensors_shapes(path: Path, source: str) -> Dict[str, List[int]]:
    """{tensor: shape} from a safetensors header, or PruneConfigError for a truncated or damaged file."""
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < length <= size - 8:
                raise ValueError(f"its header length ({length:,} bytes) does not fit the file ({size:,} bytes)")
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        if 8 + length + end > size:
            problem = f"is truncated: {size:,} bytes, its header describes {8 + length + end:,}"
    except (ValueError, KeyError, TypeError, IndexError) as e:
        problem = f"is damaged ({e})"
    if problem:
        raise PruneConfigError(f"--hf-model {source!r}: weight file {path.name} {problem}; copy or download it again")
    return {k: list(v["shape"]) for k, v in tensors.items()}


def _check_shapes(source: str, hf_config, shapes: Dict[str, List[int]], trust_remote_code: bool) -> None:
    """The tensors `config.json` implies (an HF model built on the meta device) against the files'."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    expected = {name: list(p.shape) for name, p in model.named_parameters()}
    if sum(name in expected for name in shapes) < 0.9 * len(shapes):
        return  # the files name tensors otherwise (a conversion the bridge applies): nothing to compare
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(hf_config, "tie_word_embeddings", False) else set()
    wrong = [f"{n} is {shapes[n]} in the files but {expected[n]} by config.json" for n in expected if n in shapes and shapes[n] != expected[n]]
    missing = [n for n in expected if n not in shapes and n not in tied]
    if not wrong and not missing:
        return
    written = json.loads((Path(source) / "config.json").read_text())
    unset = [f"{k} (transformers used {getattr(hf_config, k)!r})" for k in _SIZE_FIELDS if hasattr(hf_config, k) and k not in written]
    detail = "; ".join(wrong[:3] + ([f"{len(missing)} tensors missing from the files, e.g. {missing[0]}"] if missing else []))
    hint = f"config.json does not set {', '.join(unset)}" if unset else "config.json does not describe these weights"
    raise PruneConfigError(f"--hf-model {source!r}: the weights do not match config.json: {detail}. {hint}")
