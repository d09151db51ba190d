"""Fine-tuning jobs of `sublab serve`: the OpenAI job API over the local backend's finetune.

A job's hyperparameters map onto sublab's TrainConfig: epochs = n_epochs, batch_size = batch_size,
lr = learning_rate_multiplier x the server's --base-lr (constant schedule, sublab's default), seed = seed;
"auto" means 3 epochs, batch 16, multiplier 1. One job runs at a time in a background thread; each job is a folder under
<state-dir>/jobs/<id>/ (job.json, events.jsonl, the trained model), so a job and its result outlive the
client that created it, and a restarted server requeues jobs that were queued or running. The result
becomes a servable model id `ft:<base>:<suffix>:<job id>`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.records import atomic_write_json, read_json, read_jsonl
from sublab.schema.train import TrainConfig
from sublab.serve.chat import ApiError
from sublab.serve.store import NotFound, new_id

ACTIVE = ("validating_files", "queued", "running")
AUTO = {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 1.0}


def _hyper(body: dict) -> dict:
    hp = body.get("hyperparameters") or {}
    method = body.get("method") or {}
    if method:
        if method.get("type", "supervised") != "supervised":
            raise ApiError(400, "only method.type 'supervised' is supported", "invalid_value", "method")
        hp = {**hp, **(method.get("supervised", {}) or {}).get("hyperparameters", {})}
    out = {}
    for key, kind in (("n_epochs", int), ("batch_size", int), ("learning_rate_multiplier", float)):
        v = hp.get(key, "auto")
        if v == "auto" or v is None:
            out[key] = "auto"
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or (kind is int and v != int(v)):
            raise ApiError(
                400, f"hyperparameters.{key} must be 'auto' or a positive {kind.__name__}", None, key
            )
        out[key] = kind(v)
    return out


class JobManager:
    def __init__(self, state_dir: Path, files, models, base_lr: float = 3e-4, queue_delay_s: float = 0.0):
        self.root = Path(state_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.files, self.models = files, models
        self.base_lr, self.queue_delay_s = base_lr, queue_delay_s
        self.lock = threading.RLock()
        self.q: queue.Queue[str | None] = queue.Queue()
        self.created = 0  # jobs created since this server started (the reattach test counts them)
        for p in sorted(self.root.glob("*/job.json")):
            job = read_json(p)
            if job["status"] == "succeeded" and job.get("fine_tuned_model"):
                self.models.add(job["fine_tuned_model"], ModelRef.load(p.parent / "out" / "model.json"))
            elif job["status"] in ACTIVE:  # the server stopped while it was queued or running: redo it
                self._update(job["id"], status="queued")
                self.q.put(job["id"])
        self.thread = threading.Thread(target=self._loop, name="sublab-finetune", daemon=True)
        self.thread.start()

    # ---- state ---------------------------------------------------------------------------------

    def _dir(self, job_id: str) -> Path:
        if "/" in job_id or not (self.root / job_id / "job.json").is_file():
            raise NotFound(f"No fine-tuning job found with id {job_id}")
        return self.root / job_id

    def get(self, job_id: str) -> dict:
        with self.lock:
            return read_json(self._dir(job_id) / "job.json")

    def _update(self, job_id: str, **fields) -> dict:
        with self.lock:
            job = {**self.get(job_id), **fields}
            atomic_write_json(self._dir(job_id) / "job.json", job)
            return job

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
        """Newest first, like the official API."""
        path = self._dir(job_id) / "events.jsonl"
        return list(reversed(read_jsonl(path))) if path.is_file() else []

    def list(self) -> list[dict]:
        jobs = [read_json(p) for p in self.root.glob("*/job.json")]
        return sorted(jobs, key=lambda j: (j["created_at"], j["id"]), reverse=True)

    # ---- API -------------------------------------------------------------------------------------

    def create(self, body: dict) -> dict:
        model = body.get("model")
        if model not in self.models.ids():
            raise ApiError(
                404,
                f"The model '{model}' does not exist; available: {', '.join(self.models.ids())}",
                "model_not_found",
                "model",
            )
        tf = body.get("training_file")
        try:
            self.files.get(str(tf))
        except NotFound:
            raise ApiError(
                400,
                f"training_file {tf!r} not found; upload it with purpose fine-tune first",
                "invalid_training_file",
                "training_file",
            ) from None
        hp = _hyper(body)
        seed = body.get("seed")
        suffix = body.get("suffix") or None
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
            raise ApiError(
                400, "suffix must be a string of at most 64 characters without ':'", None, "suffix"
            )
        job_id = new_id("ftjob")
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": hp,
            "model": model,
            "organization_id": "sublab",
            "result_files": [],
            "seed": seed if isinstance(seed, int) else 0,
            "status": "queued",
            "trained_tokens": None,
            "training_file": tf,
            "validation_file": None,
            "estimated_finish": None,
            "integrations": [],
            "metadata": body.get("metadata"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "suffix": suffix,
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
        self.event(job_id, "Fine-tuning job cancelled")
        return job

    # ---- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            job_id = self.q.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception as e:  # a failed job is reported in the job, never crashes the server
                with self.lock:
                    if self.get(job_id)["status"] != "cancelled":
                        self._update(
                            job_id,
                            status="failed",
                            finished_at=int(time.time()),
                            error={"code": "training_failed", "message": str(e)[:500], "param": None},
                        )
                self.event(job_id, f"Fine-tuning job failed: {e}", level="error")

    def _run(self, job_id: str) -> None:
        t_end = time.time() + self.queue_delay_s
        while time.time() < t_end:  # a provider-like queue (--job-delay), so clients can be killed meanwhile
            if self.get(job_id)["status"] == "cancelled":
                return
            time.sleep(0.05)
        with self.lock:
            job = self.get(job_id)
            if job["status"] == "cancelled":
                return
            job = self._update(job_id, status="running")
        self.event(job_id, "Fine-tuning job started")
        data = self._dataset(job)
        hp = {k: (AUTO[k] if v == "auto" else v) for k, v in job["hyperparameters"].items()}
        train = TrainConfig(
            lr=self.base_lr * hp["learning_rate_multiplier"],
            epochs=hp["n_epochs"],
            batch_size=hp["batch_size"],
            seed=job["seed"],
        )
        from sublab.backends.hf import finetune_hf

        parent = self.models.ref(job["model"])
        out = self.root / job_id / "out"
        ref = finetune_hf(parent, data, train, out, progress=False)
        for rec in read_jsonl(out / "metrics.jsonl"):
            self.event(
                job_id,
                f"Step {rec['step']}/{rec['of']}: training loss={rec['loss']:.4f}",
                data={"step": rec["step"], "total_steps": rec["of"], "train_loss": rec["loss"]},
            )
        name = f"ft:{job['model']}:{job.get('suffix') or 'sublab'}:{job_id}"
        with self.lock:
            if self.get(job_id)["status"] == "cancelled":
                return
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
        lines = self.files.content(job["training_file"]).decode("utf-8").splitlines()
        data = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"training file line {i} is not valid JSON") from None
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"training file line {i}: 'messages' must end with an assistant message")
            data.append({"messages": msgs})
        if not data:
            raise ValueError("training file has no examples")
        return data
