"""Tier 1: pure statistics and index geometry, checked against hand-computed values (no Megatron)."""

import math

import pytest
import torch

from megatron_prune.minitron.importance.statistics import StatStore, block_influence, channel_sum_sq, layer_norm, rms_norm
from megatron_prune.minitron.slicing.geometry import expand_blocks, gated_rows, head_columns, qkv_rows


def test_channel_statistic_by_hand():
    # S=2, B=2, C=2.  sample b=0: mean|x| over s = [(1+3)/2, (2+4)/2] = [2, 3]
    #                 sample b=1: [(5+1)/2, (0+2)/2] = [3, 1]
    x = torch.tensor([[[1.0, -2.0], [5.0, 0.0]], [[-3.0, 4.0], [1.0, -2.0]]])  # [S, B, C]
    assert torch.equal(channel_sum_sq(x), torch.tensor([2.0**2 + 3.0**2, 3.0**2 + 1.0**2]))


def test_channel_statistic_two_dim_input_is_one_sample():
    x = torch.tensor([[1.0, -1.0], [3.0, 0.0]])  # [T, C]: one sample of 2 tokens
    assert torch.equal(channel_sum_sq(x), torch.tensor([4.0, 0.25]))


def test_channel_statistic_is_a_sum_over_calls():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 3)
    store = StatStore()
    store.add("k", channel_sum_sq(x[:, :2]))
    store.add("k", channel_sum_sq(x[:, 2:]))
    torch.testing.assert_close(store["k"], channel_sum_sq(x))


def test_channel_statistic_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"\[S, B, C\]"):
        channel_sum_sq(torch.zeros(2, 2, 2, 2))


def test_block_influence_by_hand():
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [S=2, B=1, H=2]
    y = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])  # cos = 1 and 0 -> mean 0.5
    assert block_influence(x, y).item() == pytest.approx(0.5)
    assert block_influence(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert block_influence(x, -x).item() == pytest.approx(2.0)


def test_norm_recomputation_matches_torch():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 2, 8), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5), torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected)
    torch.testing.assert_close(rms_norm(x, w - 1, 1e-6, zero_centered_gamma=True), expected)


def test_store_merge_reduce_and_round_trip():
    a = StatStore({"x": torch.tensor([1.0, 2.0])}, calls=2)
    b = StatStore({"x": torch.tensor([3.0, 4.0]), "y": torch.tensor(5.0)}, calls=1)
    m = a.merge(b)
    assert torch.equal(m["x"], torch.tensor([4.0, 6.0])) and m["y"].item() == 5.0 and m.calls == 3
    doubled = m.reduce(lambda t: t * 2)  # a stand-in "all-reduce" over two identical replicas
    assert torch.equal(doubled["x"], torch.tensor([8.0, 12.0])) and doubled.calls == 6
    again = StatStore.from_state_dict(m.state_dict())
    assert again.calls == 3 and torch.equal(again["x"], m["x"])


def test_expand_blocks():
    assert expand_blocks(torch.tensor([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


def test_qkv_rows_worked_example():
    # N=8, G=2 (q=4), d=1. Keep group order [1, 0]; in group 1 heads [2, 0], in group 0 heads [3, 1].
    # Group g spans blocks g*6 .. g*6+5 = [Q0 Q1 Q2 Q3 K V].
    rows = qkv_rows(torch.tensor([1, 0]), torch.tensor([[2, 0], [3, 1]]), q=4, d=1)
    assert rows.tolist() == [8, 6, 10, 11, 3, 1, 4, 5]
    rows_d2 = qkv_rows(torch.tensor([0]), torch.tensor([[1]]), q=4, d=2)
    assert rows_d2.tolist() == [2, 3, 8, 9, 10, 11]


def test_head_columns_match_qkv_heads():
    cols = head_columns(torch.tensor([1, 0]), torch.tensor([[2, 0], [3, 1]]), q=4, d=2)
    # global heads: 1*4+2=6, 4, 3, 1 -> columns 2h, 2h+1
    assert cols.tolist() == [12, 13, 8, 9, 6, 7, 2, 3]


def test_gated_rows():
    assert gated_rows(torch.tensor([2, 0]), ffn=4, gated=True).tolist() == [2, 0, 6, 4]
    assert gated_rows(torch.tensor([2, 0]), ffn=4, gated=False).tolist() == [2, 0]


def test_qkv_rows_identity_when_everything_is_kept():
    G, q, d = 3, 2, 4
    rows = qkv_rows(torch.arange(G), torch.arange(q).repeat(G, 1), q, d)
    assert rows.tolist() == list(range(G * (q + 2) * d))
    assert math.prod(head_columns(torch.arange(G), torch.arange(q).repeat(G, 1), q, d).shape) == G * q * d


def test_group_output_norms_by_hand():
    from megatron_prune.minitron.importance.statistics import column_gram, group_output_norms

    W = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # [H=2, C=4]: groups of d=2 columns
    x = torch.tensor([[3.0, 4.0, 1.0, 5.0], [0.0, -1.0, -2.0, 0.0]])  # [T=2, C]
    # group 0: W_0 x_0 = (3, 4) -> 5 and (0, -1) -> 1;  group 1: W_1 x_1 = (2, 0) -> 2 and (-4, 0) -> 4
    torch.testing.assert_close(group_output_norms(x, column_gram(W, 2)), torch.tensor([6.0, 6.0]))
    # d = 1 (channels): |x_c| * ||W[:, c]||, summed over tokens
    torch.testing.assert_close(group_output_norms(x, column_gram(W, 1)), torch.tensor([3.0, 5.0, 6.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        column_gram(W, 3)


def test_group_output_norms_equal_explicit_products():
    from megatron_prune.minitron.importance.statistics import column_gram, group_output_norms

    torch.manual_seed(0)
    W, x = torch.randn(6, 12), torch.randn(5, 3, 12)  # [H, C], [S, B, C]; 4 groups of 3
    expected = torch.stack([(x[..., g * 3 : g * 3 + 3] @ W[:, g * 3 : g * 3 + 3].T).norm(dim=-1).sum() for g in range(4)])
    torch.testing.assert_close(group_output_norms(x, column_gram(W, 3)), expected)


def test_taylor_groups_by_hand():
    from megatron_prune.minitron.importance.statistics import taylor_groups

    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[-1.0, 1.0], [1.0, 1.0]]])  # [S=2, B=2, C=2]
    g = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, -3.0], [2.0, 0.0]]])
    # sample 0: channel 0: 1*1 + (-1)*1 = 0, channel 1: 2*1 + 1*(-3) = -1;  sample 1: 3*1 + 1*2 = 5, 0 + 0 = 0
    assert torch.equal(taylor_groups(x, g, 1), torch.tensor([5.0, 1.0]))
    assert torch.equal(taylor_groups(x, g, 2), torch.tensor([1.0 + 5.0]))  # one group: |0 - 1| + |5 + 0|


@pytest.mark.parametrize("G, q, d", [(2, 4, 8), (3, 3, 4), (4, 1, 8)])
def test_heads_and_groups_at_once_equal_each_on_its_own(G, q, d):
    """One pass for heads and query groups (diagonal blocks + cross terms) gives the two separate statistics."""
    from megatron_prune.minitron.importance.statistics import column_gram, gram_blocks, group_output_norms, head_and_group_output_norms

    torch.manual_seed(0)
    x, W = torch.randn(6, 2, G * q * d), torch.randn(24, G * q * d)
    heads, groups = head_and_group_output_norms(x, gram_blocks(W, q, d))
    torch.testing.assert_close(heads, group_output_norms(x, column_gram(W, d)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(groups, group_output_norms(x, column_gram(W, q * d)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_normed_channel_statistic_needs_no_normalised_copy(zero_centered):
    from megatron_prune.minitron.importance.statistics import rms_normed_channel_sum_sq

    torch.manual_seed(0)
    x, w = torch.randn(7, 3, 16), torch.rand(16) - 0.5
    expected = channel_sum_sq(rms_norm(x, w, 1e-5, zero_centered))
    torch.testing.assert_close(rms_normed_channel_sum_sq(x, w, 1e-5, zero_centered), expected, rtol=1e-5, atol=1e-7)



@pytest.mark.parametrize("G, q, d", [(2, 4, 8), (3, 3, 4), (4, 1, 8)])
def test_gram_blocks_are_the_blocks_of_the_query_group_gram(G, q, d):
    """Only the diagonal and upper blocks are computed; they equal those of the full group Gram matrices."""
    from megatron_prune.minitron.importance.statistics import column_gram, gram_blocks

    torch.manual_seed(1)
    W = torch.randn(24, G * q * d)
    full = column_gram(W, q * d).view(G, q, d, q, d)
    diagonal, rows = gram_blocks(W, q, d)
    torch.testing.assert_close(diagonal, full.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(G * q, d, d))
    assert len(rows) == q - 1
    for h, row in enumerate(rows):
        torch.testing.assert_close(row, full[:, h, :, h + 1 :, :].reshape(G, d, (q - 1 - h) * d))
