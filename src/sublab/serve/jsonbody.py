"""Reading JSON from clients (request bodies, batch input lines) without ever failing with a 500:
UTF-8, valid JSON, no NaN / Infinity, numbers Python can convert, nesting <= 64 levels and no lone
surrogates (text that could never be written back as UTF-8), else ApiError 400 naming the problem."""

from __future__ import annotations

import json
import re

from sublab.serve.chat import ApiError

MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def structure_problem(obj) -> str | None:
    """Nesting deeper than MAX_DEPTH, or a lone surrogate in a string (not valid Unicode)."""
    stack = [(obj, 0)]
    while stack:
        o, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"JSON nested deeper than {MAX_DEPTH} levels"
        if isinstance(o, str):
            if _SURROGATE.search(o):
                return "a string that is not valid Unicode (a lone surrogate)"
        elif isinstance(o, dict):
            for k, v in o.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
        elif isinstance(o, list):
            stack.extend((v, depth + 1) for v in o)
    return None


def parse_json(raw: bytes, what: str = "the request body"):
    """Bytes -> a JSON value, or ApiError 400 naming what is wrong (never a 500)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"{what} is not UTF-8 text") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"{what}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except ValueError as e:  # NaN / Infinity, or an integer with more digits than Python converts
        msg = str(e).splitlines()[0][:120]
        if "integer string conversion" in msg:
            msg = "a number with too many digits"
        raise ApiError(400, f"{what} is not valid JSON ({msg})") from None
    problem = structure_problem(obj)
    if problem:
        raise ApiError(400, f"{what}: {problem}")
    return obj
