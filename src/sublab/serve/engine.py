"""The generation engine of `sublab serve`: one thread owns the models; chat requests are queued,
collected for a few milliseconds and run as one batched generation per (model, settings).

Every choice is sampled with its own seed (the request's `seed` for choice 0), so a completion depends
only on (model, messages, seed, settings): the same request gives the same answer whichever batch it
lands in, and a retried request is idempotent. The organism samples ~10x faster batched than one by one.

Requests arrive checked and tokenized (chat.py), so a batch holds only requests the model can run. If a
batch still fails, each of its requests is run again alone: only the one that fails gets the error.
A request whose client has gone away (or whose batch was cancelled) is marked `cancelled`: it is
dropped from the queue, and a running generation whose requests are all cancelled stops at its next
forward pass. At most `max_queued` sequences wait; beyond that `submit` raises QueueFull (-> 429).

Log-probabilities are those of the model's own next-token distribution (temperature 1), computed by one
teacher-forced forward over prompt + completion. When a completion ends with the end token, that token
gets an entry too (its text is the end token's), so a request with max_tokens=1 always reports the
distribution over the first answer token. With `stop`, the text, the token count and the logprobs end
with the token that completes the stop sequence.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sublab.backends.hf_generate import _left_pad, generate_ids

log = logging.getLogger("sublab.serve")


class QueueFull(Exception):
    """More sequences are waiting than --max-queued allows."""


class Cancelled(Exception):
    """The request was cancelled (its client went away, or its batch was cancelled)."""


class _Aborted(Exception):
    """Raised inside the model's forward when every request of the running batch is cancelled."""


@dataclass
class ChatJob:
    """One chat completion request: `seeds` has one seed per choice (n)."""

    model: str
    messages: list[dict]
    seeds: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_ids: list[int] | None = None  # set by chat.prepare
    max_new: int | None = None  # max_tokens cut to the context left after the prompt
    cancelled: bool = False
    future: Future = field(default_factory=Future)

    @property
    def limit(self) -> int:
        return self.max_new if self.max_new is not None else self.max_tokens

    def group(self) -> tuple:
        return (self.model, self.temperature, self.top_p, self.limit)

    def cancel(self) -> None:
        self.cancelled = True


def _stop_cut(text: str, stop: list[str]) -> int:
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)


class Engine:
    """Micro-batching worker: `submit(job)` -> Future of {"choices": [...], "usage": {...}}."""

    def __init__(self, models, window_s: float = 0.005, max_batch: int = 256, max_queued: int = 4096):
        self.models = models
        self.window_s, self.max_batch, self.max_queued = window_s, max_batch, max_queued
        self.q: queue.Queue[ChatJob | None] = queue.Queue()
        self.queued = 0  # sequences submitted and not yet taken by the engine thread
        self.lock = threading.Lock()
        self.stats = {
            "batches": 0,
            "sequences": 0,
            "requests": 0,
            "cancelled": 0,
            "aborted": 0,
            "isolated": 0,
        }
        self._running: list[ChatJob] = []
        self.thread = threading.Thread(target=self._loop, name="sublab-engine", daemon=True)
        self.thread.start()

    def submit(self, job: ChatJob, force: bool = False) -> Future:
        """Queue a prepared job. QueueFull when the queue holds --max-queued sequences (unless `force`:
        the Batch API, which keeps its own window)."""
        with self.lock:
            if not force and self.queued + len(job.seeds) > self.max_queued:
                raise QueueFull
            self.queued += len(job.seeds)
        self.q.put(job)
        return job.future

    def close(self) -> None:
        self.q.put(None)

    def _take(self, job: ChatJob) -> bool:
        """Account for a job leaving the queue; False (and its future cancelled) if it was cancelled."""
        with self.lock:
            self.queued -= len(job.seeds)
        if job.cancelled:
            self.stats["cancelled"] += 1
            if not job.future.done():
                job.future.set_exception(Cancelled())
            return False
        return True

    def _collect(self, first: ChatJob) -> list[ChatJob]:
        items = [first] if self._take(first) else []
        n = len(first.seeds) if items else 0
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            try:
                item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self.q.put(None)
                break
            if self._take(item):
                items.append(item)
                n += len(item.seeds)
        return items

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            groups: dict[tuple, list[ChatJob]] = {}
            for job in self._collect(first):
                groups.setdefault(job.group(), []).append(job)
            for jobs in groups.values():
                try:
                    self._settle(jobs, self._run(jobs))
                except _Aborted:
                    self.stats["aborted"] += 1
                    self._settle(jobs, [None] * len(jobs))
                except (
                    Exception
                ) as e:  # isolate: each request alone, so only the one that fails gets the error
                    if len(jobs) == 1:
                        self._fail(jobs[0], e)
                        continue
                    self.stats["isolated"] += 1
                    for j in jobs:
                        try:
                            self._settle([j], self._run([j]))
                        except _Aborted:
                            self._settle([j], [None])
                        except Exception as e1:
                            self._fail(j, e1)

    def _settle(self, jobs: list[ChatJob], results: list) -> None:
        for j, r in zip(jobs, results, strict=True):
            if j.future.done():
                continue
            if r is None or j.cancelled:
                j.future.set_exception(Cancelled())
            else:
                j.future.set_result(r)

    def _fail(self, job: ChatJob, e: Exception) -> None:
        log.warning("generation failed for one request: %s", type(e).__name__)
        if not job.future.done():
            job.future.set_exception(e)

    def _abort_check(self, module, args) -> None:
        running = self._running
        if running and all(j.cancelled for j in running):
            raise _Aborted

    def _backend(self, model_id: str):
        backend = self.models.backend(model_id)
        if getattr(backend.model, "_sublab_engine_hook", None) is not self:
            # stops a generation whose requests are all cancelled, at its next forward pass
            backend.model.register_forward_pre_hook(self._abort_check)
            backend.model._sublab_engine_hook = self
        return backend

    def _run(self, jobs: list[ChatJob]) -> list[dict]:
        head = jobs[0]
        backend = self._backend(head.model)
        tok = backend.tok
        prompts, seeds, owner = [], [], []
        for ji, j in enumerate(jobs):
            for s in j.seeds:
                prompts.append(j.prompt_ids)
                seeds.append(s)
                owner.append(ji)
        self._running = jobs
        try:
            ids = generate_ids(
                backend.model,
                prompts,
                seeds,
                tok.eos_token_id,
                tok.pad_token_id,
                head.limit,
                head.temperature,
                head.top_p,
                max(1, len(prompts)),
            )
            self.stats["batches"] += 1
            self.stats["sequences"] += len(prompts)
            self.stats["requests"] += len(jobs)
            texts, ended, cut_rows = [], [], set()
            for i, toks in enumerate(ids):
                text, cut = self._cut(backend, toks, jobs[owner[i]].stop)
                if cut is not None:
                    ids[i] = toks[:cut]
                    cut_rows.add(i)
                texts.append(text)
                ended.append(cut is not None or len(toks) < head.limit)  # stop sequence or end token
            want_lp = [
                i for i in range(len(prompts)) if jobs[owner[i]].logprobs and not jobs[owner[i]].cancelled
            ]
            scored: dict[int, list[dict]] = {}
            if want_lp:
                scored = self._logprobs(backend, prompts, ids, want_lp, jobs, owner, head.limit, cut_rows)
        finally:
            self._running = []
        out: list[dict | None] = []
        index = [0] * len(jobs)
        per_job: list[list[dict]] = [[] for _ in jobs]
        for i in range(len(prompts)):
            ji = owner[i]
            per_job[ji].append(
                {
                    "index": index[ji],
                    "message": {"role": "assistant", "content": texts[i]},
                    "finish_reason": "stop" if ended[i] else "length",
                    "logprobs": {"content": scored[i]} if i in scored else None,
                }
            )
            index[ji] += 1
        for ji, j in enumerate(jobs):
            if j.cancelled:
                out.append(None)
                continue
            n_in = len(j.prompt_ids)
            n_out = sum(len(ids[i]) for i in range(len(prompts)) if owner[i] == ji)
            usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            out.append({"choices": per_job[ji], "usage": usage})
        return out

    @staticmethod
    def _cut(backend, toks: list[int], stop: list[str]) -> tuple[str, int | None]:
        """(text, None) or, when a stop sequence occurs, (the text before it, the number of tokens up to
        and including the one that completes it)."""
        text = backend.decode(toks)
        if not stop or _stop_cut(text, stop) < 0:
            return text, None
        lo, hi = 1, len(toks)  # the shortest prefix whose text holds a stop sequence
        while lo < hi:
            mid = (lo + hi) // 2
            if _stop_cut(backend.decode(toks[:mid]), stop) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return text[: _stop_cut(text, stop)], lo

    @torch.no_grad()
    def _logprobs(self, backend, prompts, ids, rows, jobs, owner, limit, cut_rows) -> dict[int, list[dict]]:
        """Per-token logprob entries (with top alternatives) for the completions in `rows`."""
        tok, model = backend.tok, backend.model
        eos = tok.eos_token_id
        out: dict[int, list[dict]] = {}
        texts: dict[int, str] = {}

        def text(t: int) -> str:
            if t not in texts:
                texts[t] = tok.decode([t])
            return texts[t]

        for b in range(0, len(rows), 64):
            chunk = rows[b : b + 64]
            # the end token gets an entry when the completion ended with it (not at a stop sequence)
            comp = [ids[i] + ([eos] if len(ids[i]) < limit and i not in cut_rows else []) for i in chunk]
            seqs = [prompts[i] + c for i, c in zip(chunk, comp, strict=True)]
            x, attn = _left_pad(seqs, tok.pad_token_id)
            pos = (attn.cumsum(-1) - 1).clamp_min(0)
            dev = next(model.parameters()).device  # the model may sit on a GPU (backends/device.py)
            logits = model(input_ids=x.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev)).logits
            width = x.shape[1]
            for r, (i, c) in enumerate(zip(chunk, comp, strict=True)):
                logp = torch.log_softmax(logits[r, width - len(c) - 1 : width - 1].float(), -1).cpu()
                k = min(jobs[owner[i]].top_logprobs, logp.shape[-1])
                top = torch.topk(logp, k) if k > 0 else None
                entries = []
                for t, token in enumerate(c):
                    alts = []
                    if top is not None:
                        for v, a in zip(top.values[t].tolist(), top.indices[t].tolist(), strict=True):
                            s = text(a)
                            alts.append({"token": s, "logprob": v, "bytes": list(s.encode())})
                    s = text(token)
                    entries.append(
                        {
                            "token": s,
                            "logprob": float(logp[t, token]),
                            "bytes": list(s.encode()),
                            "top_logprobs": alts,
                        }
                    )
                out[i] = entries
        return out
