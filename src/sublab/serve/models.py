"""Served model ids -> ModelRef -> loaded local backends.

The ids are the MODEL arguments of `sublab serve` (e.g. `organism/default`) plus every fine-tuned model
a job has produced (`ft:<base>:<suffix>:<job id>`, persisted in the state folder). Loaded backends are
kept in a small LRU; only the engine thread calls `backend()`. Requests are tokenized before they reach
the engine by tokenizers of their own (`tokenizer()`: one instance per model and calling thread, since
a tokenizer is not safe to share between threads), which also give the model's context length.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.serve.store import NotFound

DEFAULT_CONTEXT = 4096  # a model whose config names no context length


def ref_for(model: str) -> ModelRef:
    """A MODEL argument (a spec, or a folder / file holding a sublab model.json) -> ModelRef."""
    p = Path(model)
    if (p / "model.json").is_file():
        return ModelRef.load(p / "model.json")
    if p.name == "model.json" and p.is_file():
        return ModelRef.load(p)
    from sublab.backends.registry import resolve

    ref = resolve(model, progress=True)
    if ref.is_remote:
        raise SublabError(f"sublab serve runs local models; {model!r} is an API model")
    return ref


class ModelRegistry:
    def __init__(self, models: list[str], max_loaded: int = 6):
        self.refs: dict[str, ModelRef] = {}
        self.created: dict[str, int] = {}
        self.lock = threading.Lock()
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self._local = threading.local()
        self.max_loaded = max_loaded
        for m in models:
            self.add(m, ref_for(m))

    def add(self, model_id: str, ref: ModelRef) -> None:
        with self.lock:
            self.refs[model_id] = ref
            self.created.setdefault(model_id, int(time.time()))

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.refs)

    def ref(self, model_id: str) -> ModelRef:
        with self.lock:
            if model_id not in self.refs:
                raise NotFound(f"The model '{model_id}' does not exist; available: {', '.join(self.refs)}")
            return self.refs[model_id]

    def model_object(self, model_id: str) -> dict:
        ref = self.ref(model_id)
        return {
            "id": model_id,
            "object": "model",
            "created": self.created[model_id],
            "owned_by": "sublab" if ref.kind == "base" else "sublab-finetune",
        }

    def backend(self, model_id: str):
        """The loaded HF backend of a model (loads it; evicts the least recently used beyond max_loaded)."""
        ref = self.ref(model_id)
        if model_id in self._loaded:
            self._loaded.move_to_end(model_id)
            return self._loaded[model_id]
        from sublab.backends.hf import HFBackend

        backend = HFBackend(ref, progress=False)
        self._loaded[model_id] = backend
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return backend

    def tokenizer(self, model_id: str) -> tuple:
        """(tokenizer, context length, system prompt) of a model, for checking requests; this thread's
        own instance, loaded the way the backend loads it."""
        ref = self.ref(model_id)
        cache = getattr(self._local, "tokenizers", None)
        if cache is None:
            cache = self._local.tokenizers = OrderedDict()
        if model_id in cache:
            cache.move_to_end(model_id)
            return cache[model_id]
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ref.path)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        cfg = AutoConfig.from_pretrained(ref.path)
        context = next(
            (
                int(v)
                for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                if isinstance(v := getattr(cfg, k, None), int) and v > 0
            ),
            DEFAULT_CONTEXT,
        )
        entry = (tok, min(context, DEFAULT_CONTEXT * 32), ref.system_prompt)
        cache[model_id] = entry
        while len(cache) > 4 * self.max_loaded:
            cache.popitem(last=False)
        return entry
