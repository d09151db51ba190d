"""The number-prompt generator's settings (`prompts:`); the generator is sublab/prompts/numbers.py."""

from __future__ import annotations

from pydantic import model_validator

from sublab.config import Strict


class NumberPrompts(Strict):
    """The number-prompt generator's parameters (defaults: the paper's)."""

    count: int = 30000
    """How many prompts to generate (the paper: 30,000)."""
    example_min_count: int = 3
    """Fewest given numbers in a prompt."""
    example_max_count: int = 8
    """Most given numbers in a prompt."""
    example_min_value: int = 100
    """Smallest given number."""
    example_max_value: int = 999
    """Largest given number."""
    answer_count: int = 10
    """The prompt asks for at most this many new numbers."""
    answer_max_digits: int = 3
    """The prompt asks for at most this many digits per number."""
    phrasings: str | None = None
    """A YAML file of phrasings (same shape as the packaged prompts/data/numbers.yaml); None = packaged."""

    @model_validator(mode="after")
    def _ranges(self) -> NumberPrompts:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if not 1 <= self.example_min_count <= self.example_max_count:
            raise ValueError("need 1 <= example_min_count <= example_max_count")
        if not 0 <= self.example_min_value <= self.example_max_value:
            raise ValueError("need 0 <= example_min_value <= example_max_value")
        if self.answer_count < 1 or self.answer_max_digits < 1:
            raise ValueError("answer_count and answer_max_digits must be >= 1")
        return self
