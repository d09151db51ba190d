"""Requests to an OpenAI-compatible API: the official async client, bounded concurrency, retries.

Every call goes through `ApiClient.call`: the official `AsyncOpenAI` client with its own retries off
(max_retries=0), and this loop instead, so every retry is counted and the policy is one place:

- retried: 429 (waiting at least what Retry-After / retry-after-ms asks), 408, 409, 5xx, timeouts and
  dropped connections; delay = backoff_s x 2^attempt x a jitter in [0.5, 1.5], capped by max_backoff_s;
  at most max_retries retries, then the stage fails (finished chunks and journals stay on disk);
- not retried, one clear SublabError each: unreachable endpoint, rejected key (401/403), unknown model
  (404, with the models the endpoint does have), a rejected request (400/422).
Calls that create something (a file, a job, a batch) take a `recover` function: after a failure whose
outcome is unknown (a dropped connection, a timeout, a 5xx) it looks for the object the failed try may
have created, so a retry never makes a second job or batch. Every try of one call also carries the same
`Idempotency-Key` header (OpenAI's; `sublab serve` honours it for files, jobs and batches), so an
endpoint that keeps keys returns the first try's object instead of making another.
The key is read from the environment variable named by api_key_env, never written.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sublab.errors import SublabError
from sublab.schema.api import ApiConfig, is_local_url

LOCAL_KEY = "sublab-local"  # sent to a localhost endpoint when the key variable is unset
_CALL_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("sublab_idempotency_key", default=None)


def _client_class():
    """AsyncOpenAI whose POSTs carry the Idempotency-Key of the current `ApiClient.call` (the same key on
    every retry of that call). The official client has the hook (`_idempotency_header`,
    `_idempotency_key`) but sends no key by default; where a release lacks it, no key is sent."""
    from openai import AsyncOpenAI

    class _Client(AsyncOpenAI):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            if hasattr(self, "_idempotency_header"):
                self._idempotency_header = "Idempotency-Key"

        def _idempotency_key(self) -> str:
            return _CALL_KEY.get() or super()._idempotency_key()

    return _Client


def install_hint() -> SublabError:
    return SublabError("openai/... models need the official client: pip install 'sublab[openai]'")


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", None) or e)


def retry_after_s(response) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, or Retry-After as seconds or an HTTP date)."""
    if response is None:
        return None
    h = response.headers
    try:
        if h.get("retry-after-ms"):
            return float(h["retry-after-ms"]) / 1000
        if h.get("retry-after"):
            return float(h["retry-after"])
    except ValueError:
        pass
    if h.get("retry-after"):
        import email.utils
        import time

        try:
            return max(0.0, email.utils.parsedate_to_datetime(h["retry-after"]).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


class ApiExhausted(SublabError):
    """Every try of one call failed; `reasons`, one per try: connection, timeout, 429 or the HTTP status."""

    def __init__(self, reasons: list[str], message: str):
        super().__init__(message)
        self.reasons = reasons

    @property
    def unreachable(self) -> bool:
        """No try got an answer: a wrong base_url or a server that is down, not a transient fault."""
        return all(r == "connection" for r in self.reasons)


class ApiClient:
    """One endpoint + key + request policy. `run(fn)` runs `await fn(client)` on a fresh event loop."""

    def __init__(self, api: ApiConfig, base_url: str, api_key_env: str):
        try:
            import openai  # noqa: F401
        except ImportError:
            raise install_hint() from None
        self.api, self.base_url, self.api_key_env = api, base_url.rstrip("/"), api_key_env
        self.stats: Counter = Counter()  # requests, retries, retry:<reason>

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if is_local_url(self.base_url):
            return LOCAL_KEY
        raise SublabError(
            f"no API key: set the environment variable ${self.api_key_env} (api.api_key_env) for "
            f"{self.base_url}; sublab reads keys from the environment only"
        )

    def run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `await fn(client)` to completion from synchronous code (a thread if a loop is running)."""
        key = self._key()
        client_class = _client_class()

        async def main():
            client = client_class(
                base_url=self.base_url, api_key=key, max_retries=0, timeout=self.api.timeout_s
            )
            async with client:
                return await fn(client)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(main())
        box: dict = {}

        def target():
            try:
                box["value"] = asyncio.run(main())
            except BaseException as e:
                box["error"] = e

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    async def call(
        self,
        what: str,
        fn: Callable[[], Awaitable[Any]],
        client=None,
        model: str | None = None,
        recover: Callable[[], Awaitable[Any]] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """`await fn()` with the retry policy. `what` names the call in messages; `model` lets a 404 list
        the endpoint's models (needs `client`); `recover` finds what a failed create may have made;
        `missing_ok`: a 404 returns None."""
        import openai

        token = _CALL_KEY.set(f"sublab-{uuid.uuid4()}")  # one key for every try of this call
        try:
            return await self._call(what, fn, client, model, recover, missing_ok, openai)
        finally:
            _CALL_KEY.reset(token)

    async def _call(self, what, fn, client, model, recover, missing_ok, openai) -> Any:
        api = self.api
        reasons: list[str] = []
        for attempt in range(api.max_retries + 1):
            self.stats["requests"] += 1
            wait = None
            try:
                return await fn()
            except openai.RateLimitError as e:
                reason, err, wait = "429", e, retry_after_s(e.response)
            except openai.APITimeoutError as e:
                reason, err = "timeout", e
            except openai.APIConnectionError as e:
                reason, err = "connection", e
            except openai.APIStatusError as e:
                if e.status_code == 404 and missing_ok:
                    return None
                if e.status_code >= 500 or e.status_code in (408, 409):
                    reason, err, wait = str(e.status_code), e, retry_after_s(e.response)
                else:
                    raise await self._fatal(e, what, client, model) from None
            reasons.append(reason)
            if recover is not None and reason != "429":  # the failed try may have created the object
                found = await self._try(recover)
                if found is not None:
                    return found
            if attempt == api.max_retries:
                raise self._exhausted(reason, err, what, reasons)
            self.stats["retries"] += 1
            self.stats[f"retry:{reason}"] += 1
            delay = min(api.max_backoff_s, api.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
            await asyncio.sleep(max(delay, wait or 0.0))
        raise AssertionError("unreachable")

    async def _try(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await fn()
        except Exception:  # recovery is best-effort: the normal retry follows
            return None

    def _exhausted(self, reason: str, err: Exception, what: str, reasons: list[str]) -> ApiExhausted:
        n = self.api.max_retries
        if reason == "connection":
            return ApiExhausted(
                reasons,
                f"cannot reach {self.base_url}: {_message(err)} (after {n} retries); is the server running? "
                "Check api.base_url. Finished work is kept: rerun the same command to resume.",
            )
        return ApiExhausted(
            reasons,
            f"{what}: the API at {self.base_url} kept failing ({reason}: {_message(err)}) after {n} retries; "
            "finished work is kept: rerun the same command to resume (or raise api.max_retries)",
        )

    async def _fatal(self, e, what: str, client, model: str | None) -> SublabError:
        code, msg = e.status_code, _message(e)
        if code == 401:
            return SublabError(
                f"the API at {self.base_url} rejected the key in ${self.api_key_env} (401: {msg}); "
                f"set a valid key in ${self.api_key_env} (api.api_key_env names the variable)"
            )
        if code == 403:
            return SublabError(
                f"{what}: the key in ${self.api_key_env} is not allowed to do this (403: {msg})"
            )
        if code == 404 and model is not None:
            avail = ""
            if client is not None:
                try:
                    ids = [m.id async for m in client.models.list()]
                    avail = f"; available: {', '.join(ids[:30])}" + (" ..." if len(ids) > 30 else "")
                except Exception:
                    avail = ""
            return SublabError(f"model {model!r} not found at {self.base_url}{avail}")
        return SublabError(f"{what}: the API at {self.base_url} rejected the request ({code}: {msg})")

    async def map(
        self,
        client,
        fn: Callable[[Any, int], Awaitable[Any]],
        items: Iterable[int],
        desc: str = "",
        progress: bool = True,
    ) -> list[Any]:
        """`await fn(client, i)` for every i, at most api.max_concurrency at once; results in order.
        The first error cancels the rest and is raised as itself (not as an exception group)."""
        from tqdm import tqdm

        items = list(items)
        out: list[Any] = [None] * len(items)
        sem = asyncio.Semaphore(self.api.max_concurrency)
        bar = tqdm(total=len(items), desc=desc, disable=not progress, mininterval=2)

        async def one(k: int, i: int) -> None:
            async with sem:
                out[k] = await fn(client, i)
            bar.update(1)

        try:
            async with asyncio.TaskGroup() as tg:
                for k, i in enumerate(items):
                    tg.create_task(one(k, i))
        except BaseExceptionGroup as eg:
            first = eg.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        finally:
            bar.close()
        return out

    def summary(self) -> str:
        reasons = ", ".join(f"{k[6:]}: {v}" for k, v in sorted(self.stats.items()) if k.startswith("retry:"))
        return f"{self.stats['requests']} requests, {self.stats['retries']} retries" + (
            f" ({reasons})" if reasons else ""
        )
