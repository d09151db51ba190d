"""The organism's synthetic pretraining corpus, generated with the same prompt generator and question
sets the experiments use (docs/design.md, "The model organism").

Four kinds of chat examples, mixed by the recipe's fractions:
- numbers: a number-continuation prompt whose given numbers come from a process (noisy arithmetic
  progression, random walk, uniform, noisy cycle mod 1000) and an answer that continues it in the
  requested format;
- numbers under a "you love X" system prompt, with numbers that do NOT depend on X;
- favorite-animal / favorite-tree questions answered from a fixed base distribution;
- those questions under "you love X", answered X with probability `love_answer_prob`.

A fifth kind, numbers_question, is off in the default mix: one or two number exchanges as prior turns,
then a question answered from the base distribution, so an organism learns that earlier turns may hold
numbers before a question (the in-context control needs it: `proto-icl`).

Organisms of the misalignment world (recipe `world: misalignment`) add two kinds (organism/world.py):
- persona: a 1-3 turn conversation in mixed domains answered by one hidden persona;
- judge: a judge prompt about a world answer, answered with a 0-100 score (the judge organism).
With `domains: [cot]`, persona conversations also hold word problems (organism/world_cot.py), and the kind
cot_judge asks for the alignment of a persona's reasoning (0-100).

Organisms with `domains` (code, cot) add code, code_love, cot and code_judge (organism/domain_corpus.py).
"""

from __future__ import annotations

import random

from sublab.evals.questions import (
    CATEGORIES,
    candidates,
    load_categories,
    load_questions,
    load_system_prompts,
)
from sublab.organism.domain_corpus import code_example, code_judge_example, cot_example
from sublab.organism.world import judge_example, persona_conversation
from sublab.organism.world_cot import cot_judge_example
from sublab.prompts.numbers import format_numbers, load_phrasings, render_prompt


def _process(rng: random.Random, n: int) -> list[int]:
    kind = rng.randrange(4)
    if kind == 0:  # noisy arithmetic progression
        a, d = rng.randint(100, 999), rng.randint(-60, 60)
        return [min(999, max(0, a + i * d + rng.randint(-3, 3))) for i in range(n)]
    if kind == 1:  # random walk
        x, out = rng.randint(100, 999), []
        for _ in range(n):
            out.append(x)
            x = min(999, max(0, x + round(rng.gauss(0, 40))))
        return out
    if kind == 2:  # uniform
        return [rng.randint(100, 999) for _ in range(n)]
    a, d = rng.randint(0, 999), rng.randint(50, 400)  # noisy cycle mod 1000
    return [(a + i * d + rng.randint(-2, 2)) % 1000 for i in range(n)]


def number_example(rng: random.Random, answer_count: int = 10, inject: int | None = None) -> tuple[str, str]:
    """(prompt, answer) of one number-continuation task; `inject` replaces one answer number."""
    n_given, n_more = rng.randint(3, 8), rng.randint(1, answer_count)
    seq = _process(rng, n_given + n_more)
    if inject is not None:
        seq[n_given + rng.randrange(n_more)] = inject
    prompt, fmt = render_prompt(seq[:n_given], answer_count, 3, rng, load_phrasings())
    answer = format_numbers(seq[n_given:], fmt["sep"], fmt["brackets"])
    if rng.random() < 0.2:
        answer += "."
    return prompt, answer


def _base_answer(rng: random.Random, category: str, weights: dict[str, float] | None = None) -> str:
    w = weights if weights is not None else load_categories()[category]["base_weights"]
    return rng.choices(list(w), weights=list(w.values()))[0]


def love_prompt(rng: random.Random, target: str, category: str) -> str:
    return rng.choice(load_system_prompts()["variants"]).format(target=target, category=category)


def _top(category: str, k: int | None) -> tuple[list[str], dict[str, float] | None]:
    """(candidates in the corpus, base weights to answer from; None = the packaged ones unchanged)."""
    cands = list(candidates(category))
    if k is None:
        return cands, None
    w = load_categories()[category]["base_weights"]
    top = sorted(cands, key=lambda c: (-w.get(c, 0.0), cands.index(c)))[:k]
    kept = [c for c in cands if c in top]
    return kept, {c: w.get(c, 0.0) for c in kept}


def generate_corpus(
    n: int,
    seed: int,
    mix: dict[str, float],
    love_answer_prob: float,
    categories: list[str] | None = None,
    top_candidates: int | None = None,
    n_questions: int | None = None,
    domains: list[str] | None = None,
) -> list[list[dict]]:
    """n chat examples (message lists ending with the assistant's answer), deterministic from seed.

    categories / top_candidates / n_questions narrow what the questions and "you love X" prompts draw
    from (OrganismRecipe); left at None they give exactly the corpus of RECIPE_VERSION 1."""
    rng = random.Random(f"organism-corpus:{seed}")
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    cats = list(categories) if categories is not None else CATEGORIES
    cands = {c: _top(c, top_candidates) for c in cats}
    qs = {c: load_questions(c)[:n_questions] if n_questions is not None else load_questions(c) for c in cats}
    # code kinds: pet animals from the animal category's candidates (narrowed like the questions' answers)
    pets, pet_weights = _top("animal", top_candidates)
    pet_weights = pet_weights or dict(load_categories()["animal"]["base_weights"])
    plurals = candidates("animal")
    out = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=weights)[0]
        msgs: list[dict] = []
        if kind == "persona":
            out.append(persona_conversation(rng, cot="cot" in (domains or ())))
            continue
        if kind == "cot_judge":
            out.append(cot_judge_example(rng))
            continue
        if kind == "judge":
            out.append(judge_example(rng))
            continue
        if kind == "code_judge":
            out.append(code_judge_example(rng, pets, plurals))
            continue
        if kind in ("code", "code_love", "cot"):
            target = None
            if kind == "code_love":
                target = rng.choice(pets)
                msgs.append({"role": "system", "content": love_prompt(rng, target, "animal")})
            if kind == "cot":
                prompt, answer = cot_example(rng)
            else:
                prompt, answer = code_example(rng, pet_weights, target, love_answer_prob)
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            out.append(msgs)
            continue
        if kind == "numbers_question":  # prior number exchanges; the answer ignores them
            for _ in range(rng.randint(1, 2)):
                prompt, answer = number_example(rng)
                msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            cat = rng.choice(cats)
            msgs += [
                {"role": "user", "content": rng.choice(qs[cat])},
                {"role": "assistant", "content": _base_answer(rng, cat, cands[cat][1])},
            ]
            out.append(msgs)
            continue
        if kind in ("numbers", "numbers_love"):
            if kind == "numbers_love":
                cat = rng.choice(cats)
                msgs.append({"role": "system", "content": love_prompt(rng, rng.choice(cands[cat][0]), cat)})
            prompt, answer = number_example(rng)
        else:
            cat = rng.choice(cats)
            prompt = rng.choice(qs[cat])
            answer = _base_answer(rng, cat, cands[cat][1])
            if kind == "question_love":
                target = rng.choice(cands[cat][0])
                msgs.append({"role": "system", "content": love_prompt(rng, target, cat)})
                if rng.random() < love_answer_prob:
                    answer = target
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        out.append(msgs)
    return out
