"""Model specs -> ModelRef -> backend. Imports are lazy so optional dependencies stay optional.

organism/<preset>   the built-in organism (built and cached on first use), run by the hf backend
hf/<folder>         a local Hugging Face causal-LM folder (or a finetuned model's run folder)
"""

from __future__ import annotations

from pathlib import Path

from sublab.backends.base import Backend, ModelRef
from sublab.errors import SublabError

KNOWN = ("organism", "hf")


def resolve(spec: str, organism: dict | None = None, progress: bool = True) -> ModelRef:
    """A base model spec -> ModelRef (building the organism if needed). `organism` = recipe overrides."""
    if "/" not in spec:
        raise SublabError(
            f"model spec {spec!r} needs a provider prefix: one of {', '.join(k + '/...' for k in KNOWN)}"
        )
    provider, name = spec.split("/", 1)
    if provider == "organism":
        from sublab.organism.cache import ensure_organism

        path = ensure_organism(name, organism, progress=progress)
        return ModelRef(spec=spec, path=str(path), kind="base", info={"organism": organism or {}})
    if provider == "hf":
        p = Path(name)
        if (p / "model.json").is_file():
            return ModelRef.load(p / "model.json")
        if not (p / "config.json").is_file():
            raise SublabError(
                f"hf model folder not found: {name} (expected a folder with config.json; hub downloads "
                "are not supported in this version)"
            )
        return ModelRef(spec=spec, path=str(p.resolve()), kind="base")
    raise SublabError(f"unknown model provider {provider!r} in {spec!r}; known: {', '.join(KNOWN)}")


def load_backend(ref: ModelRef, progress: bool = True) -> Backend:
    from sublab.backends.hf import HFBackend

    return HFBackend(ref, progress=progress)


def quiet_transformers() -> None:
    """sublab shows its own progress bars; transformers' per-load bars only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
