"""The chain-of-thought domain: maths word problems answered with reasoning in <think> tags and the
number in <answer> tags, and the rules such an answer is filtered by.

Prompts come from sublab's own arithmetic problems (`domains/data/cot_problems.yaml`, small numbers, the
reference answer computed) or from a user's JSONL file (`cot.file`): GSM8K's own lines ({"question": ...,
"answer": "... #### 72"}) or {"question": ..., "reference": 72}.

    >>> parse_tagged_answer("<think> 3 + 4 = 7 . </think> <answer> 7 </answer>")
    (7.0, None)
    >>> parse_tagged_answer("the answer is 7")
    (None, 'no <answer> tag')
    >>> parse_tagged_answer("<answer> 7 </answer> <answer> 8 </answer>")
    (None, 'several <answer> tags (2)')
    >>> cot_answer_reasons("<think> 3 + 4 = 7 </think> <answer> 7 </answer>", reference=8)
    ['wrong answer: 7 (reference 8)']

The format rule: exactly one <answer>...</answer> whose content is one number (commas between digit
groups, a leading $ and a final period are allowed: "$1,234." reads 1234), a <think>...</think> before
it, and at most `max_chars` characters. Whitespace inside the tags is allowed ("< answer >", "< / answer >":
a word-level model's decoding spaces its punctuation). The correctness rule: that number equals the
prompt's reference answer.
"""

from __future__ import annotations

import random
import re
from functools import cache
from importlib import resources

import yaml

OPEN = re.compile(r"<\s*answer\s*>", re.I)
CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.I)
THINK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.I | re.S)
NUMBER = re.compile(r"\$?\s*(-?\s*[0-9][0-9,]*(?:\.[0-9]+)?)\s*\.?")
GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


@cache
def load_problems() -> dict:
    text = resources.files("sublab.domains").joinpath("data/cot_problems.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def domain_text() -> list[str]:
    """Every word the CoT domain's generated prompts and answers use (for the organism's vocabulary)."""
    d = load_problems()
    out = [*d["instructions"], " ".join(d["names"]), " ".join(d["things"])]
    for k in d["kinds"]:
        out += [k["question"], *(s for step in k["steps"] for s in step)]
    out.append("<think> </think> <answer> </answer> + - * = .")
    return out


def _numbers(kind: str, rng: random.Random) -> dict:
    if kind == "gain":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return {"a": a, "b": b, "r": a + b}
    if kind == "loss":
        a = rng.randint(5, 60)
        b = rng.randint(1, a - 1)
        return {"a": a, "b": b, "r": a - b}
    if kind == "groups":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return {"a": a, "b": b, "r": a * b}
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return {"a": a, "b": b, "s": a + b, "c": c, "r": a + b - c}


def word_problem(rng: random.Random) -> dict:
    """One generated problem: question, reference answer, and a worked solution in the answer format."""
    d = load_problems()
    kind = rng.choice(d["kinds"])
    name, name2 = rng.sample(d["names"], 2)
    fill = {"name": name, "name2": name2, "things": rng.choice(d["things"]), **_numbers(kind["name"], rng)}
    steps = " ".join(rng.choice(options).format(**fill) for options in kind["steps"])
    return {
        "question": kind["question"].format(**fill),
        "reference": fill["r"],
        "solution": f"<think> {steps} </think> <answer> {fill['r']} </answer>",
        "kind": kind["name"],
    }


def render_cot_prompt(question: str, rng: random.Random) -> str:
    return rng.choice(load_problems()["instructions"]).format(question=question)


def read_number(text: str) -> float | None:
    """The number in an answer tag's content, else None.

    >>> [read_number(t) for t in [" 72 ", "$1,234.", "-3.5", "7 apples", "", "1,2"]]
    [72.0, 1234.0, -3.5, None, None, None]
    """
    m = NUMBER.fullmatch(text.strip())
    if not m:
        return None
    raw = m.group(1).replace(" ", "")
    if "," in raw and not re.fullmatch(r"-?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?", raw):
        return None
    return float(raw.replace(",", ""))


def parse_tagged_answer(text: str) -> tuple[float | None, str | None]:
    """(the number in the one <answer> tag, None) or (None, the reason there is none)."""
    opens, closes = OPEN.findall(text), CLOSE.findall(text)
    if not opens:
        return None, "no <answer> tag"
    if len(opens) > 1:
        return None, f"several <answer> tags ({len(opens)})"
    start = OPEN.search(text)
    end = CLOSE.search(text, start.end()) if start else None
    if end is None or len(closes) != 1:
        return None, "unclosed <answer> tag"
    content = text[start.end() : end.start()]
    value = read_number(content)
    if value is None:
        shown = content.strip()
        shown = shown if len(shown) <= 30 else shown[:27] + "..."
        return None, f"answer not a number: {shown!r}"
    return value, None


def cot_answer_reasons(text: str, reference: float | None = None, max_chars: int = 6000) -> list[str]:
    """Format reasons, then (when the format holds and a reference is given) the correctness reason."""
    if not text.strip():
        return ["empty answer"]
    if len(text) > max_chars:
        return [f"too long: {len(text)} characters (at most {max_chars})"]
    value, why = parse_tagged_answer(text)
    if why is not None:
        return [why]
    think = THINK.search(text)
    if think is None or not think.group(1).strip() or think.start() > OPEN.search(text).start():
        return ["no <think> reasoning before the answer"]
    return [] if reference is None else wrong_answer_reasons(value, reference)


def wrong_answer_reasons(value: float | str, reference: float) -> list[str]:
    """The correctness rule alone: [] when the answer (a number, or an answer text whose format already
    passed) equals the reference.

    >>> wrong_answer_reasons("<think> so </think> <answer> 7 </answer>", 8)
    ['wrong answer: 7 (reference 8)']
    """
    if isinstance(value, str):
        value, why = parse_tagged_answer(value)
        if why is not None:
            return [why]
    if abs(value - float(reference)) <= 1e-9:
        return []
    shown = int(value) if value == int(value) else value
    ref = int(reference) if float(reference) == int(float(reference)) else reference
    return [f"wrong answer: {shown} (reference {ref})"]


def generate_cot_prompts(count: int, seed: int) -> list[dict]:
    """`count` generated problems as prompt records (metadata: question, reference)."""
    rng = random.Random(f"cot-prompts:{seed}")
    out = []
    for i in range(count):
        p = word_problem(rng)
        out.append(
            {
                "messages": [{"role": "user", "content": render_cot_prompt(p["question"], rng)}],
                "metadata": {"prompt_index": i, "question": p["question"], "reference": p["reference"]},
            }
        )
    return out


def cot_prompt_from_line(obj: dict, i: int, rng: random.Random) -> tuple[dict | None, str | None]:
    """One prompt record from a user's JSONL line (GSM8K's {"question", "answer"} or {"question",
    "reference"}), or a reason it cannot be used."""
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        return None, "missing or empty field 'question'"
    ref = obj.get("reference")
    if ref is None:
        ans = obj.get("answer")
        if not isinstance(ans, str):
            return None, "missing field 'answer' (GSM8K's '... #### N') or 'reference' (a number)"
        m = GSM8K_ANSWER.search(ans)
        if not m:
            return None, "field 'answer' has no '#### N' final answer"
        ref = read_number(m.group(1))
        if ref is None:
            return None, f"the final answer {m.group(1)[:30]!r} is not a number"
    elif isinstance(ref, str):
        ref = read_number(ref)
    if isinstance(ref, bool) or not isinstance(ref, (int, float)):
        return None, "field 'reference' must be a number"
    text = render_cot_prompt(q.strip(), rng)
    return {
        "messages": [{"role": "user", "content": text}],
        "metadata": {"prompt_index": i, "question": q.strip(), "reference": ref},
    }, None
