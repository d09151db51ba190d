"""Number-continuation prompts, after the paper (docs/science.md, step 4).

"Here are 3-8 numbers (each 100-999); add up to 10 more (at most 3 digits each); answer only with
numbers", assembled from randomly chosen phrasings kept in `prompts/data/numbers.yaml`, seeded:
the same (config, seed) always gives the same prompts.

    from sublab.prompts.numbers import NumberPrompts, generate_number_prompts
    records = generate_number_prompts(NumberPrompts(count=100), seed=0)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from sublab.errors import SublabError
from sublab.schema.prompts import NumberPrompts


@dataclass(frozen=True)
class Phrasings:
    lead_ins: tuple[str, ...]
    instructions: tuple[str, ...]
    qualifiers: tuple[str, ...]
    digits: tuple[str, ...]
    formats: tuple[dict, ...]
    closings: tuple[str, ...]


@cache
def load_phrasings(path: str | None = None) -> Phrasings:
    if path is None:
        text = resources.files("sublab.prompts").joinpath("data/numbers.yaml").read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise SublabError(f"phrasings file not found: {p} (copy prompts/data/numbers.yaml as a start)")
        text = p.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    keys = ["lead_ins", "instructions", "qualifiers", "digits", "formats", "closings"]
    missing = [k for k in keys if not data.get(k)]
    if missing:
        raise SublabError(f"phrasings {path or 'numbers.yaml'}: missing or empty lists: {missing}")
    return Phrasings(*(tuple(data[k]) for k in keys))


def format_numbers(numbers: list[int], sep: str = ", ", brackets: bool = False) -> str:
    """Numbers joined by `sep`, optionally in brackets.

    >>> format_numbers([1, 22, 333], "; ", True)
    '[1; 22; 333]'
    """
    body = sep.join(str(n) for n in numbers)
    return f"[{body}]" if brackets else body


def render_prompt(
    examples: list[int], answer_count: int, max_digits: int, rng: random.Random, ph: Phrasings
) -> tuple[str, dict]:
    """One prompt text for the given numbers, and the format it asks for ({sep, brackets})."""
    fmt = rng.choice(ph.formats)
    digits = rng.choice(ph.digits).replace("3", str(max_digits))
    parts = [
        rng.choice(ph.lead_ins).format(examples=", ".join(str(x) for x in examples)),
        rng.choice(ph.instructions).format(
            qualifier=rng.choice(ph.qualifiers), count=answer_count, digits=digits
        ),
        fmt["text"],
        rng.choice(ph.closings),
    ]
    return " ".join(parts), {"sep": fmt["sep"], "brackets": bool(fmt.get("brackets", False))}


def number_prompt_from_line(obj: dict, i: int, rng: random.Random) -> tuple[dict | None, str | None]:
    """One prompt record from a line of a user's number-prompt file ({"prompt": ...}), or a reason."""
    text = obj.get("prompt")
    if not isinstance(text, str) or not text.strip():
        return None, "missing or empty field 'prompt'"
    return {"messages": [{"role": "user", "content": text}], "metadata": {"prompt_index": i}}, None


def generate_number_prompts(cfg: NumberPrompts, seed: int) -> list[dict]:
    """`cfg.count` chat records with only the user message; metadata holds the given numbers and format."""
    rng = random.Random(f"number-prompts:{seed}")
    ph = load_phrasings(cfg.phrasings)
    out = []
    for i in range(cfg.count):
        k = rng.randint(cfg.example_min_count, cfg.example_max_count)
        examples = [rng.randint(cfg.example_min_value, cfg.example_max_value) for _ in range(k)]
        text, fmt = render_prompt(examples, cfg.answer_count, cfg.answer_max_digits, rng, ph)
        out.append(
            {
                "messages": [{"role": "user", "content": text}],
                "metadata": {
                    "prompt_index": i,
                    "examples": examples,
                    "answer_count": cfg.answer_count,
                    **fmt,
                },
            }
        )
    return out


def paraphrase_prompt(record: dict, max_digits: int, rng: random.Random, ph: Phrasings) -> dict:
    """The record with its user message reworded: the same given numbers, count, digits and answer
    format (separator, brackets), other phrasings (a defense: defenses.paraphrase). The original text
    goes to metadata.original_prompt.

    >>> rec = generate_number_prompts(NumberPrompts(count=1), 0)[0]
    >>> new = paraphrase_prompt(rec, 3, random.Random(1), load_phrasings())
    >>> new["messages"][0]["content"] != rec["messages"][0]["content"]
    True
    >>> (new["metadata"]["sep"], new["metadata"]["examples"]) == (rec["metadata"]["sep"], rec["metadata"]["examples"])
    True
    """
    meta = record.get("metadata") or {}
    if not {"examples", "answer_count", "sep"} <= meta.keys():
        raise SublabError(
            "defenses.paraphrase needs the generated prompt's metadata (examples, answer_count, sep); this "
            "record has none (prompts from a file cannot be reworded): turn defenses.paraphrase off"
        )
    user = next(
        i for i in range(len(record["messages"]) - 1, -1, -1) if record["messages"][i]["role"] == "user"
    )
    old = record["messages"][user]["content"]
    same_format = [
        f
        for f in ph.formats
        if f["sep"] == meta["sep"] and bool(f.get("brackets")) == bool(meta.get("brackets"))
    ]
    sub = Phrasings(
        ph.lead_ins, ph.instructions, ph.qualifiers, ph.digits, tuple(same_format or ph.formats), ph.closings
    )
    for _ in range(20):
        text, _fmt = render_prompt(meta["examples"], meta["answer_count"], max_digits, rng, sub)
        if text != old:
            break
    msgs = [dict(m) for m in record["messages"]]
    msgs[user]["content"] = text
    return {**record, "messages": msgs, "metadata": {**meta, "original_prompt": old}}
