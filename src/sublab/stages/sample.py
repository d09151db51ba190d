"""Sample stage: a model answers every prompt once -> chat records (raw.jsonl).

Resumable: finished chunks of `chunk` prompts are kept in <out>.parts/ until the whole file is written.
The parts folder is stamped with the model, the sampling settings, the prompts' hash and the chunk size,
so leftover chunks of another prompt file or chunking are discarded, never spliced into new data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sublab.backends.base import ModelRef, request_seed
from sublab.backends.registry import load_backend
from sublab.errors import SublabError
from sublab.records import (
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    read_jsonl,
    sha256_file,
    write_jsonl,
)
from sublab.schema.sampling import SamplingParams

SAMPLE_CHUNK = 2048  # prompts per resumable sampling chunk


def read_prompts(path: Path) -> list[dict]:
    """Prompt records: {"messages": [...user...], "metadata": {...}}; prompt_index defaults to the line."""
    out = []
    for i, rec in enumerate(read_jsonl(path)):
        msgs = rec.get("messages")
        if (
            not isinstance(msgs, list)
            or not msgs
            or not isinstance(msgs[-1], dict)
            or msgs[-1].get("role") != "user"
        ):
            raise SublabError(f"{path}: record {i + 1} needs a 'messages' list ending with a user message")
        meta = dict(rec.get("metadata") or {})  # read_jsonl checked that it is an object
        meta.setdefault("prompt_index", i)
        out.append({"messages": msgs, "metadata": meta})
    return out


def sample_dataset(
    model_json: Path,
    prompts_path: Path,
    out_path: Path,
    sampling: SamplingParams,
    label: str,
    progress: bool = True,
    api=None,
    chunk: int | None = None,
) -> int:
    """The model answers every prompt once; returns the number of records written to `out_path`.
    `chunk`: prompts per resumable chunk (default SAMPLE_CHUNK)."""
    chunk = chunk or SAMPLE_CHUNK
    ref = ModelRef.load(model_json)
    prompts = read_prompts(prompts_path)
    parts = out_path.with_name(out_path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    stamp = {
        "model": ref.model_dump(),
        "sampling": sampling.model_dump(),
        "n": len(prompts),
        "prompts_sha256": sha256_file(prompts_path),
        "chunk": chunk,
    }
    stamp_path = parts / "stamp.json"
    if stamp_path.is_file() and stamp_path.read_text() != dumps_json(stamp):
        shutil.rmtree(parts)
        parts.mkdir(parents=True)
    atomic_write_text(stamp_path, dumps_json(stamp))
    backend = None
    records: list[dict] = []
    for c in range(0, len(prompts), chunk):
        part = parts / f"part-{c // chunk:05d}.jsonl"
        if not part.is_file():
            if backend is None:
                backend = load_backend(ref, progress, api=api)
                if hasattr(backend, "estimate_cost"):  # API models: tokens x prices, before anything is spent
                    todo = [p["messages"] for p in prompts[c:]]
                    cost = backend.estimate_cost(todo, sampling)
                    atomic_write_json(out_path.with_name(out_path.stem + ".cost.json"), cost)
            batch = prompts[c : c + chunk]
            ids = [p["metadata"]["prompt_index"] for p in batch]
            answers = backend.generate([p["messages"] for p in batch], sampling, request_ids=ids)
            recs = [
                {
                    "messages": [*p["messages"], {"role": "assistant", "content": a}],
                    "metadata": {
                        **p["metadata"],
                        "model": label,
                        "model_parent": ref.parent or ref.spec,
                        "system_prompt": ref.system_prompt,
                        "seed": request_seed(sampling.seed, i),
                        "sample_index": 0,
                        "temperature": sampling.temperature,
                    },
                }
                for p, a, i in zip(batch, answers, ids, strict=True)
            ]
            write_jsonl(part, recs)
        records += read_jsonl(part)
    write_jsonl(out_path, records)
    shutil.rmtree(parts)
    return len(records)
