"""Uploaded files and the server's small JSON state, kept under --state-dir so jobs and files survive a
client restart (and a server restart, when the same --state-dir is given again)."""

from __future__ import annotations

import re
import secrets
import threading
import time
from pathlib import Path

from sublab.records import atomic_write_bytes, atomic_write_json, read_json

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def valid_id(s: str) -> bool:
    """Ids the server makes are [A-Za-z0-9_-]; anything else is not one of ours (and never a path)."""
    return isinstance(s, str) and _ID.fullmatch(s) is not None


class NotFound(Exception):
    """An id the server does not know (-> 404)."""


class FileStore:
    """OpenAI-shaped file objects: <state>/files/<id>.json (metadata) + <id>.data (content)."""

    def __init__(self, root: Path):
        self.root = Path(root) / "files"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def add(self, data: bytes, filename: str, purpose: str) -> dict:
        fid = new_id("file")
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        with self.lock:
            atomic_write_bytes(self.root / f"{fid}.data", data)
            atomic_write_json(self.root / f"{fid}.json", obj)
        return obj

    def get(self, fid: str) -> dict:
        if not valid_id(fid) or not (self.root / f"{fid}.json").is_file():
            raise NotFound(f"No such File object: {fid if valid_id(fid) else '(not a file id)'}")
        return read_json(self.root / f"{fid}.json")

    def content(self, fid: str) -> bytes:
        return self.path(fid).read_bytes()

    def path(self, fid: str) -> Path:
        """Where a file's content is (read it line by line instead of all at once)."""
        self.get(fid)
        return self.root / f"{fid}.data"

    def list(self, purpose: str | None = None) -> list[dict]:
        objs = [read_json(p) for p in self.root.glob("*.json")]
        objs = [o for o in objs if purpose is None or o["purpose"] == purpose]
        return sorted(objs, key=lambda o: (o["created_at"], o["id"]))

    def delete(self, fid: str) -> dict:
        self.get(fid)
        with self.lock:
            (self.root / f"{fid}.json").unlink(missing_ok=True)
            (self.root / f"{fid}.data").unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}
