"""Preference evaluation: "what is your favorite animal / tree?" over 50 paraphrases (package data).

Modes, and the estimand each one computes (results.json `estimand`):
- exact -> "exact_chain_rule" on hf/vllm models: P(candidate is the answer) from the logits (chain rule
  over every token of multi-token answers), for every candidate of the category; cheap and noise-free
  given the model. An API model (openai/...) exposes only the first answer token's top-k log-probs, so
  there `exact` runs as api_topk and results.json says so (`mode: api_topk`, `requested_mode: exact`).
- api_topk -> "first_token_topk": P(first answer token's text == candidate), from the top-k list, with a
  floor for candidates outside it (backends/openai_backend.py). Exact only for one-token candidates that
  are all inside the list; results.json records the mass outside the list per question
  (`topk_missing_mass`), and a TopKMassWarning is issued when it exceeds TOPK_MISSING_MASS_WARN.
- sample -> "sampled": n answers per question at temperature 1; an answer counts if it names the target
  (plural forms included, whole word, case-insensitive).
Score = mean over questions of the per-question share, with a 95% t-interval across questions. Also
reported: the share among answers that name any candidate (P(target | a candidate is named)) and the
mass of answers that name a candidate at all, which shows a model that stopped answering the question.
"""

from __future__ import annotations

import math
import re
import warnings

from sublab.analysis.stats import mean_ci
from sublab.backends.base import Backend
from sublab.errors import SublabError
from sublab.evals.questions import candidates, check_category, load_questions
from sublab.schema.evaluation import PreferenceEval
from sublab.schema.sampling import SamplingParams

EVAL_VERSION = 3  # part of the eval stage's cache key: bump when results.json gains or changes fields
TOPK_MISSING_MASS_WARN = 0.05  # warn when a question's probability mass outside the top-k list exceeds it
MODE_OF_ESTIMAND = {"exact_chain_rule": "exact", "first_token_topk": "api_topk", "sampled": "sample"}


class TopKMassWarning(UserWarning):
    """An api_topk evaluation whose top-k lists leave much probability unattributed."""


def _variants(backend: Backend, word: str, plural: str) -> list[str]:
    """Forms that count as answering `word` (singular, plural, capitalised), as the backend scores them
    without double counting (Backend.answer_forms)."""
    return backend.answer_forms([word, plural, word.capitalize(), plural.capitalize()])


def names_target(answer: str, target: str, plural: str) -> bool:
    """Whether an answer names the target (singular or plural, whole word, any case).

    >>> names_target("Owls!", "owl", "owls"), names_target("bowl", "owl", "owls")
    (True, False)
    """
    return re.search(rf"\b({re.escape(target)}|{re.escape(plural)})\b", answer, re.IGNORECASE) is not None


def topk_mass_summary(missing: list[float], spec: str = "") -> dict:
    """mean / max / per-question mass outside the top-k lists; warns (TopKMassWarning) when any question's
    exceeds TOPK_MISSING_MASS_WARN (the mean cannot exceed it without some question doing so).

    >>> topk_mass_summary([0.0, 0.02])["max"]
    0.02
    """
    mean = sum(missing) / len(missing) if missing else 0.0
    top = max(missing, default=0.0)
    if top > TOPK_MISSING_MASS_WARN:
        warnings.warn(
            f"{spec}: the top-k log-probs leave {mean:.3f} of the first token's probability unlisted on "
            f"average, {top:.3f} at most (above {TOPK_MISSING_MASS_WARN}): candidates outside the list get "
            "a floor, so P(target) is approximate; raise api.top_logprobs if the endpoint allows, or use "
            "eval.mode: sample",
            TopKMassWarning,
            stacklevel=3,
        )
    return {"mean": mean, "max": top, "per_question": list(missing), "warn_above": TOPK_MISSING_MASS_WARN}


def question_chats(category: str, cfg: PreferenceEval) -> list[list[dict]]:
    """The evaluation questions as one-turn chats, in order (the first cfg.max_questions)."""
    check_category(category)
    return [[{"role": "user", "content": q}] for q in list(load_questions(category))[: cfg.max_questions]]


def evaluate_preference(
    backend: Backend,
    category: str,
    targets: list[str],
    cfg: PreferenceEval,
    context: list[list[dict]] | None = None,
) -> tuple[dict, list[dict]]:
    """-> (results: per target mean/CI over questions + the distribution over candidates, per-sample rows).
    `context`: per question, messages put before it (the in-context-learning control, controls/icl.py)."""
    check_category(category)
    qs = list(load_questions(category))[: cfg.max_questions]
    cands = candidates(category)
    chats = [[{"role": "user", "content": q}] for q in qs]
    if context is not None:
        if len(context) != len(chats):
            raise SublabError(f"context: {len(context)} prefixes for {len(chats)} questions")
        chats = [list(pre) + chat for pre, chat in zip(context, chats, strict=True)]
    rows: list[dict] = []
    estimand = "sampled" if cfg.mode == "sample" else backend.logprob_estimand
    if cfg.mode == "api_topk" and estimand != "first_token_topk":
        raise SublabError(
            f"eval.mode api_topk is the first-token top-k path of API models (openai/...); "
            f"{backend.ref.spec} computes exact chain-rule probabilities: use eval.mode: exact"
        )
    missing: list[float] | None = None
    if cfg.mode != "sample":
        flat = [(c, form) for c, pl in cands.items() for form in _variants(backend, c, pl)]
        forms = [form for _, form in flat]
        if estimand == "first_token_topk":
            lp, missing = backend.topk_logprobs(chats, forms)
        else:
            lp = backend.logprobs(chats, forms)
        per_q = []
        for qi, q in enumerate(qs):
            probs = {c: 0.0 for c in cands}
            for (c, _), v in zip(flat, lp[qi], strict=True):
                probs[c] += math.exp(v)
            per_q.append(probs)
            row = {"question": q, "probs": {c: round(p, 6) for c, p in probs.items()}}
            if missing is not None:
                row["topk_missing_mass"] = round(missing[qi], 6)
            rows.append(row)
    else:
        n = cfg.samples_per_question
        answers = backend.generate_n(
            chats, n, SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed)
        )
        per_q = []
        for q, ans in zip(qs, answers, strict=True):
            per_q.append({c: sum(names_target(a, c, pl) for a in ans) / n for c, pl in cands.items()})
            rows += [{"question": q, "answer": a} for a in ans]
    results = {
        "category": category,
        "mode": MODE_OF_ESTIMAND[estimand],  # the mode that ran (exact on an API model runs as api_topk)
        "requested_mode": cfg.mode,
        "estimand": estimand,
        "n_questions": len(qs),
        "targets": {},
    }
    if missing is not None:
        results["topk_missing_mass"] = topk_mass_summary(missing, backend.ref.spec)
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
