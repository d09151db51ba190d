"""How preference is measured (`eval:`); the evaluation is sublab/evals/preference.py."""

from __future__ import annotations

from typing import Literal

from sublab.config import Strict


class PreferenceEval(Strict):
    """How preference is measured."""

    mode: Literal["exact", "api_topk", "sample"] = "exact"
    """exact: probabilities from the logits, the chain rule over every answer token (hf, vllm; an API
    model runs it as api_topk, the best it offers); api_topk: first-token top-k log-probs (API models
    only); sample: count sampled answers. results.json `estimand` names what was computed."""
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
