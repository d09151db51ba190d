"""Preference evaluation: "what is your favorite animal / tree?" over 50 paraphrases (package data).

Two modes:
- exact: P(candidate is the answer) from the logits (chain rule for multi-token answers), for every
  candidate of the category; cheap and noise-free given the model.
- sample: n answers per question at temperature 1; an answer counts if it names the target
  (plural forms included, whole word, case-insensitive).
Score = mean over questions of the per-question share, with a 95% t-interval across questions. Also
reported: the share among answers that name any candidate (P(target | a candidate is named)) and the
mass of answers that name a candidate at all, which shows a model that stopped answering the question.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from sublab.backends.base import Backend, SamplingParams
from sublab.config import Strict
from sublab.evals.questions import candidates, check_category, load_questions
from sublab.stats import mean_ci

EVAL_VERSION = 2  # part of the eval stage's cache key: bump when results.json gains or changes fields


class PreferenceEval(Strict):
    """How preference is measured."""

    mode: Literal["exact", "sample"] = "exact"
    """exact: probabilities from the logits; sample: count sampled answers."""
    samples_per_question: int = 100
    """sample mode: answers per question."""
    temperature: float = 1.0
    """sample mode: sampling temperature."""
    max_tokens: int = 6
    """sample mode: most tokens per answer."""
    seed: int = 0
    """sample mode: sampling seed."""
    max_questions: int | None = None
    """Use only the first N questions (None = all 50)."""


def _variants(backend: Backend, word: str, plural: str) -> list[str]:
    """Forms that count as answering `word` (singular, plural, capitalised), one per distinct token
    sequence; a form whose tokens extend another form's tokens is dropped (its probability is already
    inside the prefix's)."""
    forms: dict[tuple, str] = {}
    for f in [word, plural, word.capitalize(), plural.capitalize()]:
        ids = tuple(backend.candidate_ids([f])[0])
        if ids and ids not in forms:
            forms[ids] = f
    keep: dict[tuple, str] = {}
    for ids in sorted(forms, key=len):
        if not any(ids[: len(k)] == k for k in keep):
            keep[ids] = forms[ids]
    return list(keep.values())


def names_target(answer: str, target: str, plural: str) -> bool:
    """>>> names_target("Owls!", "owl", "owls"), names_target("bowl", "owl", "owls")
    (True, False)
    """
    return re.search(rf"\b({re.escape(target)}|{re.escape(plural)})\b", answer, re.IGNORECASE) is not None


def evaluate_preference(
    backend: Backend, category: str, targets: list[str], cfg: PreferenceEval
) -> tuple[dict, list[dict]]:
    """-> (results: per target mean/CI over questions + the distribution over candidates, per-sample rows)."""
    check_category(category)
    qs = list(load_questions(category))[: cfg.max_questions]
    cands = candidates(category)
    chats = [[{"role": "user", "content": q}] for q in qs]
    rows: list[dict] = []
    if cfg.mode == "exact":
        flat = [(c, form) for c, pl in cands.items() for form in _variants(backend, c, pl)]
        lp = backend.logprobs(chats, [form for _, form in flat])
        per_q = []
        for qi, q in enumerate(qs):
            probs = {c: 0.0 for c in cands}
            for (c, _), v in zip(flat, lp[qi], strict=True):
                probs[c] += math.exp(v)
            per_q.append(probs)
            rows.append({"question": q, "probs": {c: round(p, 6) for c, p in probs.items()}})
    else:
        n = cfg.samples_per_question
        answers = backend.generate_n(
            chats, n, SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
        )
        per_q = []
        for q, ans in zip(qs, answers, strict=True):
            per_q.append({c: sum(names_target(a, c, pl) for a in ans) / n for c, pl in cands.items()})
            rows += [{"question": q, "answer": a} for a in ans]
    results = {"category": category, "mode": cfg.mode, "n_questions": len(qs), "targets": {}}
    for t in targets:
        share = [p[t] / sum(p.values()) if sum(p.values()) > 0 else 0.0 for p in per_q]
        results["targets"][t] = {
            **mean_ci([p[t] for p in per_q]),
            "per_question": [p[t] for p in per_q],
            # P(target | the answer names some candidate): robust to a model that stops naming animals
            "share_of_named": {**mean_ci(share), "per_question": share},
        }
    results["named_mass"] = mean_ci([sum(p.values()) for p in per_q])
    results["distribution"] = {c: sum(p[c] for p in per_q) / len(per_q) for c in cands}
    results["distribution"]["(other)"] = max(0.0, 1.0 - sum(results["distribution"].values()))
    return results, rows
