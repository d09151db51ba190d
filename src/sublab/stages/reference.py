"""Reference stage: resolve a model spec (pretraining and caching the organism if needed) -> model.json."""

from __future__ import annotations

from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.backends.registry import resolve


def build_reference(spec: str, organism: dict, out: Path, progress: bool = True, api=None) -> ModelRef:
    """The shared starting point of teacher and students, written as `out` (a model.json)."""
    ref = resolve(spec, organism, progress=progress, api=api)
    ref.save(out)
    return ref
