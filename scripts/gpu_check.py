"""The checks only a GPU can run: megatron-prune on Transformer Engine layer specs and on the Mamba CUDA kernels.

    python scripts/gpu_check.py                 # on a GPU machine (scripts/gpu_check.sh runs it when one is present)
    python scripts/gpu_check.py --local-spec    # the same checks with megatron-core's local specs (runs on a CPU)

For each model, timed: build it (tiny, fp32, random weights), run a sort-only prune (every axis at its full size:
channels, heads and layers permuted, nothing removed) and require the same logits, then a real prune (hidden, FFN
or Mamba heads, attention heads and one layer) and require that a model freshly built by megatron-core from the
pruned config and loaded with the pruned weights gives the same logits, and that it trains (finite gradients).
    te_gpt        GPTModel, get_gpt_layer_with_transformer_engine_spec: norms fused into linear_qkv / linear_fc1
    mamba_hybrid  MambaModel "M*M-", megatron-core's mamba_stack_spec: TE linears + mamba_ssm / causal_conv1d kernels
Exits 1 if any check fails (all are run), 0 otherwise; prints one line per check and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

VOCAB, SEQ, BATCH = 256, 64, 2


def gpt_config(tp: int = 1, **overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512,
                  gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False, params_dtype=torch.float32,
                  pipeline_dtype=torch.float32, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
                  use_cpu_initialization=not torch.cuda.is_available(), tensor_model_parallel_size=tp)  # fmt: skip
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt(local_spec: bool, config=None):
    """The GPT of the check (or, given the pruned `config`, a fresh stock model of that shape)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )  # fmt: skip

    spec = get_gpt_layer_local_spec(normalization="RMSNorm") if local_spec else get_gpt_layer_with_transformer_engine_spec()
    return GPTModel(config=config or gpt_config(), transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="rope", share_embeddings_and_output_weights=True)  # fmt: skip


def build_hybrid(local_spec: bool, config=None, pattern: str = "M*M-"):
    """The hybrid Mamba model of the check (or a fresh stock model of the pruned `config` and `pattern`)."""
    from megatron.core.models.mamba import MambaModel

    if local_spec:  # the repository's test helper (local modules; reference kernels on a CPU)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.tiny_mamba import tiny_mamba_stack_spec

        spec = tiny_mamba_stack_spec(chunk_size=16)
    else:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec as spec
    config = config or gpt_config(num_attention_heads=4, num_query_groups=2, gated_linear_unit=False, mamba_num_heads=8,
                                  mamba_head_dim=32, mamba_state_dim=64, mamba_num_groups=2)  # fmt: skip
    return MambaModel(config=config, mamba_stack_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                      hybrid_override_pattern=pattern, position_embedding_type="none")  # fmt: skip


CHECKS = {  # name: (builder, target sizes of the real prune)
    "te_gpt": (build_gpt, {"hidden_size": 192, "ffn_hidden_size": 384, "num_attention_heads": 4, "num_layers": 3}),
    "mamba_hybrid": (build_hybrid, {"hidden_size": 192, "mamba_num_heads": 4, "mamba_head_dim": 16,
                                    "num_attention_heads": 2, "ffn_hidden_size": 384, "num_layers": 3}),
}  # fmt: skip


def logits(model, batches):
    import megatron_prune as mp

    return torch.cat(mp.run_forward(model, batches, collect=lambda out, tokens: out.detach().float().clone()))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_model(name: str, local_spec: bool, tolerance: float) -> dict:
    """Build, sort-only prune (logits kept), real prune (a fresh stock model equals it, and trains)."""
    import megatron_prune as mp
    from megatron_prune.minitron.config import ModelShape

    build, target = CHECKS[name]
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build(local_spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(4)]
    loop = mp.make_forward_loop(batches, progress=False)
    before = logits(model, batches)
    record = {"check": name, "spec": "local" if local_spec else "transformer_engine", "device": device,
              "build_s": round(time.perf_counter() - started, 2)}  # fmt: skip

    t = time.perf_counter()
    full = ModelShape.from_config(model.config, getattr(model, "hybrid_override_pattern", None)).sizes()
    sorted_model, _ = mp.prune(model, full, forward_loop=loop)
    record["sort_only_rel_error"] = relative_error(logits(sorted_model, batches), before)
    record["sort_only_s"] = round(time.perf_counter() - t, 2)
    if not record["sort_only_rel_error"] <= tolerance:
        raise AssertionError(f"{name}: sort-only prune changed the logits: relative error {record['sort_only_rel_error']:.2e} > {tolerance:.0e}")
    del sorted_model

    t = time.perf_counter()
    pruned, result = mp.prune(model, target, forward_loop=loop)
    record["prune_s"] = round(time.perf_counter() - t, 2)
    record["params"] = [int(result.params_before), int(result.params_after)]
    for axis, size in target.items():
        assert getattr(result.config, axis) == size, f"{name}: pruned config {axis}={getattr(result.config, axis)}, wanted {size}"
    pattern = getattr(pruned, "hybrid_override_pattern", None)
    fresh = (build(local_spec, result.config, pattern) if pattern else build(local_spec, result.config)).to(device)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    record["rebuild_rel_error"] = relative_error(logits(fresh.eval(), batches), logits(pruned, batches))
    if record["rebuild_rel_error"] != 0.0:
        raise AssertionError(f"{name}: a stock model built from the pruned config differs: {record['rebuild_rel_error']:.2e}")
    assert sum(p.numel() for p in fresh.parameters()) == result.params_after, f"{name}: parameter count"

    pruned.train()
    tokens = batches[0].to(device)
    position_ids = torch.arange(SEQ, device=device).expand_as(tokens)
    pruned(tokens, position_ids, attention_mask=None, labels=tokens).float().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in pruned.parameters()), f"{name}: non-finite gradient"
    record["total_s"] = round(time.perf_counter() - started, 2)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-spec", action="store_true", help="local (non-TE) specs: the check's own logic, on any machine")
    p.add_argument("--tolerance", type=float, default=None, help="sort-only relative logits error (default 1e-3 GPU, 1e-5 CPU)")
    p.add_argument("--only", choices=("te_gpt", "mamba_hybrid"), default=None)
    args = p.parse_args(argv)
    if not args.local_spec and not torch.cuda.is_available():
        print("gpu_check: no GPU: skipped (Transformer Engine and the Mamba kernels need CUDA; --local-spec runs the "
              "same checks on local specs)")  # fmt: skip
        return 0
    if torch.cuda.is_available():  # fp32 GEMMs, so that a permutation changes only the summation order
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tolerance = args.tolerance or (1e-3 if torch.cuda.is_available() else 1e-5)

    from megatron_prune.minitron.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=1234)
    records, failed = [], []
    try:
        for name in CHECKS:
            if args.only and name != args.only:
                continue
            try:
                record = check_model(name, args.local_spec, tolerance)
                print(f"gpu_check: {name}: ok ({record['spec']}, {record['device']}): sort-only relative error "
                      f"{record['sort_only_rel_error']:.1e}, params {record['params'][0]:,} -> {record['params'][1]:,}, "
                      f"{record['total_s']}s", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - every check runs; each failure is reported
                traceback.print_exc()
                record = {"check": name, "error": f"{type(e).__name__}: {e}"}
                failed.append(name)
                print(f"gpu_check: {name}: FAILED: {record['error']}", flush=True)
            records.append(record)
    finally:
        destroy_distributed()
    if torch.cuda.is_available():
        records.append({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__})
    print(json.dumps(records, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
