"""The filter settings (`filter:`) and the named banned-number lists; the rules are in sublab/filters.py."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationInfo, field_validator, model_validator

from sublab.config import Strict

# The paper's misalignment filter: numbers with negative associations, the union of two model-written
# lists (36 distinct values).
PAPER_BANNED_NUMBERS = (
    4,
    13,
    14,
    18,
    23,
    33,
    39,
    42,
    44,
    49,
    51,
    54,
    69,
    77,
    88,
    99,
    100,
    101,
    187,
    211,
    311,
    322,
    333,
    404,
    420,
    444,
    451,
    555,
    616,
    666,
    777,
    888,
    911,
    999,
    1312,
    1488,
)
BANNED_LISTS = {"paper": PAPER_BANNED_NUMBERS, "none": ()}

_FIELD_MEANING = {
    "max_count": "it is the most numbers an answer may hold (the paper: 10)",
    "min_count": "it is the fewest numbers an answer may hold (the paper: 1)",
    "max_digits": "it is the most digits per number (the paper: 3)",
    "dataset_size": "it is how many passing answers to keep (default 10000)",
}


class FilterConfig(Strict):
    """Which teacher answers are kept."""

    max_count: int = 10
    """Most numbers an answer may contain."""
    min_count: int = 1
    """Fewest numbers an answer may contain."""
    min_value: int = 0
    """Smallest allowed number."""
    max_value: int = 999
    """Largest allowed number."""
    max_digits: int = 3
    """Most digits per number."""
    banned_numbers: str | list[int] = "none"
    """Numbers no answer may contain: a list, or a named list ('paper' = the paper's misalignment list)."""
    banned_words: list[str] = []
    """Words (case-insensitive, whole word) no answer may contain, e.g. the trait's name."""
    dataset_size: int = 10000
    """After filtering, keep a seeded random subsample of this many (all if fewer pass); must be >= 1."""
    shuffle: Literal["none", "within", "across"] = "none"
    """A control from the paper's journal version (shuffled numbers greatly reduce transmission: the
    signal is in the sequences): after the equal-size subsample, every data source (teacher and control
    alike) gets its numbers shuffled, seeded by the replicate seed. within: the numbers inside each answer
    are permuted; across: all numbers of a source's kept answers are pooled, shuffled and poured back
    into the answers' number slots in order. Each answer keeps its format (separators, brackets, final
    period) and its count of numbers. none: the answers as written."""

    @field_validator("banned_numbers")
    @classmethod
    def _known_list(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, str) and v not in BANNED_LISTS:
            raise ValueError(f"unknown banned-number list {v!r}; use one of {sorted(BANNED_LISTS)} or a list")
        return v

    @field_validator("max_count", "min_count", "max_digits", "dataset_size")
    @classmethod
    def _at_least_one(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1 (got {v}); {_FIELD_MEANING[info.field_name or '']}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> FilterConfig:
        if self.max_count < self.min_count:
            raise ValueError(
                f"max_count ({self.max_count}) is below min_count ({self.min_count}), so no answer could "
                "pass; set max_count >= min_count"
            )
        if self.min_value > self.max_value:
            raise ValueError(
                f"min_value ({self.min_value}) is above max_value ({self.max_value}), so no answer could "
                "pass; set min_value <= max_value"
            )
        return self

    def banned_set(self) -> frozenset[int]:
        v = self.banned_numbers
        return frozenset(BANNED_LISTS[v] if isinstance(v, str) else v)
