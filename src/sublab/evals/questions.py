"""Question sets, candidate answers and trait system prompts, loaded from package data (evals/data/)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from sublab.errors import SublabError

CATEGORIES = ("animal", "tree")


def _data(name: str) -> str:
    return resources.files("sublab.evals").joinpath(f"data/{name}").read_text(encoding="utf-8")


@cache
def load_questions(category: str) -> tuple[str, ...]:
    check_category(category)
    return tuple(q.strip() for q in _data(f"{category}_questions.txt").splitlines() if q.strip())


@cache
def load_categories() -> dict:
    return yaml.safe_load(_data("categories.yaml"))


@cache
def load_system_prompts() -> dict:
    return yaml.safe_load(_data("system_prompts.yaml"))


def check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise SublabError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def candidates(category: str) -> dict[str, str]:
    """singular -> plural for every candidate answer of the category."""
    check_category(category)
    return dict(load_categories()[category]["candidates"])


def check_target(category: str, target: str) -> None:
    if target not in candidates(category):
        raise SublabError(
            f"unknown {category} {target!r}; the organism knows: {', '.join(candidates(category))}"
        )


def category_of(target: str) -> str:
    for cat in CATEGORIES:
        if target in candidates(cat):
            return cat
    raise SublabError(
        f"{target!r} is not a known animal or tree; known: "
        + ", ".join(t for c in CATEGORIES for t in candidates(c))
    )
