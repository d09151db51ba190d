"""The FastAPI app of `sublab serve` and its runner (uvicorn).

Binds 127.0.0.1 unless told otherwise. If the environment variable named by --api-key-env (default
SUBLAB_SERVE_API_KEY) is set, every /v1/ request must carry `Authorization: Bearer <that value>`.
Errors are OpenAI-shaped JSON ({"error": {...}}) with the right status; a failure inside the model is a
500 with a one-line message, never a traceback. GET /health and GET /sublab/stats are outside /v1/, so
fault injection never touches them.
"""

import asyncio
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sublab.serve.chat import ApiError, chat_job, completion_object
from sublab.serve.store import NotFound


@dataclass
class ServeOptions:
    """What `sublab serve` takes on its command line."""

    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path | None = None
    api_key_env: str = "SUBLAB_SERVE_API_KEY"
    faults: float = 0.0
    fault_kinds: tuple[str, ...] = ("429", "500", "drop")
    retry_after_s: float = 0.05
    fault_seed: int = 0
    base_lr: float = 3e-4
    job_delay_s: float = 0.0
    batch_window_ms: float = 5.0
    max_batch: int = 256
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def _page(items: list[dict], after: str | None, limit: int | None) -> dict:
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = limit or 20
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def create_app(opts: ServeOptions):
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    from sublab.organism.cache import cache_root
    from sublab.serve.batches import BatchManager
    from sublab.serve.engine import Engine
    from sublab.serve.faults import FaultInjector
    from sublab.serve.jobs import JobManager
    from sublab.serve.models import ModelRegistry
    from sublab.serve.store import FileStore

    state = Path(opts.state_dir or cache_root() / "serve")
    models = ModelRegistry(opts.models)
    files = FileStore(state)
    engine = Engine(models, window_s=opts.batch_window_ms / 1000, max_batch=opts.max_batch)
    jobs = JobManager(state, files, models, base_lr=opts.base_lr, queue_delay_s=opts.job_delay_s)
    batches = BatchManager(state, files, models, engine)
    stats = {"requests": 0, "chat_completions": 0}
    key = os.environ.get(opts.api_key_env) or None

    app = FastAPI(title="sublab serve", docs_url=None, redoc_url=None)
    app.state.models, app.state.jobs, app.state.engine = models, jobs, engine

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(NotFound)
    async def _not_found(request, e: NotFound):
        return JSONResponse(ApiError(404, str(e), "not_found").body(), status_code=404)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return JSONResponse(ApiError(400, msg, "invalid_request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        logging.getLogger("sublab.serve").warning("request failed: %s: %s", type(e).__name__, e)
        return JSONResponse(ApiError(500, f"server error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            stats["requests"] += 1
            if key is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                    body = ApiError(401, "Incorrect API key provided", "invalid_api_key").body()
                    return JSONResponse(body, status_code=401)
        return await call_next(request)

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": models.ids()}

    @app.get("/sublab/stats")
    async def sublab_stats():
        return {
            **stats,
            "faults": app.state.faults.counts,
            "engine": engine.stats,
            "jobs_created": jobs.created,
            "jobs": len(jobs.list()),
        }

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [models.model_object(m) for m in models.ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return models.model_object(model_id)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        job = chat_job(await _json(request), models)
        try:
            result = await asyncio.wrap_future(engine.submit(job))
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from None
        stats["chat_completions"] += 1
        return completion_object(job, result)

    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose not in ("fine-tune", "batch", "batch_output", "assistants", "user_data", "evals"):
            raise ApiError(400, f"unknown purpose {purpose!r}", None, "purpose")
        return files.add(await file.read(), file.filename or "upload.jsonl", purpose)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None):
        return {"object": "list", "data": files.list(purpose), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return files.get(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        return Response(files.content(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return files.delete(file_id)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        return jobs.create(await _json(request))

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

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        return batches.create(await _json(request))

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
        app, rate=opts.faults, kinds=opts.fault_kinds, retry_after_s=opts.retry_after_s, seed=opts.fault_seed
    )
    app.state.faults = wrapped
    return wrapped


class _QuietDrops(logging.Filter):
    """Injected dropped connections make uvicorn log an error per drop; they are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def serve(opts: ServeOptions) -> None:
    """Run the server until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        from sublab.errors import SublabError

        raise SublabError("sublab serve needs FastAPI and uvicorn: pip install 'sublab[serve]'") from None
    from sublab.threads import set_threads

    set_threads(opts.threads)
    app = create_app(opts)
    logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    auth = f"; bearer key from ${opts.api_key_env}" if os.environ.get(opts.api_key_env) else ""
    faults = f"; faults {opts.faults:.0%} ({', '.join(opts.fault_kinds)})" if opts.faults else ""
    print(
        f"sublab serve: {', '.join(opts.models)} at http://{opts.host}:{opts.port}/v1{auth}{faults}",
        flush=True,
    )
    server.run()
