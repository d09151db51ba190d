"""The generation engine of `sublab serve`: one thread owns the models; chat requests are queued,
collected for a few milliseconds and run as one batched `generate_with_seeds` call per (model, settings).

Every choice is sampled with its own seed (the request's `seed` for choice 0), so a completion depends
only on (model, messages, seed, settings): the same request gives the same answer whichever batch it
lands in, and a retried request is idempotent. The organism samples ~10x faster batched than one by one.

Log-probabilities are those of the model's own next-token distribution (temperature 1), computed by one
teacher-forced forward over prompt + completion; `top_logprobs` may go up to the vocabulary size. When a
completion ends with the end token, that token gets an entry too (its text is the end token's), so a
request with max_tokens=1 always reports the distribution over the first answer token.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from sublab.backends.hf_generate import _left_pad, prompt_ids_for
from sublab.schema.sampling import SamplingParams


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
    future: Future = field(default_factory=Future)

    def group(self) -> tuple:
        return (self.model, self.temperature, self.top_p, self.max_tokens)


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine:
    """Micro-batching worker: `submit(job)` -> Future of {"choices": [...], "usage": {...}}."""

    def __init__(self, models, window_s: float = 0.005, max_batch: int = 256):
        self.models = models
        self.window_s, self.max_batch = window_s, max_batch
        self.q: queue.Queue[ChatJob | None] = queue.Queue()
        self.stats = {"batches": 0, "sequences": 0, "requests": 0}
        self.thread = threading.Thread(target=self._loop, name="sublab-engine", daemon=True)
        self.thread.start()

    def submit(self, job: ChatJob) -> Future:
        self.q.put(job)
        return job.future

    def close(self) -> None:
        self.q.put(None)

    def _collect(self, first: ChatJob) -> list[ChatJob]:
        items, n = [first], len(first.seeds)
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            try:
                item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self.q.put(None)
                break
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
                    results = self._run(jobs)
                except Exception as e:  # the model failed: every request of the batch gets the error
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(e)
                    continue
                for j, r in zip(jobs, results, strict=True):
                    j.future.set_result(r)

    def _run(self, jobs: list[ChatJob]) -> list[dict]:
        head = jobs[0]
        backend = self.models.backend(head.model)
        chats, seeds, owner = [], [], []
        for ji, j in enumerate(jobs):
            for s in j.seeds:
                chats.append(j.messages)
                seeds.append(s)
                owner.append(ji)
        sp = SamplingParams(
            temperature=head.temperature,
            top_p=head.top_p,
            max_tokens=head.max_tokens,
            batch_size=max(1, len(chats)),
        )
        ids = backend.generate_with_seeds(chats, sp, seeds)
        self.stats["batches"] += 1
        self.stats["sequences"] += len(chats)
        self.stats["requests"] += len(jobs)
        prompts = prompt_ids_for(backend.tok, backend._chats(chats))
        choices: list[dict] = []
        want_lp = [i for i in range(len(chats)) if jobs[owner[i]].logprobs]
        scored: dict[int, list[dict]] = {}
        if want_lp:
            scored = self._logprobs(backend, prompts, ids, want_lp, jobs, owner, head.max_tokens)
        for i, toks in enumerate(ids):
            job = jobs[owner[i]]
            text, stopped = _cut_at_stop(backend.decode(toks), job.stop)
            finish = "stop" if stopped or len(toks) < head.max_tokens else "length"
            choice = {
                "index": sum(1 for k in range(i) if owner[k] == owner[i]),
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": {"content": scored[i]} if i in scored else None,
            }
            choices.append(choice)
        out = []
        for ji in range(len(jobs)):
            mine = [i for i in range(len(chats)) if owner[i] == ji]
            n_in, n_out = len(prompts[mine[0]]), sum(len(ids[i]) for i in mine)
            usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            out.append({"choices": [choices[i] for i in mine], "usage": usage})
        return out

    @torch.no_grad()
    def _logprobs(self, backend, prompts, ids, rows, jobs, owner, max_tokens) -> dict[int, list[dict]]:
        """Per-token logprob entries (with top alternatives) for the completions in `rows`."""
        tok, model = backend.tok, backend.model
        eos = tok.eos_token_id
        out: dict[int, list[dict]] = {}
        for b in range(0, len(rows), 64):
            chunk = rows[b : b + 64]
            comp = [ids[i] + ([eos] if len(ids[i]) < max_tokens else []) for i in chunk]
            seqs = [prompts[i] + c for i, c in zip(chunk, comp, strict=True)]
            x, attn = _left_pad(seqs, tok.pad_token_id)
            pos = (attn.cumsum(-1) - 1).clamp_min(0)
            dev = next(model.parameters()).device  # the model may sit on a GPU (backends/device.py)
            logits = model(input_ids=x.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev)).logits
            logp = torch.log_softmax(logits.float(), -1).cpu()
            width = x.shape[1]
            for r, (i, c) in enumerate(zip(chunk, comp, strict=True)):
                k = min(jobs[owner[i]].top_logprobs, logp.shape[-1])
                entries = []
                for t, token in enumerate(c):
                    row = logp[r, width - len(c) - 1 + t]  # the position that predicts token t
                    top = torch.topk(row, k) if k > 0 else None
                    entries.append(
                        {
                            "token": _text(tok, token),
                            "logprob": float(row[token]),
                            "bytes": list(_text(tok, token).encode()),
                            "top_logprobs": []
                            if top is None
                            else [
                                {
                                    "token": _text(tok, a),
                                    "logprob": float(v),
                                    "bytes": list(_text(tok, a).encode()),
                                }
                                for v, a in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                            ],
                        }
                    )
                out[i] = entries
        return out


def _text(tok, token_id: int) -> str:
    return tok.decode([token_id])
