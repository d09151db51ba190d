"""The sampling settings (`sample:` and the sampling parts of evaluations)."""

from __future__ import annotations

from pydantic import field_validator

from sublab.config import Strict


class SamplingParams(Strict):
    """How completions are sampled."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    min_p: float = 0.0
    """Threshold sampling, a defense (follow-up work: p = 0.05 cut owl transfer from 60% to 28%, against
    a 12% baseline): at each step, tokens whose probability is below min_p are dropped and the rest
    renormalised. The threshold is ABSOLUTE (a probability, compared with each token's probability after
    temperature), not relative to the top token's as in vLLM's or transformers' min_p; the most likely
    token is always kept. Applied before top_p. 0 = off; local hf models only (vllm/ and openai/
    models refuse min_p > 0)."""
    max_tokens: int = 40
    """Most new tokens per completion."""
    seed: int = 0
    """Base seed; request i uses a seed derived from (seed, i), independent of batching."""
    batch_size: int = 256
    """Prompts per forward pass."""

    @field_validator("min_p")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"min_p is a probability threshold in [0, 1] (got {v}); 0 = off, e.g. 0.05")
        return v
