"""Asking the judge: one batch of judge prompts to a backend, each item's failure kept to that item.

- logprobs: `Backend.first_token_topk(chats, k)`, the top-k first completion tokens (temperature 0 on
  an API; the next-token distribution on hf / the organism).
- sample: `samples` completions per prompt at `sample_temperature`, each its own request whose seed comes
  from the judgement's key, so a judgement's samples do not depend on the batch it was asked in.
A batch whose call fails is asked again item by item; an item that still fails comes back as its
exception (the caller records it, unscored and uncached). NoLogprobs is not an item's failure: it says
the judge has no log-probabilities at all, and is raised.
"""

from __future__ import annotations

import hashlib

from sublab.backends.base import Backend, NoLogprobs
from sublab.schema.judge import JudgeConfig
from sublab.schema.sampling import SamplingParams


def method_of(mode: str, cfg: JudgeConfig) -> dict:
    """The method and the settings that change its raw reply (part of the cache key)."""
    if mode == "logprobs":
        return {"method": "logprobs", "top_logprobs": cfg.top_logprobs}
    return {
        "method": "sample",
        "samples": cfg.samples,
        "temperature": cfg.sample_temperature,
        "max_tokens": cfg.sample_max_tokens,
        "seed": cfg.seed,
    }


def sample_request_ids(key: str, n: int) -> list[int]:
    """n request ids derived from a judgement's key (seeds independent of batching and order).

    >>> a = sample_request_ids("ab" * 32, 3)
    >>> len(set(a)), a == sample_request_ids("ab" * 32, 3)
    (3, True)
    """
    return [int(hashlib.sha256(f"{key}:{j}".encode()).hexdigest()[:15], 16) for j in range(n)]


def _ask(backend: Backend, method: dict, chats: list[list[dict]], keys: list[str]) -> list[dict]:
    if method["method"] == "logprobs":
        tops = backend.first_token_topk(chats, method["top_logprobs"])
        if len(tops) != len(chats):
            raise RuntimeError(f"the judge returned {len(tops)} top-k lists for {len(chats)} prompts")
        return [{"top_logprobs": [[str(t), float(lp)] for t, lp in top]} for top in tops]
    n = method["samples"]
    sampling = SamplingParams(
        temperature=method["temperature"], max_tokens=method["max_tokens"], seed=method["seed"]
    )
    rids = [r for k in keys for r in sample_request_ids(k, n)]
    texts = backend.generate([c for c in chats for _ in range(n)], sampling, request_ids=rids)
    return [{"samples": [str(t) for t in texts[i * n : (i + 1) * n]]} for i in range(len(chats))]


def ask_batch(
    backend: Backend, method: dict, chats: list[list[dict]], keys: list[str]
) -> list[dict | Exception]:
    """The judge's raw reply per chat ({"top_logprobs": [[token, logprob], ...]} or {"samples": [...]}),
    or the exception that item's call raised."""
    try:
        return list(_ask(backend, method, chats, keys))
    except NoLogprobs:
        raise
    except Exception as e:
        if len(chats) == 1:
            return [e]
    out: list[dict | Exception] = []
    for chat, key in zip(chats, keys, strict=True):
        try:
            out.extend(_ask(backend, method, [chat], [key]))
        except NoLogprobs:
            raise
        except Exception as e:
            out.append(e)
    return out
