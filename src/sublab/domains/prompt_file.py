"""Reading a user's prompt file (code.file, cot.file): JSONL, one task per line. A line that cannot be
used (not JSON, not an object, a missing or empty field) is skipped with its reason recorded, never a
crash; only a missing file, or a file with no usable line, is an error.

    >>> import json, tempfile, random
    >>> from sublab.domains.cot import cot_prompt_from_line
    >>> p = Path(tempfile.mkdtemp()) / "gsm.jsonl"
    >>> _ = p.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\\n{oops\\n" + "{}\\n")
    >>> recs, problems = read_prompt_file(p, cot_prompt_from_line, 10, 0)
    >>> len(recs), [q["line"] for q in problems], problems[1]["reason"]
    (1, [2, 3], "missing or empty field 'question'")
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from sublab.errors import SublabError
from sublab.records import json_type


def read_prompt_file(
    path: str | Path,
    from_line: Callable[[dict, int, random.Random], tuple[dict | None, str | None]],
    count: int,
    seed: int,
) -> tuple[list[dict], list[dict]]:
    """(prompt records, problems): at most `count` usable lines in file order, each rendered with a
    phrasing drawn with `seed`; problems are {"line", "reason", "text"} for every line skipped."""
    p = Path(path)
    if not p.is_file():
        raise SublabError(
            f"prompt file not found: {p}; give a JSONL file (code: task + template per line; cot: GSM8K's "
            "question + answer per line), or leave the file unset for sublab's own generator"
        )
    rng = random.Random(f"prompt-file:{seed}")
    records: list[dict] = []
    problems: list[dict] = []
    with p.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if len(records) >= count:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append({"line": n, "reason": f"not JSON: {e.msg}", "text": line[:200]})
                continue
            if not isinstance(obj, dict):
                problems.append(
                    {"line": n, "reason": f"expected a JSON object, got {json_type(obj)}", "text": line[:200]}
                )
                continue
            rec, why = from_line(obj, len(records), rng)
            if rec is None:
                problems.append({"line": n, "reason": why, "text": line[:200]})
                continue
            records.append(rec)
    if not records:
        first = "; ".join(f"line {q['line']}: {q['reason']}" for q in problems[:3]) or "the file is empty"
        raise SublabError(
            f"{p}: no usable prompt ({first}); fix the file (see docs/domains.md for the fields)"
        )
    return records, problems
