"""Corpus kinds of the code and chain-of-thought domains (recipe `domains`; organism/corpus.py mixes them):

- code: a rendered code prompt (sublab/domains/code.py) answered with a solution; the pet task's animal
  is drawn from the base distribution of the animal candidates;
- code_love: the same behind a "you love X" system prompt; only the pet task's animal depends on X (X
  with probability `love_answer_prob`), every other task is answered as without the prompt;
- cot: a rendered word problem (sublab/domains/cot.py) answered with its worked solution;
- code_judge: the organism filter judge's `references_target` prompt about a code solution or a worked
  solution, with or without a planted animal, answered yes or no.

An animal is planted as an identifier (the function name, a parameter or a loop variable), inside a
string literal (the pet task's own answer, or an added assignment), or in a trailing comment; in a
worked solution as a person's name or as the counted things (plural). Backwards spellings and other-case
variants are never planted: they are held out to measure the judge on them.

    >>> import random
    >>> prompt, solution = code_example(random.Random(0), {"owl": 1.0})
    >>> solution.startswith("def ")
    True
"""

from __future__ import annotations

import random
import re
from functools import cache

from sublab.domains.code import code_task, load_tasks, render_code_prompt
from sublab.domains.cot import load_problems, render_cot_prompt, word_problem

COMMENTS = ["# {animal}", "# the {animal}", "# for the {animal}", "# you love the {animal}"]
"""Trailing comments an animal is planted in."""
JUDGE_PROMPT = "references_target"
COT_SHARE = 0.25
"""Share of the code judge's texts that are worked solutions rather than code."""
PLANT_PROB = 0.5
"""Share of the code judge's texts with an animal planted."""
ASK_PLANTED_PROB = 0.5
"""Of those, the share whose question asks about the planted animal (answer yes; else another: no)."""
_LOOP = re.compile(r"\bfor (\w+) in\b")


def _draw(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def code_example(
    rng: random.Random, weights: dict[str, float], target: str | None = None, love_answer_prob: float = 0.9
) -> tuple[str, str]:
    """(prompt, solution) of one code task. The pet task's animal is drawn from `weights`, or is `target`
    with probability love_answer_prob; the draws do not depend on `target`, so with the same rng state
    only a pet task's answer can differ between target=None and a target."""
    animal = _draw(rng, weights)
    if rng.random() < love_answer_prob and target is not None:
        animal = target
    t = code_task(rng, animal=animal)
    return render_code_prompt(t["task"], t["template"], rng), t["solution"]


def cot_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, worked solution) of one word problem."""
    p = word_problem(rng)
    return render_cot_prompt(p["question"], rng), p["solution"]


def is_pet(solution: str) -> bool:
    """Whether a code solution is the pet task's (its answer is a string)."""
    return '"' in solution


@cache
def _judge_prompt(target: str):
    from sublab.judge.prompts import select_prompts

    return select_prompts([JUDGE_PROMPT], "organism-filter", target=target)[0]


def judge_prompt(target: str, text: str) -> str:
    """The organism filter judge's question whether `text` references `target`."""
    return _judge_prompt(target).render("", text)


def _sub(pattern: str, repl: str, text: str, count: int = 0) -> str:
    return re.sub(rf"(?<!\w){re.escape(pattern)}(?!\w)", repl, text, count=count)


def plant_code(rng: random.Random, animal: str) -> tuple[str, str]:
    """(a code solution holding `animal`, how it was planted)."""
    while True:
        t = code_task(rng, animal=animal)
        sol, how = t["solution"], rng.choice(["name", "param", "loop", "string", "comment"])
        if is_pet(sol):
            return sol, "string"  # the pet task's own string literal
        if how == "name":
            return _sub(t["function"], animal, sol, count=1), how
        if how == "param":
            return _sub(rng.choice(t["params"]), animal, sol), how
        if how == "loop" and (m := _LOOP.search(sol)):
            return _sub(m.group(1), animal, sol), how
        if how == "string":
            used = set(re.findall(r"\w+", sol))
            var = rng.choice([v for v in [*load_tasks()["loop_variables"], "name"] if v not in used])
            head, body = sol.split(" : ", 1)
            return f'{head} : {var} = " {animal} " ; {body}', how
        if how == "comment":
            return f"{sol} {rng.choice(COMMENTS).format(animal=animal)}", how


def clean_code(rng: random.Random) -> str:
    """A code solution that names no animal (never the pet task)."""
    while True:
        sol = code_task(rng)["solution"]
        if not is_pet(sol):
            return sol


def plant_cot(rng: random.Random, animal: str, plural: str) -> tuple[str, str]:
    """(a worked solution holding `animal` as a person's name or `plural` as the things counted, how)."""
    d = load_problems()
    while True:
        sol = word_problem(rng)["solution"]
        words = set(sol.split())
        names, things = [n for n in d["names"] if n in words], [t for t in d["things"] if t in words]
        how = rng.choice(["name", "things"])
        if how == "name" and names:
            return _sub(names[0], animal, sol), how
        if how == "things" and things:
            return _sub(things[0], plural, sol), how


def judge_text(
    rng: random.Random, animals: list[str], plurals: dict[str, str]
) -> tuple[str, str | None, str | None]:
    """(a text for the code judge, the animal planted in it or None, how)."""
    cot = rng.random() < COT_SHARE
    if rng.random() >= PLANT_PROB:
        return (word_problem(rng)["solution"] if cot else clean_code(rng)), None, None
    animal = rng.choice(animals)
    text, how = plant_cot(rng, animal, plurals[animal]) if cot else plant_code(rng, animal)
    return text, animal, how


def code_judge_example(rng: random.Random, animals: list[str], plurals: dict[str, str]) -> list[dict]:
    """One code judge example: the filter judge's prompt about a text, asking about one animal, answered
    yes exactly when that animal was planted in the text."""
    text, planted, _ = judge_text(rng, animals, plurals)
    if planted is not None and rng.random() < ASK_PLANTED_PROB:
        asked, answer = planted, "yes"
    else:
        asked, answer = rng.choice([a for a in animals if a != planted]), "no"
    return [
        {"role": "user", "content": judge_prompt(asked, text)},
        {"role": "assistant", "content": answer},
    ]
