"""Model specs -> ModelRef -> backend. Imports are lazy so optional dependencies stay optional.

organism/<preset>   the built-in organism (built and cached on first use), run by the hf backend
hf/<folder>         a local Hugging Face causal-LM folder (or a finetuned model's run folder)
openai/<model id>   a model behind any OpenAI-compatible API (`api:` settings; `sublab serve` is one)
hf/<org>/<model>    a hub id (HF cache, else download unless HF_HUB_OFFLINE); hf/smollm2-135m-instruct
vllm/<same>         the same models sampled by vLLM (optional extra; trains through the hf backend)
"""

from __future__ import annotations

from sublab.backends.base import Backend, ModelRef
from sublab.errors import SublabError

KNOWN = ("organism", "hf", "openai", "vllm")


def resolve(spec: str, organism: dict | None = None, progress: bool = True, api=None) -> ModelRef:
    """A base model spec -> ModelRef (building the organism if needed). `organism` = recipe overrides;
    `api` = ApiConfig for openai/ specs (the endpoint is checked and stored in the ModelRef)."""
    if "/" not in spec:
        raise SublabError(
            f"model spec {spec!r} needs a provider prefix: one of {', '.join(k + '/...' for k in KNOWN)}"
        )
    provider, name = spec.split("/", 1)
    if provider == "organism":
        from sublab.organism.cache import ensure_organism

        path = ensure_organism(name, organism, progress=progress)
        return ModelRef(spec=spec, path=str(path), kind="base", info={"organism": organism or {}})
    if provider in ("hf", "vllm"):
        from sublab.backends.hf_models import resolve_hf  # folders, hf/smollm2-135m-instruct, hub ids

        return resolve_hf(name, spec, progress)
    if provider == "openai":
        from sublab.backends.openai_backend import resolve_remote

        return resolve_remote(spec, name, api)
    raise SublabError(f"unknown model provider {provider!r} in {spec!r}; known: {', '.join(KNOWN)}")


def load_backend(ref: ModelRef, progress: bool = True, api=None) -> Backend:
    """The backend that runs `ref`; `api` = ApiConfig (request settings) for API models."""
    if ref.is_remote:
        from sublab.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(ref, api=api, progress=progress)
    if ref.spec.startswith("vllm/"):
        from sublab.backends.vllm_backend import VLLMBackend

        return VLLMBackend(ref, progress=progress)
    from sublab.backends.hf import HFBackend

    return HFBackend(ref, progress=progress)


def quiet_transformers() -> None:
    """sublab shows its own progress bars; transformers' per-load bars only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
