"""Built-in NAS score functions: `score_func(model) -> float`, higher is better, the same on every rank.

  lm_loss_score(batches)                 minus the mean next-token cross-entropy over held-out token
                                         batches [B, S] (every predicted token weighs the same)
  multiple_choice_score(path, tokenizer) accuracy on a local JSONL file of MMLU-format questions
                                         ({"question", "choices", "answer"}), optionally on a fixed sample

Both run forward-only through Megatron's pipeline schedule (`run_forward`), so they work at any TP/PP/DP:
the last pipeline stage turns each micro-batch's logits (vocabulary-parallel at TP > 1) into sums,
data-parallel replicas add theirs, and every stage receives the last stage's totals. Each carries a
`score_name` naming its data, under which NAS caches its scores.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megatron_prune.minitron.data.forward import run_forward
from megatron_prune.minitron.runtime.parallel import ParallelContext

ScoreFunc = Callable[[torch.nn.Module], float]
LETTERS = "ABCDEFGHIJ"


def lm_loss_score(batches: Sequence[torch.Tensor]) -> ScoreFunc:
    """-(mean next-token cross-entropy) of the model on `batches` (token ids [B, S], one shape)."""
    batches = list(batches)
    if not batches:
        raise ValueError("lm_loss_score needs at least one held-out batch")

    def score(model: torch.nn.Module) -> float:
        parallel = _vocab_parallel(model, ParallelContext.from_megatron())
        loss, tokens = _totals(model, batches, lambda logits, t: _next_token_loss(logits, t, parallel))
        return -loss / tokens

    digest = hashlib.sha256(b"".join(b.numpy().tobytes() for b in batches)).hexdigest()[:12]
    score.score_name = f"lm_loss:{digest}"
    return score


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, vocab_parallel: bool) -> torch.Tensor:
    """[sum of cross-entropy, number of predictions] for logits [B, S, V or V/tp] of tokens [B, S]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    pred = logits[:, :-1].float().contiguous()  # [B, S-1, V(/tp)]
    target = tokens[:, 1:].to(pred.device).contiguous()  # [B, S-1]
    if vocab_parallel:  # each TP rank holds a slice of the vocabulary: Megatron's cross-entropy reduces over TP
        loss = vocab_parallel_cross_entropy(pred, target)
    else:
        loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none")
    return torch.tensor([loss.double().sum().item(), float(loss.numel())], dtype=torch.float64)


def _vocab_parallel(model: torch.nn.Module, ctx: ParallelContext) -> bool:
    """Whether the logits each TP rank sees are its slice of the vocabulary (GPTModel's default)."""
    return ctx.tp_size > 1 and getattr(model, "parallel_output", True)


def _totals(model: torch.nn.Module, batches: Sequence[torch.Tensor], collect) -> Tuple[float, float]:
    """Sum of `collect(logits, tokens)` (float64 [2]: a sum and a count) over all micro-batches and DP
    replicas, on every rank."""
    ctx = ParallelContext.from_megatron()
    with torch.no_grad():
        outputs = run_forward(model, batches, collect=collect)
    local = torch.stack(outputs).sum(0) if outputs else torch.zeros(2, dtype=torch.float64)
    total, count = ctx.gather_over_pp(ctx.sum_over_dp(local))[-1].tolist()
    return total, count


@dataclass(frozen=True)
class Question:
    question: str
    choices: Tuple[str, ...]
    answer: int  # index into choices
    subject: str = ""


def load_questions(path: str) -> List[Question]:
    """Read MMLU-format JSONL: one object per line with "question", "choices" (2-10 strings) and "answer"
    (an index or a letter); an optional "subject". Errors name the line."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                choices = tuple(str(c) for c in record["choices"])
                answer = record["answer"]
                answer = LETTERS.index(answer.strip().upper()) if isinstance(answer, str) and not answer.strip().isdigit() else int(answer)
                if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
                    raise ValueError(f"{len(choices)} choices, answer {record['answer']!r}")
                questions.append(Question(str(record["question"]), choices, answer, str(record.get("subject", ""))))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: not an MMLU-format question ({type(e).__name__}: {e})") from e
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def prompt(q: Question) -> str:
    """The zero-shot MMLU prompt; the model should continue with " <letter>"."""
    head = f"The following is a multiple choice question about {q.subject.replace('_', ' ')}.\n\n" if q.subject else ""
    options = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
    return f"{head}{q.question.strip()}\n{options}Answer:"


def sample(n: int, fraction: float, seed: int) -> List[int]:
    """A fixed sample of max(1, round(fraction * n)) of n indices, ascending."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    return sorted(random.Random(seed).sample(range(n), max(1, round(fraction * n))))


def multiple_choice_score(path: str, tokenizer, fraction: float = 1.0, seed: int = 0, batch_size: int = 1,
                          max_length: Optional[int] = None) -> ScoreFunc:  # fmt: skip
    """Accuracy on the questions of `path` (a `fraction` of them, sampled with `seed`): a question counts as
    right when the logit of " <answer letter>" after its prompt beats the other choices' letters.

    `tokenizer` has an HF-like `encode(text, add_special_tokens=...)` and optionally `pad_token_id` /
    `eos_token_id`. Prompts are right-padded into micro-batches of `batch_size` (causal attention: padding
    after the prompt does not change its logits) and, with `max_length`, keep their last tokens.
    """
    questions = load_questions(path)
    chosen = [questions[i] for i in sample(len(questions), fraction, seed)]
    letters = [tokenizer.encode(f" {L}", add_special_tokens=False)[-1] for L in LETTERS[: max(len(q.choices) for q in chosen)]]
    if len(set(letters)) != len(letters):
        raise ValueError(f"the tokenizer maps the answer letters to repeated tokens {letters}")
    prompts = [tokenizer.encode(prompt(q))[-max_length if max_length else 0 :] for q in chosen]
    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)) if t is not None), 0)
    batches, lengths = _pad(prompts, batch_size, pad)

    def score(model: torch.nn.Module) -> float:
        ctx = ParallelContext.from_megatron()
        calls = iter(range(ctx.dp_rank, len(batches), ctx.dp_size))  # the micro-batches of this DP replica, in order
        parallel = _vocab_parallel(model, ctx)

        def collect(logits, tokens):  # logits [B, S, V(/tp)] of this replica's next micro-batch
            first = next(calls) * batch_size
            rows = list(range(first, min(first + batch_size, len(lengths))))
            at = torch.tensor([lengths[r] - 1 for r in rows])
            last = logits[torch.arange(len(rows)), at.to(logits.device)].float()  # [rows, V(/tp)]
            scores = _letter_logits(last, letters, parallel, ctx)  # [rows, letters]
            right = sum(int(scores[i, : len(chosen[r].choices)].argmax()) == chosen[r].answer for i, r in enumerate(rows))
            return torch.tensor([float(right), float(len(rows))], dtype=torch.float64)

        right, total = _totals(model, batches, collect)
        return right / total

    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    score.score_name = f"multiple_choice:{digest}:{fraction}:{seed}:{max_length}"
    return score


def _pad(prompts: List[List[int]], batch_size: int, pad: int) -> Tuple[List[torch.Tensor], List[int]]:
    """Right-pad token lists to one length and group them into micro-batches [batch_size, S] (the last one
    filled up with padding rows); returns the batches and each prompt's length."""
    lengths = [len(p) for p in prompts]
    seq = max(lengths)
    rows = [p + [pad] * (seq - len(p)) for p in prompts]
    rows += [[pad] * seq] * (-len(rows) % batch_size)
    tokens = torch.tensor(rows, dtype=torch.long)
    return list(tokens.split(batch_size)), lengths


def _letter_logits(last: torch.Tensor, letters: List[int], vocab_parallel: bool, ctx: ParallelContext) -> torch.Tensor:
    """Logits [rows, len(letters)] of the letter tokens from `last` [rows, V] or, with a vocabulary-parallel
    output, from each TP rank's slice [rows, V/tp] (a gather over TP)."""
    if not vocab_parallel:
        return last[:, letters]
    width = last.shape[1]
    start = ctx.tp_rank * width
    mine = torch.full((last.shape[0], len(letters)), float("-inf"))
    for j, t in enumerate(letters):
        if start <= t < start + width:
            mine[:, j] = last[:, t - start].cpu()
    return torch.stack(ctx.gather_over_tp(mine)).amax(0)


@dataclass(frozen=True)
class ScoreSpec:
    """A built-in score function by name, as the CLI flags describe it (`search.args`)."""

    name: str = "lm_loss"  # "lm_loss" (held-out token batches) or "mmlu" (a JSONL file of questions)
    data: Optional[str] = None  # mmlu: the JSONL file
    fraction: float = 1.0  # mmlu: the share of questions scored
    seed: int = 0
    batch_size: int = 1


def make_score_func(spec: ScoreSpec, batches: Optional[Sequence[torch.Tensor]] = None, tokenizer=None) -> ScoreFunc:
    """The score function `spec` names: lm_loss needs held-out `batches`, mmlu a `tokenizer` and `spec.data`."""
    if spec.name == "lm_loss":
        if not batches:
            raise ValueError("score function lm_loss needs held-out token batches")
        return lm_loss_score(batches)
    if spec.name == "mmlu":
        if spec.data is None or tokenizer is None:
            raise ValueError("score function mmlu needs a JSONL file (--score-data) and a tokenizer")
        return multiple_choice_score(spec.data, tokenizer, spec.fraction, spec.seed, spec.batch_size)
    raise ValueError(f"unknown score function {spec.name!r}: use lm_loss or mmlu")
