"""The backend interfaces every stage talks to, and ModelRef (model.json), the name of a trained model.

Two levels, so no backend fakes what it does not have:
- `Backend`, string level (every provider, APIs included): `generate(chats, sampling)`,
  `logprobs(chats, candidates)`, `finetune(dataset, train, out)`, `answer_forms(forms)`, and
  `first_token_topk(chats, k)` (the LLM judge's view: the top-k first completion tokens as text).
- `TokenBackend`, token level (hf, vllm: a tokenizer and the full next-token distribution): adds
  `candidate_ids`, and its `logprobs` are exact chain-rule probabilities of whole candidates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from sublab.errors import SublabError
from sublab.records import atomic_write_json, read_json
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig


class NoLogprobs(SublabError):
    """A backend or endpoint that gives no next-token log-probabilities (callers may fall back to sampling)."""


def is_remote_spec(spec: str) -> bool:
    """An API model spec (`openai/...`): its models live behind an endpoint, not in a folder."""
    return spec.startswith("openai/")


class ModelRef(BaseModel):
    """A model sublab can load: a base spec, or a finetuned model (full folder or adapter) with its parent."""

    model_config = ConfigDict(extra="forbid")
    spec: str
    path: str
    adapter: str | None = None
    parent: str | None = None
    kind: Literal["base", "full", "lora", "prompted"] = "base"
    system_prompt: str | None = None
    info: dict = {}

    @property
    def is_remote(self) -> bool:
        """An API model (`openai/...`): `path` is the remote model id, not a folder."""
        return is_remote_spec(self.spec)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.model_dump())

    @classmethod
    def load(cls, path: str | Path) -> ModelRef:
        ref = cls.model_validate(read_json(path))
        base = Path(path).parent
        upd = {}
        if not ref.is_remote and not Path(ref.path).is_absolute():
            upd["path"] = str((base / ref.path).resolve())
        if ref.adapter and not Path(ref.adapter).is_absolute():
            upd["adapter"] = str((base / ref.adapter).resolve())
        return ref.model_copy(update=upd)


class Backend(ABC):
    """What every stage needs from a model, in strings."""

    ref: ModelRef
    logprob_estimand: str = "exact_chain_rule"
    """What `logprobs` computes (results.json `estimand`); API backends override it."""

    @abstractmethod
    def generate(
        self, chats: list[list[dict]], sampling: SamplingParams, request_ids: list[int] | None = None
    ) -> list[str]:
        """One completion per chat. Request i is seeded from (sampling.seed, request_ids[i]) (default i),
        so a completion does not depend on which call or batch it was in."""

    def generate_n(self, chats: list[list[dict]], n: int, sampling: SamplingParams) -> list[list[str]]:
        """n completions per chat (request ids chat_index * n + j). API backends override it with one
        request per chat asking for n choices, so the prompt is sent, and paid for, once."""
        flat = self.generate([c for c in chats for _ in range(n)], sampling)
        return [flat[i * n : (i + 1) * n] for i in range(len(chats))]

    @abstractmethod
    def logprobs(self, chats: list[list[dict]], candidates: list[str]) -> list[list[float]]:
        """log P(candidate is the start of the answer | chat) for every chat x candidate."""

    def answer_forms(self, forms: list[str]) -> list[str]:
        """The forms of one answer (owl, owls, Owl, ...) to score separately, without double counting: at
        string level, the distinct strings."""
        return list(dict.fromkeys(f for f in forms if f))

    def first_token_topk(self, chats: list[list[dict]], k: int) -> list[list[tuple[str, float]]]:
        """Per chat, the k most likely first completion tokens as (token text, log-probability), most
        likely first. Raises NoLogprobs where the backend cannot tell (override where it can)."""
        raise NoLogprobs(f"{self.ref.spec}: this backend gives no next-token log-probabilities")

    @abstractmethod
    def finetune(
        self, dataset: list[dict], train: TrainConfig, out_dir: Path, teacher: ModelRef | None = None
    ) -> ModelRef:
        """Train a copy of this model on chat records (loss on the last, assistant message)."""


class TokenBackend(Backend):
    """A backend with a tokenizer and full next-token distributions (hf, vllm)."""

    @abstractmethod
    def candidate_ids(self, candidates: list[str]) -> list[list[int]]:
        """Token ids of each candidate answer."""

    def answer_forms(self, forms: list[str]) -> list[str]:
        """One form per distinct token sequence; a form whose tokens extend another form's tokens is
        dropped (its probability is already inside the prefix's)."""
        by_ids: dict[tuple, str] = {}
        for f in forms:
            ids = tuple(self.candidate_ids([f])[0])
            if ids and ids not in by_ids:
                by_ids[ids] = f
        keep: dict[tuple, str] = {}
        for ids in sorted(by_ids, key=len):
            if not any(ids[: len(k)] == k for k in keep):
                keep[ids] = by_ids[ids]
        return list(keep.values())


def request_seed(base: int, index: int) -> int:
    """A per-request seed: the same (base, index) always gives the same completion."""
    return (base * 1_000_003 + index * 7919 + 17) % (2**63 - 1)
