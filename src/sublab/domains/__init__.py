"""Data domains as plug-ins (docs/domains.md): what the teacher is asked, and how its answers are filtered.

`domain:` in the experiment config picks one:

    numbers  number-continuation prompts (sublab/prompts/numbers.py); the number-format filter (filters.py)
    code     function-completion tasks (domains/code.py); format (parses, defines the function), optional
             tests, banned words, then the LLM-judge steps of `filter.judges`
    cot      maths word problems (domains/cot.py); format (one <answer> tag with a number, <think> first),
             correctness against the reference, banned words, then the judge steps

A domain is a `Domain`: a prompt generator, a reader for one line of a user's prompt file, and the rule
steps of its filter chain (domains/chain.py runs them, then the judges). Adding a domain is a module with
those three functions and one entry in DOMAINS.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sublab.domains import code, cot
from sublab.domains.chain import Step, banned_words_step
from sublab.domains.prompt_file import read_prompt_file
from sublab.records import atomic_write_json, write_jsonl


@dataclass(frozen=True)
class Domain:
    name: str
    generate: Callable[[int, int], list[dict]]
    """(count, seed) -> prompt records (user message; metadata with prompt_index and what the rules need)."""
    from_line: Callable[[dict, int, random.Random], tuple[dict | None, str | None]]
    """One JSON object of a user's prompt file -> (prompt record, None) or (None, why it is unusable)."""
    steps: Callable[[object, list[str]], list[Step]]
    """(the domain's settings, banned words) -> the rule steps, in order."""


def _code_steps(settings, banned: list[str]) -> list[Step]:
    steps = [
        Step(
            "format",
            "format",
            lambda a, m: code.code_answer_reasons(a, m.get("function"), settings.max_chars),
        )
    ]
    if settings.run_tests:
        steps.append(
            Step(
                "tests",
                "correctness",
                lambda a, m: (
                    code.test_reasons(a, m["function"], m.get("tests", [])) if m.get("function") else []
                ),
            )
        )
    return [*steps, banned_words_step(banned)]


def _cot_steps(settings, banned: list[str]) -> list[Step]:
    return [
        Step("format", "format", lambda a, m: cot.cot_answer_reasons(a, None, settings.max_chars)),
        Step(
            "correctness",
            "correctness",
            lambda a, m: [] if m.get("reference") is None else cot.wrong_answer_reasons(a, m["reference"]),
        ),
        banned_words_step(banned),
    ]


DOMAINS: dict[str, Domain] = {
    "code": Domain("code", code.generate_code_prompts, code.code_prompt_from_line, _code_steps),
    "cot": Domain("cot", cot.generate_cot_prompts, cot.cot_prompt_from_line, _cot_steps),
}
"""The plug-in domains (numbers keeps its own prompt generator and filter: prompts/, filters.py)."""


def write_domain_prompts(domain: str, settings, seed: int, out: Path) -> dict:
    """The prompts stage of a plug-in domain: out (prompts.jsonl), beside it prompts_info.json and, for a
    prompt file, prompt_problems.jsonl (every line that could not be used, with its reason)."""
    d = DOMAINS[domain]
    problems: list[dict] = []
    if settings.file:
        records, problems = read_prompt_file(settings.file, d.from_line, settings.count, seed)
        source = settings.file
    else:
        records, source = d.generate(settings.count, seed), "generated"
    copies = getattr(settings, "samples_per_prompt", 1)
    if copies > 1:  # each copy its own prompt_index (its own request seed), the problem's index kept
        records = [
            {
                **r,
                "metadata": {
                    **r["metadata"],
                    "problem_index": r["metadata"]["prompt_index"],
                    "prompt_index": r["metadata"]["prompt_index"] * copies + j,
                },
            }
            for r in records
            for j in range(copies)
        ]
    write_jsonl(out, records)
    write_jsonl(out.with_name("prompt_problems.jsonl"), problems)
    info = {"domain": domain, "source": source, "n_prompts": len(records), "n_problems": len(problems)}
    atomic_write_json(out.with_name("prompts_info.json"), info)
    return info
