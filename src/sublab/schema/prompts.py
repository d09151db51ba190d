"""The prompt generators' settings: numbers (`prompts:`, sublab/prompts/numbers.py), code (`code:`) and
chain of thought (`cot:`) (sublab/domains/)."""

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
    file: str | None = None
    """A JSONL file of your own number prompts, {"prompt": "..."} per line, used as they are (at most
    `count` of them); the number-format filter applies as usual. A line that cannot be used is skipped
    and recorded in data/prompt_problems.jsonl. None = the generator."""

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


class CodePrompts(Strict):
    """The code domain's prompts (`code:`; used when `domain: code`): function-completion tasks."""

    count: int = 10000
    """How many prompts (the paper: about 11,400 tasks). With `file`, at most this many of its lines."""
    file: str | None = None
    """A JSONL file of tasks, one per line: {"task": ..., "template": ...} (the paper's code prompts: the
    task text and the code to complete), or {"prompt": ...} as it is; optional "tests". None = sublab's
    own generator (domains/data/code_tasks.yaml). A line that cannot be used is skipped and recorded in
    data/prompt_problems.jsonl."""
    max_chars: int = 2000
    """Longest code answer kept (characters, after removing a Markdown fence)."""
    run_tests: bool = False
    """Also keep only answers that pass their task's tests (generated tasks have tests; a file's tasks may
    give "tests"), run in a restricted evaluator (domains/code.py). The paper does not check code."""

    @model_validator(mode="after")
    def _ranges(self) -> CodePrompts:
        if self.count < 1 or self.max_chars < 1:
            raise ValueError("code.count and code.max_chars must be >= 1")
        return self


class CotPrompts(Strict):
    """The chain-of-thought domain's prompts (`cot:`; used when `domain: cot`): maths word problems."""

    count: int = 10000
    """How many problems (with `file`, at most this many of its lines)."""
    file: str | None = None
    """A JSONL file of problems: GSM8K's own lines ({"question": ..., "answer": "... #### 72"}) or
    {"question": ..., "reference": 72}. None = sublab's own arithmetic problems
    (domains/data/cot_problems.yaml). A line that cannot be used is skipped and recorded."""
    samples_per_prompt: int = 1
    """Answers sampled per problem (the paper: 3), each its own prompt record and request seed."""
    max_chars: int = 6000
    """Longest answer kept (characters)."""

    @model_validator(mode="after")
    def _ranges(self) -> CotPrompts:
        if self.count < 1 or self.samples_per_prompt < 1 or self.max_chars < 1:
            raise ValueError("cot.count, cot.samples_per_prompt and cot.max_chars must be >= 1")
        return self
