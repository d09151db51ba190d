"""Creating a file, a fine-tuning job or a batch exactly once, however often a client retries.

- `Idempotency-Key: <key>` (OpenAI's header): the first request with a key creates the object; a later
  request with the same key (from the same caller) gets that object back instead of a second one (its
  current state), and one with the same key but other parameters is a 400. Keys are kept in
  <state-dir>/idempotency/ for 24 hours, so a retry after a server restart is recognised too.
- No key (the official Python client sends none by default): when a create's response never reached
  the client (the connection dropped before the body went out), the object is remembered for 10
  minutes; a retry of the same request (`x-stainless-retry-count` > 0, which the official clients send)
  with the same content gets that object back. A first try is never matched, so two deliberate
  identical creates still make two objects.

The caller is told apart by a hash of its Authorization header, so one caller's key never returns
another caller's object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path

from sublab.records import atomic_write_json

KEY_TTL_S = 86400.0
UNDELIVERED_TTL_S = 600.0
MAX_KEY_LEN = 255


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


class Idempotency:
    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "idempotency"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._undelivered: dict[tuple, tuple[str, float]] = {}
        self.stats = {"replayed_key": 0, "replayed_retry": 0}
        now = time.time()
        for p in self.root.glob("*.json"):  # forget expired keys
            try:
                if now - p.stat().st_mtime > KEY_TTL_S:
                    p.unlink(missing_ok=True)
            except OSError:
                pass

    @staticmethod
    def caller(authorization: str) -> str:
        return hashlib.sha256(authorization.encode("utf-8", "replace")).hexdigest()[:16]

    def _path(self, caller: str, key: str) -> Path:
        return self.root / f"{fingerprint(caller, key)[:40]}.json"

    def key_lock(self, caller: str, key: str) -> asyncio.Lock:
        """One request per key at a time (a retry that arrives while the first try still runs waits)."""
        k = f"{caller}:{key}"
        if k not in self._locks:
            if len(self._locks) > 10000:
                self._locks = {a: b for a, b in self._locks.items() if b.locked()}
            self._locks[k] = asyncio.Lock()
        return self._locks[k]

    def lookup(self, caller: str, key: str) -> dict | None:
        p = self._path(caller, key)
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if time.time() - rec.get("created", 0) > KEY_TTL_S:
            return None
        return rec

    def remember(self, caller: str, key: str, kind: str, fp: str, obj: dict) -> None:
        rec = {"kind": kind, "fingerprint": fp, "id": obj["id"], "response": obj, "created": time.time()}
        atomic_write_json(self._path(caller, key), rec)

    # ---- requests without a key ------------------------------------------------------------------

    def undelivered(self, caller: str, kind: str, fp: str, object_id: str) -> None:
        now = time.time()
        with self.lock:
            self._undelivered = {k: v for k, v in self._undelivered.items() if now - v[1] < UNDELIVERED_TTL_S}
            self._undelivered[(caller, kind, fp)] = (object_id, now)

    def claim_undelivered(self, caller: str, kind: str, fp: str) -> str | None:
        with self.lock:
            hit = self._undelivered.pop((caller, kind, fp), None)
        if hit is None or time.time() - hit[1] > UNDELIVERED_TTL_S:
            return None
        return hit[0]
