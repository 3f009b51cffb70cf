"""Tier 2: the built-in NAS score functions equal values computed directly from the model's logits."""

import json

import pytest
import torch

import megatron_prune as mp
from megatron_prune.minitron.data.scores import load_questions, prompt, sample
from tests.tiny import build_tiny_gpt, random_tokens, tiny_gpt_config

VOCAB = 128


class CharTokenizer:
    """HF-like: one token per character, token 1 (BOS) first when add_special_tokens."""

    pad_token_id, eos_token_id = 0, 2

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


def make():
    torch.manual_seed(0)
    return build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB, max_seq_length=128)


def direct_logits(model, tokens):  # [B, S] -> [B, S, V], a plain forward (not the pipeline schedule)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)


def test_lm_loss_score_is_minus_the_mean_next_token_loss(mcore):
    model = make()
    batches = [random_tokens(2, 12, VOCAB, seed=i) for i in range(3)]
    losses = [torch.nn.functional.cross_entropy(direct_logits(model, b)[:, :-1].flatten(0, 1), b[:, 1:].flatten(), reduction="sum")
              for b in batches]  # fmt: skip
    expected = -sum(l.item() for l in losses) / (3 * 2 * 11)
    score = mp.lm_loss_score(batches)
    assert score(model) == pytest.approx(expected, rel=1e-6)
    assert score.score_name == mp.lm_loss_score(batches).score_name != mp.lm_loss_score(batches[:2]).score_name


QUESTIONS = [  # prompts of different lengths (padding), one with three choices
    ("What is 2+2?", ["3", "4", "5", "22"]),
    ("Which is a colour?", ["red", "dog", "run", "seven"]),
    ("Pick the prime.", ["4", "6", "7"]),
    ("Capital of France?", ["Rome", "Paris", "Berlin", "Madrid"]),
    ("Largest planet?", ["Mars", "Venus", "Jupiter", "Earth"]),
    ("H2O is", ["water", "salt", "air", "fire"]),
    ("Opposite of up?", ["left", "down", "in", "on"]),
]


def write_questions(path, answers, letters_for=()):
    with open(path, "w") as f:
        for i, ((q, choices), a) in enumerate(zip(QUESTIONS, answers)):
            answer = "ABCD"[a] if i in letters_for else a
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer, "subject": "general_knowledge"}) + "\n")
        f.write("\n")  # blank lines are skipped


def predictions(model, path, tokenizer):
    """The answer letter each question's prompt alone (no padding) makes most likely."""
    letters = [tokenizer.encode(f" {L}", add_special_tokens=False)[-1] for L in "ABCD"]
    out = []
    for q in load_questions(path):
        tokens = torch.tensor([tokenizer.encode(prompt(q))])
        last = direct_logits(model, tokens)[0, -1]
        out.append(int(last[letters[: len(q.choices)]].argmax()))
    return out


def test_multiple_choice_accuracy_equals_direct_predictions(mcore, tmp_path):
    model, tok = make(), CharTokenizer()
    path = tmp_path / "mmlu.jsonl"
    write_questions(path, [0] * len(QUESTIONS))
    pred = predictions(model, path, tok)
    # right on even questions, wrong on odd ones: accuracy 4/7 only if every prompt is read at its own end
    answers = [p if i % 2 == 0 else (p + 1) % len(QUESTIONS[i][1]) for i, p in enumerate(pred)]
    write_questions(path, answers, letters_for={1, 4})
    assert [q.answer for q in load_questions(path)] == answers
    for batch_size in (1, 3):  # unpadded; padded prompts and a last micro-batch filled up with padding rows
        assert mp.multiple_choice_score(str(path), tok, batch_size=batch_size)(model) == pytest.approx(4 / 7)
    chosen = sample(len(QUESTIONS), 0.5, seed=3)
    assert chosen == sample(len(QUESTIONS), 0.5, seed=3) and len(chosen) == 4
    expected = sum(i % 2 == 0 for i in chosen) / len(chosen)
    score = mp.multiple_choice_score(str(path), tok, fraction=0.5, seed=3, batch_size=2)
    assert score(model) == pytest.approx(expected)
    assert "general knowledge" in prompt(load_questions(path)[0]) and score.score_name.startswith("multiple_choice:")


def test_bad_question_files_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not an MMLU-format question \(ValueError: 2 choices, answer 2\)"):
        load_questions(str(path))
    path.write_text('{"question": "q", "answer": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not an MMLU-format question \(KeyError"):
        load_questions(str(path))
    with pytest.raises(ValueError, match=r"fraction=0 must be in \(0, 1\]"):
        sample(10, 0, seed=0)


def test_score_functions_by_name(tmp_path):
    from megatron_prune.minitron.data.scores import ScoreSpec, make_score_func

    batches = [random_tokens(1, 8, VOCAB, seed=0)]
    assert make_score_func(ScoreSpec("lm_loss"), batches=batches).score_name == mp.lm_loss_score(batches).score_name
    path = tmp_path / "q.jsonl"
    write_questions(path, [0] * len(QUESTIONS))
    mc = make_score_func(ScoreSpec("mmlu", str(path), fraction=0.5, seed=1), tokenizer=CharTokenizer())
    assert mc.score_name == mp.multiple_choice_score(str(path), CharTokenizer(), fraction=0.5, seed=1).score_name
    with pytest.raises(ValueError, match="lm_loss needs held-out token batches"):
        make_score_func(ScoreSpec("lm_loss"))
    with pytest.raises(ValueError, match="mmlu needs a JSONL file"):
        make_score_func(ScoreSpec("mmlu"), tokenizer=CharTokenizer())
    with pytest.raises(ValueError, match="unknown score function 'bleu'"):
        make_score_func(ScoreSpec("bleu"))
