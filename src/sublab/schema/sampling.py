"""The sampling settings (`sample:` and the sampling parts of evaluations)."""

from __future__ import annotations

from sublab.config import Strict


class SamplingParams(Strict):
    """How completions are sampled."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    max_tokens: int = 40
    """Most new tokens per completion."""
    seed: int = 0
    """Base seed; request i uses a seed derived from (seed, i), independent of batching."""
    batch_size: int = 256
    """Prompts per forward pass."""
