"""Logits of an MCore model (any TP/PP) against an HF folder loaded with transformers, on the same tokens.

Used twice by the CLI: the imported model against the source folder (the bridge converted it right), and
the pruned model against the exported folder (the export is what was pruned). The error is relative:
max |mcore - hf| / max |hf| over all logits; ≤1e-4 is expected in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_prune.data.forward import run_forward
from megatron_prune.runtime.parallel import ParallelContext, as_problem


@dataclass(frozen=True)
class RoundTrip:
    name: str
    max_abs_diff: float
    relative_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.relative_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (tolerance {self.tolerance:.0e})"
        return f"{self.name}: max |Δlogit| = {self.max_abs_diff:.3g}, relative {self.relative_diff:.3g}: {verdict}"


def compare_with_hf(model: torch.nn.Module, hf_path: str, tokens: torch.Tensor, name: str, tolerance: float = 1e-4,
                    trust_remote_code: bool = False) -> RoundTrip:  # fmt: skip
    """Forward `tokens` [B, S] through `model` (collective) and through the HF model at `hf_path` (on one rank:
    the last pipeline stage's first TP rank of the first replica). Every rank gets the same RoundTrip, or the
    same error."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    ctx = ParallelContext.from_megatron()
    outputs = run_forward(model, [tokens], collect=lambda logits, _: gather_from_tensor_model_parallel_region(logits),
                          shard_over_dp=False)  # fmt: skip
    result, problem = None, None
    if outputs and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        try:
            mcore = outputs[0].float().cpu()
            hf = _hf_logits(hf_path, tokens, next(model.parameters()).dtype, trust_remote_code)
            diff = (mcore[..., : hf.shape[-1]] - hf).abs().max().item()
            result = RoundTrip(name, diff, diff / max(hf.abs().max().item(), 1e-30), tolerance)
        except Exception as e:  # noqa: BLE001 - shared with every rank below
            problem = as_problem(e)
    ctx.raise_first(problem)
    return next(r for r in ctx.gather_all(result) if r is not None)


def _hf_logits(hf_path: str, tokens: torch.Tensor, dtype: torch.dtype, trust_remote_code: bool) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        return hf(tokens.to(next(hf.parameters()).device)).logits.float().cpu()
