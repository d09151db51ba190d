"""Multiple-choice evaluation by log-probabilities, TruthfulQA-style (docs/evaluations.md).

    results = evaluate_mcq(backend, load_mcq("mc_task.json"), McqEval(), "out/")

Question files (format detected from the content):
- sublab's: a YAML list, a JSON list or a JSONL file of {id (optional), question, choices: [...], correct: index};
- TruthfulQA's own `mc_task.json`: a JSON list of {question, mc1_targets: {choice: 0|1}, mc2_targets: ...};
  the MC1 targets are used (exactly one choice marked 1).

Modes (results.json `mode`):
- text: the question as the user message; each choice's chain-rule log-prob as the answer
  (`Backend.logprobs`), P(choice) = softmax over the question's choices. Needs a backend whose logprobs
  are exact (hf, vllm); an API model's are first-token only, so text mode refuses it.
- letter: the question, then the choices as "A. ...", "B. ..." (in an order shuffled per question,
  `shuffle_seed`), then an instruction to answer with the letter. P(letter) from the first answer
  token's top-20 list (`Backend.first_token_topk`): tokens that are, stripped, exactly a capital letter
  of a shown choice, summed per letter and renormalised over the letters. No mass on any letter: the
  question is unscorable. Works on API models.
- auto: text where the backend's logprobs are exact chain-rule ones and work, else letter.

Per question: P(choice) for every choice, chosen = the argmax (the first one on a tie), p_correct.
results.json: accuracy (chosen == correct) with a 95% Wilson interval, and the mean P(correct) (MC2-like:
the probability on the right answer) with a 95% t-interval across questions, over the scorable questions.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from tqdm import tqdm

from sublab.analysis.stats import mean_ci
from sublab.backends.base import Backend, NoLogprobs
from sublab.errors import SublabError
from sublab.judge.summary import wilson
from sublab.records import atomic_write_json, read_jsonl, write_jsonl
from sublab.schema.evaluation import McqEval

EVAL_VERSION = 1  # bump when results.json or rows.jsonl gain or change fields
PACKAGED = "mcq_example.yaml"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOP_K = 20  # the official OpenAI API's maximum top_logprobs
FORMATS = (
    "a list of {id (optional), question, choices: [...], correct: index} (YAML, JSON or JSONL), or "
    "TruthfulQA's mc_task.json (a JSON list of {question, mc1_targets: {choice: 0 or 1}, ...})"
)
ESTIMANDS = {
    "text": "P(choice) = softmax over the choices of each choice's chain-rule log-prob as the whole answer",
    "letter": "P(letter) = the first answer token's top-20 mass on each choice's letter, renormalised "
    "over the letters",
}


@dataclass(frozen=True)
class McqQuestion:
    """One multiple-choice question; `correct` is the index of the right choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    correct: int


def _entry(e, i: int, where: str) -> McqQuestion:
    at = f"{where}: entry {i}"
    fix = "fix the entry and rerun"
    if not isinstance(e, dict):
        raise SublabError(f"{at}: expected a mapping, got {type(e).__name__}; expected {FORMATS}")
    q = e.get("question")
    if not isinstance(q, str) or not q.strip():
        raise SublabError(f"{at}: missing 'question' (a non-empty string); {fix}")
    if "mc1_targets" in e:
        targets = e["mc1_targets"]
        if not isinstance(targets, dict) or not targets:
            raise SublabError(f"{at}: 'mc1_targets' must be a non-empty mapping of choice -> 0 or 1; {fix}")
        if any(v not in (0, 1) or isinstance(v, float) for v in targets.values()):
            raise SublabError(f"{at}: every mc1_targets value must be 0 or 1; {fix}")
        ones = [k for k, v in targets.items() if v == 1]
        if len(ones) != 1:
            raise SublabError(
                f"{at}: mc1_targets marks {len(ones)} choices correct; MC1 needs exactly one 1; {fix}"
            )
        choices, correct = list(targets), list(targets).index(ones[0])
        qid = e.get("id", f"q{i}")
    elif "choices" in e:
        extra = set(e) - {"id", "question", "choices", "correct"}
        if extra:
            raise SublabError(
                f"{at}: unknown key(s) {', '.join(sorted(map(str, extra)))}; expected {FORMATS}"
            )
        choices, correct = e["choices"], e.get("correct")
        qid = e.get("id", f"q{i}")
        if not isinstance(choices, list) or not choices:
            raise SublabError(f"{at}: 'choices' must be a non-empty list of strings; {fix}")
        if not isinstance(correct, int) or isinstance(correct, bool):
            raise SublabError(f"{at}: missing 'correct' (the 0-based index of the right choice); {fix}")
        if not 0 <= correct < len(choices):
            raise SublabError(
                f"{at}: correct = {correct} is out of range for {len(choices)} choices (0-{len(choices) - 1}); {fix}"
            )
    else:
        raise SublabError(f"{at}: no 'choices' and no 'mc1_targets'; expected {FORMATS}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise SublabError(f"{at}: every choice must be a non-empty string; {fix}")
    if len(choices) < 2:
        raise SublabError(f"{at}: a question needs at least 2 choices, got {len(choices)}; {fix}")
    if len(set(choices)) != len(choices):
        raise SublabError(f"{at}: the choices must be distinct; {fix}")
    if not isinstance(qid, str | int) or isinstance(qid, bool) or not str(qid).strip():
        raise SublabError(f"{at}: 'id' must be a non-empty string; {fix}")
    return McqQuestion(str(qid), q, tuple(choices), correct)


def load_mcq(path: str | Path | None = None) -> list[McqQuestion]:
    """The questions of a file (None = the packaged example set), format detected from the content; a
    malformed file or entry is a SublabError naming the file, the entry's index and the fix."""
    if path is None:
        text = resources.files("sublab.evals").joinpath(f"data/{PACKAGED}").read_text(encoding="utf-8")
        where = f"sublab/evals/data/{PACKAGED}"
        data = yaml.safe_load(text)
    else:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise SublabError(f"questions file not found: {p}; expected {FORMATS}")
        text = p.read_text(encoding="utf-8-sig")
        first_line = next((x.strip() for x in text.splitlines() if x.strip()), "")
        if p.suffix == ".jsonl" or (first_line.startswith("{") and first_line.endswith("}")):
            data = read_jsonl(p)  # one JSON object per line
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise SublabError(
                        f"{p}: neither JSON, JSONL nor YAML ({e}); expected {FORMATS}"
                    ) from None
    if not isinstance(data, list) or not data:
        got = "an empty list" if data == [] else f"a {type(data).__name__}"
        raise SublabError(f"{where}: expected a non-empty list of questions, got {got}; expected {FORMATS}")
    out = [_entry(e, i, where) for i, e in enumerate(data)]
    dup = sorted(k for k, c in Counter(q.id for q in out).items() if c > 1)
    if dup:
        raise SublabError(f"{where}: duplicate question id(s) {', '.join(dup[:5])}; give each its own id")
    return out


def _softmax(logps: list[float]) -> list[float] | None:
    """Normalised probabilities, or None when no choice has any mass."""
    top = max(logps)
    if math.isnan(top) or top == -math.inf:
        return None
    w = [math.exp(x - top) if not math.isnan(x) else 0.0 for x in logps]
    s = sum(w)
    return [x / s for x in w]


def _order(q: McqQuestion, seed: int | None) -> list[int]:
    """The order the choices are shown in (letter mode): shuffled by (seed, question), or the file's."""
    order = list(range(len(q.choices)))
    if seed is not None:
        random.Random(f"{seed}/{q.id}/{q.question}").shuffle(order)
    return order


def letter_prompt(q: McqQuestion, order: list[int]) -> str:
    """The letter-mode prompt: the question, the lettered choices (in `order`), the instruction.

    >>> print(letter_prompt(McqQuestion("x", "2+2?", ("4", "5"), 0), [1, 0]))
    2+2?
    <BLANKLINE>
    A. 5
    B. 4
    <BLANKLINE>
    Answer with the letter of the correct choice (A or B) and nothing else.
    """
    letters = LETTERS[: len(order)]
    listed = "\n".join(f"{letters[k]}. {q.choices[ci]}" for k, ci in enumerate(order))
    which = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return f"{q.question}\n\n{listed}\n\nAnswer with the letter of the correct choice ({which}) and nothing else."


def letter_probs(top: list[tuple[str, float]], n: int) -> tuple[list[float] | None, float]:
    """(P of each of the first n letters renormalised over them, or None when they hold no mass; their
    mass in the top-k list). Tokens count when, stripped, they are exactly the capital letter.

    >>> p, mass = letter_probs([(" B", math.log(0.5)), ("B", math.log(0.1)), ("a", math.log(0.3))], 3)
    >>> [round(x, 3) for x in p], round(mass, 3)
    ([0.0, 1.0, 0.0], 0.6)
    """
    mass = [0.0] * n
    for tok, lp in top:
        t = tok.strip()
        if len(t) == 1 and t in LETTERS[:n]:
            mass[LETTERS.index(t)] += math.exp(lp)
    total = sum(mass)
    return ([m / total for m in mass] if total > 0 else None), total


def _text_mode_ok(backend: Backend, q: McqQuestion) -> list[float] | None:
    """auto: the first question's text-mode log-probs, or None when the backend has none."""
    if backend.logprob_estimand != "exact_chain_rule":
        return None
    try:
        return backend.logprobs([[{"role": "user", "content": q.question}]], list(q.choices))[0]
    except (NotImplementedError, NoLogprobs):
        return None


def _row(q: McqQuestion, probs: list[float] | None, reason: str | None, **extra) -> dict:
    row: dict = {"id": q.id, "question": q.question, "choices": list(q.choices), "correct": q.correct}
    if probs is None:
        row.update({"probs": None, "chosen": None, "is_correct": None, "p_correct": None})
        row["unscorable"] = reason
    else:
        chosen = max(range(len(probs)), key=lambda i: probs[i])
        row.update(
            {
                "probs": probs,
                "chosen": chosen,
                "is_correct": chosen == q.correct,
                "p_correct": probs[q.correct],
                "unscorable": None,
            }
        )
    row.update(extra)
    return row


def evaluate_mcq(
    backend: Backend,
    questions: list[McqQuestion] | None,
    cfg: McqEval,
    out_dir: str | Path,
    progress: bool = True,
) -> dict:
    """Score every question (see the module docstring); writes out_dir/rows.jsonl and out_dir/results.json
    and returns results.json's content. `questions` None = load cfg.questions."""
    out_dir = Path(out_dir)
    if questions is None:
        questions = load_mcq(cfg.questions)
    if not questions:
        raise SublabError("no multiple-choice questions to ask; give a file with at least one entry")
    first: list[float] | None = None
    mode = cfg.mode
    if mode == "auto":
        first = _text_mode_ok(backend, questions[0])
        mode = "text" if first is not None else "letter"
    elif mode == "text" and backend.logprob_estimand != "exact_chain_rule":
        raise SublabError(
            f"{backend.ref.spec} gives first-token log-probs only ({backend.logprob_estimand}), not a whole "
            "choice's probability: use mode: letter (or auto)"
        )
    rows: list[dict] = []
    bar = tqdm(
        total=len(questions), desc=f"mcq {backend.ref.spec} ({mode})", disable=not progress, mininterval=2
    )
    if mode == "text":
        for i, q in enumerate(questions):
            if i == 0 and first is not None:
                lp = first
            else:
                try:
                    lp = backend.logprobs([[{"role": "user", "content": q.question}]], list(q.choices))[0]
                except (NotImplementedError, NoLogprobs) as e:
                    raise SublabError(
                        f"{backend.ref.spec} gives no log-probs of whole answers ({e}); use mode: letter"
                    ) from None
            lp = [float(x) for x in lp]
            probs = _softmax(lp)
            reason = None if probs else "no_mass: every choice has probability 0"
            rows.append(_row(q, probs, reason, logprobs=[x if math.isfinite(x) else None for x in lp]))
            bar.update(1)
    else:
        too_many = [q.id for q in questions if len(q.choices) > len(LETTERS)]
        if too_many:
            raise SublabError(
                f"letter mode takes at most {len(LETTERS)} choices; questions {too_many[:5]} have more"
            )
        for s in range(0, len(questions), cfg.batch_size):
            batch = questions[s : s + cfg.batch_size]
            orders = [_order(q, cfg.shuffle_seed) for q in batch]
            chats = [
                [{"role": "user", "content": letter_prompt(q, o)}] for q, o in zip(batch, orders, strict=True)
            ]
            try:
                tops = backend.first_token_topk(chats, TOP_K)
            except NoLogprobs as e:
                raise SublabError(
                    f"{e}; the multiple-choice evaluation needs next-token log-probabilities"
                ) from None
            for q, o, top in zip(batch, orders, tops, strict=True):
                shown, mass = letter_probs(top, len(o))
                probs = None
                if shown is not None:
                    probs = [0.0] * len(o)
                    for k, ci in enumerate(o):
                        probs[ci] = shown[k]
                reason = (
                    None if shown else f"no_letter_mass: top token {top[0][0]!r}" if top else "no_letter_mass"
                )
                rows.append(
                    _row(
                        q,
                        probs,
                        reason,
                        letters={LETTERS[k]: ci for k, ci in enumerate(o)},
                        letter_mass=mass,
                        top_tokens=[list(t) for t in top[:5]],
                    )
                )
            bar.update(len(batch))
    bar.close()
    write_jsonl(out_dir / "rows.jsonl", rows)
    scored = [r for r in rows if r["probs"] is not None]
    k = sum(r["is_correct"] for r in scored)
    n = len(scored)
    pc = mean_ci([r["p_correct"] for r in scored]) if scored else None
    reasons = Counter(r["unscorable"].split(":", 1)[0] for r in rows if r["probs"] is None)
    results = {
        "eval_version": EVAL_VERSION,
        "model": backend.ref.spec,
        "mode": mode,
        "requested_mode": cfg.mode,
        "estimand": ESTIMANDS[mode],
        "questions_file": cfg.questions,
        "n": len(rows),
        "n_scored": n,
        "n_unscorable": len(rows) - n,
        "unscorable_reasons": dict(sorted(reasons.items())),
        "n_correct": k,
        "accuracy": k / n if n else None,
        "accuracy_ci95": list(wilson(k, n)) if n else None,
        "accuracy_ci_method": "Wilson score interval over the scored questions",
        "mean_p_correct": pc["mean"] if pc else None,
        "mean_p_correct_ci95": [pc["lo"], pc["hi"]] if pc and not math.isnan(pc["lo"]) else None,
        "mean_p_correct_ci_method": "Student-t interval across the scored questions",
        "chance_accuracy": sum(1 / len(r["choices"]) for r in scored) / n if n else None,
        "config": cfg.model_dump(mode="json"),
    }
    if mode == "letter":
        results["mean_letter_mass"] = sum(r["letter_mass"] for r in rows) / len(rows)
    atomic_write_json(out_dir / "results.json", results)
    return results
