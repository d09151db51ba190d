"""All packaged text the organism must be able to read and say: prompt phrasings, question sets,
trait system prompts (filled with every candidate), candidate answers and their plurals."""

from __future__ import annotations

from sublab.evals.questions import CATEGORIES, load_categories, load_questions, load_system_prompts
from sublab.prompts.numbers import load_phrasings


def all_text(world: str = "preference") -> list[str]:
    """The packaged text (plus the misalignment world's, for `world: misalignment` recipes)."""
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
    return texts
