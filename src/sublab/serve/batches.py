"""The Batch API of `sublab serve`: an uploaded JSONL of chat completion requests
({"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}) is run through the engine in a
background thread; the answers land in an output file (and failures in an error file), one line each,
in the official shape. Batch objects persist under <state-dir>/batches/.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path

from sublab.records import atomic_write_json, read_json
from sublab.serve.chat import ApiError, chat_job, completion_object
from sublab.serve.store import NotFound, new_id


class BatchManager:
    def __init__(self, state_dir: Path, files, models, engine):
        self.root = Path(state_dir) / "batches"
        self.root.mkdir(parents=True, exist_ok=True)
        self.files, self.models, self.engine = files, models, engine
        self.lock = threading.RLock()

    def get(self, batch_id: str) -> dict:
        p = self.root / f"{batch_id}.json"
        if "/" in batch_id or not p.is_file():
            raise NotFound(f"No batch found with id {batch_id}")
        return read_json(p)

    def _update(self, batch_id: str, **fields) -> dict:
        with self.lock:
            b = {**self.get(batch_id), **fields}
            atomic_write_json(self.root / f"{batch_id}.json", b)
            return b

    def list(self) -> list[dict]:
        objs = [read_json(p) for p in self.root.glob("*.json")]
        return sorted(objs, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def create(self, body: dict) -> dict:
        if body.get("endpoint") != "/v1/chat/completions":
            raise ApiError(
                400, "sublab serve batches support endpoint /v1/chat/completions only", None, "endpoint"
            )
        fid = body.get("input_file_id")
        try:
            self.files.get(str(fid))
        except NotFound:
            raise ApiError(400, f"input_file_id {fid!r} not found", None, "input_file_id") from None
        now = int(time.time())
        b = {
            "id": new_id("batch"),
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": fid,
            "completion_window": body.get("completion_window", "24h"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        atomic_write_json(self.root / f"{b['id']}.json", b)
        threading.Thread(target=self._run, args=(b["id"],), name="sublab-batch", daemon=True).start()
        return b

    def cancel(self, batch_id: str) -> dict:
        b = self.get(batch_id)
        if b["status"] in ("completed", "failed", "cancelled", "expired"):
            return b
        return self._update(batch_id, status="cancelling", cancelling_at=int(time.time()))

    def _run(self, batch_id: str) -> None:
        try:
            self._process(batch_id)
        except Exception as e:
            self._update(
                batch_id,
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": "batch_failed", "message": str(e)[:500]}]},
            )

    def _process(self, batch_id: str) -> None:
        b = self.get(batch_id)
        lines = [
            ln for ln in self.files.content(b["input_file_id"]).decode("utf-8").splitlines() if ln.strip()
        ]
        reqs = []
        for i, line in enumerate(lines, start=1):
            try:
                r = json.loads(line)
                assert (
                    isinstance(r, dict)
                    and isinstance(r.get("custom_id"), str)
                    and isinstance(r.get("body"), dict)
                )
            except (json.JSONDecodeError, AssertionError):
                raise ValueError(f"input line {i}: expected {{custom_id, method, url, body}}") from None
            reqs.append(r)
        ids = [r["custom_id"] for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError("custom_id values must be unique within a batch")
        self._update(
            batch_id,
            status="in_progress",
            in_progress_at=int(time.time()),
            request_counts={"total": len(reqs), "completed": 0, "failed": 0},
        )
        pending = []
        for r in reqs:
            try:
                if r.get("url") not in (None, "/v1/chat/completions"):
                    raise ApiError(400, f"url must be /v1/chat/completions, got {r.get('url')!r}")
                job = chat_job(r["body"], self.models)
                pending.append((r, job, self.engine.submit(job)))
            except ApiError as e:
                pending.append((r, e, None))
        out, err = [], []
        for r, job, fut in pending:
            if self.get(batch_id)["status"] == "cancelling":
                break
            line = {"id": f"batch_req_{secrets.token_hex(8)}", "custom_id": r["custom_id"], "error": None}
            try:
                if fut is None:
                    raise job
                body = completion_object(job, fut.result())
                out.append({**line, "response": {"status_code": 200, "request_id": body["id"], "body": body}})
            except ApiError as e:
                err.append(
                    {**line, "response": {"status_code": e.status, "request_id": None, "body": e.body()}}
                )
            except Exception as e:
                body = ApiError(500, f"generation failed: {e}").body()
                err.append({**line, "response": {"status_code": 500, "request_id": None, "body": body}})
        counts = {"total": len(reqs), "completed": len(out), "failed": len(err)}
        with self.lock:
            cancelled = self.get(batch_id)["status"] == "cancelling"
            self._update(
                batch_id,
                request_counts=counts,
                finalizing_at=int(time.time()),
                **({} if cancelled else {"status": "finalizing"}),
            )
        out_id = (
            self.files.add(_jsonl(out), f"{batch_id}_output.jsonl", "batch_output")["id"] if out else None
        )
        err_id = (
            self.files.add(_jsonl(err), f"{batch_id}_errors.jsonl", "batch_output")["id"] if err else None
        )
        if cancelled:
            self._update(
                batch_id,
                status="cancelled",
                cancelled_at=int(time.time()),
                output_file_id=out_id,
                error_file_id=err_id,
            )
            return
        self._update(
            batch_id,
            status="completed",
            completed_at=int(time.time()),
            output_file_id=out_id,
            error_file_id=err_id,
        )


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
