"""Calibration: what it collects, what it records, and that an interrupted one resumes (real tiny MCore models).

Invariants: a prune collects the statistics its criteria read (every forward-only one on request); the scores
file records the calibration data (a hash of the token rows and the settings behind them) and refuses other
data, naming the setting that changed, unless told to reuse it; a calibration stopped by Ctrl-C keeps the
statistics of its completed steps and, run again on the same data, forwards only the micro-batches not yet
counted and ends with the statistics of an uninterrupted run.
"""

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.importance.hooks import statistics_by_layer
from megatron_prune.minitron.importance.scores_file import read_scores_file
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB, SEQ = 128, 16
DEFAULT_SITES = {"qkv_in", "fc1_in", "proj_heads_out", "proj_groups_out", "fc2_in", "block"}


def make(seed=0):
    torch.manual_seed(seed)
    return build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB)


def batches(n=3, seed=0):
    return [random_tokens(2, SEQ, VOCAB, seed=seed + i) for i in range(n)]


def stored_sites(path):
    return statistics_by_layer(read_scores_file(path)["statistics"]["sums"])[1]


def test_prune_collects_what_its_criteria_read_and_everything_on_request(mcore, tmp_path):
    model, data = make(), batches()
    lean, full = str(tmp_path / "lean.pt"), str(tmp_path / "full.pt")
    mp.prune(model, {"ffn_hidden_size": 64}, mp.make_forward_loop(data, progress=False), scores_path=lean)
    assert stored_sites(lean) == DEFAULT_SITES
    mp.prune(model, {"ffn_hidden_size": 64}, mp.make_forward_loop(data, progress=False), scores_path=full, all_statistics=True)
    assert stored_sites(full) == DEFAULT_SITES | {"proj_in", "fc2_out"}
    _, result = mp.prune(model, {"ffn_hidden_size": 64}, scores_path=full, criteria="reference")  # a switch, no pass
    assert not result.calibrated
    with pytest.raises(mp.ScoresFileError, match=r"num_attention_heads=minitron needs statistic 'proj_in'.*all_statistics=True"):
        mp.prune(model, {"ffn_hidden_size": 64}, scores_path=lean, criteria="reference")


def test_scores_file_of_other_calibration_data_is_refused_naming_the_setting(mcore, tmp_path):
    model, path = make(), str(tmp_path / "scores.pt")
    settings = {"data": "calib.txt", "seed": 1}
    first = mp.make_forward_loop(batches(seed=0), progress=False, settings=settings)
    _, r1 = mp.prune(model, {"ffn_hidden_size": 64}, first, scores_path=path)
    assert r1.calibrated and r1.calibration == first.calibration and r1.calibration["samples"] == 6
    same = mp.make_forward_loop(batches(seed=0), progress=False, settings=settings)
    assert not mp.prune(model, {"ffn_hidden_size": 96}, same, scores_path=path)[1].calibrated
    other = mp.make_forward_loop(batches(seed=5), progress=False, settings={**settings, "seed": 2})
    with pytest.raises(mp.ScoresFileError, match=r"other calibration data: --seed 1 in the file, 2 now.*--reuse-scores"):
        mp.prune(model, {"ffn_hidden_size": 64}, other, scores_path=path)
    edited = mp.make_forward_loop(batches(seed=5), progress=False, settings=settings)  # same flags, other text
    with pytest.raises(mp.ScoresFileError, match="tokens differ with the same settings"):
        mp.prune(model, {"ffn_hidden_size": 64}, edited, scores_path=path)
    _, reused = mp.prune(model, {"ffn_hidden_size": 64}, other, scores_path=path, reuse_scores=True)
    assert not reused.calibrated and reused.calibration == first.calibration  # what the statistics really came from


class Interrupting:
    """A forward pre-hook raising KeyboardInterrupt (what Ctrl-C raises) on the `at`-th forward of the model."""

    def __init__(self, model, at):
        self.calls, self.at = 0, at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_interrupted_calibration_resumes_after_the_last_saved_micro_batch(mcore, tmp_path):
    model, data, path = make(), batches(n=10), str(tmp_path / "scores.pt")
    _, whole = mp.prune(model, {"ffn_hidden_size": 64, "num_layers": 3}, mp.make_forward_loop(data, progress=False))
    stop = Interrupting(model, at=7)  # micro-batches 1..6 done and saved (one per checkpoint: 10 micro-batches)
    with pytest.raises(KeyboardInterrupt):
        mp.prune(model, {"ffn_hidden_size": 64, "num_layers": 3}, mp.make_forward_loop(data, progress=False), scores_path=path)
    stop.handle.remove()
    partial = read_scores_file(path + ".partial")
    assert partial["meta"]["partial"]["done"] == 6 and partial["statistics"]["calls"] == 6
    count = Interrupting(model, at=0)
    _, resumed = mp.prune(model, {"ffn_hidden_size": 64, "num_layers": 3}, mp.make_forward_loop(data, progress=False), scores_path=path)
    count.handle.remove()
    assert count.calls == 4 and resumed.calibration_calls == 10  # only the 4 micro-batches not yet counted
    for n in range(1, 5):
        torch.testing.assert_close(resumed.importance.ffn[n], whole.importance.ffn[n], rtol=1e-6, atol=0)
        assert resumed.importance.layers[n] == pytest.approx(whole.importance.layers[n], rel=1e-6)
    assert resumed.plan.kept_layers == whole.plan.kept_layers
    assert all(torch.equal(resumed.orders.layers[n].ffn, whole.orders.layers[n].ffn) for n in range(1, 5))
    import os

    assert os.path.exists(path) and not os.path.exists(path + ".partial")
    other = mp.make_forward_loop(batches(n=10, seed=50), progress=False)  # a checkpoint of other data is not resumed
    stop = Interrupting(model, at=3)
    with pytest.raises(KeyboardInterrupt):
        mp.prune(model, {"ffn_hidden_size": 64}, other, scores_path=str(tmp_path / "b.pt"))
    stop.handle.remove()
    count = Interrupting(model, at=0)
    mp.prune(model, {"ffn_hidden_size": 64}, mp.make_forward_loop(data, progress=False), scores_path=str(tmp_path / "b.pt"))
    count.handle.remove()
    assert count.calls == 10
