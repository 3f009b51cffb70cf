"""Calibration data: text from files or a dataset, tokenised and packed into fixed-length samples.

    source ──(datasets)──> documents ──tokenizer, EOS between──> one token stream
      ──> rows of seq_length ──seeded choice of num_samples rows──> [N, S] ──> micro-batches [B, S]

Sources: "default" (the public-domain corpus shipped in `megatron_prune/minitron/data/corpus/`), a file, a directory
(every .txt/.md/.rst/.json/.jsonl/.parquet file in it, recursively, sorted), a glob, several of those separated
by commas, or a dataset name for `datasets.load_dataset` ("name" or "name:config"). Same source, tokenizer,
sizes and seed give the same samples.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import os
from pathlib import Path
from typing import Iterator, List

import torch

from megatron_prune.errors import PruneConfigError

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "jargon_file_4.4.7_excerpt.txt.gz"
_BUILDERS = {".txt": "text", ".md": "text", ".rst": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_POOL_FACTOR = 4  # tokenise up to this many times the tokens needed, then choose rows from that pool


def calibration_tokens(source: str, tokenizer, num_samples: int, seq_length: int, seed: int = 1234,
                       text_field: str = "text", split: str = "train", held_out: int = 0) -> torch.LongTensor:  # fmt: skip
    """[num_samples + held_out, seq_length] token ids packed from `source`: a seeded choice of rows, the first
    `num_samples` for calibration (the same rows whatever `held_out` is, as long as it is at most 3 x num_samples)
    and then `held_out` other rows (e.g. to score NAS candidates on).

    Raises PruneConfigError, before anything is calibrated, when the source yields too few tokens, or cannot be read.
    """
    if num_samples < 1 or seq_length < 1:
        raise PruneConfigError(f"--calib-samples ({num_samples}) and --seq-length ({seq_length}) must be >= 1")
    needed = (num_samples + held_out) * seq_length
    pool = max(_POOL_FACTOR * num_samples * seq_length, needed)
    stream = _token_stream(_documents(source, text_field, split), tokenizer, limit=pool)
    if stream.numel() < needed:
        raise PruneConfigError(
            f"--calib-data {source!r} has {stream.numel():,} tokens; --calib-samples {num_samples} x --seq-length "
            f"{seq_length} needs {num_samples * seq_length:,}" + (f" (and {held_out} held-out rows {needed:,})" if held_out else "")
            + ": give more text or ask for fewer/shorter samples"
        )
    rows = stream[: stream.numel() // seq_length * seq_length].view(-1, seq_length)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    calibration, rest = order[:num_samples].sort().values, order[num_samples : num_samples + held_out].sort().values
    return rows[torch.cat([calibration, rest])].clone()


def token_rows(source: str, tokenizer, seq_length: int, max_rows: int, text_field: str = "text",
               split: str = "train") -> torch.LongTensor:  # fmt: skip
    """[N, seq_length] token ids packed in order from the start of `source`, N <= max_rows (fewer when the
    source is shorter: training loops then repeat them). Raises PruneConfigError if it has no whole row."""
    stream = _token_stream(_documents(source, text_field, split), tokenizer, limit=max_rows * seq_length)
    if stream.numel() < seq_length:
        raise PruneConfigError(f"{source!r} has {stream.numel():,} tokens, fewer than one sequence of {seq_length}")
    return stream[: stream.numel() // seq_length * seq_length].view(-1, seq_length).clone()


def micro_batches(tokens: torch.Tensor, micro_batch_size: int) -> List[torch.Tensor]:
    """Split [N, S] into N / micro_batch_size micro-batches [B, S] (N must be a multiple of B)."""
    if micro_batch_size < 1 or tokens.shape[0] % micro_batch_size:
        raise PruneConfigError(
            f"--calib-samples ({tokens.shape[0]}) must be a multiple of --micro-batch-size ({micro_batch_size})"
        )
    return list(tokens.split(micro_batch_size))


def resolve_files(source: str) -> List[str]:
    """The data files `source` names (sorted, deduplicated), or [] when it names no local path (a dataset)."""
    if source == "default":
        return [str(DEFAULT_CORPUS)]
    files: List[str] = []
    for part in (p.strip() for p in source.split(",") if p.strip()):
        path = Path(os.path.expanduser(part))
        if path.is_dir():
            files += [str(f) for f in sorted(path.rglob("*")) if f.is_file() and _builder(f.name)]
        elif path.is_file():
            files.append(str(path))
        elif glob.has_magic(part):
            files += sorted(f for f in glob.glob(os.path.expanduser(part), recursive=True) if os.path.isfile(f))
        elif part.count("/") > 1 or part.startswith((".", "/", "~")) or _builder(part) or _under_local_dir(part):
            # a path (a dataset name is "name" or "org/name", without a data file's suffix): no network look-up
            raise PruneConfigError(f"--calib-data: {part!r} does not exist (no such file or directory)")
    return list(dict.fromkeys(files))


def _under_local_dir(part: str) -> bool:
    """"data/calib" where ./data exists: a path, not the dataset "org/name"."""
    parent = os.path.dirname(part)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def _documents(source: str, text_field: str, split: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    files = resolve_files(source)
    builders = {_builder(f) for f in files}
    if files and (None in builders or len(builders) != 1):
        kinds = sorted({Path(f).suffix or Path(f).name for f in files})
        raise PruneConfigError(
            f"--calib-data {source!r}: files must be all text (.txt/.md/.rst[.gz]), all JSON lines or all Parquet; got {kinds}"
        )
    try:
        if files:
            builder = builders.pop()
            extra = {"sample_by": "document"} if builder == "text" else {}
            data = datasets.load_dataset(builder, data_files=files, split="train", **extra)
        else:  # streamed: only the rows the token pool needs are downloaded
            name, _, config = source.partition(":")
            data = datasets.load_dataset(name, config or None, split=split, streaming=True)
        rows = iter(data)
        first = next(rows, None)
    except Exception as e:  # noqa: BLE001 - name the source and the cause
        raise _load_error(source, files, e) from e
    if first is None:
        return
    if text_field not in first:
        raise PruneConfigError(f"--calib-data {source!r} has no column {text_field!r} (columns: {sorted(first)}); set --calib-text-field")
    for row in itertools.chain([first], rows):
        if row[text_field]:
            yield row[text_field]


def _load_error(source: str, files: List[str], error: Exception) -> PruneConfigError:
    """What went wrong loading `source`, in the user's terms: the file that is not UTF-8, the dataset that the
    Hub did not serve, or the loader's own message."""
    cause = error
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        culprit = next((f"{f} (byte {b})" for f, b in map(_non_utf8_byte, files) if b is not None), "a file")
        return PruneConfigError(f"--calib-data {source!r}: {culprit} is not UTF-8 text (an encoding error): convert it "
                                "to UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8")  # fmt: skip
    if not files:
        return PruneConfigError(f"--calib-data {source!r} is not a file or directory here, and as a dataset name it could "
                                f"not be loaded: {type(error).__name__}: {error}")  # fmt: skip
    return PruneConfigError(f"--calib-data {source!r} cannot be loaded: {type(error).__name__}: {error}")


def _non_utf8_byte(name: str):
    """(name, offset of the first byte that is not UTF-8, or None); gzip files are read unpacked."""
    opener = gzip.open if name.endswith(".gz") else open
    with opener(name, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return name, e.start
    return name, None


def _token_stream(documents: Iterator[str], tokenizer, limit: int) -> torch.LongTensor:
    """Token ids of the documents in order, an EOS token after each, until `limit` tokens."""
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if len(ids) >= limit:
            break
    return torch.tensor(ids[:limit], dtype=torch.long)


def _builder(name: str):
    stem = name[:-3] if name.endswith(".gz") else name
    return _BUILDERS.get(Path(stem).suffix.lower())

