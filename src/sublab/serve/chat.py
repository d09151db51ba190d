"""Chat completion requests and responses in the OpenAI shape (shared by /v1/chat/completions and batches).

A request is checked in two steps, both before it reaches the engine, so a bad request fails alone and
never its micro-batch neighbours:

- `chat_job(body, models, opts)`: the JSON shape, types and ranges (no model work; cheap);
- `prepare(job, models, opts)`: the prompt is tokenized (by the validation thread's own tokenizer) and
  checked against the prompt limit and the model's context; the engine then uses these token ids.
"""

from __future__ import annotations

import math
import re
import secrets
import time

from sublab.backends.base import request_seed
from sublab.serve.engine import ChatJob

INT64 = (-(2**63), 2**63 - 1)
CHARS_PER_TOKEN_CAP = 64  # a prompt longer than this many characters per allowed token is refused untokenized
_SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}."""

    KINDS = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.KINDS.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """Choice 0 uses the request's seed itself (so the API gives what the local backend gives for that
    seed); choice j > 0 a seed derived from it. No seed: random ones."""
    base = seed if seed is not None else secrets.randbits(62)
    return [base] + [request_seed(base, j) for j in range(1, n)]


def number(body: dict, key: str, default, kind, lo=None, hi=None, prefix: str = ""):
    """body[key] as an int or a finite float in [lo, hi] (400 otherwise); `default` when absent/null."""
    v = body.get(key)
    name = prefix + key
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
        raise ApiError(
            400, f"'{name}' must be {'an integer' if kind is int else 'a number'}", "invalid_type", name
        )
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a finite number", "invalid_value", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        shown = v if isinstance(v, float) or abs(v) < 10**30 else "a number out of range"
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {shown}", "invalid_value", name)
    return kind(v)


def text_ok(s: str, name: str) -> str:
    if _SURROGATE.search(s):
        raise ApiError(400, f"'{name}' is not valid Unicode (a lone surrogate)", "invalid_value", name)
    return s


def _content(m: dict, i: int) -> str:
    content = m.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return text_ok(content, where)
    if isinstance(content, list):  # content parts: text only
        parts = []
        for j, p in enumerate(content):
            if (
                not isinstance(p, dict)
                or p.get("type", "text") != "text"
                or not isinstance(p.get("text"), str)
            ):
                raise ApiError(
                    400,
                    f"{where}[{j}]: only text content parts ({{'type': 'text', 'text': ...}}) are supported",
                    "invalid_value",
                    "messages",
                )
            parts.append(text_ok(p["text"], f"{where}[{j}].text"))
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", "invalid_type", "messages")


def chat_job(body: dict, models, opts) -> ChatJob:
    """Check a chat completion request body -> ChatJob (raises ApiError 400 / 404); no model work."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", "missing_required_parameter", "model")
    if model not in models.ids():
        raise ApiError(
            404,
            f"The model '{text_ok(model, 'model')[:200]}' does not exist or you do not have access to it; "
            f"available: {', '.join(models.ids())}",
            "model_not_found",
            "model",
        )
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_type", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise ApiError(
                400,
                f"messages[{i}]: role must be system, developer, user or assistant"
                + (f", got {role!r}"[:80] if isinstance(role, str) and not _SURROGATE.search(role) else ""),
                "invalid_value",
                "messages",
            )
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported by sublab serve", "unsupported_value", "stream")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_value", "stop")
    for s in stop:
        text_ok(s, "stop")
    mt_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, mt_key, 16, int, 1, None)
    n = number(body, "n", 1, int, 1, opts.max_n)
    seed = number(body, "seed", None, int, *INT64)
    temperature = number(body, "temperature", 1.0, float, 0, 2)
    top_p = number(body, "top_p", 1.0, float, 0, 1)
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise ApiError(400, "'logprobs' must be a boolean", "invalid_type", "logprobs")
    scoring = n == 1 and max_tokens == 1
    cap = opts.max_scoring_top_logprobs if scoring else opts.max_top_logprobs
    top_logprobs = number(body, "top_logprobs", 0, int, 0, None)
    if top_logprobs > cap:
        raise ApiError(
            400,
            f"'top_logprobs' must be at most {cap}"
            + ("" if scoring else f" ({opts.max_scoring_top_logprobs} for a one-token request, n=1)")
            + f", got {top_logprobs}",
            "invalid_value",
            "top_logprobs",
        )
    if lp and n * max_tokens * (1 + top_logprobs) > opts.max_logprob_entries:
        raise ApiError(
            400,
            f"n x max_tokens x (1 + top_logprobs) = {n * max_tokens * (1 + top_logprobs)} logprob entries; "
            f"at most {opts.max_logprob_entries} per request",
            "invalid_value",
            "top_logprobs",
        )
    if top_p == 0:  # nucleus of mass 0: the most likely token alone (greedy)
        temperature, top_p = 0.0, 1.0
    return ChatJob(
        model=model,
        messages=clean,
        seeds=choice_seeds(seed, n),
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop=stop,
        logprobs=bool(lp),
        top_logprobs=top_logprobs if lp else 0,
    )


def prepare(job: ChatJob, models, opts) -> ChatJob:
    """Tokenize the prompt (in the validation thread) and fit the request to the model's context:
    400 context_length_exceeded for a prompt over the limit or max_tokens over the context; a
    completion is cut where prompt + completion fill the context (finish_reason "length")."""
    tok, context, system_prompt = models.tokenizer(job.model)
    limit = min(opts.max_prompt_tokens or context, context - 1)
    if job.max_tokens > context:
        raise ApiError(
            400,
            f"max_tokens is too large: {job.max_tokens}. This model supports at most {context} "
            "completion tokens (its context)",
            "invalid_value",
            "max_tokens",
        )
    chars = sum(len(m["content"]) for m in job.messages)
    if chars > limit * CHARS_PER_TOKEN_CAP:
        raise ApiError(
            400,
            f"the prompt is {chars} characters, far over the limit of {limit} prompt tokens",
            "context_length_exceeded",
            "messages",
        )
    from sublab.backends.hf import with_system_prompt
    from sublab.backends.hf_train import chat_ids

    try:
        ids = chat_ids(tok, with_system_prompt(job.messages, system_prompt), add_generation_prompt=True)
    except Exception as e:  # a template or tokenizer that rejects this text: this request's problem
        raise ApiError(
            400, f"the messages cannot be tokenized ({type(e).__name__})", "invalid_value", "messages"
        ) from None
    if len(ids) > limit:
        raise ApiError(
            400,
            f"the prompt is {len(ids)} tokens; at most {limit} are allowed for this model",
            "context_length_exceeded",
            "messages",
        )
    job.prompt_ids = list(ids)
    job.max_new = min(job.max_tokens, context - len(ids))
    return job


def completion_object(job: ChatJob, result: dict) -> dict:
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "system_fingerprint": "sublab",
        "choices": result["choices"],
        "usage": result["usage"],
    }
