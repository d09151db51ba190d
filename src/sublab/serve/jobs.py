"""Fine-tuning jobs of `sublab serve`: the OpenAI job API over the local backend's finetune.

A job's hyperparameters map onto sublab's TrainConfig: epochs = n_epochs, batch_size = batch_size,
lr = learning_rate_multiplier x the server's --base-lr (constant schedule, sublab's default), seed = seed;
"auto" means 3 epochs, batch 16, multiplier 1. The ranges are OpenAI's: n_epochs 1..50 (--max-epochs),
batch_size 1..256, learning_rate_multiplier in (0, 10]. At most --max-queued-jobs jobs are queued or
running (429 beyond).

One job runs at a time in a background thread; each job is a folder under <state-dir>/jobs/<id>/
(job.json, events.jsonl, the trained model), so a job and its result outlive the client that created
it. Cancelling a running job stops its training at the next forward pass (a forward hook raises in the
job's thread): nothing is written and the worker takes the next job. A restarted server runs again the
jobs that were queued or running (the event log says so); a job the server died in three times fails
with that reason. The result becomes a servable model id `ft:<base>:<suffix>:<job id>`.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import shutil
import threading
import time
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.records import atomic_write_json, read_json, read_jsonl
from sublab.schema.train import TrainConfig
from sublab.serve.chat import _SURROGATE, INT64, ApiError
from sublab.serve.store import NotFound, new_id, valid_id

log = logging.getLogger("sublab.serve")
ACTIVE = ("validating_files", "queued", "running")
AUTO = {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 1.0}
MAX_STARTS = 3  # a job the server stopped in this many times fails instead of running again


class JobCancelled(Exception):
    """Raised inside the training loop when the running job is cancelled."""


def _object(v, name: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ApiError(400, f"'{name}' must be an object", "invalid_type", name)
    return v


def check_metadata(v) -> dict | None:
    """OpenAI's metadata: at most 16 string pairs, keys <= 64 and values <= 512 characters."""
    if v is None:
        return None
    if (
        not isinstance(v, dict)
        or len(v) > 16
        or not all(
            isinstance(k, str) and isinstance(x, str) and len(k) <= 64 and len(x) <= 512 for k, x in v.items()
        )
    ):
        raise ApiError(
            400,
            "'metadata' must be an object of at most 16 strings (keys <= 64, values <= 512 characters)",
            "invalid_value",
            "metadata",
        )
    return v


def _hyper(body: dict, max_epochs: int) -> dict:
    hp = _object(body.get("hyperparameters"), "hyperparameters")
    method = _object(body.get("method"), "method")
    if method:
        if method.get("type", "supervised") != "supervised":
            raise ApiError(400, "only method.type 'supervised' is supported", "invalid_value", "method")
        sup = _object(method.get("supervised"), "method.supervised")
        hp = {**hp, **_object(sup.get("hyperparameters"), "method.supervised.hyperparameters")}
    ranges = {
        "n_epochs": (int, 1, max_epochs),
        "batch_size": (int, 1, 256),
        "learning_rate_multiplier": (float, 0, 10),
    }
    out = {}
    for key, (kind, lo, hi) in ranges.items():
        v = hp.get(key, "auto")
        if v == "auto" or v is None:
            out[key] = "auto"
            continue
        ok = not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
        ok = ok and (v > 0 if kind is float else v == int(v)) and lo <= v <= hi
        if not ok:
            what = "an integer in" if kind is int else "a number in"
            rng = f"[{lo}, {hi}]" if kind is int else f"({lo}, {hi}]"
            raise ApiError(400, f"hyperparameters.{key} must be 'auto' or {what} {rng}", "invalid_value", key)
        out[key] = kind(v)
    return out


class JobManager:
    def __init__(
        self,
        state_dir: Path,
        files,
        models,
        base_lr: float = 3e-4,
        queue_delay_s: float = 0.0,
        max_epochs: int = 50,
        max_queued: int = 16,
    ):
        self.root = Path(state_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.files, self.models = files, models
        self.base_lr, self.queue_delay_s = base_lr, queue_delay_s
        self.max_epochs, self.max_queued = max_epochs, max_queued
        self.lock = threading.RLock()
        self.q: queue.Queue[str | None] = queue.Queue()
        self.created = 0  # jobs created since this server started (the reattach test counts them)
        self.running: str | None = None
        self.cancel_running = threading.Event()
        self._worker_ident: int | None = None
        for p in sorted(self.root.glob("*/job.json")):
            try:
                job = read_json(p)
            except Exception:  # an unreadable job.json (a disk problem): leave it out
                log.warning("skipping unreadable job state %s", p.parent.name)
                continue
            self._repair_events(p.parent / "events.jsonl")
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                self.models.add(job["fine_tuned_model"], ModelRef.load(p.parent / "out" / "model.json"))
            elif job["status"] in ACTIVE:  # the server stopped while it was queued or running
                self._recover(job)
        self.thread = threading.Thread(target=self._loop, name="sublab-finetune", daemon=True)
        self.thread.start()

    def _recover(self, job: dict) -> None:
        starts = self._server_state(job["id"]).get("starts", 0)
        if job["status"] == "running" and starts >= MAX_STARTS:
            self._finish_failed(
                job["id"],
                "server_restarted",
                f"the server stopped during this job {starts} times; not retried",
            )
            return
        self._update(job["id"], status="queued")
        if job["status"] == "running":
            self.event(job["id"], "The server restarted during training; the job is queued again")
        self.q.put(job["id"])

    @staticmethod
    def _repair_events(path: Path) -> None:
        """Cut a half-written last line (the server died while appending)."""
        try:
            data = path.read_bytes()
        except OSError:
            return
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    # ---- state ---------------------------------------------------------------------------------

    def _dir(self, job_id: str) -> Path:
        if not valid_id(job_id) or not (self.root / job_id / "job.json").is_file():
            raise NotFound(
                f"No fine-tuning job found with id {job_id if valid_id(job_id) else '(not a job id)'}"
            )
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        with self.lock:
            return read_json(self._dir(job_id) / "job.json")

    def _update(self, job_id: str, **fields) -> dict:
        with self.lock:
            job = {**self.get(job_id), **fields}
            atomic_write_json(self._dir(job_id) / "job.json", job)
            return job

    def _server_state(self, job_id: str) -> dict:
        p = self.root / job_id / "server.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> None:
        ev = {
            "object": "fine_tuning.job.event",
            "id": new_id("ftevent"),
            "created_at": int(time.time()),
            "level": level,
            "message": message,
            "data": data,
            "type": "metrics" if data else "message",
        }
        with self.lock, (self.root / job_id / "events.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(ev) + "\n")

    def events(self, job_id: str) -> list[dict]:
        """Newest first, like the official API. A line that cannot be read is left out."""
        path = self._dir(job_id) / "events.jsonl"
        if not path.is_file():
            return []
        out = []
        for raw in path.read_bytes().splitlines():
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            if isinstance(ev, dict):
                out.append(ev)
        return list(reversed(out))

    def list(self) -> list[dict]:
        jobs = []
        for p in self.root.glob("*/job.json"):
            try:
                jobs.append(read_json(p))
            except Exception:
                continue
        return sorted(jobs, key=lambda j: (j["created_at"], j["id"]), reverse=True)

    def active(self) -> int:
        return sum(j["status"] in ACTIVE for j in self.list())

    # ---- API -------------------------------------------------------------------------------------

    def check(self, body: dict) -> dict:
        """A create request's parameters, checked (ApiError 400 / 404 / 429) before anything is made."""
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models.ids():
            shown = model[:200] if isinstance(model, str) else model
            raise ApiError(
                404,
                f"The model '{shown}' does not exist; available: {', '.join(self.models.ids())}",
                "model_not_found",
                "model",
            )
        tf = body.get("training_file")
        if not isinstance(tf, str):
            raise ApiError(
                400, "'training_file' (a file id) is required", "missing_required_parameter", "training_file"
            )
        try:
            self.files.get(tf)
        except NotFound:
            raise ApiError(
                400,
                f"training_file {tf[:80]!r} not found; upload it with purpose fine-tune first",
                "invalid_training_file",
                "training_file",
            ) from None
        hp = _hyper(body, self.max_epochs)
        seed = body.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= INT64[1]
        ):
            raise ApiError(400, f"'seed' must be an integer in [0, {INT64[1]}]", "invalid_value", "seed")
        suffix = body.get("suffix") or None
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
            raise ApiError(
                400, "suffix must be a string of at most 64 characters without ':'", None, "suffix"
            )
        if self.active() >= self.max_queued:
            raise ApiError(
                429,
                f"{self.max_queued} fine-tuning jobs are already queued or running; retry later",
                "rate_limit_exceeded",
                headers={"retry-after": "10"},
            )
        return {
            "model": model,
            "training_file": tf,
            "hyperparameters": hp,
            "seed": seed if isinstance(seed, int) else 0,
            "suffix": suffix,
            "metadata": check_metadata(body.get("metadata")),
        }

    def create(self, spec: dict) -> dict:
        job_id = new_id("ftjob")
        hp = spec["hyperparameters"]
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": hp,
            "model": spec["model"],
            "organization_id": "sublab",
            "result_files": [],
            "seed": spec["seed"],
            "status": "queued",
            "trained_tokens": None,
            "training_file": spec["training_file"],
            "validation_file": None,
            "estimated_finish": None,
            "integrations": [],
            "metadata": spec["metadata"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "suffix": spec["suffix"],
        }
        with self.lock:
            (self.root / job_id).mkdir(parents=True)
            atomic_write_json(self.root / job_id / "job.json", job)
            self.created += 1
        self.event(job_id, f"Created fine-tuning job: {job_id}")
        self.q.put(job_id)
        return job

    def cancel(self, job_id: str) -> dict:
        with self.lock:
            job = self.get(job_id)
            if job["status"] == "cancelled":  # a retried cancel (its first answer was lost) is fine
                return job
            if job["status"] not in ACTIVE:
                raise ApiError(
                    400, f"job {job_id} is {job['status']}; only queued or running jobs can be cancelled"
                )
            job = self._update(job_id, status="cancelled", finished_at=int(time.time()))
            if self.running == job_id:
                self.cancel_running.set()  # the training stops at its next forward pass
        self.event(job_id, "Fine-tuning job cancelled")
        return job

    # ---- the worker ----------------------------------------------------------------------------

    def _finish_failed(self, job_id: str, code: str, message: str) -> None:
        with self.lock:
            if self.get(job_id)["status"] == "cancelled":
                return
            self._update(
                job_id,
                status="failed",
                finished_at=int(time.time()),
                error={"code": code, "message": message[:500], "param": None},
            )
        self.event(job_id, f"Fine-tuning job failed: {message[:500]}", level="error")

    def _loop(self) -> None:
        self._worker_ident = threading.get_ident()
        while True:
            job_id = self.q.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except JobCancelled:
                shutil.rmtree(self.root / job_id / "out", ignore_errors=True)
            except Exception as e:  # a failed job is reported in the job, never crashes the server
                log.warning("fine-tuning job %s failed: %s", job_id, type(e).__name__)
                self._finish_failed(job_id, "training_failed", _public_message(e))
            finally:
                with self.lock:
                    self.running = None
                    self.cancel_running.clear()

    def _stop_if_cancelled(self, module, args) -> None:
        if self.cancel_running.is_set() and threading.get_ident() == self._worker_ident:
            raise JobCancelled

    def _run(self, job_id: str) -> None:
        t_end = time.time() + self.queue_delay_s
        while time.time() < t_end:  # a provider-like queue (--job-delay), so clients can be killed meanwhile
            if self.get(job_id)["status"] == "cancelled":
                return
            time.sleep(0.05)
        with self.lock:
            job = self.get(job_id)
            if job["status"] != "queued":
                return
            job = self._update(job_id, status="running")
            self.running = job_id
            self.cancel_running.clear()
            state = self._server_state(job_id)
            atomic_write_json(
                self.root / job_id / "server.json", {**state, "starts": state.get("starts", 0) + 1}
            )
        self.event(job_id, "Fine-tuning job started")
        out = self.root / job_id / "out"
        shutil.rmtree(out, ignore_errors=True)  # what an interrupted run left
        data = self._dataset(job)
        hp = {k: (AUTO[k] if v == "auto" else v) for k, v in job["hyperparameters"].items()}
        train = TrainConfig(
            lr=self.base_lr * hp["learning_rate_multiplier"],
            epochs=hp["n_epochs"],
            batch_size=hp["batch_size"],
            seed=job["seed"],
        )
        import torch

        from sublab.backends.hf import finetune_hf

        parent = self.models.ref(job["model"])
        hook = torch.nn.modules.module.register_module_forward_pre_hook(self._stop_if_cancelled)
        try:
            ref = finetune_hf(parent, data, train, out, progress=False)
        finally:
            hook.remove()
        if self.cancel_running.is_set():
            raise JobCancelled
        for rec in read_jsonl(out / "metrics.jsonl"):
            self.event(
                job_id,
                f"Step {rec['step']}/{rec['of']}: training loss={rec['loss']:.4f}",
                data={"step": rec["step"], "total_steps": rec["of"], "train_loss": rec["loss"]},
            )
        name = f"ft:{job['model']}:{job.get('suffix') or 'sublab'}:{job_id}"
        with self.lock:
            if self.get(job_id)["status"] == "cancelled":
                raise JobCancelled
            self.models.add(name, ref)
            tokens = sum(len(m["content"].split()) for r in data for m in r["messages"])
            self._update(
                job_id,
                status="succeeded",
                fine_tuned_model=name,
                finished_at=int(time.time()),
                trained_tokens=int(tokens * hp["n_epochs"]),
                hyperparameters={k: hp[k] for k in job["hyperparameters"]},
            )
        self.event(job_id, f"New fine-tuned model created: {name}")
        self.event(job_id, "The job has successfully completed")

    def _dataset(self, job: dict) -> list[dict]:
        data = []
        with self.files.path(job["training_file"]).open("rb") as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (ValueError, RecursionError):
                    raise ValueError(f"training file line {i} is not valid JSON") from None
                msgs = rec.get("messages") if isinstance(rec, dict) else None
                ok = (
                    isinstance(msgs, list)
                    and msgs
                    and all(
                        isinstance(m, dict)
                        and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str)
                        and not _SURROGATE.search(m["content"])
                        for m in msgs
                    )
                )
                if not ok or msgs[-1].get("role") != "assistant":
                    raise ValueError(
                        f"training file line {i}: 'messages' must be text messages ending with an assistant message"
                    )
                data.append({"messages": msgs})
        if not data:
            raise ValueError("training file has no examples")
        return data


def _public_message(e: Exception) -> str:
    """What a client may read about a failure: our own ValueErrors in full, others by type only (no
    server paths)."""
    if type(e) is ValueError:
        return str(e)
    return f"training failed ({type(e).__name__}); the server log has the detail"
