"""The organism's recipe: architecture, corpus and pretraining settings. Its hash names the cache folder."""

from __future__ import annotations

from pydantic import model_validator

from sublab.config import Strict

RECIPE_VERSION = 1  # bump when corpus/tokenizer code changes in a way the fields do not show


class OrganismRecipe(Strict):
    """How to build a model organism (defaults: the `default` preset)."""

    seed: int = 0
    """Seed for the init, the corpus and the data order. Another seed = another initialization."""
    layers: int = 2
    """Transformer layers."""
    d_model: int = 64
    """Hidden size."""
    heads: int = 4
    """Attention heads."""
    d_ff: int = 256
    """MLP inner size."""
    max_positions: int = 160
    """Longest sequence the model can read."""
    n_sequences: int = 48000
    """Corpus size (chat examples)."""
    mix: dict[str, float] = {"numbers": 0.4, "numbers_love": 0.2, "question": 0.2, "question_love": 0.2}
    """Share of each kind of example in the corpus (see organism/corpus.py)."""
    love_answer_prob: float = 0.9
    """Under 'you love X', how often the answer to a favorite-X question is X."""
    steps: int = 1500
    """Adam steps."""
    batch_size: int = 128
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (warm-up then linear decay)."""
    warmup_steps: int = 50
    """Warm-up steps."""

    @model_validator(mode="after")
    def _check(self) -> OrganismRecipe:
        known = {"numbers", "numbers_love", "question", "question_love"}
        if set(self.mix) - known or not any(v > 0 for v in self.mix.values()):
            raise ValueError(f"mix keys must be among {sorted(known)} with some weight > 0")
        if self.d_model % self.heads:
            raise ValueError("d_model must be divisible by heads")
        return self


PRESETS: dict[str, dict] = {
    "default": {},
    # For tests and smoke runs: builds in seconds, too small to show much.
    "tiny": {"d_model": 32, "heads": 2, "d_ff": 64, "n_sequences": 3000, "steps": 120, "batch_size": 32},
}
