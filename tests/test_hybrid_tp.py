"""Hybrid Mamba models at tensor parallelism 2 (torchrun, gloo): Megatron splits a mixer's `in_proj` rows
[z, x, B, C, dt] and `conv1d` channels [x, B, C] over TP ranks per segment, and its heads (A_log, D, dt_bias, the
gated norm, `out_proj` columns) evenly. Pruning at TP=2 must give the orders, the pruned weights and the logits of
one process, and a scores file is reusable across the two layouts."""

import pytest
import torch

from megatron_prune.minitron.slicing.tensor_parallel import Partition, gather_full, shard
from megatron_prune.minitron.slicing.geometry import MAMBA_IN, mamba_segments
from tests.test_hybrid import batches, make, logits
from tests.stages import assert_same_orders_and_weights, prune_here_and_in_a_world
from tests.workers.tp2 import HYBRID_PATTERN as PATTERN

pytestmark = pytest.mark.heavy  # a torchrun world

EXPORT = {"mamba_num_heads": 4, "mamba_head_dim": 12, "hidden_size": 48, "ffn_hidden_size": 96, "num_layers": 4}


class _Ranks:
    """Two TP ranks in one process: gather_over_tp returns the shards of both."""

    def __init__(self, shards, rank=0):
        self.shards, self.tp_rank, self.tp_size = shards, rank, len(shards)

    def gather_over_tp(self, local):
        return self.shards


def test_segments_shard_and_gather_like_megatron():
    """[z, x, B, C, dt] rows of in_proj (nh=4, hd=2, ng=2, ds=1 -> D=8): rank r holds each segment's r-th half."""
    part = Partition(0, segments=mamba_segments(MAMBA_IN, 4, 2, 2, 1))
    full = torch.arange(8 + 8 + 2 + 2 + 4)
    shards = [shard(full, part, _Ranks([None, None], r)) for r in range(2)]
    assert shards[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 18, 20, 21]
    assert shards[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 17, 19, 22, 23]
    assert torch.equal(gather_full(shards[0], part, _Ranks(shards)), full)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_prune.minitron.runtime.distributed import init_distributed

    init_distributed(seed=1234)
    out = tmp_path_factory.mktemp("hybrid_tp")
    model, data = make(PATTERN), batches()
    before = logits(model, data)
    pruned, result = prune_here_and_in_a_world(model, data, EXPORT, out, "tp2.py", "hybrid")
    return {"unpruned": before, "pruned": pruned, "result": result, "logits": logits(pruned, data),
            "tp2": torch.load(out / "tp2.pt", weights_only=False)}  # fmt: skip


def test_tp2_prunes_a_hybrid_model_exactly_as_one_process(runs):
    tp2, result = runs["tp2"], runs["result"]
    torch.testing.assert_close(tp2["unpruned_logits"], runs["unpruned"], rtol=1e-5, atol=1e-5)  # the shards load
    assert_same_orders_and_weights(tp2, result, runs["pruned"])
    assert_same_orders_and_weights({**tp2, "weights": tp2["reused_weights"]}, result, runs["pruned"])  # one process's scores, reused
    torch.testing.assert_close(tp2["logits"], runs["logits"], rtol=1e-5, atol=1e-5)
    assert tp2["params_after"] == result.params_after == tp2["counted_params"]  # live at TP=2 = analytic at TP=2
    assert tp2["config"] == {k: getattr(result.config, k) for k in EXPORT}
