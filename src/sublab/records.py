"""JSONL chat records and atomic file I/O.

Every file sublab writes goes through `atomic_write_*`: the content is written to a temp file in the
same folder and renamed over the target, so a killed process never leaves a partial file that looks
complete. `read_jsonl` names the file and line of any malformed record.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
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


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records as JSON lines and flush them to disk (fsync) before returning: an append-only
    cache whose lines survive a crash right after the call."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SublabError(f"file not found: {path} (check the path, or run the stage that writes it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SublabError(f"{path}: not valid JSON ({e}); fix or delete the file and rerun") from None


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
_MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_type(v: Any) -> str:
    """How a JSON value is called in an error message ('an array', 'a string', ...)."""
    return _JSON_TYPES.get(type(v), "a number" if isinstance(v, int | float) else type(v).__name__)


def _structure_problem(rec: Any) -> str | None:
    """Nesting deeper than _MAX_DEPTH, or a lone surrogate in any string (not valid Unicode, so it could
    never be written back as UTF-8)."""
    stack: list[tuple[Any, int, str]] = [(rec, 0, "")]
    while stack:
        obj, depth, loc = stack.pop()
        if depth > _MAX_DEPTH:
            return f"JSON nested deeper than {_MAX_DEPTH} levels"
        if isinstance(obj, str):
            m = _SURROGATE.search(obj)
            if m:
                return f"a lone surrogate \\u{ord(m.group()):04x} in the text at {loc or 'top level'}"
        elif isinstance(obj, dict):
            for k, v in obj.items():
                stack.append((k, depth + 1, f"{loc}.{ascii(k)[1:-1]} (key)"))
                stack.append((v, depth + 1, f"{loc}.{ascii(k)[1:-1]}"))
        elif isinstance(obj, list):
            stack.extend((v, depth + 1, f"{loc}[{j}]") for j, v in enumerate(obj))
    return None


def _parse_line(raw: bytes, where: str) -> dict:
    """One JSONL line -> a JSON object, or a SublabError naming file:line, the problem and the fix."""
    fix = "fix or remove that line and rerun"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SublabError(
            f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
            "convert the file to UTF-8 and rerun"
        ) from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise SublabError(
            f"{where}: malformed JSONL line ({e.msg} at column {e.colno}); each line must be one JSON object - {fix}"
        ) from None
    except RecursionError:
        raise SublabError(f"{where}: JSON nested too deeply to read; {fix}") from None
    except ValueError as e:  # e.g. an integer beyond Python's int-string conversion limit
        what = (
            f"a JSON number with more than {sys.get_int_max_str_digits()} digits"
            if "integer string conversion" in str(e)
            else f"unreadable JSON ({str(e).splitlines()[0][:100]})"
        )
        raise SublabError(f"{where}: {what}; {fix}") from None
    if not isinstance(rec, dict):
        raise SublabError(f"{where}: expected a JSON object (a chat record), got {json_type(rec)}; {fix}")
    problem = _structure_problem(rec)
    if problem:
        raise SublabError(f"{where}: {problem}; {fix}")
    if "metadata" in rec and not isinstance(rec["metadata"], dict):
        raise SublabError(
            f"{where}: 'metadata' must be a JSON object, got {json_type(rec['metadata'])}; {fix}"
        )
    return rec


def read_jsonl(
    path: str | Path, require_messages: bool = False, check: Callable[[dict], str | None] | None = None
) -> list[dict]:
    """Read a JSONL file, each line one JSON object, strictly: text that is not UTF-8, malformed or too
    deeply nested JSON, huge numbers, lone surrogates and non-object `metadata` are SublabErrors that
    name file:line and the fix. `require_messages`: each record must be a chat record. `check`: a
    caller's own rule, returning a problem (named with file:line) or None."""
    path = Path(path)
    if not path.is_file():
        raise SublabError(f"file not found: {path} (check the path, or run the stage that writes it)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SublabError(f"cannot read {path}: {e.strerror or e}; check its permissions") from None
    out: list[dict] = []
    for i, raw in enumerate(data.splitlines(), start=1):
        if i == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            continue
        where = f"{path}:{i}"
        rec = _parse_line(raw, where)
        if require_messages:
            try:
                validate_chat_record(rec, where)
            except SublabError as e:
                raise SublabError(f"{e}; fix or remove that line and rerun") from None
        if check is not None and (problem := check(rec)):
            raise SublabError(f"{where}: {problem}; fix or remove that line and rerun")
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
