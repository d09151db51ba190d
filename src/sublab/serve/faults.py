"""Fault injection for reliability tests: a share of API requests fails the way real endpoints fail.

    429  rate limited, with Retry-After / retry-after-ms headers
    500  internal server error
    drop the request is processed, then the connection is closed before the body is sent (the client
         sees a dropped connection; the server did the work, so a retry must not duplicate anything)

Faults are drawn from a seeded generator, so a run's sequence of faults is reproducible.
"""

from __future__ import annotations

import json
import random
import threading

KINDS = ("429", "500", "drop")


class FaultInjector:
    """ASGI middleware: with probability `rate` a /v1/ request gets one of `kinds`."""

    def __init__(
        self,
        app,
        rate: float = 0.0,
        kinds: tuple[str, ...] = KINDS,
        retry_after_s: float = 0.05,
        seed: int = 0,
    ):
        bad = [k for k in kinds if k not in KINDS]
        if bad or not 0 <= rate <= 1:
            raise ValueError(f"faults: rate must be in [0, 1] and kinds among {KINDS}, got {rate}, {bad}")
        self.app, self.rate, self.kinds, self.retry_after_s = app, rate, kinds, retry_after_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in KINDS}

    def _draw(self) -> str | None:
        with self.lock:
            if self.rate <= 0 or self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        kind = self._draw()
        if kind is None:
            return await self.app(scope, receive, send)
        if kind in ("429", "500"):
            code = int(kind)
            msg = "rate limited (injected fault)" if code == 429 else "internal error (injected fault)"
            body = json.dumps({"error": {"message": msg, "type": "injected_fault", "code": kind}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if code == 429:
                headers += [
                    (b"retry-after", f"{self.retry_after_s:g}".encode()),
                    (b"retry-after-ms", str(int(self.retry_after_s * 1000)).encode()),
                ]
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        # drop: let the app do the work, send the status line and headers, then end without the body;
        # the server closes the connection mid-response and the client sees an incomplete message
        started = False

        async def swallow(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                await send(message)

        await self.app(scope, receive, swallow)
