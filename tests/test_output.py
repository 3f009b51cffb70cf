"""The output directory appears complete or not at all, and never replaces data without --overwrite."""

import pytest

from megatron_prune.errors import PruneConfigError
from megatron_prune.minitron.output import atomic_output_dir, check_output_dir


def test_published_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(str(out)) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary directory
    with atomic_output_dir(str(out)) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "model").write_text("done")
    assert (out / "model").read_text() == "done" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    check_output_dir(str(out))  # empty: fine
    (out / "old").write_text("user data")
    with pytest.raises(PruneConfigError, match="--overwrite"):
        check_output_dir(str(out))
    with pytest.raises(PruneConfigError, match="not a directory"):
        check_output_dir(str(out / "old"))
    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output
        with atomic_output_dir(str(out), overwrite=True):
            raise RuntimeError("failed")
    assert (out / "old").read_text() == "user data"
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
