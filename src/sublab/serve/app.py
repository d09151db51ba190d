"""The FastAPI app of `sublab serve` and its runner (uvicorn).

Binds 127.0.0.1 unless told otherwise; binding beyond loopback needs a key (or --allow-no-key) and
prints a warning. If the environment variable named by --api-key-env (default SUBLAB_SERVE_API_KEY) is
set, every request must carry `Authorization: Bearer <that value>` (guard.py has the exceptions).
Every error is OpenAI-shaped JSON ({"error": {...}}) with the right status, never a traceback or a
server path; a failure inside the server is a 500 with an error id (the detail goes to the log).
GET /health and GET /sublab/stats are outside /v1/, so fault injection never touches them.

Requests are checked before any work (options.py lists the limits): the body's size, its JSON (UTF-8,
nesting <= 64, no NaN, no lone surrogates), the parameters and the prompt's length in tokens. A chat
request whose client disconnects while it waits is cancelled.
"""

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sublab.serve.chat import ApiError, chat_job, completion_object, prepare, text_ok
from sublab.serve.jsonbody import parse_json
from sublab.serve.options import ServeOptions, add_arguments, bind_check, is_loopback, options_from_args
from sublab.serve.store import NotFound

__all__ = ["ServeOptions", "add_arguments", "create_app", "options_from_args", "serve"]

log = logging.getLogger("sublab.serve")
INLINE_CHARS = 16384  # chat prompts shorter than this are checked on the event loop itself
PURPOSES = ("fine-tune", "batch", "batch_output", "assistants", "user_data", "evals")


def _page(items: list[dict], after: str | None, limit: int | None) -> dict:
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = max(1, min(limit or 20, 10_000))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def dumps(obj) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return json.dumps(obj, default=str).encode("ascii")


def create_app(opts: ServeOptions):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from sublab.organism.cache import cache_root
    from sublab.serve.batches import BatchManager
    from sublab.serve.engine import Cancelled, Engine, QueueFull
    from sublab.serve.faults import FaultInjector
    from sublab.serve.guard import Auth, BodyTooLarge, Guard
    from sublab.serve.idempotency import MAX_KEY_LEN, Idempotency, fingerprint
    from sublab.serve.jobs import JobManager
    from sublab.serve.models import ModelRegistry
    from sublab.serve.store import FileStore

    opts.check()
    state = Path(opts.state_dir or cache_root() / "serve")
    models = ModelRegistry(opts.models)
    files = FileStore(state)
    validator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sublab-validate")

    def check_chat(body: dict):
        """Shape and ranges, then the prompt's tokens (in the validation thread)."""
        return prepare(chat_job(body, models, opts), models, opts)

    engine = Engine(
        models, window_s=opts.batch_window_ms / 1000, max_batch=opts.max_batch, max_queued=opts.max_queued
    )
    jobs = JobManager(
        state,
        files,
        models,
        base_lr=opts.base_lr,
        queue_delay_s=opts.job_delay_s,
        max_epochs=opts.max_epochs,
        max_queued=opts.max_queued_jobs,
    )
    batches = BatchManager(
        state,
        files,
        models,
        engine,
        check=check_chat,  # in the batch's own thread (its own tokenizer)
        window=opts.max_batch,
        max_requests=opts.max_batch_requests,
        max_active=opts.max_active_batches,
    )
    idem = Idempotency(state)
    stats = {"requests": 0, "chat_completions": 0, "rejected": 0}
    key = os.environ.get(opts.api_key_env) or None
    loopback = is_loopback(opts.host)

    app = FastAPI(title="sublab serve", docs_url=None, redoc_url=None)
    app.state.models, app.state.jobs, app.state.engine, app.state.batches = models, jobs, engine, batches

    def json_response(obj, status: int = 200, headers: dict | None = None) -> Response:
        return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)

    def error_response(e: ApiError) -> Response:
        if e.status in (400, 404, 409, 413, 422):
            stats["rejected"] += 1
        return json_response(e.body(), e.status, e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(NotFound)
    async def _not_found(request, e: NotFound):
        return error_response(ApiError(404, str(e), "not_found"))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return error_response(ApiError(400, msg[:500], "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = {404: "Not found: no such endpoint", 405: "Method not allowed for this endpoint"}.get(
            e.status_code, str(e.detail)[:300]
        )
        if e.status_code == 404 and request.url.path.startswith("/v1/"):
            msg = f"Invalid URL ({request.method} {request.url.path[:200]})"
        return error_response(ApiError(e.status_code, msg, None))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        if isinstance(e, BodyTooLarge):
            return error_response(
                ApiError(413, f"the body is over the limit of {e.limit} bytes", "request_too_large")
            )
        import secrets

        ref = secrets.token_hex(4)
        log.warning("request %s %s failed [%s]: %s", request.method, request.url.path, ref, type(e).__name__)
        return json_response(ApiError(500, f"internal server error (ref {ref})").body(), 500)

    async def _json(request: Request) -> dict:
        body = parse_json(await request.body())
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def caller(request: Request) -> str:
        return Idempotency.caller(request.headers.get("authorization", ""))

    async def create_once(request: Request, kind: str, fp: str, create, get):
        """`create()` once per Idempotency-Key (or per lost answer, for a retry without a key)."""
        who = caller(request)
        ikey = request.headers.get("idempotency-key")
        if ikey is not None:
            if not 0 < len(ikey) <= MAX_KEY_LEN or not ikey.isprintable():
                raise ApiError(400, f"Idempotency-Key must be 1 to {MAX_KEY_LEN} printable characters")
            async with idem.key_lock(who, ikey):
                rec = idem.lookup(who, ikey)
                if rec is not None:
                    if rec["kind"] != kind or rec["fingerprint"] != fp:
                        raise ApiError(
                            400,
                            "this Idempotency-Key was already used with other parameters; use a new key",
                            "idempotency_key_reused",
                        )
                    idem.stats["replayed_key"] += 1
                    try:
                        return get(rec["id"])
                    except (NotFound, ApiError):
                        return rec["response"]
                obj = create()
                idem.remember(who, ikey, kind, fp, obj)
                return obj
        obj = None
        if request.headers.get("x-stainless-retry-count", "0") not in ("", "0"):
            found = idem.claim_undelivered(who, kind, fp)
            if found is not None:
                try:
                    obj = get(found)
                    idem.stats["replayed_retry"] += 1
                except (NotFound, ApiError):
                    obj = None
        if obj is None:
            obj = create()
        # if this answer is lost too, the next retry gets the same object
        request.scope.get("sublab.on_undelivered", []).append(
            lambda: idem.undelivered(who, kind, fp, obj["id"])
        )
        return obj

    # ---- outside /v1/ ----------------------------------------------------------------------------

    @app.get("/health")
    async def health(request: Request):
        if not request.scope.get("sublab.authorized"):
            return {"status": "ok"}
        return {"status": "ok", "models": models.ids()}

    @app.get("/sublab/stats")
    async def sublab_stats(request: Request):
        out = {
            **stats,
            "faults": app.state.faults.counts,
            "engine": {**engine.stats, "queued": engine.queued},
            "jobs_created": jobs.created,
            "idempotency": idem.stats,
            "batches_active": batches.active(),
        }
        if request.scope.get("sublab.authorized"):
            out["jobs"] = len(jobs.list())
        return out

    # ---- models and chat -------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [models.model_object(m) for m in models.ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return models.model_object(model_id)

    async def until_done_or_gone(request: Request, fut: asyncio.Future, job) -> object:
        """The engine's result; if the client disconnects first, cancel the job (None)."""
        gone = asyncio.ensure_future(request.receive())
        try:
            while True:
                done, _ = await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
                if fut in done:
                    return fut.result()
                msg = gone.result()
                if msg.get("type") == "http.disconnect":
                    job.cancel()
                    return None
                gone = asyncio.ensure_future(request.receive())
        finally:
            if not gone.done():
                gone.cancel()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        if sum(len(str(m)) for m in body.get("messages") or [] if isinstance(m, dict)) < INLINE_CHARS:
            job = check_chat(body)  # a short prompt: tokenized right here, no thread hop
        else:  # a long one in the validation thread, so the event loop stays free
            job = await asyncio.get_running_loop().run_in_executor(validator, check_chat, body)
        try:
            fut = asyncio.wrap_future(engine.submit(job))
        except QueueFull:
            raise ApiError(
                429,
                f"the server is busy ({engine.queued} sequences queued); retry shortly",
                "rate_limit_exceeded",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            ) from None
        try:
            result = await until_done_or_gone(request, fut, job)
        except Cancelled:
            result = None
        except asyncio.CancelledError:
            job.cancel()
            raise
        except Exception as e:
            import secrets

            ref = secrets.token_hex(4)
            log.warning("chat completion failed [%s]: %s", ref, type(e).__name__)
            raise ApiError(500, f"generation failed (ref {ref})") from None
        if result is None:  # the client went away: nobody reads this
            return Response(status_code=499)
        stats["chat_completions"] += 1
        return json_response(completion_object(job, result))

    # ---- files -----------------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "upload a file as multipart/form-data (fields 'file' and 'purpose')")
        form = await request.form(max_files=1, max_fields=8, max_part_size=65536)
        try:
            file, purpose = form.get("file"), form.get("purpose")
            if not isinstance(file, UploadFile):
                raise ApiError(400, "'file' is required (a file part)", "missing_required_parameter", "file")
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                shown = repr(purpose)[:60] if isinstance(purpose, str) else "missing"
                raise ApiError(400, f"unknown purpose {shown}; one of {', '.join(PURPOSES)}", None, "purpose")
            name = text_ok(file.filename or "upload.jsonl", "filename")
            if len(name.encode()) > 255 or any(c in name for c in "\0/\\"):
                raise ApiError(
                    400, "the file name must be at most 255 bytes, without '/', '\\' or NUL", None, "file"
                )
            data = await file.read(opts.max_upload_bytes + 1)
            if len(data) > opts.max_upload_bytes:
                raise ApiError(
                    413,
                    f"the file is over the limit of {opts.max_upload_bytes} bytes",
                    "file_too_large",
                    "file",
                )
        finally:
            await form.close()
        fp = fingerprint("file", purpose, name, data)
        obj = await create_once(request, "file", fp, lambda: files.add(data, name, purpose), files.get)
        return json_response(obj)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return {"object": "list", "data": files.list(purpose), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return files.get(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        from fastapi.responses import FileResponse

        return FileResponse(files.path(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return files.delete(file_id)

    # ---- fine-tuning jobs ------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        body = await _json(request)
        spec = jobs.check(body)
        obj = await create_once(request, "job", fingerprint("job", body), lambda: jobs.create(spec), jobs.get)
        return json_response(obj)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int | None = None):
        return _page(jobs.list(), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return jobs.get(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return jobs.cancel(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = None, limit: int | None = None):
        return _page(jobs.events(job_id), after, limit)

    # ---- batches ---------------------------------------------------------------------------------

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        body = await _json(request)
        spec = batches.check(body)
        obj = await create_once(
            request, "batch", fingerprint("batch", body), lambda: batches.create(spec), batches.get
        )
        return json_response(obj)

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int | None = None):
        return _page(batches.list(), after, limit)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return batches.get(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return batches.cancel(batch_id)

    wrapped = FaultInjector(
        Auth(app, key, loopback, stats),
        rate=opts.faults,
        kinds=opts.fault_kinds,
        retry_after_s=opts.retry_after_s,
        seed=opts.fault_seed,
    )
    app.state.faults = wrapped
    return Guard(wrapped, opts.max_body_bytes, opts.max_upload_bytes)


class _QuietDrops(logging.Filter):
    """Injected dropped connections make uvicorn log an error per drop; they are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def serve(opts: ServeOptions) -> None:
    """Run the server until interrupted."""
    from sublab.errors import SublabError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise SublabError("sublab serve needs FastAPI and uvicorn: pip install 'sublab[serve]'") from None
    from sublab.threads import set_threads

    opts.check()
    warning = bind_check(opts)
    set_threads(opts.threads)
    app = create_app(opts)
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    auth = f"; bearer key from ${opts.api_key_env}" if os.environ.get(opts.api_key_env) else ""
    faults = f"; faults {opts.faults:.0%} ({', '.join(opts.fault_kinds)})" if opts.faults else ""
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(f"sublab serve: {', '.join(opts.models)} at http://{host}:{opts.port}/v1{auth}{faults}", flush=True)
    if warning:
        print(warning, flush=True)
    server.run()
