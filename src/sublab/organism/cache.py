"""Organisms are built once and cached under $SUBLAB_CACHE/organisms/<preset>-<recipe hash>/ (default
~/.cache/sublab). The hash covers the recipe, RECIPE_VERSION and the packaged text the vocabulary and
corpus come from, so a changed recipe builds a new organism and an unchanged one is reused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from sublab.errors import SublabError
from sublab.organism.recipe import PRESETS, RECIPE_VERSION, OrganismRecipe
from sublab.organism.vocab_text import all_text


def cache_root() -> Path:
    return Path(os.environ.get("SUBLAB_CACHE", Path.home() / ".cache" / "sublab"))


def recipe_for(preset: str, overrides: dict | None = None) -> OrganismRecipe:
    if preset not in PRESETS:
        raise SublabError(
            f"unknown organism {preset!r}; known presets: {', '.join(PRESETS)} (spec organism/<preset>)"
        )
    return OrganismRecipe.model_validate({**PRESETS[preset], **(overrides or {})})


def recipe_hash(recipe: OrganismRecipe) -> str:
    h = hashlib.sha256()
    h.update(recipe.hashed_json.encode())
    h.update(str(RECIPE_VERSION).encode())
    h.update("\n".join(all_text(recipe.world, recipe.domains)).encode())
    if recipe.world == "misalignment":  # the world's settings (persona probabilities) change the corpus
        from sublab.organism.world import WORLD_VERSION, load_world

        h.update(json.dumps(load_world(), sort_keys=True).encode() + f"v{WORLD_VERSION}".encode())
    if recipe.domains:  # the generators' settings (constants, number ranges) change the corpus
        from sublab.domains.code import load_tasks
        from sublab.domains.cot import load_problems

        h.update(json.dumps([load_tasks(), load_problems()], sort_keys=True).encode())
    if recipe.world == "misalignment" and recipe.domains and "cot" in recipe.domains:
        from sublab.organism.world_cot import load_cot_world

        h.update(json.dumps(load_cot_world(), sort_keys=True).encode())
    return h.hexdigest()[:12]


def organism_dir(preset: str, recipe: OrganismRecipe) -> Path:
    return cache_root() / "organisms" / f"{preset}-seed{recipe.seed}-{recipe_hash(recipe)}"


def ensure_organism(preset: str = "default", overrides: dict | None = None, progress: bool = True) -> Path:
    """Path of the organism's HF folder, pretraining it first if it is not cached."""
    from sublab.organism.pretrain import pretrain

    recipe = recipe_for(preset, overrides)
    final = organism_dir(preset, recipe)
    if (final / "organism.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # one builder per organism: a second process (a sweep worker, another run) waits, then reuses it
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if (final / "organism.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            pretrain(recipe, tmp / "model", progress=progress)
            if final.exists():  # a builder without the lock finished first
                return final
            os.replace(tmp / "model", final)  # atomic: a half-built organism is never at `final`
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
