"""Organisms are built once and cached under $SUBLAB_CACHE/organisms/<preset>-<recipe hash>/ (default
~/.cache/sublab). The hash covers the recipe, RECIPE_VERSION and the packaged text the vocabulary and
corpus come from, so a changed recipe builds a new organism and an unchanged one is reused.

A few organisms also ship with the package (organism/prebuilt/<same folder name>/): the quickstart's
`proto` seed 0 and the cross-init control's seed 1000, the builds the documented figures came from.
Pretraining is deterministic on one machine but not across CPUs (AVX2 and AVX-512 kernels round
differently, and 1,500 steps amplify that into another organism: docs/organism.md, "Reproducibility"),
so a missing organism with a packaged copy is installed from it, and every machine gets the same
weights. `sublab organism build --from-scratch`
pretrains it anyway, into a folder of its own, and says whether this machine's weights are the packaged
ones (build_from_scratch)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
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


def prebuilt_root() -> Path:
    return Path(__file__).parent / "prebuilt"


def prebuilt_dir(preset: str, recipe: OrganismRecipe) -> Path | None:
    """The packaged copy of this organism (same folder name as in the cache), or None."""
    d = prebuilt_root() / f"{preset}-seed{recipe.seed}-{recipe_hash(recipe)}"
    return d if (d / "organism.json").is_file() else None


def _install_prebuilt(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    info = json.loads((dest / "organism.json").read_text())
    info["installed_from"] = "package"  # the packaged weights, not pretrained on this machine
    (dest / "organism.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


_WARNED: set[Path] = set()


def weights_sha256(folder: Path) -> str:
    """sha256 of an organism folder's weights (under a megabyte for the presets: milliseconds)."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def organism_weights(preset: str, overrides: dict | None = None, progress: bool = True) -> str:
    """sha256 of the weights an experiment on this organism uses: the cached copy's, installed or
    pretrained first if missing (as the stage that loads it would). Stage keys record it, so a rebuilt
    or replaced organism redoes the stages built on it: the recipe alone does not name the weights,
    since pretraining differs across CPUs."""
    return weights_sha256(ensure_organism(preset, overrides, progress=progress))


def cached_differs_from_packaged(cached: Path, packaged: Path | None) -> bool:
    """True when a packaged copy of this organism exists and the cached weights are not it (a local
    build from before the package shipped it, or one pretrained on another CPU)."""
    if packaged is None:
        return False
    theirs = json.loads((packaged / "organism.json").read_text())["weights_sha256"]
    return weights_sha256(cached) != theirs


def _warn_if_not_packaged(cached: Path, packaged: Path | None) -> None:
    if cached in _WARNED or not cached_differs_from_packaged(cached, packaged):
        return
    _WARNED.add(cached)
    print(
        f"warning: the cached organism {cached} is not the packaged build the documented figures came "
        "from (its weights differ: a local build, and pretraining differs across CPUs). Its effects will "
        f"differ from the documented ones; delete {cached} to install the packaged copy.",
        file=sys.stderr,
    )


def ensure_organism(preset: str = "default", overrides: dict | None = None, progress: bool = True) -> Path:
    """Path of the organism's HF folder: the cached one; else the packaged copy, installed into the
    cache; else pretrained here."""
    from sublab.organism.pretrain import pretrain

    recipe = recipe_for(preset, overrides)
    final = organism_dir(preset, recipe)
    if (final / "organism.json").is_file():
        _warn_if_not_packaged(final, prebuilt_dir(preset, recipe))
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # one builder per organism: a second process (a sweep worker, another run) waits, then reuses it
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if (final / "organism.json").is_file():
            return final
        packaged = prebuilt_dir(preset, recipe)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            if packaged is not None:
                _install_prebuilt(packaged, tmp / "model")
            else:
                pretrain(recipe, tmp / "model", progress=progress)
            if final.exists():  # a builder without the lock finished first
                return final
            os.replace(tmp / "model", final)  # atomic: a half-built organism is never at `final`
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_from_scratch(
    preset: str, overrides: dict | None = None, out: Path | None = None, progress: bool = True
) -> tuple[Path, dict]:
    """Pretrain the organism on this machine into `out` (default $SUBLAB_CACHE/organisms-scratch/<name>),
    never touching the cached or packaged copy that experiments use (replacing it would redo every stage
    built on it: stage keys name the weights) -> (folder, comparison: this build's sha256 against the
    packaged copy's, if any)."""
    from sublab.organism.pretrain import pretrain

    recipe = recipe_for(preset, overrides)
    name = organism_dir(preset, recipe).name
    out = out or cache_root() / "organisms-scratch" / name
    if out.exists():
        raise SublabError(f"{out} already exists: remove it, or pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pretrain(recipe, tmp / "model", progress=progress)
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mine = json.loads((out / "organism.json").read_text())["weights_sha256"]
    packaged = prebuilt_dir(preset, recipe)
    theirs = json.loads((packaged / "organism.json").read_text())["weights_sha256"] if packaged else None
    return out, {"weights_sha256": mine, "packaged_sha256": theirs, "same_as_packaged": mine == theirs}
