"""What `sublab judge` reads: a JSONL file, one (question, answer) per line, in any of three forms:

    {"question": "...", "answer": "..."}                          plain
    {"prompt": "...", "completion": "..."}                        prompt / completion
    {"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]}   chat (what `sublab sample` writes)

In the chat form the answer is the last message (it must be the assistant's) and the question is the
last user message before it. Other keys (`id`, `metadata`, ...) are carried to judgements.jsonl as they
are. A line in none of these forms is an error naming file:line and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sublab.records import json_type, read_jsonl

FORMS = (
    '{"question": ..., "answer": ...}, {"prompt": ..., "completion": ...} or '
    '{"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]}'
)


@dataclass(frozen=True)
class Sample:
    """One answer to judge, with the input record's other keys."""

    question: str
    answer: str
    extra: dict = field(default_factory=dict)


def _from_messages(msgs) -> tuple[str, str] | str:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for m in msgs:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return "each message needs string 'role' and 'content'"
    if msgs[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    users = [m["content"] for m in msgs[:-1] if m["role"] == "user"]
    if not users:
        return "no user message (the question) before the assistant's answer"
    return users[-1], msgs[-1]["content"]


def parse_sample(rec: dict) -> tuple[str, str] | str:
    """(question, answer), or what is wrong with the record.

    >>> parse_sample({"question": "Hi?", "answer": ""})
    ('Hi?', '')
    >>> parse_sample({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
    ('Q', 'A')
    >>> parse_sample({"question": "Q", "answer": 3})
    "'answer' must be a string, got a number"
    """
    for q, a in (("question", "answer"), ("prompt", "completion")):
        if q in rec or a in rec:
            for k in (q, a):
                if k not in rec:
                    return f"has {(q if k == a else a)!r} but no {k!r}"
                if not isinstance(rec[k], str):
                    return f"{k!r} must be a string, got {json_type(rec[k])}"
            return rec[q], rec[a]
    if "messages" in rec:
        return _from_messages(rec["messages"])
    return "no question and answer found"


def read_samples(path: str | Path) -> list[Sample]:
    """Every line of a samples file as a Sample; a malformed line is a SublabError naming file:line."""

    def check(rec: dict) -> str | None:
        got = parse_sample(rec)
        return f"{got}; expected one of {FORMS}" if isinstance(got, str) else None

    out = []
    for rec in read_jsonl(path, check=check):
        question, answer = parse_sample(rec)
        skip = {"question", "answer", "prompt", "completion", "messages"}
        out.append(Sample(question, answer, {k: v for k, v in rec.items() if k not in skip}))
    return out
