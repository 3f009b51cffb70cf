"""Multi-latent attention at tensor parallelism 2 (torchrun, gloo), megatron-core's local spec: every MLA projection
is column-parallel (the down projections' outputs gathered; `linear_q_up_proj` / `linear_kv_up_proj` rows split by
heads), `linear_proj` row-parallel over the heads' v columns. Pruning at TP=2 must give the orders, the pruned
weights and the logits of one process, and a scores file is reusable across the two layouts."""

import pytest
import torch

from tests.stages import assert_same_orders_and_weights, prune_here_and_in_a_world
from tests.test_mla import batches, logits, make

pytestmark = pytest.mark.heavy  # a torchrun world

EXPORT = {"hidden_size": 48, "num_attention_heads": 2, "ffn_hidden_size": 64, "num_layers": 2}


def test_tp2_prunes_an_mla_model_exactly_as_one_process(tmp_path):
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    model, data = make(), batches()
    before = logits(model, data)
    pruned, result = prune_here_and_in_a_world(model, data, EXPORT, tmp_path, "tp2.py", "mla")
    tp2 = torch.load(tmp_path / "tp2.pt", weights_only=False)
    torch.testing.assert_close(tp2["unpruned_logits"], before, rtol=1e-5, atol=1e-5)  # the shards load
    assert_same_orders_and_weights(tp2, result, pruned)
    assert_same_orders_and_weights({**tp2, "weights": tp2["reused_weights"]}, result, pruned)  # one process's scores, reused
    torch.testing.assert_close(tp2["logits"], logits(pruned, data), rtol=1e-5, atol=1e-5)
    assert tp2["params_after"] == result.params_after == tp2["counted_params"]  # live at TP=2 = analytic at TP=2
    assert tp2["config"] == {k: getattr(result.config, k) for k in EXPORT}
