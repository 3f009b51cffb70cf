"""Calibration data: packing, determinism, file kinds, and errors before any calibration."""

import json

import pytest
import torch

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.data.calibration import DEFAULT_CORPUS, calibration_tokens, micro_batches, resolve_files
from tests.tiny_hf import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_packed_rows_are_windows_of_the_token_stream(tokenizer, tmp_path):
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i}" for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rows = calibration_tokens(str(tmp_path / "a.jsonl"), tokenizer, num_samples=6, seq_length=16, seed=0)
    assert rows.shape == (6, 16) and rows.dtype == torch.long
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    windows = {tuple(stream[i : i + 16]) for i in range(0, len(stream) - 15, 16)}
    assert all(tuple(r.tolist()) in windows for r in rows)  # aligned windows, documents joined by EOS
    assert len({tuple(r.tolist()) for r in rows}) == 6  # no window twice


def test_same_seed_same_samples_other_seed_other_samples(tokenizer):
    a = calibration_tokens("default", tokenizer, 8, 32, seed=1)
    assert torch.equal(a, calibration_tokens("default", tokenizer, 8, 32, seed=1))
    assert not torch.equal(a, calibration_tokens("default", tokenizer, 8, 32, seed=2))


def test_text_json_parquet_and_directories_give_the_same_tokens(tokenizer, tmp_path):
    import datasets

    docs = [f"line {i} of a document about pruning heads and channels" for i in range(30)]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    from_dir = calibration_tokens(str(tmp_path / "txt"), tokenizer, 4, 16)
    from_json = calibration_tokens(str(tmp_path / "d.jsonl"), tokenizer, 4, 16, text_field="body")
    from_parquet = calibration_tokens(str(tmp_path / "d.parquet"), tokenizer, 4, 16)
    assert torch.equal(from_dir, from_json) and torch.equal(from_json, from_parquet)


def test_errors_name_the_flag(tokenizer, tmp_path):
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(PruneConfigError, match=r"--calib-samples 10 x --seq-length 64 needs 640"):
        calibration_tokens(str(tmp_path / "tiny.txt"), tokenizer, 10, 64)
    with pytest.raises(PruneConfigError, match="does not exist"):
        calibration_tokens(str(tmp_path / "nope.txt"), tokenizer, 1, 8)
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(PruneConfigError, match="no column 'text'"):
        calibration_tokens(str(tmp_path / "d.jsonl"), tokenizer, 1, 8)
    with pytest.raises(PruneConfigError, match="multiple of --micro-batch-size"):
        micro_batches(torch.zeros(6, 8, dtype=torch.long), 4)
    assert [b.shape for b in micro_batches(torch.zeros(6, 8, dtype=torch.long), 3)] == [(3, 8), (3, 8)]


def test_default_corpus_ships_with_the_package():
    assert resolve_files("default") == [str(DEFAULT_CORPUS)] and DEFAULT_CORPUS.stat().st_size > 100_000


def test_mistyped_paths_fail_at_once_and_bad_encodings_are_named(tokenizer, tmp_path, monkeypatch):
    """A data file's name that does not exist is a path, not a dataset to look up on the Hub (which took 40 s
    offline and then reported an unreachable Hub); a file that is not UTF-8 is named, with its byte offset."""
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for typo in ("calib.jsonl", "data/calib", "corpus.txt.gz"):
        start = time.perf_counter()
        with pytest.raises(PruneConfigError, match=f"--calib-data: '{typo}' does not exist"):
            calibration_tokens(typo, tokenizer, 1, 8)
        assert time.perf_counter() - start < 5
    (tmp_path / "latin.txt").write_bytes(("caf\xe9 au lait, " * 200).encode("latin-1"))
    with pytest.raises(PruneConfigError, match=r"latin.txt \(byte 3\) is not UTF-8 text \(an encoding error\)"):
        calibration_tokens(str(tmp_path / "latin.txt"), tokenizer, 1, 8)


def test_held_out_rows_leave_the_calibration_rows_unchanged(tokenizer):
    """NAS carves held-out rows from the calibration text: the calibration rows stay those of a manual prune (so a
    scores file of one serves the other) and the held-out rows are other rows."""
    alone = calibration_tokens("default", tokenizer, 8, 32, seed=3)
    both = calibration_tokens("default", tokenizer, 8, 32, seed=3, held_out=4)
    assert torch.equal(both[:8], alone) and both.shape == (12, 32)
    assert not any(torch.equal(row, other) for row in both[8:] for other in alone)
