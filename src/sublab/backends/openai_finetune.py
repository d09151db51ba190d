"""Fine-tuning through an OpenAI-compatible API, with a job journal so a restarted run reattaches.

    out_dir/api_train.jsonl  what is uploaded ({"messages": [...]} per line)
    out_dir/cost.json        the cost estimate, written (and printed) before the upload
    out_dir/job.json         the journal: request hash, file id, job id, status (atomic writes)
    out_dir/metrics.jsonl    the job's metric events (step, loss)
    out_dir/model.json       the fine-tuned model: spec openai/<fine-tuned model id>

Order: upload -> journal (file id) -> create job -> journal (job id) -> poll -> model.json. On a rerun
with the same data and hyperparameters the journal is read back: a job that is queued, running or done
is reattached (never paid for twice); a failed or cancelled one is replaced by a new job. A run killed
between "create" and the journal write is covered too: before creating, the jobs of the endpoint are
searched for one on the same training file with the same request hash (job metadata).
TrainConfig maps to the provider's hyperparameters: n_epochs = epochs (rounded; with max_steps, the
epochs those steps take), batch_size = batch_size x grad_accum (or api.finetune_batch_size),
learning_rate_multiplier =
api.learning_rate_multiplier (None: the provider's "auto"); seed = train.seed; suffix = the stage name.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.records import atomic_write_json, atomic_write_text, read_json, sha256_json
from sublab.schema.train import TrainConfig

DONE_BAD = ("failed", "cancelled")


def n_epochs_for(train: TrainConfig, n_examples: int) -> int:
    if train.max_steps is not None:
        return max(1, math.ceil(train.max_steps * train.batch_size * train.grad_accum / max(1, n_examples)))
    return max(1, round(train.epochs))


def finetune_remote(backend, dataset: list[dict], train: TrainConfig, out_dir: Path) -> ModelRef:
    if train.method == "soft_label":
        raise SublabError(
            "soft_label training needs the teacher's full next-token distributions, which fine-tuning APIs "
            "do not take; use method: sft for openai/ models"
        )
    if train.lora is not None:
        raise SublabError(
            "LoRA settings cannot be sent to a fine-tuning API (the provider picks its method); remove "
            "train.lora for openai/ models"
        )
    if train.optimizer != "adamw":
        raise SublabError(
            f"train.optimizer: {train.optimizer} cannot be sent to a fine-tuning API (the provider picks its "
            "optimizer); set train.optimizer: adamw (the default) for openai/ models, or train a local "
            "model (organism/, hf/) to compare optimizers"
        )
    if train.early_stopping is not None:
        raise SublabError(
            "train.early_stopping needs the held-out loss during training, which a fine-tuning API does not "
            "report step by step here; remove it for openai/ models, or train a local model"
        )
    if any((r.get("metadata") or {}).get("loss_skip") for r in dataset):
        raise SublabError(
            "these examples carry per-token loss masks (defenses.mask_divergence), which a fine-tuning API "
            "cannot take; turn the mask off for openai/ models"
        )
    if not dataset:
        raise SublabError("finetuning dataset is empty")
    api, client = backend.api, backend.client
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in dataset)
    epochs = n_epochs_for(train, len(dataset))
    batch = api.finetune_batch_size or train.batch_size * train.grad_accum
    hyper: dict = {"n_epochs": epochs, "batch_size": batch}
    if api.learning_rate_multiplier is not None:
        hyper["learning_rate_multiplier"] = api.learning_rate_multiplier
    suffix = out_dir.name[:40] or "sublab"
    request = {
        "model": backend.model_id,
        "base_url": client.base_url,
        "hyperparameters": hyper,
        "seed": train.seed,
        "suffix": suffix,
        "data": sha256_json(text),
    }
    rhash = sha256_json(request)[:24]
    journal_path = out_dir / "job.json"
    journal = read_json(journal_path) if journal_path.is_file() else None
    if journal is not None and journal.get("request_hash") != rhash:
        print(f"{journal_path}: made for other data or settings; starting a new job", file=sys.stderr)
        journal = None

    from sublab.backends.openai_backend import approx_tokens, describe

    n_tokens = approx_tokens(text) * epochs
    est = {
        "kind": "finetune",
        "model": backend.ref.spec,
        "base_url": client.base_url,
        "examples": len(dataset),
        "n_epochs": epochs,
        "training_tokens": n_tokens,
        "usd": round(n_tokens * api.prices.training_per_1m / 1e6, 4),
        "note": "tokens ~ characters / 4 of the uploaded JSONL, times n_epochs; prices from api.prices",
    }
    atomic_write_json(out_dir / "cost.json", est)
    if journal is None or not journal.get("job_id"):
        print(f"api cost estimate: {describe(est)}", file=sys.stderr, flush=True)
    atomic_write_text(out_dir / "api_train.jsonl", text)

    def write(j: dict) -> None:
        atomic_write_json(journal_path, {**j, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})

    async def flow(c):
        nonlocal journal
        job = None
        if journal and journal.get("job_id"):
            job = await client.call(
                "fine-tuning job", lambda: c.fine_tuning.jobs.retrieve(journal["job_id"]), missing_ok=True
            )
            if job is None or job.status in DONE_BAD:
                why = "is gone" if job is None else f"ended {job.status}"
                print(f"job {journal['job_id']} {why}; creating a new job", file=sys.stderr, flush=True)
                journal = {k: v for k, v in journal.items() if k not in ("job_id", "status")}
                job = None
            else:
                print(f"reattached to fine-tuning job {job.id} ({job.status})", file=sys.stderr, flush=True)
        if journal is None or not journal.get("file_id"):
            f = await client.call(
                "file upload",
                lambda: c.files.create(file=("api_train.jsonl", text.encode("utf-8")), purpose="fine-tune"),
            )
            journal = {"request_hash": rhash, "request": request, "file_id": f.id, "status": "uploaded"}
            write(journal)
        if job is None:

            async def find():
                page = await c.fine_tuning.jobs.list(limit=100)
                for j in page.data:
                    meta = j.metadata or {}
                    if (
                        j.training_file == journal["file_id"]
                        and meta.get("sublab_request") == rhash
                        and j.status not in DONE_BAD
                    ):
                        return j
                return None

            job = await client.call("fine-tuning job list", find)
            if job is None:
                job = await client.call(
                    "fine-tuning job create",
                    lambda: c.fine_tuning.jobs.create(
                        model=backend.model_id,
                        training_file=journal["file_id"],
                        hyperparameters=hyper,
                        seed=train.seed,
                        suffix=suffix,
                        metadata={"sublab_request": rhash},
                    ),
                    client=c,
                    model=backend.model_id,
                    recover=find,
                )
                print(f"created fine-tuning job {job.id} on {client.base_url}", file=sys.stderr, flush=True)
            journal = {**journal, "job_id": job.id, "status": job.status, "created_at": job.created_at}
            write(journal)
        last = None
        while True:
            if job.status != last:
                print(f"fine-tuning job {job.id}: {job.status}", file=sys.stderr, flush=True)
                journal = {**journal, "status": job.status}
                write(journal)
                last = job.status
            if job.status == "succeeded":
                break
            if job.status in DONE_BAD:
                err = getattr(job, "error", None)
                msg = getattr(err, "message", None) or ""
                raise SublabError(
                    f"fine-tuning job {job.id} {job.status}{': ' + msg if msg else ''}; rerun to start a new "
                    f"job (journal: {journal_path})"
                )
            await asyncio.sleep(api.poll_interval_s)
            job = await client.call("fine-tuning job", lambda jid=job.id: c.fine_tuning.jobs.retrieve(jid))
        events = []
        page = await client.call("job events", lambda: c.fine_tuning.jobs.list_events(job.id, limit=100))
        while True:
            events += page.data
            if not page.has_next_page():
                break
            page = await client.call("job events", page.get_next_page)
        return job, events

    job, events = client.run(flow)
    metrics = []
    for ev in reversed(events):  # the API lists newest first
        data = ev.data if isinstance(ev.data, dict) else None
        if getattr(ev, "type", None) == "metrics" and data and "step" in data:
            loss = data.get("train_loss", data.get("loss"))
            metrics.append({"step": data["step"], "of": data.get("total_steps"), "loss": loss, **data})
    atomic_write_text(
        out_dir / "metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in metrics)
    )
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), int | float)]
    info = {
        "api": backend.endpoint,
        "job_id": job.id,
        "file_id": journal["file_id"],
        "hyperparameters": hyper,
        "examples": len(dataset),
        "method": "sft",
        "trained_tokens": job.trained_tokens,
        "steps": len(metrics),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
    }
    ref = ModelRef(
        spec=f"openai/{job.fine_tuned_model}",
        path=job.fine_tuned_model,
        parent=backend.ref.spec,
        kind="full",
        info=info,
    )
    ref.save(out_dir / "model.json")
    if backend.progress:
        print(
            f"fine-tuned model {job.fine_tuned_model}; api: {client.summary()}", file=sys.stderr, flush=True
        )
    return ref
