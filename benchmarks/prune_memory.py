"""Benchmark: peak host memory while pruning, against the sizes of the original and pruned models.

Slicing streams one tensor at a time into the pruned model, so the peak during `prune()` (scores file
already present, so no calibration) should be about: original + pruned + the largest single tensor.

    .venv/bin/python benchmarks/prune_memory.py      # writes benchmarks/results/prune_memory.json
"""

import json
import os
import resource
import tempfile

import torch

import megatron_prune as mp
from megatron_prune.minitron.runtime.distributed import init_distributed

MB = 1024**2


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    init_distributed(seed=0)
    config = TransformerConfig(
        num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=4, ffn_hidden_size=2048,
        gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, pipeline_dtype=torch.float32,
    )  # fmt: skip
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=32000,
                     max_sequence_length=128, position_embedding_type="rope",
                     share_embeddings_and_output_weights=True).eval()  # fmt: skip
    batches = [torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    scores = os.path.join(tempfile.mkdtemp(), "scores.pt")
    mp.calibrate(model, mp.make_forward_loop(batches, progress=False), scores_path=scores)
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values() if isinstance(t, torch.Tensor)) / MB  # noqa: E731
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)) / MB
    before = peak_rss_mb()  # calibration's own peak (activations) is already in here
    export = {"hidden_size": 512, "ffn_hidden_size": 1536, "num_layers": 10}
    pruned, _ = mp.prune(model, export, scores_path=scores)
    result = {
        "original_mb": size(model), "pruned_mb": size(pruned), "largest_tensor_mb": largest,
        "peak_rss_before_prune_mb": before, "peak_rss_after_prune_mb": peak_rss_mb(),
        "peak_increase_mb": peak_rss_mb() - before, "export_config": export,
    }  # fmt: skip
    out = os.path.join(os.path.dirname(__file__), "results", "prune_memory.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
