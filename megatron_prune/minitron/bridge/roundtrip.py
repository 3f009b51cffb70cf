"""Logits of an MCore model (any TP/PP) against an HF folder loaded with transformers, on the same tokens.

Used twice by the CLI: the imported model against the source folder (the bridge converted it right), and
the pruned model against the exported folder (the export is what was pruned). The error is relative:
max |mcore - hf| / max |hf| over all logits; ≤1e-4 is expected in float32.

The HF side runs in float32 (weights stored in 16 bits widen exactly), so an MCore model in float32 is compared
with the exact function of the folder's weights. An MCore model in bf16/fp16 carries its own rounding (a few
percent of the largest logit over 30 layers): its error may reach twice the HF model's own rounding at that dtype,
measured on the same tokens (`RoundTrip.floor`), or the tolerance, whichever is larger.

The decoder layers are streamed: the model is built on the meta device, the embeddings, final norm and output layer
are read from the safetensors files, and each decoder layer's weights are read just before it runs and dropped
after it (`StreamedCausalLM`). Host memory is then the embeddings and output layer plus one decoder layer and the
activations, not the whole model (an 8B Llama: about 4.5 GB instead of 32 GB in float32). Folders without
safetensors are loaded whole.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_prune.minitron.data.forward import run_forward
from megatron_prune.common.log import log
from megatron_prune.minitron.runtime.parallel import ParallelContext, as_problem


@dataclass(frozen=True)
class RoundTrip:
    name: str
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    floor: float = 0.0  # the HF model's own relative rounding error in the MCore model's 16-bit dtype (0: float32)

    @property
    def allowed(self) -> float:
        """The relative error the check accepts: the tolerance, or twice the HF model's own 16-bit rounding."""
        return max(self.tolerance, 2 * self.floor)

    @property
    def ok(self) -> bool:
        return self.relative_diff <= self.allowed

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (tolerance {self.allowed:.0e})"
        rounding = f" (the HF model's own rounding in 16 bits: {self.floor:.3g})" if self.floor else ""
        return f"{self.name}: max |Δlogit| = {self.max_abs_diff:.3g}, relative {self.relative_diff:.3g}{rounding}: {verdict}"


def compare_with_hf(model: torch.nn.Module, hf_path: str, tokens: torch.Tensor, name: str, tolerance: float = 1e-4,
                    trust_remote_code: bool = False, ctx: Optional[ParallelContext] = None) -> RoundTrip:  # fmt: skip
    """Forward `tokens` [B, S] through `model` (collective) and through the HF model at `hf_path` (on one rank:
    the last pipeline stage's first TP rank of the first replica), in float32; for an MCore model in 16 bits also in
    its dtype, for the rounding floor. Every rank gets the same RoundTrip, or the same error."""
    dtype = next(model.parameters()).dtype

    def reference() -> Tuple[torch.Tensor, float]:
        exact = hf_logits(hf_path, tokens, trust_remote_code, torch.float32)
        if dtype == torch.float32:
            return exact, 0.0
        return exact, _relative(hf_logits(hf_path, tokens, trust_remote_code, dtype), exact)[1]

    return _compared(model, tokens, name, reference, tolerance, ctx)


def compare_models(model: torch.nn.Module, other: torch.nn.Module, tokens: torch.Tensor, name: str,
                   tolerance: float = 1e-6, ctx: Optional[ParallelContext] = None) -> RoundTrip:  # fmt: skip
    """Logits of two MCore models (stages of the same layout) on `tokens`, e.g. a model and its saved-and-reloaded
    copy. Collective; every rank gets the same RoundTrip."""
    reference = _mcore_logits(model, tokens)
    return _compared(other, tokens, name, lambda: (reference[0], 0.0), tolerance, ctx)


def _relative(logits: torch.Tensor, expected: torch.Tensor) -> Tuple[float, float]:
    """(max |Δ|, max |Δ| / max |expected|) over the expected logits' vocabulary (a model may pad it)."""
    diff = (logits[..., : expected.shape[-1]] - expected).abs().max().item()
    return diff, diff / max(expected.abs().max().item(), 1e-30)


def _compared(model: torch.nn.Module, tokens: torch.Tensor, name: str, reference: Callable[[], Tuple[torch.Tensor, float]],
              tolerance: float, ctx: Optional[ParallelContext]) -> RoundTrip:  # fmt: skip
    """`model`'s logits against `reference()` (the logits and the rounding floor), compared on one rank (the last
    pipeline stage's first TP rank of the first replica): max |Δ| relative to max |reference|. Every rank gets the
    same RoundTrip, or the same error."""
    ctx = ParallelContext.given(ctx)
    log(f"checking logits ({name})")
    outputs = _mcore_logits(model, tokens)
    result, problem = None, None
    if outputs and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        try:
            expected, floor = reference()
            result = RoundTrip(name, *_relative(outputs[0], expected), tolerance, floor)
        except Exception as e:  # noqa: BLE001 - shared with every rank below
            problem = as_problem(e)
    ctx.raise_first(problem)
    return next(r for r in ctx.gather_all(result) if r is not None)


def _mcore_logits(model: torch.nn.Module, tokens: torch.Tensor) -> List[torch.Tensor]:
    """[logits [B, S, V] gathered over TP, float32 on the CPU] on the last pipeline stage; [] on the others."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    collect = lambda logits, _: gather_from_tensor_model_parallel_region(logits).float().cpu()  # noqa: E731
    return run_forward(model, [tokens], collect=collect, shard_over_dp=False)


def hf_logits(hf_path: str, tokens: torch.Tensor, trust_remote_code: bool = False,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:  # fmt: skip
    """Logits [B, S, V] (float32) of the HF causal LM at `hf_path`, computed in `dtype` (default: the folder's own),
    layer by layer when it can."""
    start = time.perf_counter()
    streamed = StreamedCausalLM.open(hf_path, trust_remote_code, dtype)
    if streamed is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = dtype or folder_dtype(AutoConfig.from_pretrained(hf_path, trust_remote_code=trust_remote_code))
        hf = AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
        with torch.no_grad():
            logits = hf(tokens.to(next(hf.parameters()).device)).logits.float().cpu()
    else:
        logits = streamed.logits(tokens)
    how = "layer by layer" if streamed else "whole model"
    log(f"HF logits of {hf_path} in {time.perf_counter() - start:.1f}s ({how}, {dtype_name(streamed.dtype if streamed else dtype)})")
    return logits


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: a dtype as config.json, `--dtype` and the summary spell it."""
    return str(dtype).replace("torch.", "")


def folder_dtype(hf_config) -> torch.dtype:
    """The dtype an HF config records for its weights (float32 when it records none)."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class StreamedCausalLM:
    """An HF causal LM built on the meta device whose decoder layers load their weights from the folder's
    safetensors just before they run and drop them after; everything else (and every buffer the folder holds) is
    loaded once."""

    def __init__(self, model: torch.nn.Module, layers: torch.nn.ModuleList, prefix: str, files: Dict[str, Path], dtype: torch.dtype):
        self.model, self.layers, self.prefix, self.files, self.dtype = model, layers, prefix, files, dtype
        layer_params = {f"{prefix}.{name}" for name, _ in layers.named_parameters()}
        for name, _ in list(model.named_parameters()):
            if name not in layer_params and name in files:
                self._set(name, self._read(name))
        model.tie_weights()  # an output layer tied to the embeddings has no tensor of its own in the files
        for name, buffer in list(model.named_buffers()):  # persistent buffers saved with the weights (DeepSeek's
            if name in files:  # routing bias, e_score_correction_bias): small, loaded once, layers' included
                module, _, leaf = name.rpartition(".")
                model.get_submodule(module)._buffers[leaf] = self._read(name).to(buffer.dtype)
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: self._load(i))
            layer.register_forward_hook(lambda module, args, output, i=i: self._drop(i))

    @classmethod
    def open(cls, hf_path: str, trust_remote_code: bool = False, dtype: Optional[torch.dtype] = None) -> Optional["StreamedCausalLM"]:
        """The streamed model of `hf_path` in `dtype` (default: the folder's own), or None when it cannot be streamed
        (no safetensors, no decoder ModuleList, or weights named otherwise than the model's parameters)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        files = _safetensors_names(Path(hf_path))
        if not files:
            return None
        config = AutoConfig.from_pretrained(hf_path, trust_remote_code=trust_remote_code)
        dtype = dtype or folder_dtype(config)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed as usual
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        found = _decoder_layers(model, config)
        tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings", False) else set()
        if found is None or any(n not in files and n not in tied for n, _ in model.named_parameters()):
            return None
        return cls(model.eval(), found[1], found[0], files, dtype)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(tokens).logits.float().cpu()

    def materialised_layers(self) -> List[int]:
        """Decoder layers whose weights are in memory now."""
        return [i for i, layer in enumerate(self.layers) if any(not p.is_meta for p in layer.parameters())]

    def _load(self, i: int) -> None:
        for name, _ in self.layers[i].named_parameters():
            self._set(f"{self.prefix}.{i}.{name}", self._read(f"{self.prefix}.{i}.{name}"))

    def _drop(self, i: int) -> None:
        for name, p in list(self.layers[i].named_parameters()):
            self._set(f"{self.prefix}.{i}.{name}", torch.empty_like(p, device="meta"))

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt", device="cpu") as f:
            return f.get_tensor(name).to(self.dtype)

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        module, _, leaf = name.rpartition(".")
        self.model.get_submodule(module)._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def _safetensors_names(folder: Path) -> Dict[str, Path]:
    """{tensor name: safetensors file} of an HF folder (sharded or not); {} without safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt", device="cpu") as f:
        return {name: single for name in f.keys()}


def _decoder_layers(model: torch.nn.Module, config):
    """(parameter-name prefix, ModuleList) of the decoder layers: the ModuleList of `num_hidden_layers` modules."""
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count:
            return name, module
    return None
