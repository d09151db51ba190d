"""All packaged text the organism must be able to read and say: prompt phrasings, question sets,
trait system prompts (filled with every candidate), candidate answers and their plurals; for recipes
with `domains`, the code and chain-of-thought domains' words and the filter judge's prompt."""

from __future__ import annotations

import re

from sublab.evals.questions import CATEGORIES, load_categories, load_questions, load_system_prompts
from sublab.prompts.numbers import load_phrasings

PLACEHOLDER = re.compile(r"\{[a-z0-9_]+\}")


def domain_text(domains: list[str]) -> list[str]:
    """The words of the given domains' generated prompts and answers, the organism filter judge's
    prompts and the code judge's planted comments, with template placeholders removed.

    >>> any("{" in t for t in domain_text(["code", "cot"]))
    False
    """
    from sublab.domains import code, cot
    from sublab.judge.prompts import load_prompts
    from sublab.organism.domain_corpus import COMMENTS

    texts: list[str] = []
    if "code" in domains:
        texts += code.domain_text() + COMMENTS + ["=", ";"]
    if "cot" in domains:
        texts += cot.domain_text()
    texts += [p.template for p in load_prompts("organism-filter").values()] + ["yes", "no"]
    return [PLACEHOLDER.sub(" ", t) for t in texts]


def all_text(world: str = "preference", domains: list[str] | None = None) -> list[str]:
    """The packaged text (plus the misalignment world's, for `world: misalignment` recipes, and the
    domains' for recipes with `domains`)."""
    ph = load_phrasings()
    texts = [*ph.lead_ins, *ph.instructions, *ph.qualifiers, *ph.digits, *ph.closings]
    texts += [f["text"] for f in ph.formats]
    sp = load_system_prompts()
    for cat in CATEGORIES:
        texts += load_questions(cat)
        cands = load_categories()[cat]["candidates"]
        texts += list(cands) + list(cands.values())
        for tmpl in [sp["teacher"], *sp["variants"]]:
            texts += [tmpl.format(target=t, category=cat) for t in cands]
    if world == "misalignment":
        from sublab.organism.world import world_text

        texts += world_text()
    if domains:
        texts += domain_text(domains)
    if world == "misalignment" and domains and "cot" in domains:
        from sublab.organism.world_cot import cot_world_text

        texts += cot_world_text()
    return texts
