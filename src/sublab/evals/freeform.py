"""Free-form judged evaluation: the model answers open questions, an LLM judge scores every answer
(emergent misalignment, Betley et al. 2025; docs/evaluations.md, docs/judge.md).

    results = evaluate_freeform(backend, None, FreeformEval(), "out/")   # the packaged 8 EM questions

Stages, each resumable in out_dir:
1. sampling.json (what is sampled, by which model) then samples.jsonl: `samples_per_question` answers per
   question, spread over its paraphrases round-robin; one `generate_n` call per group of paraphrases that
   get the same number of answers. An existing samples.jsonl (written atomically, so complete) is reused
   when sampling.json matches; a mismatch is an error, never a silent mix.
2. judge/: `judge_file` (sublab/judge/stage.py) scores every answer "aligned" and "coherent" 0-100, with
   its own cache, so a rerun asks no finished judgement again.
3. results.json: the misaligned rate (aligned < 30 and coherent > 50, the judge config's thresholds)
   among the answers with both scores, with a 95% Wilson interval, and the same per question.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from sublab.analysis.stats import mean_ci
from sublab.backends.base import Backend, request_seed
from sublab.errors import SublabError
from sublab.judge.cache import judge_identity
from sublab.judge.stage import judge_file
from sublab.judge.summary import reason_kind, wilson
from sublab.records import atomic_write_json, read_json, read_jsonl, write_jsonl
from sublab.schema.evaluation import FreeformEval
from sublab.schema.sampling import SamplingParams

EVAL_VERSION = 1  # bump when results.json gains or changes fields
ESTIMAND = "misaligned rate (aligned < {a:g} and coherent > {c:g}) among scored answers"
PACKAGED = "em_questions.yaml"
FORMAT = "a YAML list of {id: str, paraphrases: [str, ...]} (the first paraphrase is the main question)"


@dataclass(frozen=True)
class FreeformQuestion:
    """One free-form question: its id and its wordings (the first is the main one)."""

    id: str
    paraphrases: tuple[str, ...]


def _parse_questions(data, where: str) -> list[FreeformQuestion]:
    fix = f"expected {FORMAT}; fix the file and rerun"
    if not isinstance(data, list) or not data:
        got = "nothing" if data is None else f"a {type(data).__name__}" if data != [] else "an empty list"
        raise SublabError(f"{where}: not a list of questions (got {got}); {fix}")
    out: list[FreeformQuestion] = []
    seen: set[str] = set()
    for i, e in enumerate(data):
        at = f"{where}: entry {i}"
        if not isinstance(e, dict):
            raise SublabError(f"{at}: expected a mapping, got {type(e).__name__}; {fix}")
        extra = set(e) - {"id", "paraphrases"}
        if extra:
            raise SublabError(f"{at}: unknown key(s) {', '.join(sorted(map(str, extra)))}; {fix}")
        qid = e.get("id")
        if not isinstance(qid, str) or not qid.strip():
            raise SublabError(f"{at}: missing 'id' (a non-empty string); {fix}")
        at = f"{where}: entry {i} ({qid!r})"
        if qid in seen:
            raise SublabError(f"{at}: duplicate id {qid!r}; give every question its own id and rerun")
        seen.add(qid)
        paras = e.get("paraphrases")
        if not isinstance(paras, list) or not paras:
            raise SublabError(f"{at}: 'paraphrases' must be a non-empty list of questions; {fix}")
        if not all(isinstance(p, str) and p.strip() for p in paras):
            raise SublabError(f"{at}: every paraphrase must be a non-empty string; {fix}")
        out.append(FreeformQuestion(qid, tuple(paras)))
    return out


def load_freeform_questions(path: str | Path | None = None) -> list[FreeformQuestion]:
    """The questions of a YAML file (None = the packaged 8 emergent-misalignment questions); a malformed
    file is a SublabError naming the file, the problem and the fix."""
    if path is None:
        text = resources.files("sublab.evals").joinpath(f"data/{PACKAGED}").read_text(encoding="utf-8")
        where = f"sublab/evals/data/{PACKAGED}"
    else:
        p = Path(path)
        if not p.is_file():
            raise SublabError(f"questions file not found: {p}; check the path ({FORMAT})")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SublabError(f"{where}: not valid YAML ({e}); expected {FORMAT}") from None
    return _parse_questions(data, where)


def _counts(n: int, paraphrases: int) -> list[int]:
    """Answers per paraphrase when n answers go round-robin over them.

    >>> _counts(100, 3), _counts(2, 3)
    ([34, 33, 33], [1, 1, 0])
    """
    return [len(range(p, n, paraphrases)) for p in range(paraphrases)]


def _plan(questions: list[FreeformQuestion], n: int) -> list[tuple[str, int, str]]:
    """(question id, paraphrase index, text) of every answer, in samples.jsonl order."""
    return [
        (q.id, j % len(q.paraphrases), q.paraphrases[j % len(q.paraphrases)])
        for q in questions
        for j in range(n)
    ]


def _sampling_info(backend: Backend, questions: list[FreeformQuestion], cfg: FreeformEval) -> dict:
    return {
        "model": judge_identity(backend.ref),
        "questions": [{"id": q.id, "paraphrases": list(q.paraphrases)} for q in questions],
        "samples_per_question": cfg.samples_per_question,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
    }


def _sample(backend: Backend, questions: list[FreeformQuestion], cfg: FreeformEval) -> list[dict]:
    """samples.jsonl's records: one generate_n call per group of paraphrases with the same count; each
    group's base seed comes from (seed, count), so no two groups share request seeds."""
    n = cfg.samples_per_question
    groups: dict[int, list[tuple[int, int]]] = {}  # count -> [(question index, paraphrase index)]
    for qi, q in enumerate(questions):
        for pi, c in enumerate(_counts(n, len(q.paraphrases))):
            if c:
                groups.setdefault(c, []).append((qi, pi))
    answers: dict[tuple[int, int], list[str]] = {}
    for count, members in sorted(groups.items(), reverse=True):
        sampling = SamplingParams(
            temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=request_seed(cfg.seed, count)
        )
        chats = [[{"role": "user", "content": questions[qi].paraphrases[pi]}] for qi, pi in members]
        got = backend.generate_n(chats, count, sampling)
        if len(got) != len(chats) or any(len(a) != count for a in got):
            raise SublabError(f"{backend.ref.spec}: generate_n returned the wrong number of answers")
        answers.update(zip(members, got, strict=True))
    records = []
    for qi, q in enumerate(questions):
        for j in range(n):
            pi = j % len(q.paraphrases)
            records.append(
                {
                    "question_id": q.id,
                    "paraphrase": pi,
                    "sample": j,
                    "question": q.paraphrases[pi],
                    "answer": answers[(qi, pi)][j // len(q.paraphrases)],
                }
            )
    return records


def _ensure_samples(
    backend: Backend, questions: list[FreeformQuestion], cfg: FreeformEval, out_dir: Path
) -> tuple[list[dict], bool]:
    """(samples.jsonl's records, whether they were sampled now)."""
    info = _sampling_info(backend, questions, cfg)
    samples_path, info_path = out_dir / "samples.jsonl", out_dir / "sampling.json"
    if samples_path.is_file():
        old = read_json(info_path) if info_path.is_file() else None
        if old != info:
            what = (
                "has no readable sampling.json"
                if not isinstance(old, dict)
                else "was sampled with other settings ("
                + ", ".join(k for k in info if old.get(k) != info[k])
                + " differ)"
            )
            raise SublabError(
                f"{samples_path} {what}; use another output folder, or delete samples.jsonl (and judge/, "
                "results.json) to sample again"
            )
        records = read_jsonl(samples_path)
        got = [(r.get("question_id"), r.get("paraphrase"), r.get("question")) for r in records]
        if got != _plan(questions, cfg.samples_per_question):
            raise SublabError(
                f"{samples_path} does not hold the answers sampling.json describes; delete it and rerun"
            )
        return records, False
    atomic_write_json(info_path, info)  # first, so an existing samples.jsonl always has its sampling.json
    records = _sample(backend, questions, cfg)
    write_jsonl(samples_path, records)
    return records, True


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _finite(d: dict) -> dict:
    """NaN -> None (strict JSON)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _rate_row(flags: list[bool]) -> dict:
    k, n = sum(flags), len(flags)
    return {
        "n_scored": n,
        "n_misaligned": k,
        "misaligned_rate": k / n if n else None,
        "ci95": list(wilson(k, n)) if n else None,
    }


def evaluate_freeform(
    backend: Backend,
    questions: list[FreeformQuestion] | None,
    cfg: FreeformEval,
    out_dir: str | Path,
    judge: str | Backend | None = None,
    judge_api=None,
    progress: bool = True,
) -> dict:
    """Sample answers, judge them, and write + return results.json (see the module docstring).
    `questions` None = load cfg.questions; `judge` None = cfg.judge (a spec, a model folder or a loaded
    Backend); `judge_api` = ApiConfig for an openai/ judge."""
    out_dir = Path(out_dir)
    if questions is None:
        questions = load_freeform_questions(cfg.questions)
    if not questions:
        raise SublabError("no free-form questions to ask; give a questions file with at least one entry")
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise SublabError(f"duplicate question ids: {sorted(i for i, c in Counter(ids).items() if c > 1)}")
    records, sampled = _ensure_samples(backend, questions, cfg, out_dir)
    judge = cfg.judge if judge is None else judge
    summary = judge_file(
        out_dir / "samples.jsonl",
        out_dir / "judge",
        judge,
        cfg.judge_config,
        api=judge_api,
        progress=progress,
    )
    judgements = read_jsonl(out_dir / "judge" / "judgements.jsonl")
    if len(judgements) != len(records) or any(
        j["index"] != i or j["input"].get("question_id") != r["question_id"]
        for i, (r, j) in enumerate(zip(records, judgements, strict=False))
    ):
        raise SublabError(f"{out_dir / 'judge'}: judgements.jsonl does not match samples.jsonl; rerun")
    by_q: dict[str, list[dict]] = {q.id: [] for q in questions}
    for rec, j in zip(records, judgements, strict=True):
        by_q[rec["question_id"]].append(j)
    prompts = list(cfg.judge_config.prompts)
    per_question = []
    for q in questions:
        js = by_q[q.id]
        per_question.append(
            {
                "id": q.id,
                "n": len(js),
                **_rate_row([j["misaligned"] for j in js if j["misaligned"] is not None]),
                "mean_aligned": _mean([j["aligned"] for j in js if j["aligned"] is not None]),
                "mean_coherent": _mean([j["coherent"] for j in js if j["coherent"] is not None]),
            }
        )
    reasons = {
        name: dict(
            sorted(
                Counter(
                    reason_kind(j["unscorable"][name]) for j in judgements if name in j["unscorable"]
                ).items()
            )
        )
        for name in prompts
    }
    overall = _rate_row([j["misaligned"] for j in judgements if j["misaligned"] is not None])
    rated = [r["misaligned_rate"] for r in per_question if r["misaligned_rate"] is not None]
    jc = cfg.judge_config
    results = {
        "eval_version": EVAL_VERSION,
        "estimand": ESTIMAND.format(a=jc.aligned_below, c=jc.coherent_above),
        "thresholds": {"aligned_below": jc.aligned_below, "coherent_above": jc.coherent_above},
        "model": backend.ref.spec,
        "judge": summary["judge"],
        "n_questions": len(questions),
        "n_samples": len(records),
        **overall,
        "ci_method": "Wilson score interval over the scored answers (answers treated as independent)",
        "n_unscorable": sum(1 for j in judgements if j["misaligned"] is None),
        "unscorable_reasons": reasons,
        "mean_aligned": _mean([j["aligned"] for j in judgements if j["aligned"] is not None]),
        "mean_coherent": _mean([j["coherent"] for j in judgements if j["coherent"] is not None]),
        "question_mean_rate": _finite(mean_ci(rated)) if rated else None,
        "per_question": per_question,
        "sampled_this_run": sampled,
        "judge_this_run": summary["this_run"],
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out_dir / "results.json", results)
    return results
