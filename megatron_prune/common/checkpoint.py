"""Search checkpoints: every measured score, keyed by the subnet, tied to the model they were measured on.

    ckpt = SearchCheckpoint.open("search.pt", algorithm="fastnas", model_id=fingerprint(model), settings={...})
    ckpt.get("layer1.0.conv1=32")          -> a score measured earlier, or None
    ckpt.put("layer1.0.conv1=32", 0.871)   # written to disk at once, atomically

    ckpt.save_state({"batches": 12, "sums": {...}})   # an algorithm's own progress (tensors allowed), also atomic

An interrupted search reopened with the same file skips every score it already has and therefore reaches the
same result. A file written for another model is refused; one written with other settings (importance
criterion, BatchNorm batches, ...) is not reused, with a warning saying which setting changed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from megatron_prune.errors import PruneConfigError

FORMAT = "megatron-prune.search-checkpoint"


def atomic_save(obj, path: os.PathLike) -> None:
    """`torch.save` to a temporary sibling, then rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


@dataclass
class SearchCheckpoint:
    path: Optional[Path]
    algorithm: str
    model_id: str
    settings: Dict[str, object]
    scores: Dict[str, float] = field(default_factory=dict)
    reused: int = 0  # scores taken from the file
    state: Dict[str, object] = field(default_factory=dict)  # algorithm-specific progress (GradNAS: gradient sums)

    @classmethod
    def open(cls, path, algorithm: str, model_id: str, settings: Mapping[str, object]) -> "SearchCheckpoint":
        """Load `path` if it exists (checking model and settings), else start empty; `path=None`: in memory."""
        if path is None:
            return cls(None, algorithm, model_id, dict(settings))
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir() or str(path).endswith(os.sep):
            p = p / f"{algorithm}_search.pt"
        ckpt = cls(p, algorithm, model_id, dict(settings))
        if not p.exists():
            return ckpt
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            raise PruneConfigError(f"checkpoint {str(p)!r} cannot be read ({type(e).__name__}: {e}); delete it or pass another path") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise PruneConfigError(f"checkpoint {str(p)!r} is not a megatron-prune search checkpoint")
        if state["algorithm"] != algorithm or state["model_id"] != model_id:
            raise PruneConfigError(
                f"checkpoint {str(p)!r} was written by {state['algorithm']} for another model (fingerprint "
                f"{state['model_id']}, this model is {model_id}); delete it or pass another path")
        changed = sorted(k for k in set(settings) | set(state["settings"]) if settings.get(k) != state["settings"].get(k))
        if changed:
            warnings.warn(f"checkpoint {str(p)!r}: not reusing its scores, measured with other settings ({', '.join(changed)})", stacklevel=3)
            return ckpt
        ckpt.scores = dict(state["scores"])
        ckpt.state = dict(state.get("state", {}))
        return ckpt

    def get(self, key: str) -> Optional[float]:
        value = self.scores.get(key)
        if value is not None:
            self.reused += 1
        return value

    def put(self, key: str, score: float) -> None:
        self.scores[key] = float(score)
        self._write()

    def save_state(self, state: Mapping[str, object]) -> None:
        """Replace the algorithm's progress record (plain values and tensors) and write the file."""
        self.state = dict(state)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            atomic_save({"format": FORMAT, "algorithm": self.algorithm, "model_id": self.model_id,
                         "settings": self.settings, "scores": self.scores, "state": self.state}, self.path)
