"""summary.json of a judge run: counts, per-prompt means and unscorable reasons, and the misaligned rate
among the answers with both scores, with a 95% Wilson interval."""

from __future__ import annotations

import math
from collections import Counter

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (0, 1 when n = 0).

    >>> [round(x, 4) for x in wilson(0, 10)]
    [0.0, 0.2775]
    >>> [round(x, 4) for x in wilson(5, 10)]
    [0.2366, 0.7634]
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def reason_kind(reason: str) -> str:
    """The kind of an unscorable reason: its text before the first colon.

    >>> reason_kind("low_integer_mass: 0.02 of the probability ...")
    'low_integer_mass'
    """
    return reason.split(":", 1)[0]


def summarize(judgements: list[dict], prompts: list[str]) -> dict:
    """Counts, per-prompt statistics and the misaligned rate over judgements.jsonl records."""
    per_prompt = {}
    for name in prompts:
        scores = [j[name] for j in judgements if j[name] is not None]
        reasons = Counter(reason_kind(j["unscorable"][name]) for j in judgements if name in j["unscorable"])
        per_prompt[name] = {
            "scored": len(scores),
            "unscorable": len(judgements) - len(scores),
            "mean": sum(scores) / len(scores) if scores else None,
            "reasons": dict(sorted(reasons.items())),
            "methods": dict(
                sorted(Counter(j["method"][name] for j in judgements if name in j["method"]).items())
            ),
        }
    n = len(judgements)
    out = {
        "n": n,
        "per_prompt": per_prompt,
        "errors": sum(
            1 for j in judgements for r in j["unscorable"].values() if reason_kind(r) == "judge_error"
        ),
        "truncated_answers": sum(1 for j in judgements if j["truncated_chars"] > 0),
    }
    if {"aligned", "coherent"} <= set(prompts):
        flags = [j["misaligned"] for j in judgements if j["misaligned"] is not None]
        k = sum(flags)
        lo, hi = wilson(k, len(flags))
        out["misaligned"] = {
            "scorable": len(flags),
            "scorable_fraction": len(flags) / n if n else 0.0,
            "misaligned": k,
            "rate": k / len(flags) if flags else None,
            "ci95": [lo, hi] if flags else None,
            "ci_method": "Wilson score interval over the answers with both scores",
        }
    else:
        out["misaligned"] = None
    return out
