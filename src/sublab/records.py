"""JSONL chat records and atomic file I/O.

Every file sublab writes goes through `atomic_write_*`: the content is written to a temp file in the
same folder and renamed over the target, so a killed process never leaves a partial file that looks
complete. `read_jsonl` names the file and line of any malformed record.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sublab.errors import SublabError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys) so identical results give byte-identical files."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SublabError(f"file not found: {path} (check the path, or run the stage that writes it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SublabError(f"{path}: not valid JSON ({e}); fix or delete the file and rerun") from None


def read_jsonl(path: str | Path, require_messages: bool = False) -> list[dict]:
    """Read a JSONL file; each line one JSON object. Errors name file and line number."""
    path = Path(path)
    if not path.is_file():
        raise SublabError(f"file not found: {path} (check the path, or run the stage that writes it)")
    out: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SublabError(
                    f"{path}:{i}: malformed JSONL line ({e.msg}); each line must be one JSON object - "
                    "fix or remove that line"
                ) from None
            if not isinstance(rec, dict):
                raise SublabError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            if require_messages:
                validate_chat_record(rec, f"{path}:{i}")
            out.append(rec)
    return out


def validate_chat_record(rec: dict, where: str) -> None:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise SublabError(f"{where}: record has no 'messages' list (expected {{\"messages\": [...]}})")
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise SublabError(f"{where}: each message needs string 'role' and 'content', got {m!r}")
    if msgs[-1]["role"] != "assistant":
        raise SublabError(f"{where}: the last message must be the assistant's completion")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
