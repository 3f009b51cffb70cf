"""The report agrees with the plan and with the live parameter count."""

import json

import torch

from megatron_prune import count_params, make_forward_loop, prune
from megatron_prune.minitron.report import format_tables, keep_masks, parameter_groups, write_report
from megatron_prune.minitron.runtime.parallel import ParallelContext
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config


def test_report_matches_plan_and_counts(mcore, tmp_path):
    model = build_tiny_gpt(tiny_gpt_config(), tied=False)
    target = {"hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_layers": 3}
    batches = [random_tokens(2, 16, 128, seed=s) for s in range(3)]
    pruned, result = prune(model, target, make_forward_loop(batches, progress=False))
    ctx = ParallelContext.from_megatron()
    before, after = parameter_groups(model, ctx), parameter_groups(pruned, ctx)
    assert sum(before.values()) == count_params(model, ctx) == result.params_before
    assert sum(after.values()) == count_params(pruned, ctx) == result.params_after
    assert before["output_layer"] == 128 * 64 and after["output_layer"] == 128 * 48  # untied

    masks = keep_masks(result)
    assert int(masks["hidden"].sum()) == 48 and int(masks["layers"].sum()) == 3
    kept = masks["layers"].nonzero().flatten() + 1
    assert kept.tolist() == result.plan.kept_layers
    assert masks["ffn"][masks["layers"]].sum(dim=1).tolist() == [64] * 3
    assert masks["heads"][masks["layers"]].sum(dim=1).tolist() == [4] * 3
    assert not masks["ffn"][~masks["layers"]].any()
    for n in result.plan.kept_layers:  # the FFN mask marks exactly the planned channels
        assert torch.equal(masks["ffn"][n - 1].nonzero().flatten(), result.plan.layers[n].ffn.sort().values)

    paths = write_report(result, str(tmp_path), before, after)
    record = json.loads((tmp_path / "prune_summary.json").read_text())
    assert record["dropped_layers"] == result.plan.dropped_layers and len(record["layers"]) == 4
    assert (tmp_path / "prune_report.png").read_bytes()[:4] == b"\x89PNG" and len(paths) == 2
    text = format_tables(result, before, after)
    assert "DROPPED" in text and f"{result.params_after:,}" in text
