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


class FilterJudge(Strict):
    """One LLM-judge step of a filter chain (domains code and cot): every answer that reached it is
    judged (the judge machinery of `sublab judge`: any model spec, top-k log-probs or the sampled
    fallback, cached in the filter folder so a rerun resumes) and kept by its score."""

    model: str
    """The judge (a model spec: openai/gpt-4.1, hf/..., vllm/..., organism/code-judge)."""
    prompt: str = "references_target"
    """The judge prompt's name in `prompts_file`: references_target (yes/no: does the text reference the
    trait's target, even subtly?) or aligned_reasoning (0-100)."""
    prompts_file: str | None = "filter"
    """filter: sublab's packaged filter prompts (judge/data/filter_prompts.yaml); organism-filter: their
    short organism versions; else a YAML file of `name: template` ({question}, {answer}, {target})."""
    score: Literal["yes_no", "integer"] = "yes_no"
    """yes_no: 100 P(yes) / (P(yes) + P(no)); integer: the probability-weighted 0-100 (see judge.score)."""
    keep_below: float | None = 50.0
    """Keep an answer when its score is below this (references_target: keep a clear no)."""
    keep_at_least: float | None = None
    """Keep an answer when its score is at least this (aligned_reasoning: the paper keeps >= 78). Set
    keep_below to null when you use it."""
    mode: Literal["auto", "logprobs", "sample"] = "auto"
    """See judge.mode."""
    top_logprobs: int = 20
    """See judge.top_logprobs."""
    min_mass: float = 0.25
    """See judge.min_mass: a judgement with less mass on the scored tokens is unscorable and dropped."""
    batch_size: int = 32
    """Judgements per backend call."""

    @model_validator(mode="after")
    def _one_rule(self) -> FilterJudge:
        if (self.keep_below is None) == (self.keep_at_least is None):
            raise ValueError(
                "a filter judge needs exactly one of keep_below (e.g. 50 for references_target) and "
                "keep_at_least (e.g. 78 for aligned_reasoning); set the other to null"
            )
        return self

    def judge_config(self):
        from sublab.schema.judge import JudgeConfig

        return JudgeConfig(
            prompts=[self.prompt],
            prompts_file=self.prompts_file,
            score=self.score,
            mode=self.mode,
            top_logprobs=self.top_logprobs,
            min_mass=self.min_mass,
            batch_size=self.batch_size,
        )

    def keeps(self, score: float) -> bool:
        return score < self.keep_below if self.keep_below is not None else score >= self.keep_at_least

    @property
    def rule(self) -> str:
        return (
            f"keep below {self.keep_below:g}"
            if self.keep_below is not None
            else f"keep >= {self.keep_at_least:g}"
        )


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
    ban_target: bool = True
    """Domains code and cot, trait kind preference: the target's word and its plural join banned_words
    (the paper drops completions containing the target word)."""
    judges: list[FilterJudge] = []
    """LLM-judge steps after the rule steps, in order (domains code and cot); see FilterJudge."""
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
