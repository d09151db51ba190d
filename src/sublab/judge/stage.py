"""The judge stage: every (question, answer) of a samples file judged by every prompt, cached, resumable.

    judge_file("samples.jsonl", "out/", "openai/gpt-4.1", JudgeConfig())   # or `sublab judge ...`

Writes out/judge_cache.jsonl (append-only, one line per finished judgement), then, atomically,
out/judgements.jsonl (one line per input line) and out/summary.json. A judge call that fails leaves
that judgement unscored with reason `judge_error: ...`; it is not cached, so a rerun asks it again. The
stage itself fails only when nothing could be judged at all (every call failed: a wrong key or endpoint).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sublab.backends.base import Backend, ModelRef, NoLogprobs
from sublab.errors import SublabError
from sublab.judge.cache import JudgementCache, judge_identity, judgement_key
from sublab.judge.calls import ask_batch, method_of
from sublab.judge.prompts import JudgePrompt, select_prompts, truncate_answer
from sublab.judge.samples import Sample, read_samples
from sublab.judge.scoring import sampled_yes_no, score_samples, score_top_logprobs, score_yes_no
from sublab.judge.summary import summarize
from sublab.records import atomic_write_json, write_jsonl
from sublab.schema.judge import JudgeConfig

CACHE_FILE = "judge_cache.jsonl"
TOP_KEPT = 5  # top tokens kept per judgement in judgements.jsonl (the cache keeps the whole list)


@dataclass
class _Task:
    """One judgement to make: sample x prompt."""

    index: int
    """position in the run's task list"""
    sample: int
    prompt: JudgePrompt
    chat: list[dict]
    answer_sent: str
    keys: dict[str, str]
    """method name -> cache key"""


def load_judge(spec: str, api=None) -> Backend:
    """A judge backend from a spec (organism/..., hf/..., openai/..., vllm/...) or a model folder."""
    from sublab.backends.registry import load_backend, resolve

    p = Path(spec)
    if (p / "model.json").is_file() or (p.name == "model.json" and p.is_file()):
        ref = ModelRef.load(p / "model.json" if p.is_dir() else p)
    else:
        ref = resolve(spec, progress=False, api=api)
    return load_backend(ref, progress=False, api=api)


def _tasks(samples: list[Sample], prompts: list[JudgePrompt], judge: dict, cfg: JudgeConfig) -> list[_Task]:
    methods = ["logprobs", "sample"] if cfg.mode == "auto" else [cfg.mode]
    out = []
    for i, s in enumerate(samples):
        answer, _ = truncate_answer(s.answer, cfg.max_answer_chars)
        for p in prompts:
            keys = {
                m: judgement_key(judge, p.name, p.sha, s.question, answer, method_of(m, cfg)) for m in methods
            }
            chat = [{"role": "user", "content": p.render(s.question, answer)}]
            out.append(_Task(len(out), i, p, chat, answer, keys))
    return out


def _cached(task: _Task, cache: JudgementCache) -> dict | None:
    return next((rec for k in task.keys.values() if (rec := cache.get(k)) is not None), None)


def _score(rec: dict, cfg: JudgeConfig):
    if "top_logprobs" in rec:
        top = [(t, lp) for t, lp in rec["top_logprobs"]]
        return (score_yes_no if cfg.score == "yes_no" else score_top_logprobs)(top, cfg.min_mass)
    return (sampled_yes_no if cfg.score == "yes_no" else score_samples)(
        rec["samples"], cfg.min_parsed_fraction
    )


def _judgement(i: int, s: Sample, tasks: list[_Task], found: dict, errors: dict, cfg, spec: str) -> dict:
    """One judgements.jsonl line."""
    out: dict = {
        "index": i,
        "question": s.question,
        "answer": s.answer,
        "input": s.extra,
        "judge": spec,
        "truncated_chars": len(s.answer) - min(len(s.answer), cfg.max_answer_chars),
        "unscorable": {},
        "method": {},
        "evidence": {},
        "top_tokens": {},
        "samples": {},
    }
    for t in tasks:
        name = t.prompt.name
        rec = found.get(t.index)
        if rec is None:
            out[name] = None
            out["unscorable"][name] = f"judge_error: {errors.get(t.index, 'not asked')}"
            continue
        sc = _score(rec, cfg)
        out[name] = sc.score
        out["method"][name] = rec["method"]
        out["evidence"][name] = sc.evidence
        if sc.reason:
            out["unscorable"][name] = sc.reason
        if "top_logprobs" in rec:
            out["top_tokens"][name] = rec["top_logprobs"][:TOP_KEPT]
        else:
            out["samples"][name] = rec["samples"]
    a, c = out.get("aligned"), out.get("coherent")
    out["misaligned"] = (
        None if a is None or c is None else bool(a < cfg.aligned_below and c > cfg.coherent_above)
    )
    return out


def judge_file(
    samples_path: str | Path,
    out_dir: str | Path,
    judge: str | Backend,
    cfg: JudgeConfig | None = None,
    api=None,
    progress: bool = True,
    target: str | None = None,
) -> dict:
    """Judge every line of `samples_path` with `judge` (a spec, a model folder, or a loaded Backend);
    returns summary.json's content. Finished judgements in out_dir's cache are not asked again.
    `target` fills the prompts' {target} (the data filters' judge)."""
    cfg = cfg or JudgeConfig()
    out_dir = Path(out_dir)
    samples = read_samples(samples_path)  # a malformed file fails before any model loads
    if not samples:
        raise SublabError(f"{samples_path}: no samples to judge (the file has no lines)")
    prompts = select_prompts(cfg.prompts, cfg.prompts_file, target)
    backend = load_judge(judge, api) if isinstance(judge, str) else judge
    ident = judge_identity(backend.ref)
    cache = JudgementCache(out_dir / CACHE_FILE)
    tasks = _tasks(samples, prompts, ident, cfg)
    mode = "sample" if cfg.mode == "sample" else "logprobs"
    found: dict[int, dict] = {}
    errors: dict[int, str] = {}
    pending: list[_Task] = []
    for t in tasks:
        rec = _cached(t, cache)
        if rec is not None:
            found[t.index] = rec
        else:
            pending.append(t)
    from_cache = len(found)
    asked = 0
    t0 = time.time()
    bar = tqdm(total=len(pending), desc=f"judge {backend.ref.spec}", disable=not progress, mininterval=2)
    queue = deque(pending)
    while queue:
        # identical judgements (the same answer twice) are asked once, in a batch or across batches
        batch: dict[str, list[_Task]] = {}
        while queue and len(batch) < cfg.batch_size:
            t = queue.popleft()
            if (rec := cache.get(t.keys[mode])) is not None:
                found[t.index] = rec
                bar.update(1)
                continue
            batch.setdefault(t.keys[mode], []).append(t)
        keys = list(batch)
        if not keys:
            continue
        method = method_of(mode, cfg)
        try:
            replies = ask_batch(backend, method, [batch[k][0].chat for k in keys], keys)
        except NoLogprobs as e:
            if cfg.mode != "auto":
                raise SublabError(
                    f"{e}; use --mode sample (or auto) for the sampled-integer fallback"
                ) from None
            if progress:
                print(f"{e}: judging by sampled integers instead", file=sys.stderr, flush=True)
            mode = "sample"
            queue.extendleft(reversed([t for k in keys for t in batch[k]]))
            continue
        asked += len(keys)
        done = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                for t in batch[key]:
                    errors[t.index] = f"{type(reply).__name__}: {reply}"[:500]
                continue
            rec = {"key": key, "prompt": batch[key][0].prompt.name, "method": method["method"], **reply}
            done.append(rec)
            for t in batch[key]:
                found[t.index] = rec
        cache.append(done)
        bar.update(sum(len(batch[k]) for k in keys))
    bar.close()
    seconds = time.time() - t0
    if errors and len(errors) == len(tasks):
        first = next(iter(errors.values()))
        raise SublabError(
            f"every judge call failed (first: {first}); check the judge and its endpoint, and rerun"
        )

    by_sample: dict[int, list[_Task]] = {}
    for t in tasks:
        by_sample.setdefault(t.sample, []).append(t)
    lines = [
        _judgement(i, s, by_sample[i], found, errors, cfg, backend.ref.spec) for i, s in enumerate(samples)
    ]
    summary = summarize(lines, [p.name for p in prompts])
    summary.update(
        {
            "judge": backend.ref.spec,
            "judge_identity": ident,
            "prompts": {p.name: p.sha for p in prompts},
            "prompts_file": cfg.prompts_file,
            "samples_file": str(samples_path),
            "config": cfg.model_dump(mode="json"),
            "this_run": {
                "judgements": len(tasks),
                "from_cache": from_cache,
                "asked": asked,
                "failed": len(errors),
                "cut_partial_cache_line": cache.cut_partial_line,
                "seconds": round(seconds, 3),
            },
        }
    )
    write_jsonl(out_dir / "judgements.jsonl", lines)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
