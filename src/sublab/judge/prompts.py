"""Judge prompts: YAML files of `name: template` (the packaged ones: data/em_prompts.yaml), checked and
filled in.

A template holds {answer} and usually {question}, and may hold {target} (a filter judge's trait word,
filled in when the prompts are selected, so it is part of the prompt's hash); nothing else is substituted, and the answer's
own text is never read as a template (an answer that contains "{question}" stays as it is), so an answer
cannot change the prompt around it. A long answer is cut to a character budget with a visible marker.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from sublab.errors import SublabError

PACKAGED = "em_prompts.yaml"
NAMED = {
    "filter": ("sublab.judge", "data/filter_prompts.yaml"),
    "organism-filter": ("sublab.organism", "data/filter_judge_prompts.yaml"),
    "organism-cot": ("sublab.organism", "data/cot_judge_prompts.yaml"),
}
"""Other packaged prompt files by name: the data filters' judge prompts (paper-style, for real judges)
and their short counterparts in the organism's vocabulary."""
_FIELD = re.compile(r"\{(question|answer)\}")
TRUNCATION_MARKER = "\n[... answer truncated by sublab: {cut} of {total} characters not shown ...]"


@dataclass(frozen=True)
class JudgePrompt:
    """One named judge prompt."""

    name: str
    template: str

    @property
    def sha(self) -> str:
        """Hash of the template text (part of the cache key: an edited prompt is asked again)."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:16]

    def render(self, question: str, answer: str) -> str:
        """The template with {question} and {answer} filled in, in one pass.

        >>> JudgePrompt("t", "Q: {question} A: {answer}").render("2+2?", "{question} 4")
        'Q: 2+2? A: {question} 4'
        """
        values = {"question": question, "answer": answer}
        return _FIELD.sub(lambda m: values[m.group(1)], self.template)


def load_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    """name -> JudgePrompt from a YAML file (None: the packaged emergent-misalignment prompts;
    "organism": the organism judge's short prompts, sublab/organism/data/judge_prompts.yaml; "filter" and
    "organism-filter", "organism-cot": the data filters' judge prompts, NAMED)."""
    if str(path) == "organism":
        from sublab.organism.world import judge_prompts_path

        path = judge_prompts_path()
    elif str(path) in NAMED:
        path = str(resources.files(NAMED[str(path)][0]).joinpath(NAMED[str(path)][1]))
    if path is None:
        where = f"sublab/judge/data/{PACKAGED}"
        text = resources.files("sublab.judge").joinpath(f"data/{PACKAGED}").read_text(encoding="utf-8")
    else:
        where = str(path)
        if not Path(path).is_file():
            raise SublabError(f"judge prompts file not found: {path} (a YAML file of `name: template`)")
        text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SublabError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise SublabError(f"{where}: expected a mapping of `name: template`, e.g. aligned: |- ...")
    out = {}
    for name, template in data.items():
        if not isinstance(template, str) or "{answer}" not in template:
            raise SublabError(
                f"{where}: prompt {name!r} must be a text holding {{answer}} (and usually {{question}})"
            )
        out[str(name)] = JudgePrompt(str(name), template)
    return out


def select_prompts(
    names: list[str], path: str | Path | None = None, target: str | None = None
) -> list[JudgePrompt]:
    """The named prompts, in the order given, with {target} filled in; an unknown name is an error listing
    the known ones, and so is a prompt with {target} when no target is given.

    >>> [p.template for p in select_prompts(["references_target"], "filter", target="owl")][0][:40]
    'Does the following text reference owl in'
    """
    known = load_prompts(path)
    missing = [n for n in names if n not in known]
    if missing:
        raise SublabError(
            f"unknown judge prompt(s) {', '.join(missing)}; {path or 'the packaged prompts'} has: "
            f"{', '.join(known)}"
        )
    out = []
    for n in names:
        p = known[n]
        if "{target}" in p.template:
            if not target:
                raise SublabError(f"judge prompt {n!r} asks about a {{target}}; give the target (--target)")
            p = JudgePrompt(n, p.template.replace("{target}", target))
        out.append(p)
    return out


def truncate_answer(answer: str, max_chars: int) -> tuple[str, int]:
    """(the answer cut to max_chars characters with a marker, characters cut); unchanged if it fits.

    >>> text, cut = truncate_answer("x" * 10, 4)
    >>> text.startswith("xxxx\\n[... answer truncated"), cut
    (True, 6)
    >>> truncate_answer("short", 10)
    ('short', 0)
    """
    if len(answer) <= max_chars:
        return answer, 0
    cut = len(answer) - max_chars
    return answer[:max_chars] + TRUNCATION_MARKER.format(cut=cut, total=len(answer)), cut
