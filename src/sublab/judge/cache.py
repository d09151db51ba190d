"""The judge's cache: one JSONL line per finished judgement, appended and flushed as each batch ends, so
a killed `sublab judge` resumes without asking a finished judgement again.

A judgement's key hashes the judge's identity (spec, model path or remote id, adapter, system prompt,
endpoint), the prompt's name and template hash, the question, the answer as sent (after truncation) and
the method with its settings (top-k, or the samples' count, temperature, length and seed). A line holds
the key and the judge's raw reply (the top-k list, or the sampled texts), not the score: scores are
recomputed from it, so changing min_mass or the misalignment thresholds needs no new calls.

On open, a half-written last line (the process died while appending) is cut off; every other line is
read strictly (records.read_jsonl), so a damaged cache is an error naming its line, never a silent skip.
Judge calls that failed are not written, so a rerun asks them again.
"""

from __future__ import annotations

from pathlib import Path

from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.records import append_jsonl, read_jsonl, sha256_json


def judge_identity(ref: ModelRef) -> dict:
    """What makes two judges the same judge, for the cache key."""
    ident = {"spec": ref.spec, "path": ref.path, "adapter": ref.adapter, "system_prompt": ref.system_prompt}
    if ref.is_remote:
        ident["base_url"] = (ref.info.get("api") or {}).get("base_url")
    return ident


def judgement_key(judge: dict, prompt: str, prompt_sha: str, question: str, answer: str, method: dict) -> str:
    """The cache key of one judgement.

    >>> k = judgement_key({"spec": "organism/tiny"}, "aligned", "ab12", "Q?", "A.", {"method": "logprobs"})
    >>> k == judgement_key({"spec": "organism/tiny"}, "aligned", "ab12", "Q?", "A.", {"method": "logprobs"})
    True
    >>> k == judgement_key({"spec": "organism/tiny"}, "aligned", "ab12", "Q?", "A!", {"method": "logprobs"})
    False
    """
    return sha256_json(
        {
            "judge": judge,
            "prompt": prompt,
            "prompt_sha": prompt_sha,
            "question": question,
            "answer": answer,
            "method": method,
        }
    )


def _cut_partial_last_line(path: Path) -> bool:
    """Truncate a last line that has no newline (a write cut short); True if something was cut."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


class JudgementCache:
    """key -> finished judgement record, backed by an append-only JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.cut_partial_line = False
        if self.path.is_file():
            self.cut_partial_line = _cut_partial_last_line(self.path)

            def check(rec: dict) -> str | None:
                return None if isinstance(rec.get("key"), str) else "a judge cache line needs a string 'key'"

            try:
                lines = read_jsonl(self.path, check=check)
            except SublabError as e:
                raise SublabError(
                    f"{e} (this is the judge cache: deleting it asks every judgement again)"
                ) from None
            for rec in lines:
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: list[dict]) -> None:
        """Write finished judgements (each with its 'key') and flush them to disk before returning."""
        append_jsonl(self.path, records)
        for r in records:
            self.records[r["key"]] = r
