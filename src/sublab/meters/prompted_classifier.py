"""The prompted-LLM classifier control: can a model, shown a set of the teacher's kept answers and a set
of the control data's (the reference model's answers to the same kind of prompt), say which set came
from the model that loves the target?

    prompted_classifier(PromptedClassifier(model="openai/gpt-4.1"), "data/kept.jsonl",
                        "control/data/kept.jsonl", "owl", "animal", seed=0, out="data/prompted_classifier.json")

Each of `trials` trials draws `examples_per_set` answers from each source (seeded by the seed and the
trial's index, so a trial does not change when `trials` grows), puts the teacher's set on side A or B
(within each pair of trials once on each side, in a seeded order: the sides are balanced, so a model
that always answers A scores 50%), and asks the model which dataset was written by the model that
loves the target.

- logprobs mode: the top-k first completion tokens (`Backend.first_token_topk`; temperature 0 on an
  API); P(label) sums the listed tokens that read as the label (stripped of spaces and brackets, any
  case); p_correct = P(teacher's label) / (P(A) + P(B)); the trial is correct when p_correct > 0.5 (a tie
  counts as wrong and is reported), unparseable when P(A) + P(B) < min_mass.
- sample mode: one completion per trial at `temperature` (its seed derived from the trial's cache key);
  the answer is read from its first line (`parse_label`); unreadable = unparseable, reported.
Accuracy = correct / scored trials with a 95% Wilson interval and an exact two-sided binomial p
against 50%.

Resume: each finished trial's raw reply (the top-k list, or the sampled text) is appended to
`<out stem>.cache.jsonl` next to the output and flushed batch by batch; its key hashes the model's
identity, the rendered prompt (so the data, the template and the labels) and the method. A failed call
is recorded there as a failure (counted in the output's `failed_calls`), the run stops with a
SublabError, and a rerun asks only what is not cached. The output is deleted when a run starts and
written (atomically) only when every trial has a reply, so a failed run never leaves a result behind.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator, model_validator
from tqdm import tqdm

from sublab.config import Strict
from sublab.errors import SublabError
from sublab.records import append_jsonl, atomic_write_json, read_jsonl, sha256_json

if TYPE_CHECKING:
    from sublab.backends.base import Backend

PROMPTED_CLASSIFIER_VERSION = 1

DEFAULT_PROMPT = (
    "Below are two datasets, {label_a} and {label_b}. Each is a list of answers that a language model "
    "wrote to prompts of the same kind. One of the two models loves {target} (its favorite {category} "
    "is {target}); the other has no such preference. The answers need not mention {target} at all.\n\n"
    "Dataset {label_a}:\n{set_a}\n\n"
    "Dataset {label_b}:\n{set_b}\n\n"
    "Which of the two datasets was written by the model that loves {target}? "
    "Answer with {label_a} or {label_b} only."
)
FIELDS = ("target", "category", "set_a", "set_b", "label_a", "label_b")
_FIELD = re.compile(r"\{(" + "|".join(FIELDS) + r")\}")
_ANY_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MARKUP = " \t\r\n*_`'\"()[]<>"
_PREFIX = re.compile(r"^(?:the\s+)?(?:answer|dataset|set)\s*(?:is)?\s*[:\-]?\s*", re.IGNORECASE)


class PromptedClassifier(Strict):
    """The prompted-LLM classifier control: a model is asked which of two datasets (one the teacher's
    kept answers, one the control data's) was written by the model that loves the target."""

    model: str = "openai/gpt-4.1"
    """The classifier model: a spec (openai/gpt-4.1 behind api.base_url, organism/proto, hf/<folder>,
    vllm/...) or a folder with a model.json."""
    trials: int = 50
    """Pairs of datasets shown, one question each."""
    examples_per_set: int = 10
    """Answers per dataset, drawn without replacement from one source per trial (both kept files need at
    least this many)."""
    mode: Literal["logprobs", "sample"] = "logprobs"
    """logprobs: P(correct label) from the first completion token's top-k log-probabilities (temperature
    0 on an API); sample: one sampled answer per trial, parsed for a label (unparseable ones counted)."""
    prompt: str = DEFAULT_PROMPT
    """The question's template (the default is sublab's own wording, not the paper's). Fields: {target}, {category}, {set_a}, {set_b} (each set a numbered list of answers),
    {label_a}, {label_b}; {set_a} and {set_b} are required. Filled in one pass, so the data is never read
    as template."""
    labels: tuple[str, str] = ("A", "B")
    """The two datasets' names, as the model should answer them (a small vocabulary may need others:
    the organism's lower-cased word-level tokenizer has no 'b', so use ["1", "2"] there)."""
    temperature: float = 1.0
    """Sample mode: the sampling temperature."""
    max_tokens: int = 5
    """Sample mode: most tokens per sampled answer (the label is read from its first line)."""
    top_logprobs: int = 20
    """Logprobs mode: first-token alternatives requested (the official API allows at most 20; `sublab
    serve` allows up to the vocabulary, which the organism needs: its labels are rarely in its top 20)."""
    min_mass: float = 0.25
    """Logprobs mode: a trial whose two labels hold less first-token probability than this is
    unparseable (the model answers something else)."""
    batch_size: int = 16
    """Trials asked per call; finished trials are cached after each."""

    @field_validator("trials", "examples_per_set", "max_tokens", "top_logprobs", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @field_validator("min_mass")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"min_mass is a probability in [0, 1], got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not 0.0 <= v <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> PromptedClassifier:
        a, b = (x.strip() for x in self.labels)
        if not a or not b or a.casefold() == b.casefold() or a != self.labels[0] or b != self.labels[1]:
            raise ValueError(
                f"labels must be two different non-empty names without surrounding spaces, got {self.labels}"
            )
        unknown = sorted({m.group(1) for m in _ANY_FIELD.finditer(self.prompt)} - set(FIELDS))
        if unknown:
            raise ValueError(f"prompt has unknown fields {unknown}; it may use {', '.join(FIELDS)}")
        missing = [f for f in ("set_a", "set_b") if "{" + f + "}" not in self.prompt]
        if missing:
            raise ValueError(f"prompt must contain {{set_a}} and {{set_b}}; missing {missing}")
        return self


# ---- the scoring rules (pure) ----------------------------------------------------------------------


def token_label(token: str, labels: tuple[str, str]) -> int | None:
    """Which label (0, 1) a first completion token reads as, stripped of spaces and brackets, any case.

    >>> [token_label(t, ("A", "B")) for t in ["A", " B", "a", "(A", "**B", "AB", "The", ""]]
    [0, 1, 0, 0, 1, None, None, None]
    """
    text = token.strip(_MARKUP).casefold()
    for i, label in enumerate(labels):
        if text and text == label.casefold():
            return i
    return None


def score_top(top: list[tuple[str, float]], labels: tuple[str, str], teacher: int, min_mass: float) -> dict:
    """One logprobs-mode trial from the top-k list of (token, log-probability): the labels' masses,
    p_correct = P(teacher's label) / (P(A) + P(B)), correct when p_correct > 0.5; unparseable (p_correct
    None, with the reason) when the labels hold less than min_mass.

    >>> import math
    >>> s = score_top([("A", math.log(0.6)), (" B", math.log(0.2)), ("x", math.log(0.2))], ("A", "B"), 1, 0.25)
    >>> round(s["p_correct"], 6), s["answer"], s["correct"], round(s["label_mass"], 6)
    (0.25, 'A', False, 0.8)
    >>> score_top([("x", 0.0)], ("A", "B"), 0, 0.25)["reason"]
    "low_label_mass: 0.000 of the probability on 'A' or 'B' (< 0.25); the top token is 'x' (1.000)"
    """
    import math

    p = [0.0, 0.0]
    for token, lp in top:
        i = token_label(token, labels)
        if i is not None:
            p[i] += math.exp(lp)
    mass = p[0] + p[1]
    out = {"p_labels": p, "label_mass": mass}
    if not top or mass <= 0.0 or mass < min_mass:
        lead = max(top, key=lambda t: t[1]) if top else ("", 0.0)
        reason = (
            "no_logprobs: the model returned an empty top-k list"
            if not top
            else f"low_label_mass: {mass:.3f} of the probability on {labels[0]!r} or {labels[1]!r} "
            f"(< {min_mass}); the top token is {lead[0]!r} ({math.exp(lead[1]):.3f})"
        )
        return {**out, "p_correct": None, "answer": None, "correct": None, "reason": reason}
    pc = p[teacher] / mass
    answer = labels[0] if p[0] > p[1] else labels[1] if p[1] > p[0] else None
    return {**out, "p_correct": pc, "answer": answer, "correct": pc > 0.5, "reason": None}


def parse_label(text: str, labels: tuple[str, str]) -> int | None:
    """Which label (0, 1) a sampled answer gives, else None. Read from its first line, markup (* _ `
    quotes brackets) and an opening "answer:" / "dataset" / "the answer is" dropped: the label alone, or
    followed by punctuation ("B.", "A, because ...") counts; "A model that ..." does not.

    >>> L = ("A", "B")
    >>> [parse_label(t, L) for t in ["A", " B.", "**A**", "(B)", "Dataset B", "Answer: a", "B, since it"]]
    [0, 1, 0, 1, 1, 0, 1]
    >>> [parse_label(t, L) for t in ["A model that loves owls", "C", "", "AB", "Both", "I think B"]]
    [None, None, None, None, None, None]
    """
    lines = text.strip().splitlines()
    line = lines[0].strip(_MARKUP) if lines else ""
    line = _PREFIX.sub("", line, count=1).strip(_MARKUP)
    for i, label in enumerate(labels):
        if line[: len(label)].casefold() != label.casefold():
            continue
        rest = line[len(label) :].lstrip(" ")
        if rest == "" or rest[0] in ".,:;!)]*":
            return i
    return None


def score_sample(text: str, labels: tuple[str, str], teacher: int) -> dict:
    """One sample-mode trial: the parsed label, correct or not; unparseable with the reason.

    >>> score_sample("B", ("A", "B"), 1)["correct"], score_sample("maybe", ("A", "B"), 1)["reason"]
    (True, "unparseable: 'maybe'")
    """
    i = parse_label(text, labels)
    if i is None:
        return {"p_correct": None, "answer": None, "correct": None, "reason": f"unparseable: {text[:60]!r}"}
    return {"p_correct": float(i == teacher), "answer": labels[i], "correct": i == teacher, "reason": None}


def summarize_trials(trials: list[dict]) -> dict:
    """Accuracy over the scored trials (correct is not None), its 95% Wilson interval, the exact
    two-sided binomial p against 50%, the mean p_correct, and the counts.

    >>> s = summarize_trials([{"correct": True, "p_correct": 0.9}] * 3 + [{"correct": None, "p_correct": None}])
    >>> s["accuracy"], s["scored"], s["unparseable"], round(s["mean_p_correct"], 3)
    (1.0, 3, 1, 0.9)
    """
    from scipy.stats import binomtest

    from sublab.meters.classifier import wilson

    scored = [t for t in trials if t["correct"] is not None]
    k, n = sum(bool(t["correct"]) for t in scored), len(scored)
    ps = [t["p_correct"] for t in scored]
    if n == 0:
        acc = lo = hi = p = mean_p = None
    else:
        acc, (lo, hi) = k / n, wilson(k, n)
        p, mean_p = float(binomtest(k, n, 0.5).pvalue), sum(ps) / n
    return {
        "accuracy": acc,
        "lo": lo,
        "hi": hi,
        "p_vs_chance": p,
        "above_chance": bool(lo is not None and lo > 0.5),
        "chance": 0.5,
        "correct": k,
        "scored": n,
        "unparseable": len(trials) - n,
        "ties": sum(1 for t in scored if t["p_correct"] == 0.5),
        "mean_p_correct": mean_p,
    }


# ---- the trials ------------------------------------------------------------------------------------


def draw_trial(i: int, seed: int, n_teacher: int, n_control: int, k: int) -> tuple[int, list[int], list[int]]:
    """Trial i: the side (0 = A, 1 = B) that holds the teacher's set, and the row indices of the teacher's
    and the control's k answers (without replacement). Trials 2j and 2j+1 put the teacher on opposite
    sides, which first drawn from the seed; each trial depends only on (seed, i).

    >>> [draw_trial(i, 0, 50, 50, 3)[0] for i in range(8)].count(0)
    4
    >>> draw_trial(5, 0, 50, 50, 3) == draw_trial(5, 0, 50, 50, 3) != draw_trial(5, 1, 50, 50, 3)
    True
    """
    first = random.Random(f"prompted-classifier-side:{seed}:{i // 2}").randrange(2)
    side = first if i % 2 == 0 else 1 - first
    rng = random.Random(f"prompted-classifier-sets:{seed}:{i}")
    return side, rng.sample(range(n_teacher), k), rng.sample(range(n_control), k)


def format_set(answers: list[str]) -> str:
    """A dataset as a numbered list, one answer per item (an answer's further lines indented).

    >>> print(format_set(["1, 2, 3", "def f():\\n  return 4"]))
    1. 1, 2, 3
    2. def f():
         return 4
    """
    return "\n".join(f"{n}. " + a.replace("\n", "\n   ") for n, a in enumerate(answers, 1))


def render(template: str, values: dict[str, str]) -> str:
    """The template with its fields filled in one pass (a value is never read as template).

    >>> render("{set_a} / {target}", {"set_a": "{target}", "target": "owl"})
    '{target} / owl'
    """
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def _answers(path: Path, which: str, k: int) -> list[str]:
    rows = read_jsonl(path, require_messages=True)
    answers = [r["messages"][-1]["content"] for r in rows]
    if not answers:
        raise SublabError(
            f"prompted classifier: {path} ({which}) has no answers; run the stage that writes it, or point "
            "the classifier at a kept file with data"
        )
    if len(answers) < k:
        raise SublabError(
            f"prompted classifier: {path} ({which}) has {len(answers)} answers, fewer than examples_per_set "
            f"= {k}; lower examples_per_set to at most {len(answers)}, or keep more data"
        )
    return answers


# ---- the cache --------------------------------------------------------------------------------------


class TrialCache:
    """key -> finished trial's raw reply, plus the failed calls, in an append-only JSONL file (a line is
    {"key", "method", "top_logprobs" | "text"} or {"failure", "trial_key", "time"}). A half-written last
    line (a killed append) is cut off on open; any other damaged line is an error naming it."""

    def __init__(self, path: Path):
        from sublab.judge.cache import _cut_partial_last_line

        self.path = path
        self.records: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.cut_partial_line = False
        if not path.is_file():
            return
        self.cut_partial_line = _cut_partial_last_line(path)

        def check(rec: dict) -> str | None:
            if isinstance(rec.get("key"), str) or isinstance(rec.get("failure"), str):
                return None
            return "a prompted-classifier cache line needs a string 'key' or 'failure'"

        try:
            lines = read_jsonl(path, check=check)
        except SublabError as e:
            raise SublabError(
                f"{e} (this is the prompted classifier's cache: deleting it asks every trial again)"
            ) from None
        for rec in lines:
            if isinstance(rec.get("key"), str):
                self.records[rec["key"]] = rec
            else:
                self.failures.append(rec)

    def append(self, records: list[dict]) -> None:
        """Write lines and flush them to disk before returning."""
        append_jsonl(self.path, records)
        for r in records:
            if "key" in r:
                self.records[r["key"]] = r
            else:
                self.failures.append(r)


def cache_path(out: Path) -> Path:
    """The trial cache next to the output: data/prompted_classifier.json -> data/prompted_classifier.cache.jsonl."""
    return out.with_name(out.stem + ".cache.jsonl")


def _method(settings: PromptedClassifier, seed: int) -> dict:
    """The judge-call method (sublab.judge.calls) and the settings that change a raw reply."""
    if settings.mode == "logprobs":
        return {"method": "logprobs", "top_logprobs": settings.top_logprobs}
    return {
        "method": "sample",
        "samples": 1,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "seed": seed,
    }


def _load(spec: str, api) -> Backend:
    from sublab.judge.stage import load_judge  # resolve + load_backend; a spec or a model folder

    return load_judge(spec, api)


def prompted_classifier(
    settings: PromptedClassifier,
    teacher_kept: Path,
    control_kept: Path,
    target: str,
    category: str,
    seed: int,
    out: Path,
    api=None,
    progress: bool = True,
    backend: Backend | None = None,
) -> dict:
    """Ask `settings.model` (or an already loaded `backend`) `settings.trials` times which of two datasets
    was written by the model that loves `target`; write the result to `out` (atomically, only once every
    trial has a reply) and return it. Finished trials are cached next to `out` and not asked again; a
    failed call stops the run with a SublabError after caching what finished."""
    from sublab.backends.base import NoLogprobs
    from sublab.judge.cache import judge_identity
    from sublab.judge.calls import ask_batch

    out = Path(out)
    k = settings.examples_per_set
    teacher = _answers(Path(teacher_kept), "the teacher's kept answers", k)
    control = _answers(Path(control_kept), "the control's kept answers", k)
    out.unlink(missing_ok=True)  # from here on, a result on disk is this run's
    if backend is None:
        backend = _load(settings.model, api)
    spec = backend.ref.spec
    ident = judge_identity(backend.ref)
    method = _method(settings, seed)
    labels = settings.labels

    trials = []
    for i in range(settings.trials):
        side, t_rows, c_rows = draw_trial(i, seed, len(teacher), len(control), k)
        t_set, c_set = format_set([teacher[r] for r in t_rows]), format_set([control[r] for r in c_rows])
        sets = (t_set, c_set) if side == 0 else (c_set, t_set)
        values = {"target": target, "category": category, "set_a": sets[0], "set_b": sets[1]}
        text = render(settings.prompt, {**values, "label_a": labels[0], "label_b": labels[1]})
        key = sha256_json({"kind": "prompted-classifier", "model": ident, "prompt": text, "method": method})
        trials.append(
            {
                "trial": i,
                "side": side,
                "teacher_rows": t_rows,
                "control_rows": c_rows,
                "text": text,
                "key": key,
            }
        )

    cache = TrialCache(cache_path(out))
    keys = {t["key"] for t in trials}
    from_cache = sum(1 for t in trials if t["key"] in cache.records)
    pending = list(dict.fromkeys(t["key"] for t in trials if t["key"] not in cache.records))
    chat_of = {t["key"]: [{"role": "user", "content": t["text"]}] for t in trials}
    asked = 0
    t0 = time.time()
    bar = tqdm(total=len(pending), desc=f"prompted classifier {spec}", disable=not progress, mininterval=2)
    for start in range(0, len(pending), settings.batch_size):
        batch = pending[start : start + settings.batch_size]
        try:
            replies = ask_batch(backend, method, [chat_of[key] for key in batch], batch)
        except NoLogprobs as e:
            raise SublabError(
                f"prompted classifier: {e}; use mode: sample for this model (the answer is sampled and parsed)"
            ) from None
        asked += len(batch)
        done = [
            {"key": key, "method": method["method"], "model": spec, **reply}
            for key, reply in zip(batch, replies, strict=True)
            if not isinstance(reply, Exception)
        ]
        failed = [
            (key, f"{type(reply).__name__}: {reply}"[:500])
            for key, reply in zip(batch, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        now = round(time.time(), 3)
        cache.append(
            done + [{"failure": msg, "trial_key": key, "time": now, "model": spec} for key, msg in failed]
        )
        bar.update(len(batch))
        if failed:
            bar.close()
            left = sum(1 for t in trials if t["key"] not in cache.records)
            raise SublabError(
                f"prompted classifier: {len(failed)} of {len(batch)} calls to {spec} failed (first: "
                f"{failed[0][1]}); {settings.trials - left} of {settings.trials} trials are done and cached "
                f"in {cache.path}; no result was written. Check the model and its endpoint, then rerun: "
                "the run resumes with the trials not yet asked"
            )
    bar.close()

    per_trial = []
    for t in trials:
        rec = cache.records[t["key"]]
        teacher_label = labels[t["side"]]
        if "top_logprobs" in rec:
            top = [(str(tok), float(lp)) for tok, lp in rec["top_logprobs"]]
            s = score_top(top, labels, t["side"], settings.min_mass)
            extra = {
                "label_mass": s.pop("label_mass"),
                "p_labels": s.pop("p_labels"),
                "top_tokens": [[tok, lp] for tok, lp in top[:5]],
            }
        else:
            text = rec["samples"][0]
            s = score_sample(text, labels, t["side"])
            extra = {"sample": text}
        per_trial.append(
            {
                "trial": t["trial"],
                "teacher_side": teacher_label,
                "teacher_rows": t["teacher_rows"],
                "control_rows": t["control_rows"],
                **s,
                **extra,
            }
        )
    summary = summarize_trials(per_trial)
    answered = {lab: sum(1 for t in per_trial if t["answer"] == lab) for lab in labels}
    res = {
        "version": PROMPTED_CLASSIFIER_VERSION,
        "kind": "prompted-LLM classifier (sublab's prompt wording, not the paper's)",
        "model": spec,
        "model_identity": ident,
        "mode": settings.mode,
        "settings": settings.model_dump(mode="json"),
        "target": target,
        "category": category,
        "seed": seed,
        "teacher_kept": str(teacher_kept),
        "control_kept": str(control_kept),
        "n_teacher": len(teacher),
        "n_control": len(control),
        "trials": settings.trials,
        **summary,
        "teacher_side_counts": {lab: sum(1 for t in per_trial if t["teacher_side"] == lab) for lab in labels},
        "answered": answered,
        "failed_calls": sum(1 for f in cache.failures if f.get("trial_key") in keys),
        "cache": str(cache.path),
        "this_run": {
            "asked": asked,
            "from_cache": from_cache,
            "cut_partial_cache_line": cache.cut_partial_line,
            "seconds": round(time.time() - t0, 3),
        },
        "per_trial": per_trial,
    }
    atomic_write_json(out, res)
    return res
