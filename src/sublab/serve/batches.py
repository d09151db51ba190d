"""The Batch API of `sublab serve`: an uploaded JSONL of chat completion requests
({"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}) is run through the engine in a
background thread; the answers land in an output file (and failures in an error file), one line each,
in the official shape. Batch objects persist under <state-dir>/batches/.

- Validation (status `validating`): every line must be a JSON object with a unique string custom_id and
  an object body, at most --max-batch-requests lines, else the batch fails with the line named. A line
  whose request is bad (a parameter out of range, a prompt over the limit, ...) fails alone: it gets a
  400 line in the error file, the others run.
- Work: at most --max-batch sequences of one batch are in the engine at a time, so chat requests from
  other clients interleave with a large batch. Each finished line is appended to a work file at once.
- Cancel: the requests in flight are cancelled, nothing new is sent; the batch ends `cancelled` with the
  lines finished so far.
- Restart: a batch the server stopped in resumes where its work files end (the finished lines are
  kept); one the server stopped in three times fails with that reason; a `cancelling` one ends
  `cancelled`. A batch past its expires_at (the 24h completion window) ends `expired`.
- At most --max-active-batches batches are unfinished at a time (429 beyond).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from collections import deque
from pathlib import Path

from sublab.records import atomic_write_json, read_json
from sublab.serve.chat import ApiError, completion_object
from sublab.serve.engine import Cancelled
from sublab.serve.jobs import check_metadata
from sublab.serve.jsonbody import parse_json
from sublab.serve.store import NotFound, new_id, valid_id

log = logging.getLogger("sublab.serve")
FINAL = ("completed", "failed", "cancelled", "expired")
RUNNING = ("validating", "in_progress", "finalizing")
MAX_STARTS = 3


class _Stop(Exception):
    """The batch was cancelled or expired while it ran."""


class BatchManager:
    def __init__(
        self,
        state_dir: Path,
        files,
        models,
        engine,
        check=None,
        window: int = 256,
        max_requests: int = 50_000,
        max_active: int = 8,
    ):
        self.root = Path(state_dir) / "batches"
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.files, self.models, self.engine = files, models, engine
        self.check_request = check
        self.window, self.max_requests, self.max_active = window, max_requests, max_active
        self.lock = threading.RLock()
        self.cancels: dict[str, threading.Event] = {}
        self.inflight: dict[str, deque] = {}  # each running batch's requests in the engine
        self.resumed = 0
        for b in self.list():
            if b["status"] in RUNNING:
                self._resume(b)
            elif b["status"] == "cancelling":
                self._start(b["id"])  # finishes as cancelled with what it had

    # ---- state ---------------------------------------------------------------------------------

    def get(self, batch_id: str) -> dict:
        p = self.root / f"{batch_id}.json"
        if not valid_id(batch_id) or not p.is_file():
            raise NotFound(f"No batch found with id {batch_id if valid_id(batch_id) else '(not a batch id)'}")
        return read_json(p)

    def _update(self, batch_id: str, **fields) -> dict:
        with self.lock:
            b = {**self.get(batch_id), **fields}
            atomic_write_json(self.root / f"{batch_id}.json", b)
            return b

    def list(self) -> list[dict]:
        objs = []
        for p in self.root.glob("*.json"):
            try:
                objs.append(read_json(p))
            except Exception:
                continue
        return sorted(objs, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def active(self) -> int:
        return sum(b["status"] not in FINAL for b in self.list())

    def _server_state(self, batch_id: str) -> dict:
        try:
            return json.loads((self.work / batch_id / "server.json").read_text())
        except (OSError, ValueError):
            return {}

    def _resume(self, b: dict) -> None:
        starts = self._server_state(b["id"]).get("starts", 0)
        if starts >= MAX_STARTS:
            self._fail(
                b["id"],
                "server_restarted",
                f"the server stopped during this batch {starts} times; not retried",
            )
            return
        self.resumed += 1
        self._start(b["id"])

    # ---- API -------------------------------------------------------------------------------------

    def check(self, body: dict) -> dict:
        if body.get("endpoint") != "/v1/chat/completions":
            raise ApiError(
                400, "sublab serve batches support endpoint /v1/chat/completions only", None, "endpoint"
            )
        fid = body.get("input_file_id")
        if not isinstance(fid, str):
            raise ApiError(
                400, "'input_file_id' (a file id) is required", "missing_required_parameter", "input_file_id"
            )
        try:
            self.files.get(fid)
        except NotFound:
            raise ApiError(400, f"input_file_id {fid[:80]!r} not found", None, "input_file_id") from None
        window = body.get("completion_window", "24h")
        if window != "24h":
            raise ApiError(400, "completion_window must be '24h'", "invalid_value", "completion_window")
        meta = check_metadata(body.get("metadata"))
        if self.active() >= self.max_active:
            raise ApiError(
                429,
                f"{self.max_active} batches are already unfinished; retry later",
                "rate_limit_exceeded",
                headers={"retry-after": "10"},
            )
        return {"input_file_id": fid, "metadata": meta}

    def create(self, spec: dict) -> dict:
        now = int(time.time())
        b = {
            "id": new_id("batch"),
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": spec["input_file_id"],
            "completion_window": "24h",
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
            "metadata": spec["metadata"],
        }
        atomic_write_json(self.root / f"{b['id']}.json", b)
        self._start(b["id"])
        return b

    def cancel(self, batch_id: str) -> dict:
        with self.lock:
            b = self.get(batch_id)
            if b["status"] in FINAL or b["status"] == "cancelling":
                return b
            b = self._update(batch_id, status="cancelling", cancelling_at=int(time.time()))
            self.cancels.setdefault(batch_id, threading.Event()).set()
            for _, job, _ in list(self.inflight.get(batch_id, ())):  # the engine drops or stops them now
                job.cancel()
        return b

    # ---- the worker ----------------------------------------------------------------------------

    def _start(self, batch_id: str) -> None:
        with self.lock:
            self.cancels.setdefault(batch_id, threading.Event())
        threading.Thread(target=self._run, args=(batch_id,), name="sublab-batch", daemon=True).start()

    def _fail(self, batch_id: str, code: str, message: str, line: int | None = None) -> None:
        err = {"code": code, "message": message[:500], "param": None, "line": line}
        self._update(
            batch_id,
            status="failed",
            failed_at=int(time.time()),
            errors={"object": "list", "data": [err]},
        )
        shutil.rmtree(self.work / batch_id, ignore_errors=True)

    def _run(self, batch_id: str) -> None:
        try:
            self._process(batch_id)
        except _BadInput as e:
            self._fail(batch_id, "invalid_input", str(e), e.line)
        except Exception as e:
            log.warning("batch %s failed: %s", batch_id, type(e).__name__)
            self._fail(
                batch_id,
                "batch_failed",
                f"the batch failed ({type(e).__name__}); the server log has the detail",
            )
        finally:
            with self.lock:
                self.cancels.pop(batch_id, None)
                self.inflight.pop(batch_id, None)

    def _lines(self, b: dict):
        """(line number, parsed line) for each non-blank line of the input file, streamed."""
        with self.files.path(b["input_file_id"]).open("rb") as f:
            for i, raw in enumerate(f, start=1):
                if raw.strip():
                    yield i, raw

    def _validate(self, b: dict) -> int:
        seen: set[str] = set()
        n = 0
        for i, raw in self._lines(b):
            try:
                r = parse_json(raw, f"line {i}")
            except ApiError as e:
                raise _BadInput(e.message, i) from None
            if not (
                isinstance(r, dict)
                and isinstance(r.get("custom_id"), str)
                and isinstance(r.get("body"), dict)
            ):
                raise _BadInput(
                    f"line {i}: expected {{custom_id (a string), method, url, body (an object)}}", i
                )
            if r["custom_id"] in seen:
                raise _BadInput(f"line {i}: custom_id values must be unique within a batch", i)
            seen.add(r["custom_id"])
            n += 1
            if n > self.max_requests:
                raise _BadInput(f"a batch holds at most {self.max_requests} requests", i)
        if n == 0:
            raise _BadInput("the input file has no requests", None)
        return n

    def _done(self, batch_id: str) -> set[str]:
        """custom_ids already answered in the work files (a half-written last line is cut off)."""
        done: set[str] = set()
        for name in ("out.jsonl", "err.jsonl"):
            p = self.work / batch_id / name
            if not p.is_file():
                continue
            data = p.read_bytes()
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
                with p.open("r+b") as f:
                    f.truncate(len(data))
            for raw in data.splitlines():
                try:
                    done.add(json.loads(raw)["custom_id"])
                except (ValueError, KeyError, TypeError):
                    continue
        return done

    def _process(self, batch_id: str) -> None:
        b = self.get(batch_id)
        stop = self.cancels[batch_id]
        wdir = self.work / batch_id
        wdir.mkdir(parents=True, exist_ok=True)
        state = self._server_state(batch_id)
        atomic_write_json(wdir / "server.json", {**state, "starts": state.get("starts", 0) + 1})
        if b["status"] == "cancelling":
            return self._finish(batch_id, "cancelled")
        total = self._validate(b)
        done = self._done(batch_id)
        counts = {"total": total, "completed": 0, "failed": 0}
        for name, key in (("out.jsonl", "completed"), ("err.jsonl", "failed")):
            p = wdir / name
            counts[key] = sum(1 for ln in p.read_bytes().splitlines() if ln.strip()) if p.is_file() else 0
        self._update(
            batch_id,
            status="in_progress",
            in_progress_at=b["in_progress_at"] or int(time.time()),
            request_counts=counts,
        )
        out = (wdir / "out.jsonl").open("a", encoding="utf-8")
        err = (wdir / "err.jsonl").open("a", encoding="utf-8")
        inflight: deque = deque()  # (custom_id, job, future)
        self.inflight[batch_id] = inflight
        in_engine = 0
        last = time.monotonic()

        def write(cid: str, status: int, body: dict) -> None:
            line = {
                "id": f"batch_req_{secrets.token_hex(8)}",
                "custom_id": cid,
                "response": {
                    "status_code": status,
                    "request_id": body.get("id") if status == 200 else None,
                    "body": body,
                },
                "error": None,
            }
            f = out if status == 200 else err
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            counts["completed" if status == 200 else "failed"] += 1

        def settle_one() -> None:
            """Wait for the oldest request in flight (it stays in `inflight`, so a cancel reaches it)."""
            nonlocal in_engine
            cid, job, fut = inflight[0]
            while True:
                if stop.is_set() or time.time() > b["expires_at"]:
                    raise _Stop
                try:
                    result = fut.result(timeout=0.2)
                    break
                except TimeoutError:
                    continue
                except Cancelled:
                    raise _Stop from None
                except Exception as e:
                    ref = secrets.token_hex(4)
                    log.warning("batch %s line %s failed [%s]: %s", batch_id, cid, ref, type(e).__name__)
                    result = ApiError(500, f"generation failed (ref {ref})")
                    break
            inflight.popleft()
            in_engine -= len(job.seeds)
            if isinstance(result, ApiError):
                write(cid, 500, result.body())
            else:
                write(cid, 200, completion_object(job, result))

        try:
            for _, raw in self._lines(b):
                if stop.is_set() or time.time() > b["expires_at"]:
                    raise _Stop
                r = json.loads(raw)
                cid = r["custom_id"]
                if cid in done:
                    continue
                try:
                    if r.get("url") not in (None, "/v1/chat/completions"):
                        raise ApiError(400, "url must be /v1/chat/completions", "invalid_value", "url")
                    job = self.check_request(r["body"])
                except ApiError as e:
                    write(cid, e.status, e.body())
                    continue
                inflight.append((cid, job, self.engine.submit(job, force=True)))
                in_engine += len(job.seeds)
                while in_engine >= self.window:
                    settle_one()
                if time.monotonic() - last > 1.0:
                    self._update(batch_id, request_counts=dict(counts))
                    last = time.monotonic()
            while inflight:
                settle_one()
        except _Stop:
            for _, job, _ in inflight:
                job.cancel()
            out.close()
            err.close()
            self._update(batch_id, request_counts=dict(counts))
            expired = not stop.is_set()
            return self._finish(batch_id, "expired" if expired else "cancelled")
        out.close()
        err.close()
        with self.lock:
            if self.get(batch_id)["status"] == "cancelling":
                return self._finish(batch_id, "cancelled")
            self._update(
                batch_id, status="finalizing", finalizing_at=int(time.time()), request_counts=dict(counts)
            )
        self._finish(batch_id, "completed")

    def _finish(self, batch_id: str, status: str) -> None:
        """Move the work files into output / error files and set the final status."""
        wdir = self.work / batch_id
        ids = {}
        for name, key, suffix in (
            ("out.jsonl", "output_file_id", "output"),
            ("err.jsonl", "error_file_id", "errors"),
        ):
            p = wdir / name
            if p.is_file() and p.stat().st_size:
                ids[key] = self.files.add(p.read_bytes(), f"{batch_id}_{suffix}.jsonl", "batch_output")["id"]
        now = int(time.time())
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]
        self._update(batch_id, status=status, **{stamp: now}, **ids)
        shutil.rmtree(wdir, ignore_errors=True)


class _BadInput(Exception):
    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.line = line
