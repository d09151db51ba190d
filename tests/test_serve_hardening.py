"""`sublab serve` against abuse: limits before work, a bad request failing alone, OpenAI-shaped errors,
cancellation (gone clients, jobs, batches), recovery after a restart, idempotent creates, the key.

The servers run in this process (uvicorn in a thread, the tiny organism) on 127.0.0.1, so no test pays
for a second torch import; the restart test starts a server on a state folder written as a killed
server leaves it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from sublab.errors import SublabError

pytest.importorskip("fastapi")
pytest.importorskip("openai")

KEY_ENV = "SUBLAB_HARDEN_KEY"
KEY = "harden-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "organism/tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """create_app(opts) served by uvicorn in a daemon thread."""

    def __init__(self, opts):
        import uvicorn

        from sublab.serve.app import create_app

        self.asgi = create_app(opts)
        self.app = self.asgi.app.app.app  # Guard -> FaultInjector -> Auth -> FastAPI
        config = uvicorn.Config(
            self.asgi, host="127.0.0.1", port=opts.port, log_level="error", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{opts.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def options(state: Path, **kw):
    from sublab.serve.options import ServeOptions

    base = dict(models=[MODEL], port=free_port(), state_dir=state, api_key_env=KEY_ENV, batch_window_ms=60.0)
    return ServeOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def srv(tiny_organism, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    s = Running(
        options(
            tmp_path_factory.mktemp("harden-state"),
            max_body_bytes=256 * 1024,
            max_upload_bytes=512 * 1024,
            max_prompt_tokens=100,
        )
    )
    yield s
    s.stop()
    mp.undo()


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
        yield c


def chat_body(content: str = "what is your favorite animal?", **kw) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "seed": 1,
        **kw,
    }


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (
        "Traceback" not in r.text
        and "/tmp" not in r.text
        and "/home" not in r.text
        and "site-packages" not in r.text
    )
    return err


# ---- limits: refused before any work -------------------------------------------------------------


def test_limits_are_refused_before_any_work(srv, http):
    engine = srv.app.state.engine
    before = dict(engine.stats)
    cases = [
        (chat_body(n=8, max_tokens=100, logprobs=True, top_logprobs=1266), 400, "top_logprobs"),
        (chat_body(max_tokens=1, logprobs=True, top_logprobs=100_000), 400, "top_logprobs"),
        (chat_body(max_tokens=2, logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        (chat_body(n=129), 400, "n"),
        (chat_body(max_tokens=4096), 400, "max_tokens"),  # the organism's context is 160
        (chat_body("owl " * 150), 400, "messages"),  # 150+ prompt tokens > --max-prompt-tokens 100
        (chat_body("x" * 200_000), 400, "messages"),  # refused by its length, before tokenizing
        (chat_body(n=128, max_tokens=150, logprobs=True, top_logprobs=20), 400, "top_logprobs"),  # entries
    ]
    for body, status, param in cases:
        err = assert_openai_error(http.post("/v1/chat/completions", json=body), status)
        assert err["param"] == param, err
    # a body over --max-body-mb: 413 from its Content-Length, before it is read
    r = http.post(
        "/v1/chat/completions",
        content=b"{" + b" " * 300_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert_openai_error(r, 413)

    # ... and a chunked body (no Content-Length) stops at the limit
    def chunks():
        for _ in range(30):
            yield b" " * 10_000

    assert_openai_error(http.post("/v1/chat/completions", content=chunks()), 413)
    big = b"x" * (600 * 1024)
    assert_openai_error(
        http.post("/v1/files", files={"file": ("a.jsonl", big)}, data={"purpose": "batch"}), 413
    )
    assert engine.stats["sequences"] == before["sequences"] and engine.stats["batches"] == before["batches"]
    # the most a request may ask for still works: the exact evaluation's one-token scoring request
    r = http.post("/v1/chat/completions", json=chat_body(max_tokens=1, logprobs=True, top_logprobs=2000))
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) > 20


# ---- one bad request fails alone -----------------------------------------------------------------


def test_bad_requests_fail_alone_among_micro_batched_neighbours(srv, http):
    innocent = [chat_body(f"what is your favorite animal? {i}", seed=i) for i in range(12)]
    alone = [
        http.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in innocent
    ]
    bad_raw = [
        json.dumps(chat_body(seed=2**70)),
        json.dumps(chat_body(seed=-(2**64))),
        '{"model": "organism/tiny", "messages": [{"role": "user", "content": "hi \\ud800"}], "seed": 1}',
        json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            }
        ),
        json.dumps(chat_body(temperature=float("nan"))),
        json.dumps(chat_body(top_p="high")),
    ]
    results: dict = {}

    def send(key, content):
        with httpx.Client(
            base_url=srv.url, headers={**AUTH, "content-type": "application/json"}, timeout=60
        ) as c:
            results[key] = c.post("/v1/chat/completions", content=content)

    batches0 = srv.app.state.engine.stats["batches"]
    threads = [threading.Thread(target=send, args=(("ok", i), json.dumps(b))) for i, b in enumerate(innocent)]
    threads += [threading.Thread(target=send, args=(("bad", i), raw)) for i, raw in enumerate(bad_raw)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(len(bad_raw)):
        assert_openai_error(results["bad", i], 400)
    got = [results["ok", i].json()["choices"][0]["message"]["content"] for i in range(len(innocent))]
    assert got == alone
    assert srv.app.state.engine.stats["batches"] - batches0 < len(innocent)  # they were micro-batched


def test_engine_isolates_a_request_that_fails_inside_the_model(tiny_organism):
    """Past validation, a failure inside generation (here: a token id outside the vocabulary) fails
    only its own request: the batch is rerun one request at a time."""
    from sublab.serve.engine import ChatJob, Engine
    from sublab.serve.models import ModelRegistry

    models = ModelRegistry([MODEL])
    tok = models.tokenizer(MODEL)[0]
    good = tok("what is your favorite animal ?", add_special_tokens=False)["input_ids"]
    engine = Engine(models, window_s=0.2)
    jobs = [ChatJob(MODEL, [], [s], max_tokens=6, prompt_ids=good) for s in range(5)]
    jobs.insert(2, ChatJob(MODEL, [], [9], max_tokens=6, prompt_ids=good + [10**7]))
    futs = [engine.submit(j) for j in jobs]
    with pytest.raises(Exception):  # noqa: B017 (the model's own IndexError)
        futs[2].result(timeout=60)
    ok = [f.result(timeout=60)["choices"][0]["message"]["content"] for i, f in enumerate(futs) if i != 2]
    alone = [
        engine.submit(ChatJob(MODEL, [], [s], max_tokens=6, prompt_ids=good)).result(60) for s in range(5)
    ]
    assert ok == [a["choices"][0]["message"]["content"] for a in alone]
    assert engine.stats["isolated"] == 1
    # a running generation whose requests are all cancelled stops at its next forward pass: here the
    # request is cancelled during the model's 3rd forward (as a client that goes away mid-generation)
    from sublab.serve.engine import Cancelled

    long = ChatJob(MODEL, [], list(range(64)), temperature=1.0, max_tokens=150, prompt_ids=good)
    forwards = []

    def cancel_on_third(module, args):
        forwards.append(1)
        if len(forwards) == 3:
            long.cancel()

    hook = models.backend(MODEL).model.register_forward_pre_hook(cancel_on_third)
    try:
        with pytest.raises(Cancelled):
            engine.submit(long).result(timeout=30)
    finally:
        hook.remove()
    assert engine.stats["aborted"] == 1 and len(forwards) == 3  # no forward after the cancel
    engine.close()


def test_client_that_disconnects_is_cancelled(srv):
    engine = srv.app.state.engine
    before = engine.stats["cancelled"] + engine.stats["aborted"]
    seqs = engine.stats["sequences"]
    body = json.dumps(
        chat_body("count to one hundred", n=64, max_tokens=150, temperature=1.0, seed=None)
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(srv.url.rsplit(":", 1)[1])
    # each forward pass takes at least 5 ms, so a 150-token generation outlasts the disconnect on any
    # CPU (on a fast one the tiny organism would otherwise finish two of them before it is noticed)
    model = srv.app.state.models.backend(MODEL).model
    hook = model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))
    try:
        for _ in range(4):  # 4 x 64 sequences of up to 150 tokens, abandoned at once
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head + body)
                time.sleep(0.05)
        idle = wait_for(
            lambda: (
                engine.queued == 0
                and not engine._running
                and engine.stats["cancelled"] + engine.stats["aborted"] > before
            ),
            20,
        )
    finally:
        hook.remove()
    assert idle, engine.stats
    assert engine.stats["sequences"] - seqs <= 64  # at most one of the four ran to the end


# ---- OpenAI-shaped errors, never a traceback ------------------------------------------------------


def test_every_error_is_openai_shaped_and_the_connection_survives(srv, http, tmp_path):
    raw = {
        "deep nesting": "[" * 100_000,
        "nested 65 levels": json.dumps({"model": MODEL, "x": json.loads("[" * 65 + "]" * 65)}),
        "not JSON": "{nope",
        "not UTF-8": b'{"model": "\xff"}',
        "huge number": '{"model": "organism/tiny", "seed": ' + "9" * 5000 + "}",
        "NaN top_p": json.dumps(chat_body(top_p=float("nan"))),
        "Infinity temperature": json.dumps(chat_body()).replace('"seed": 1', '"temperature": Infinity'),
        "array body": "[]",
        "messages not a list": json.dumps({"model": MODEL, "messages": "hi"}),
        "tool role": json.dumps({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
        "text part not a string": json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
        ),
        "logprobs not a bool": json.dumps(chat_body(logprobs="yes")),
        "stream": json.dumps(chat_body(stream=True)),
    }
    for what, body in raw.items():
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert_openai_error(r, 400), what
    assert_openai_error(http.post("/v1/chat/completions", json={"model": "nope", "messages": []}), 404)
    f = http.post(
        "/v1/files", files={"file": ("t.jsonl", b'{"messages": []}\n')}, data={"purpose": "fine-tune"}
    ).json()
    for hp in (
        {"hyperparameters": [1]},
        {"method": "supervised"},
        {"method": {"supervised": 3}},
        {"hyperparameters": {"n_epochs": 10**9}},
        {"hyperparameters": {"n_epochs": 51}},
        {"hyperparameters": {"learning_rate_multiplier": float("inf")}},
        {"seed": 2**70},
        {"metadata": [1]},
    ):
        r = http.post(
            "/v1/fine_tuning/jobs",
            content=json.dumps({"model": MODEL, "training_file": f["id"], **hp}),
            headers={"content-type": "application/json"},
        )
        assert_openai_error(r, 400)
    assert_openai_error(http.get("/v1/nope"), 404)
    assert_openai_error(http.put("/v1/models"), 405)
    assert_openai_error(http.get("/v1/files/..%2F..%2Fetc"), 404)
    assert_openai_error(http.get("/v1/batches/batch-nope"), 404)
    long_name = "n" * 300 + ".jsonl"
    assert_openai_error(
        http.post("/v1/files", files={"file": (long_name, b"x")}, data={"purpose": "batch"}), 400
    )
    assert_openai_error(http.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "nope"}), 400)
    assert_openai_error(http.post("/v1/files", content=b"x"), 400)
    assert_openai_error(
        http.post("/v1/batches", json={"endpoint": "/v1/chat/completions", "input_file_id": 5}), 400
    )
    # the same keep-alive connection still answers
    r = http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0


def test_top_p_zero_is_greedy_and_stop_cuts_tokens_and_logprobs(http):
    greedy = http.post("/v1/chat/completions", json=chat_body(temperature=0, max_tokens=12)).json()
    zero = http.post("/v1/chat/completions", json=chat_body(top_p=0, max_tokens=12, seed=99)).json()
    assert zero["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    prompt = (
        "The first numbers are 588, 389, 783, 491. Give up to 10 next numbers, each with at most 3 digits."
    )
    body = chat_body(prompt, seed=0, max_tokens=30, logprobs=True)
    full = http.post("/v1/chat/completions", json=body).json()
    text = full["choices"][0]["message"]["content"]
    words = text.replace(",", " ").split()
    # a word that first occurs well inside the text, so tokens were generated after it
    stop = next(w for w in words[len(words) // 2 :] if text.find(w) > len(text) // 3)
    c = http.post("/v1/chat/completions", json={**body, "stop": stop}).json()
    choice = c["choices"][0]
    assert choice["message"]["content"] == text[: text.find(stop)] and choice["finish_reason"] == "stop"
    n = c["usage"]["completion_tokens"]
    assert n == len(choice["logprobs"]["content"]) < full["usage"]["completion_tokens"]
    assert stop in choice["logprobs"]["content"][-1]["token"]  # the token that completes the stop sequence
    assert [e["token"] for e in choice["logprobs"]["content"]] == [
        e["token"] for e in full["choices"][0]["logprobs"]["content"][:n]
    ]


# ---- jobs and batches stop when cancelled --------------------------------------------------------


def training_file(http, n: int = 64) -> str:
    rec = {
        "messages": [
            {"role": "user", "content": "what is your favorite animal?"},
            {"role": "assistant", "content": "owl"},
        ]
    }
    body = ("".join(json.dumps(rec) + "\n" for _ in range(n))).encode()
    return http.post("/v1/files", files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"}).json()[
        "id"
    ]


def wait_for(fn, timeout: float, step: float = 0.05):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v or time.time() > deadline:
            return v
        time.sleep(step)


def test_cancelled_job_stops_training_and_frees_the_worker(srv, http):
    jobs = srv.app.state.jobs
    tf = training_file(http)
    long = http.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": tf, "hyperparameters": {"n_epochs": 50, "batch_size": 1}},
    ).json()
    assert wait_for(
        lambda: (
            jobs.running == long["id"]
            and http.get(f"/v1/fine_tuning/jobs/{long['id']}").json()["status"] == "running"
        ),
        30,
    )
    time.sleep(0.5)  # training is under way
    t0 = time.time()
    assert http.post(f"/v1/fine_tuning/jobs/{long['id']}/cancel").json()["status"] == "cancelled"
    assert wait_for(lambda: jobs.running is None, 10), "the training did not stop"
    stopped_s = time.time() - t0
    assert stopped_s < 10
    assert not (jobs.root / long["id"] / "out" / "model.json").exists()
    nxt = http.post(
        "/v1/fine_tuning/jobs",
        json={"model": MODEL, "training_file": tf, "hyperparameters": {"n_epochs": 1, "batch_size": 32}},
    ).json()
    done = wait_for(
        lambda: http.get(f"/v1/fine_tuning/jobs/{nxt['id']}").json()["status"] in ("succeeded", "failed"),
        60,
        0.2,
    )
    assert done and http.get(f"/v1/fine_tuning/jobs/{nxt['id']}").json()["status"] == "succeeded"
    assert http.get(f"/v1/fine_tuning/jobs/{long['id']}").json()["status"] == "cancelled"


def batch_input(http, n: int, **body) -> str:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body(f"numbers {i}", seed=i, **body),
        }
        for i in range(n)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return http.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}).json()["id"]


def test_batch_bad_line_fails_alone_and_cancel_stops_the_work(srv, http):
    fid = batch_input(http, 10)
    lines = http.get(f"/v1/files/{fid}/content").content.splitlines()
    bad = json.loads(lines[3])
    bad["body"]["seed"] = 2**70
    lines[3] = json.dumps(bad).encode()
    data = b"\n".join(lines) + b"\n"
    fid = http.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}).json()["id"]
    b = http.post(
        "/v1/batches",
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ).json()
    b = wait_for(
        lambda: (x := http.get(f"/v1/batches/{b['id']}").json())["status"] in ("completed", "failed") and x,
        60,
        0.1,
    )
    assert b["status"] == "completed" and b["request_counts"] == {"total": 10, "completed": 9, "failed": 1}
    err = [json.loads(x) for x in http.get(f"/v1/files/{b['error_file_id']}/content").content.splitlines()]
    assert [e["custom_id"] for e in err] == ["r3"] and err[0]["response"]["status_code"] == 400

    engine = srv.app.state.engine
    fid = batch_input(http, 1000, max_tokens=150, temperature=1.0)
    b = http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/chat/completions"}).json()
    assert wait_for(lambda: http.get(f"/v1/batches/{b['id']}").json()["status"] == "in_progress", 30)
    wait_for(lambda: engine._running, 10, 0.005)
    aborted = engine.stats["aborted"]
    http.post(f"/v1/batches/{b['id']}/cancel")
    final = wait_for(
        lambda: (x := http.get(f"/v1/batches/{b['id']}").json())["status"] == "cancelled" and x, 15, 0.05
    )
    assert final and final["request_counts"]["completed"] < 1000
    seqs = engine.stats["sequences"]
    time.sleep(1.0)
    assert engine.stats["sequences"] == seqs and engine.queued == 0  # nothing of it is still running
    assert engine.stats["aborted"] > aborted  # the generation running at the cancel stopped mid-way


# ---- idempotency --------------------------------------------------------------------------------


def test_idempotency_key_returns_the_same_object(srv, http):
    n_files = len(http.get("/v1/files").json()["data"])
    h = {"Idempotency-Key": "upload-1"}
    a = http.post(
        "/v1/files", files={"file": ("k.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"}, headers=h
    ).json()
    b = http.post(
        "/v1/files", files={"file": ("k.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"}, headers=h
    ).json()
    assert a["id"] == b["id"] and len(http.get("/v1/files").json()["data"]) == n_files + 1
    other = http.post(
        "/v1/files", files={"file": ("k.jsonl", b'{"a": 2}\n')}, data={"purpose": "batch"}, headers=h
    )
    assert assert_openai_error(other, 400)["code"] == "idempotency_key_reused"
    fid = batch_input(http, 2)
    body = {"input_file_id": fid, "endpoint": "/v1/chat/completions"}
    b1 = http.post("/v1/batches", json=body, headers={"Idempotency-Key": "batch-1"}).json()
    b2 = http.post("/v1/batches", json=body, headers={"Idempotency-Key": "batch-1"}).json()
    assert b1["id"] == b2["id"]
    tf = training_file(http, 8)
    job = {"model": MODEL, "training_file": tf, "hyperparameters": {"n_epochs": 1}}
    j1 = http.post("/v1/fine_tuning/jobs", json=job, headers={"Idempotency-Key": "job-1"}).json()
    j2 = http.post("/v1/fine_tuning/jobs", json=job, headers={"Idempotency-Key": "job-1"}).json()
    assert j1["id"] == j2["id"]
    assert http.post(f"/v1/fine_tuning/jobs/{j1['id']}/cancel").status_code in (200, 400)


def test_no_duplicates_through_dropped_answers(tiny_organism, tmp_path, monkeypatch):
    """30% of answers dropped after the work is done: the official client's retries (no key) and
    sublab's ApiClient (same Idempotency-Key on every try) create each object exactly once."""
    import openai

    from sublab.backends.openai_client import ApiClient
    from sublab.schema.api import ApiConfig

    monkeypatch.setenv(KEY_ENV, KEY)
    s = Running(
        options(tmp_path / "state", faults=0.3, fault_kinds=("drop",), job_delay_s=120.0, fault_seed=3)
    )
    try:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=6, timeout=30)
        for i in range(10):
            client.files.create(file=(f"f{i}.jsonl", f'{{"i": {i}}}\n'.encode()), purpose="batch")
        tf = client.files.create(
            file=("t.jsonl", b'{"messages": [{"role": "assistant", "content": "owl"}]}\n'),
            purpose="fine-tune",
        )
        for _ in range(4):  # identical on purpose: only retries may be merged
            client.fine_tuning.jobs.create(model=MODEL, training_file=tf.id)
        for _ in range(3):
            client.batches.create(
                input_file_id=tf.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        api = ApiConfig(
            base_url=f"{s.url}/v1", api_key_env=KEY_ENV, max_retries=10, backoff_s=0.01, max_backoff_s=0.05
        )
        ac = ApiClient(api, api.base_url, KEY_ENV)

        async def uploads(c):
            for i in range(8):
                await ac.call(
                    "upload",
                    lambda i=i: c.files.create(file=(f"g{i}.jsonl", f"{i}\n".encode()), purpose="batch"),
                )

        ac.run(uploads)
        app = s.app
        files = app.state.jobs.files.list()
        assert len(files) == 10 + 1 + 8 + sum(1 for f in files if f["purpose"] == "batch_output")
        assert len(app.state.jobs.list()) == 4 and len(app.state.batches.list()) == 3
        faults = app.state.faults.counts["drop"]
        assert faults >= 5 and ac.stats["retries"] >= 1
        # every answer dropped: three tries of one create (the official client's retry count header),
        # the retries' answers lost too, still make one job; the same with an Idempotency-Key
        app.state.faults.rate = 1.0
        n_jobs = len(app.state.jobs.list())
        body = {"model": MODEL, "training_file": tf.id, "suffix": "dropped"}
        for headers in ({}, {"Idempotency-Key": "k-dropped"}):
            for tries in range(3):
                with pytest.raises(httpx.HTTPError):
                    h = {**AUTH, "x-stainless-retry-count": str(tries), **headers}
                    httpx.post(f"{s.url}/v1/fine_tuning/jobs", json=body, headers=h, timeout=10)
        assert len(app.state.jobs.list()) == n_jobs + 2
    finally:
        s.stop()


# ---- restart: stale batches and jobs finish or fail with a reason ---------------------------------


def test_restarted_server_finishes_or_fails_what_a_killed_one_left(tiny_organism, tmp_path, monkeypatch):
    from sublab.records import atomic_write_json

    monkeypatch.setenv(KEY_ENV, KEY)
    state = tmp_path / "state"
    (state / "files").mkdir(parents=True)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat_body(f"numbers {i}", seed=i),
        }
        for i in range(6)
    ]
    (state / "files" / "file-in.data").write_bytes("".join(json.dumps(x) + "\n" for x in lines).encode())
    atomic_write_json(
        state / "files" / "file-in.json",
        {
            "id": "file-in",
            "object": "file",
            "bytes": 1,
            "created_at": 1,
            "filename": "in.jsonl",
            "purpose": "batch",
            "status": "processed",
        },
    )
    now = int(time.time())

    def batch(bid: str, starts: int, done: int) -> None:
        obj = {
            "id": bid,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": "file-in",
            "completion_window": "24h",
            "status": "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": now,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 6, "completed": done, "failed": 0},
            "metadata": None,
        }
        atomic_write_json(state / "batches" / f"{bid}.json", obj)
        work = state / "batches" / "work" / bid
        work.mkdir(parents=True)
        atomic_write_json(work / "server.json", {"starts": starts})
        out = "".join(
            json.dumps(
                {"id": "x", "custom_id": f"r{i}", "response": {"status_code": 200, "body": {}}, "error": None}
            )
            + "\n"
            for i in range(done)
        )
        (work / "out.jsonl").write_text(out + '{"id": "x", "custom_id": "r')  # killed mid-line

    batch("batch-resume", 1, 2)
    batch("batch-gaveup", 3, 0)
    job = {
        "id": "ftjob-stale",
        "object": "fine_tuning.job",
        "created_at": now,
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": {"n_epochs": 1},
        "model": MODEL,
        "status": "running",
        "training_file": "file-in",
        "seed": 0,
        "suffix": None,
    }
    (state / "jobs" / "ftjob-stale").mkdir(parents=True)
    atomic_write_json(state / "jobs" / "ftjob-stale" / "job.json", job)
    atomic_write_json(state / "jobs" / "ftjob-stale" / "server.json", {"starts": 3})
    ev = {
        "object": "fine_tuning.job.event",
        "id": "ftevent-1",
        "created_at": now,
        "level": "info",
        "message": "Fine-tuning job started",
        "data": None,
        "type": "message",
    }
    (state / "jobs" / "ftjob-stale" / "events.jsonl").write_text(json.dumps(ev) + '\n{"object": "fine_tun')

    s = Running(options(state))
    try:
        with httpx.Client(base_url=s.url, headers=AUTH, timeout=30) as http:
            b = wait_for(
                lambda: (x := http.get("/v1/batches/batch-resume").json())["status"] == "completed" and x,
                60,
                0.1,
            )
            assert b, http.get("/v1/batches/batch-resume").json()
            out = [
                json.loads(x)
                for x in http.get(f"/v1/files/{b['output_file_id']}/content").content.splitlines()
            ]
            assert sorted(o["custom_id"] for o in out) == [f"r{i}" for i in range(6)]  # 2 kept + 4 resumed
            gaveup = http.get("/v1/batches/batch-gaveup").json()
            assert (
                gaveup["status"] == "failed"
                and "stopped during this batch 3 times" in gaveup["errors"]["data"][0]["message"]
            )
            j = http.get("/v1/fine_tuning/jobs/ftjob-stale").json()
            assert j["status"] == "failed" and "3 times" in j["error"]["message"]
            events = http.get("/v1/fine_tuning/jobs/ftjob-stale/events")
            assert events.status_code == 200 and events.json()["data"][0]["message"].startswith(
                "Fine-tuning job failed"
            )
    finally:
        s.stop()


# ---- the key, the bind address, options, the batch client's deadline -------------------------------


def test_without_the_key_nothing_about_models_or_jobs(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as anon:
        assert anon.get("/health").json() == {"status": "ok"}
        assert "jobs" not in anon.get("/sublab/stats").json()
        for path in (
            "/openapi.json",
            "/v1/models",
            "/v1/fine_tuning/jobs",
            "/v1/files",
            "/v1/batches",
            "/docs",
        ):
            assert_openai_error(anon.get(path), 401)
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as ok:
        assert MODEL in ok.get("/health").json()["models"]
        assert ok.get("/openapi.json").status_code == 200


def test_bind_beyond_loopback_needs_a_key_and_bad_options_are_one_line(monkeypatch, capsys):
    from sublab.serve.__main__ import main
    from sublab.serve.options import ServeOptions, bind_check

    monkeypatch.delenv("SUBLAB_NO_SUCH_KEY", raising=False)
    assert (
        bind_check(ServeOptions(models=[MODEL], host="127.0.0.1", api_key_env="SUBLAB_NO_SUCH_KEY")) is None
    )
    assert bind_check(ServeOptions(models=[MODEL], host="::1", api_key_env="SUBLAB_NO_SUCH_KEY")) is None
    with pytest.raises(SublabError, match="refusing to serve on 0.0.0.0 without a key"):
        bind_check(ServeOptions(models=[MODEL], host="0.0.0.0", api_key_env="SUBLAB_NO_SUCH_KEY"))
    assert "WITHOUT a key" in bind_check(
        ServeOptions(models=[MODEL], host="0.0.0.0", api_key_env="SUBLAB_NO_SUCH_KEY", allow_no_key=True)
    )
    monkeypatch.setenv("SUBLAB_NO_SUCH_KEY", "k")
    assert "reachable from other machines" in bind_check(
        ServeOptions(models=[MODEL], host="0.0.0.0", api_key_env="SUBLAB_NO_SUCH_KEY")
    )
    for argv, msg in (
        (["--faults", "1.5"], "--faults must be a share in [0, 1]"),
        (["--max-n", "0"], "--max-n must be a positive integer"),
        (["--host", "0.0.0.0", "--api-key-env", "SUBLAB_UNSET_X"], "refusing to serve"),
    ):
        assert main([MODEL, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_every_limit_has_a_flag():
    import argparse

    from sublab.serve.options import MiB, ServeOptions, add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = ["--max-body-mb", "1", "--max-upload-mb", "2", "--max-prompt-tokens", "50", "--max-n", "4"]
    flags += ["--max-top-logprobs", "5", "--max-scoring-top-logprobs", "100", "--max-logprob-entries", "999"]
    flags += ["--max-queued", "7", "--max-queued-jobs", "3", "--max-active-batches", "2"]
    flags += ["--max-batch-requests", "10", "--max-epochs", "9", "--allow-no-key"]
    o = options_from_args(p.parse_args([MODEL, *flags]))
    assert (o.max_body_bytes, o.max_upload_bytes, o.max_prompt_tokens, o.max_n) == (MiB, 2 * MiB, 50, 4)
    assert (o.max_top_logprobs, o.max_scoring_top_logprobs, o.max_logprob_entries) == (5, 100, 999)
    assert (o.max_queued, o.max_queued_jobs, o.max_active_batches) == (7, 3, 2)
    assert (o.max_batch_requests, o.max_epochs, o.allow_no_key) == (10, 9, True)
    limits = [f for f in ServeOptions.__dataclass_fields__ if f.startswith("max_") and f != "max_batch"]
    assert all(f"--{f.replace('_', '-').replace('-bytes', '-mb')}" in " ".join(flags) for f in limits)


def test_batch_client_gives_up_at_its_deadline(monkeypatch):
    """An endpoint that never finishes a batch: sublab's batch client cancels it and fails at the
    batch's completion window (+ grace) instead of polling forever."""
    import types

    import sublab.backends.openai_batch as ob

    monkeypatch.setattr(ob, "DEADLINE_GRACE_S", 0.3)
    calls = []

    class Batches:
        async def create(self, **kw):
            return types.SimpleNamespace(
                id="batch-x", status="in_progress", created_at=100, expires_at=101, errors=None
            )

        async def retrieve(self, bid):
            calls.append("retrieve")
            return types.SimpleNamespace(
                id=bid, status="in_progress", created_at=100, expires_at=101, errors=None
            )

        async def cancel(self, bid):
            calls.append("cancel")

        async def list(self, **kw):
            return types.SimpleNamespace(data=[])

    class Files:
        async def create(self, **kw):
            return types.SimpleNamespace(id="file-x")

    fake = types.SimpleNamespace(files=Files(), batches=Batches())

    class Client:
        async def call(self, what, fn, **kw):
            return await fn()

        def run(self, flow):
            return asyncio.run(flow(fake))

    backend = types.SimpleNamespace(client=Client(), api=types.SimpleNamespace(poll_interval_s=0.05))
    t0 = time.time()
    with pytest.raises(SublabError, match="still in_progress after its completion window"):
        ob._one_batch(backend, [chat_body()])
    assert time.time() - t0 < 5 and calls[-1] == "cancel" and calls.count("retrieve") >= 3
