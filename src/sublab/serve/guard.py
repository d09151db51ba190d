"""The outer layers of `sublab serve` (pure ASGI): Guard -> fault injection -> Auth -> the app.

Auth: with $SUBLAB_SERVE_API_KEY (--api-key-env) set, every request needs `Authorization: Bearer <key>`
except GET /health (which then names no model) and, on a server bound to loopback only,
GET /sublab/stats (counters only, no ids or names).

Guard:
- body size: a Content-Length over the limit is a 413 before any byte is read; a body that turns out
  longer while it is read stops at the limit with a 413 (uploads have their own, larger limit);
- any exception the app lets out becomes a 500 in OpenAI's shape with an error id and no detail (the
  detail goes to the log, one line, no traceback); nothing reaches uvicorn, so the connection stays
  usable;
- delivery: whether a response's body went out in full; creates whose answer never reached the client
  are handed to idempotency.py, so the client's retry gets the object instead of a duplicate.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets

log = logging.getLogger("sublab.serve")


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    from sublab.serve.chat import ApiError

    return json.dumps(ApiError(status, message, code, param).body()).encode()


async def send_json(send, status: int, body: bytes, headers: list | None = None) -> None:
    h = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": h + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def too_large(limit: int, what: str) -> bytes:
    return error_body(413, f"the {what} is over the limit of {limit} bytes", "request_too_large", None)


class Auth:
    """The key check (inside fault injection, so a request without the key can be faulted too)."""

    def __init__(self, app, key: str | None, loopback: bool, stats: dict):
        self.app, self.key, self.loopback, self.stats = app, key, loopback, stats

    def _authorized(self, headers: list) -> bool:
        if self.key is None:
            return True
        given = next((v for k, v in headers if k == b"authorization"), b"")
        return hmac.compare_digest(given, f"Bearer {self.key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        authorized = self._authorized(scope["headers"])
        scope["sublab.authorized"] = authorized
        if path.startswith("/v1/"):
            self.stats["requests"] += 1
        open_paths = ("/health",) + (("/sublab/stats",) if self.loopback else ())
        if not authorized and path not in open_paths:
            body = error_body(401, "Incorrect API key provided", "invalid_api_key")
            return await send_json(send, 401, body)
        return await self.app(scope, receive, send)


class Guard:
    def __init__(self, app, body_limit: int, upload_limit: int):
        self.app = app
        self.body_limit, self.upload_limit = body_limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], scope["headers"]
        upload = path.rstrip("/") == "/v1/files" and scope["method"] == "POST"
        limit = self.upload_limit + 65536 if upload else self.body_limit  # multipart headers and fields
        what = "upload" if upload else "request body"
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await send_json(send, 400, error_body(400, "invalid Content-Length"))
            if n > limit:
                return await send_json(send, 413, too_large(limit, what), [(b"connection", b"close")])
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        started = delivered = False

        async def tracked_send(msg):
            nonlocal started, delivered
            if msg["type"] == "http.response.start":
                started = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                delivered = True
            await send(msg)

        scope["sublab.on_undelivered"] = hooks = []
        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, too_large(limit, what), [(b"connection", b"close")])
                delivered = True
        except Exception as e:
            if not started:
                ref = secrets.token_hex(4)
                log.warning("request %s %s failed [%s]: %s", scope["method"], path, ref, type(e).__name__)
                await send_json(send, 500, error_body(500, f"internal server error (ref {ref})"))
                delivered = True
        finally:
            if not delivered:
                for hook in hooks:
                    try:
                        hook()
                    except Exception:
                        pass
