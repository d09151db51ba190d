"""Sampling through the Batch API (api.use_batch): the requests go up as one JSONL file
({"custom_id", "method", "url", "body"} per line), a batch is created and polled, and the answers come
back as an output file. Requests the batch reports as failed are re-sent one by one (with retries), so
every request gets exactly one answer. At most 50,000 requests per batch (the official limit); a
sampling stage sends one batch per chunk of prompts, so finished chunks survive an interruption.

Polling has a deadline: the batch's completion window (its expires_at, 24h after creation) plus
DEADLINE_GRACE_S. A batch still unfinished then is cancelled and the stage fails with a SublabError
(rerun to resume), so a batch that an endpoint never finishes cannot hang a run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from sublab.errors import SublabError
from sublab.records import sha256_json

MAX_PER_BATCH = 50_000
FINAL = ("completed", "failed", "expired", "cancelled")
WINDOW_S = 86400.0  # completion_window "24h"
DEADLINE_GRACE_S = 600.0


def batch_deadline(batch, now: float | None = None) -> float:
    """time.monotonic() value after which we stop waiting for `batch`: its completion window (from the
    server's own created_at / expires_at, so clock skew does not matter) plus DEADLINE_GRACE_S."""
    created, expires = getattr(batch, "created_at", None), getattr(batch, "expires_at", None)
    window = expires - created if isinstance(created, int) and isinstance(expires, int) else WINDOW_S
    return (time.monotonic() if now is None else now) + max(0.0, min(window, WINDOW_S)) + DEADLINE_GRACE_S


def generate_batch(backend, bodies: list[dict]) -> list[str]:
    out: list[str] = []
    for b in range(0, len(bodies), MAX_PER_BATCH):
        out += _one_batch(backend, bodies[b : b + MAX_PER_BATCH])
    return out


def _one_batch(backend, bodies: list[dict]) -> list[str]:
    client, api = backend.client, backend.api
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for i, body in enumerate(bodies)
    ]
    payload = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
    tag = sha256_json(lines)[:24]

    async def flow(c):
        f = await client.call(
            "batch file upload", lambda: c.files.create(file=("batch.jsonl", payload), purpose="batch")
        )

        async def find():
            page = await c.batches.list(limit=100)
            for x in page.data:
                if x.input_file_id == f.id and (x.metadata or {}).get("sublab_request") == tag:
                    return x
            return None

        batch = await client.call(
            "batch create",
            lambda: c.batches.create(
                input_file_id=f.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"sublab_request": tag},
            ),
            recover=find,
        )
        print(f"batch {batch.id}: {len(bodies)} requests", file=sys.stderr, flush=True)
        deadline = batch_deadline(batch)
        while batch.status not in FINAL:
            if time.monotonic() > deadline:
                try:
                    await client.call("batch cancel", lambda bid=batch.id: c.batches.cancel(bid))
                except Exception:  # best effort: the error below is what matters
                    pass
                raise SublabError(
                    f"batch {batch.id} is still {batch.status} after its completion window "
                    f"({batch_deadline(batch, 0) - DEADLINE_GRACE_S:.0f} s + {DEADLINE_GRACE_S:.0f} s); "
                    "cancelled it. Rerun to resume (finished chunks are kept)"
                )
            await asyncio.sleep(api.poll_interval_s)
            batch = await client.call("batch", lambda bid=batch.id: c.batches.retrieve(bid))
        if batch.status != "completed":
            raise SublabError(f"batch {batch.id} ended {batch.status}: {batch.errors}; rerun to resume")
        answers: dict[str, str] = {}
        if batch.output_file_id:
            content = await client.call("batch output", lambda: c.files.content(batch.output_file_id))
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                resp = rec.get("response") or {}
                if resp.get("status_code") == 200:
                    msg = resp["body"]["choices"][0]["message"].get("content") or ""
                    answers[rec["custom_id"]] = msg.strip()
        missing = [i for i in range(len(bodies)) if f"r{i}" not in answers]
        if missing:  # failed inside the batch: one by one, with retries
            print(
                f"batch {batch.id}: {len(missing)} failed requests, re-sending", file=sys.stderr, flush=True
            )

            async def one(cc, i: int) -> str:
                resp = await client.call(
                    "chat completion",
                    lambda: cc.chat.completions.create(**bodies[i]),
                    client=cc,
                    model=bodies[i]["model"],
                )
                return (resp.choices[0].message.content or "").strip()

            for i, a in zip(missing, await client.map(c, one, missing, progress=False), strict=True):
                answers[f"r{i}"] = a
        return [answers[f"r{i}"] for i in range(len(bodies))]

    return client.run(flow)
