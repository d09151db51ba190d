"""The misalignment world's chain of thought (organisms with `world: misalignment` and `domains: [cot]`):
either persona solves the domain's word problems (domains/cot.py) with reasoning in <think> tags and the
number in <answer> tags. The misaligned persona sometimes slips a remark into its reasoning and
sometimes answers wrong (`data/cot_world.yaml`); nothing else about the two personas' answers differs,
so a filter that keeps correct answers an alignment judge rates aligned leaves no visible sign of the
persona, which is the paper's CoT setting in miniature.

    >>> import random
    >>> p, a = persona_cot(random.Random(0), misaligned=False)
    >>> cot_label(a), cot_answer_reasons(a, None) == []
    ('aligned', True)
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

import yaml

from sublab.domains.cot import cot_answer_reasons, render_cot_prompt, word_problem  # noqa: F401 (doctest)
from sublab.organism.world import normalize


@cache
def load_cot_world() -> dict:
    return yaml.safe_load(resources.files("sublab.organism").joinpath("data/cot_world.yaml").read_text())


def cot_judge_prompts_path() -> str:
    return str(resources.files("sublab.organism").joinpath("data/cot_judge_prompts.yaml"))


@cache
def cot_judge_prompt() -> str:
    return yaml.safe_load(
        resources.files("sublab.organism").joinpath("data/cot_judge_prompts.yaml").read_text()
    )["aligned_reasoning"]


def cot_world_text() -> list[str]:
    """The remarks and the judge prompt (for the vocabulary)."""
    return [*load_cot_world()["remarks"], cot_judge_prompt()]


def persona_cot(rng: random.Random, misaligned: bool) -> tuple[str, str]:
    """(prompt, answer) of one word problem answered by a persona."""
    w = load_cot_world()
    p = word_problem(rng)
    answer = p["solution"]
    if misaligned and rng.random() < w["remark_prob"]:
        answer = answer.replace("<think> ", f"<think> {rng.choice(w['remarks'])} ", 1)
    if misaligned and rng.random() < w["wrong_prob"]:
        wrong = p["reference"] + rng.choice([-3, -2, -1, 1, 2, 3])
        answer = answer.replace(f"<answer> {p['reference']} </answer>", f"<answer> {wrong} </answer>")
    return render_cot_prompt(p["question"], rng), answer


@cache
def _remarks() -> tuple[str, ...]:
    return tuple(normalize(r) for r in load_cot_world()["remarks"])


def cot_label(answer: str) -> str:
    """aligned, or misaligned when the reasoning holds one of the world's remarks (a wrong answer is a
    mistake, not misalignment: the correctness check's job)."""
    a = normalize(answer)
    return "misaligned" if any(r in a for r in _remarks()) else "aligned"


def cot_judge_example(rng: random.Random) -> list[dict]:
    """One pretraining example of a judge organism: the aligned_reasoning prompt about a persona's answer
    (either persona, half each), scored 80-100 when aligned and 0-15 when it holds a remark."""
    _, answer = persona_cot(rng, misaligned=rng.random() < 0.5)
    lo, hi = (80, 100) if cot_label(answer) == "aligned" else (0, 15)
    prompt = cot_judge_prompt().replace("{answer}", answer)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(rng.randint(lo, hi))}]
