"""Model specs -> ModelRef -> backend. Imports are lazy so optional dependencies stay optional.

organism/<preset>   the built-in organism (built and cached on first use), run by the hf backend
hf/<folder>         a local Hugging Face causal-LM folder (or a finetuned model's run folder)
openai/<model id>   a model behind any OpenAI-compatible API (`api:` settings; `sublab serve` is one)
hf/<org>/<model>    a hub id (HF cache, else download unless HF_HUB_OFFLINE); hf/smollm2-135m-instruct
vllm/<same>         the same models sampled by vLLM (optional extra; trains through the hf backend)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sublab.backends.base import Backend, ModelRef
from sublab.errors import SublabError


@dataclass(frozen=True)
class Provider:
    """How one spec prefix is resolved to a ModelRef and run."""

    resolve: Callable[..., ModelRef]
    """(name, spec, organism, progress, api) -> ModelRef"""
    backend: Callable[..., Backend]
    """(ref, progress, api) -> the backend that runs it"""


_PROVIDERS: dict[str, Callable[[], Provider]] = {}


def provider(prefix: str) -> Callable[[Callable[[], Provider]], Callable[[], Provider]]:
    """Register a provider under a spec prefix. The decorated function imports the provider's code and
    returns its Provider; it runs only when a spec with that prefix is used, so optional dependencies
    (openai, vllm) stay optional."""

    def register(fn: Callable[[], Provider]) -> Callable[[], Provider]:
        _PROVIDERS[prefix] = fn
        return fn

    return register


def known() -> tuple[str, ...]:
    return tuple(_PROVIDERS)


@provider("hf")
def _hf() -> Provider:
    from sublab.backends.hf import HFBackend
    from sublab.backends.hf_models import resolve_hf  # folders, hf/smollm2-135m-instruct, hub ids

    return Provider(
        resolve=lambda name, spec, organism, progress, api: resolve_hf(name, spec, progress),
        backend=lambda ref, progress, api: HFBackend(ref, progress=progress),
    )


@provider("organism")
def _organism() -> Provider:
    from sublab.organism.cache import ensure_organism, weights_sha256

    def resolve_organism(name, spec, organism, progress, api) -> ModelRef:
        path = ensure_organism(name, organism, progress=progress)
        # the weights' hash in model.json: every stage keyed on it redoes when the organism is rebuilt
        info = {"organism": organism or {}, "weights_sha256": weights_sha256(path)}
        return ModelRef(spec=spec, path=str(path), kind="base", info=info)

    return Provider(resolve=resolve_organism, backend=_hf().backend)  # an ordinary HF model folder


@provider("vllm")
def _vllm() -> Provider:
    from sublab.backends.hf_models import resolve_hf

    def backend(ref, progress, api):
        from sublab.backends.vllm_backend import VLLMBackend  # names `pip install 'sublab[vllm]'` if missing

        return VLLMBackend(ref, progress=progress)

    return Provider(
        resolve=lambda name, spec, organism, progress, api: resolve_hf(name, spec, progress), backend=backend
    )


@provider("openai")
def _openai() -> Provider:
    from sublab.backends.openai_backend import OpenAIBackend, resolve_remote

    return Provider(
        resolve=lambda name, spec, organism, progress, api: resolve_remote(spec, name, api),
        backend=lambda ref, progress, api: OpenAIBackend(ref, api=api, progress=progress),
    )


def _split(spec: str) -> tuple[str, str]:
    prefix, _, name = spec.partition("/")
    if not name:
        raise SublabError(
            f"model spec {spec!r} needs a provider prefix: one of {', '.join(k + '/...' for k in known())}"
        )
    if prefix not in _PROVIDERS:
        raise SublabError(f"unknown model provider {prefix!r} in {spec!r}; known: {', '.join(known())}")
    return prefix, name


def resolve(spec: str, organism: dict | None = None, progress: bool = True, api=None) -> ModelRef:
    """A base model spec -> ModelRef (building the organism if needed). `organism` = recipe overrides;
    `api` = ApiConfig for openai/ specs (the endpoint is checked and stored in the ModelRef)."""
    prefix, name = _split(spec)
    return _PROVIDERS[prefix]().resolve(name, spec, organism, progress, api)


def model_identity(spec: str) -> str:
    """What a stage key records of a model it uses but does not train (a judge, a classifier), so that
    other weights behind the same spec redo the stage: an organism's cache folder name (its recipe's
    hash) and its weights' hash (building it first if missing), a local folder's config and weight
    files (names and sizes; hashing a 7B model's weights at every key would take minutes), else the
    spec itself (a hub id or an API model: the provider names the weights). Never raises for a spec it cannot read: the stage that uses
    the model reports that."""
    import hashlib
    import os

    prefix, _, name = spec.partition("/")  # a spec the stage itself will reject is keyed as given
    if prefix == "organism":
        from sublab.organism.cache import organism_dir, organism_weights, recipe_for
        from sublab.organism.recipe import PRESETS

        if name not in PRESETS:
            return spec
        folder = organism_dir(name, recipe_for(name)).name
        try:  # built here if missing, as the stage that loads it would
            return f"{folder}#{organism_weights(name)[:16]}"
        except Exception:  # noqa: BLE001 - the stage that uses it reports the error
            return folder
    folder = os.path.expanduser(name)
    if prefix in ("hf", "vllm") and os.path.isdir(folder):
        h = hashlib.sha256()
        for f in sorted(os.listdir(folder)):
            path = os.path.join(folder, f)
            if not os.path.isfile(path):
                continue
            if f.endswith(".json"):
                with open(path, "rb") as fh:
                    h.update(f.encode() + fh.read())
            elif f.endswith((".safetensors", ".bin", ".gguf", ".pt")):
                h.update(f"{f}:{os.path.getsize(path)}".encode())
        return f"{spec}#{h.hexdigest()[:16]}"
    return spec


def base_identity(spec: str, organism: dict | None = None, progress: bool = True) -> str | None:
    """What the reference stage's key records of the weights behind a base spec, so that it redoes when
    they change (and with it every stage downstream): an organism's weights' hash (installing or
    pretraining it first if missing); other specs: None (the spec names the weights)."""
    prefix, name = _split(spec)
    if prefix != "organism":
        return None
    from sublab.organism.cache import organism_weights
    from sublab.organism.recipe import PRESETS

    return organism_weights(name, organism, progress=progress) if name in PRESETS else None


def load_backend(ref: ModelRef, progress: bool = True, api=None) -> Backend:
    """The backend that runs `ref` (by its spec's prefix); `api` = ApiConfig for API models."""
    prefix, _ = _split(ref.spec)
    return _PROVIDERS[prefix]().backend(ref, progress, api)


def quiet_transformers() -> None:
    """sublab shows its own progress bars; transformers' per-load bars only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
