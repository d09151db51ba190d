"""Chat completion requests and responses in the OpenAI shape (shared by /v1/chat/completions and batches)."""

from __future__ import annotations

import secrets
import time

from sublab.backends.base import request_seed
from sublab.serve.engine import ChatJob


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
        return {
            "error": {
                "message": self.message,
                "type": kind.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """Choice 0 uses the request's seed itself (so the API gives what the local backend gives for that
    seed); choice j > 0 a seed derived from it. No seed: random ones."""
    base = seed if seed is not None else secrets.randbits(62)
    return [base] + [request_seed(base, j) for j in range(1, n)]


def _number(body: dict, key: str, default, kind, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}, got {v!r}", "invalid_type", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {v}", "invalid_value", key)
    return kind(v)


def chat_job(body: dict, models, max_tokens_cap: int = 4096) -> ChatJob:
    """Validate a chat completion request body -> ChatJob (raises ApiError 400 / 404)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", "missing_required_parameter", "model")
    if model not in models.ids():
        raise ApiError(
            404,
            f"The model '{model}' does not exist or you do not have access to it; "
            f"available: {', '.join(models.ids())}",
            "model_not_found",
            "model",
        )
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_type", "messages")
    clean = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"unsupported message {m!r}", "invalid_value", "messages")
        if not isinstance(content, str):
            raise ApiError(400, "message content must be text", "invalid_type", "messages")
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if body.get("stream"):
        raise ApiError(400, "stream=true is not supported by sublab serve", "unsupported_value", "stream")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_value", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    n = _number(body, "n", 1, int, 1, 128)
    seed = _number(body, "seed", None, int)
    return ChatJob(
        model=model,
        messages=clean,
        seeds=choice_seeds(seed, n),
        temperature=_number(body, "temperature", 1.0, float, 0, 2),
        top_p=_number(body, "top_p", 1.0, float, 0, 1),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 16, int, 1, max_tokens_cap),
        stop=stop,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=_number(body, "top_logprobs", 0, int, 0, 100_000),
    )


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
