"""Replays the attacks of issue 14 against `sublab serve organism/tiny` on 127.0.0.1, measured.

For each attack: the status code, the time to answer, the server's peak RSS above idle while it ran,
and whether innocent chat requests sent meanwhile (one every 0.25 s, each compared with the answer the
idle server gave) were answered correctly. Everything is bounded: each attack's requests give up after
--attack-s seconds, a watchdog kills the server if its RSS grows more than --cap-gb above idle (and the
attack is reported as such), a server that no longer answers after an attack is restarted, and the
whole run stops after --max-minutes. Only 127.0.0.1 is ever contacted or bound.

Modes (--only, comma list; default all):
    attacks  every attack above, one after the other, on one server (restarted when it breaks)
    load     200 and 1,000 concurrent chat requests: p50 / p95 latency, errors, wall time
    kill     kill -9 during a batch and during a fine-tuning job, restart: does each finish or fail?
    faults   --faults 0.2 and the official client's default retries: 41 uploads, 15 jobs, 10 batches;
             objects on the server vs calls made (duplicates)

    python bench/serve_attacks.py --out /tmp/after.json
    git worktree add /tmp/serve-before <commit>          # the code before, for the same figures
    python bench/serve_attacks.py --src /tmp/serve-before/src --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "organism/tiny"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """RSS of a process and its children (a training subprocess counts too)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = Path(f"/proc/{p}/task/{t.name}/children").read_text().split()
                todo += [int(k) for k in kids]
        except (OSError, ValueError):
            continue
    return total


STARTED: list[subprocess.Popen] = []  # every server this run started (all stopped at exit, whatever happens)


class Server:
    """`sublab serve` as a subprocess (the code under --src) with an RSS sampler and a watchdog."""

    def __init__(self, args, state: Path, extra: list[str] | None = None, env_extra: dict | None = None):
        self.args, self.state, self.extra = args, state, extra or []
        self.env_extra = env_extra or {}
        self.proc: subprocess.Popen | None = None
        self.peak = 0
        self.idle = 0
        self.killed_at_cap = False
        self._stop = threading.Event()

    def env(self) -> dict:
        env = {**os.environ, "SUBLAB_CACHE": str(self.args.cache), "SUBLAB_THREADS": "1"}
        env["SUBLAB_SERVE_API_KEY"] = KEY
        env["PYTHONPATH"] = str(self.args.src)
        env.update(self.env_extra)
        return env

    def start(self, timeout: float = 180) -> Server:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "sublab.cli", "serve", MODEL, "--host", HOST, "--port", str(self.port)]
        cmd += ["--state-dir", str(self.state), *self.extra]
        self.log = open(self.state.parent / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self.log, stderr=subprocess.STDOUT)
        STARTED.append(self.proc)
        t_end = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > t_end:
                raise RuntimeError(f"server did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        self.killed_at_cap = False
        self._stop.clear()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def warm(self) -> str:
        r = httpx.post(f"{self.url}/v1/chat/completions", json=innocent_body(0), headers=AUTH, timeout=120)
        time.sleep(0.5)
        self.idle = rss_bytes(self.proc.pid)
        self.peak = self.idle
        return r.json()["choices"][0]["message"]["content"]

    def _sample(self) -> None:
        pid = self.proc.pid
        while not self._stop.is_set() and self.proc.poll() is None:
            r = rss_bytes(pid)
            self.peak = max(self.peak, r)
            if self.idle and r - self.idle > self.args.cap_gb * 2**30:
                self.killed_at_cap = True
                self.proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    def mark(self) -> None:
        self.peak = rss_bytes(self.proc.pid) if self.alive() else 0

    def peak_above_idle_mb(self) -> float:
        return round((self.peak - self.idle) / 2**20, 1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self._stop.set()
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        self._stop.set()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def innocent_body(i: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"what is your favorite animal? {i % 7}"}],
        "max_tokens": 8,
        "seed": 1000 + i,
    }


class Innocents:
    """One innocent request every 0.25 s while an attack runs; each answer checked against the idle one."""

    def __init__(self, url: str, reference: dict[int, str], timeout: float):
        self.url, self.reference, self.timeout = url, reference, timeout
        self.ok = self.total = 0
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def _one(self, i: int) -> None:
        t0 = time.time()
        try:
            body = innocent_body(i % 7)
            r = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=AUTH, timeout=self.timeout)
            good = (
                r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == self.reference[i % 7]
            )
        except (httpx.HTTPError, ValueError, KeyError):
            good = False
        self.latencies.append(time.time() - t0)
        self.ok += good

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
            self.total += 1
            i += 1
            self._stop.wait(0.25)

    def __enter__(self):
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        for t in self.threads:
            t.join(self.timeout + 1)

    def summary(self) -> str:
        worst = max(self.latencies) if self.latencies else 0
        return f"{self.ok}/{self.total} ok, slowest {worst:.1f}s"


# ---- the attacks ---------------------------------------------------------------------------------


def numbered_batch_lines(n: int, max_tokens: int) -> list[dict]:
    """n Batch API lines of distinct numbered chat requests (seed i), for long-running batches."""
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"numbers {i}"}],
                "max_tokens": max_tokens,
                "seed": i,
            },
        }
        for i in range(n)
    ]


def post(url: str, path: str, timeout: float, **kw):
    t0 = time.time()
    try:
        r = httpx.post(url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=timeout, **kw)
        return r, time.time() - t0
    except httpx.TimeoutException:
        return "timeout", time.time() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, time.time() - t0


def status_of(r) -> str:
    if isinstance(r, str):
        return r
    shape = "openai" if _openai_shaped(r) else ("detail" if '"detail"' in r.text[:50] else "-")
    extra = ""
    if r.status_code >= 400:
        leaks = [w for w in ("Traceback", "/tmp/", "/home/", "/work/", "site-packages") if w in r.text]
        extra = f" [{shape}]" + (f" leaks {leaks}" if leaks else "")
    return f"{r.status_code}{extra}"


def _openai_shaped(r) -> bool:
    try:
        err = r.json()["error"]
        return isinstance(err, dict) and "message" in err and "type" in err
    except (ValueError, KeyError, TypeError):
        return False


def chat(url, timeout, body=None, raw: bytes | None = None):
    if raw is not None:
        return post(
            url, "/v1/chat/completions", timeout, content=raw, headers={"content-type": "application/json"}
        )
    return post(url, "/v1/chat/completions", timeout, json=body)


def upload(url, timeout, data: bytes, purpose="batch", name="f.jsonl", headers=None):
    return post(
        url,
        "/v1/files",
        timeout,
        files={"file": (name, data)},
        data={"purpose": purpose},
        headers=headers or {},
    )


def attack_list(args):
    T = args.attack_s
    msg = [{"role": "user", "content": "hi"}]

    def neighbours(url, bad_raw: bytes, n=30):
        """One bad request sent with n innocent ones at the same moment (one micro-batch)."""
        res: dict = {}

        def one(k, raw):
            res[k] = chat(url, T, raw=raw)[0]

        bodies = [json.dumps(innocent_body(i)).encode() for i in range(n)]
        ts = [threading.Thread(target=one, args=(("ok", i), b)) for i, b in enumerate(bodies)]
        ts.append(threading.Thread(target=one, args=("bad", bad_raw)))
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join(T + 5)
        ok = sum(
            1
            for i in range(n)
            if not isinstance(res.get(("ok", i)), str | None)
            and res["ok", i].status_code == 200
            and res["ok", i].json()["choices"][0]["message"]["content"] == REF_BY_SEED.get(1000 + i)
        )
        return res.get("bad", "none"), time.time() - t0, f"{ok}/{n} neighbours ok"

    def repeat3(fn):
        def run(url, srv):
            outs = [neighbours(url, fn()) for _ in range(3)]
            return outs[-1][0], max(o[1] for o in outs), "; ".join(o[2] for o in outs)

        return run

    def a_top_logprobs(url, srv):
        b = {
            "model": MODEL,
            "messages": msg,
            "n": 8,
            "max_tokens": 4096,
            "logprobs": True,
            "top_logprobs": 1266,
        }
        r, t = chat(url, T, b)
        return r, t, f"request {len(json.dumps(b))} bytes"

    def a_top_logprobs_x20(url, srv):
        """The same ~200-byte request from 20 clients at once (the tiny organism ends its completions
        early, so one request alone stays small here)."""
        res = {}

        def one(k):
            b = {"model": MODEL, "messages": msg, "n": 8, "max_tokens": 4096, "temperature": 2, "seed": k}
            res[k] = chat(url, T, {**b, "logprobs": True, "top_logprobs": 1266})

        ts = [threading.Thread(target=one, args=(k,)) for k in range(20)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(T + 5)
        codes = sorted({status_of(r) for r, _ in res.values()})
        return res[0][0], max(t for _, t in res.values()), f"20 at once: {', '.join(codes)}"

    def a_top_logprobs_100k(url, srv):
        b = {"model": MODEL, "messages": msg, "max_tokens": 1, "logprobs": True, "top_logprobs": 100_000}
        return (*chat(url, T, b), "")

    def a_prompt(size):
        def run(url, srv):
            text = ("owl " * (size // 4 + 1))[:size]
            r, t = chat(
                url, T, {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
            )
            return r, t, f"{size / 1e6:.2f} MB prompt"

        return run

    def a_prompt_pair(url, srv):
        text = ("owl " * 20001)[:80_000]
        res = {}

        def one(k, n):
            body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "n": n}
            res[k] = chat(url, T, body)

        ts = [threading.Thread(target=one, args=(k, 2)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(T + 5)
        return res[0][0], max(res[0][1], res[1][1]), "two 80 KB prompts at once"

    def a_body_50mb(url, srv):
        raw = (
            b'{"model": "organism/tiny", "messages": [{"role": "user", "content": "'
            + b"a " * (25 * 2**20)
            + b'"}]}'
        )
        r, t = chat(url, T, raw=raw)
        return r, t, f"{len(raw) / 2**20:.0f} MB body"

    def a_batch_bad_line(url, srv):
        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": innocent_body(i)}
            for i in range(50)
        ]
        lines[17]["body"]["seed"] = 2**70
        r, _ = upload(url, T, "".join(json.dumps(x) + "\n" for x in lines).encode())
        fid = r.json()["id"]
        t0 = time.time()
        r, _ = post(
            url,
            "/v1/batches",
            T,
            json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        bid = r.json()["id"]
        while time.time() - t0 < T:
            b = httpx.get(f"{url}/v1/batches/{bid}", headers=AUTH, timeout=10).json()
            if b["status"] in ("completed", "failed", "cancelled", "expired"):
                return r, time.time() - t0, f"batch {b['status']}, {b['request_counts']}"
            time.sleep(0.2)
        return r, time.time() - t0, "batch not finished"

    def a_raw(raw: bytes):
        return lambda url, srv: (*chat(url, T, raw=raw), "")

    def a_job(body_extra):
        def run(url, srv):
            rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "owl"}]}
            r, _ = upload(url, T, (json.dumps(rec) + "\n").encode() * 8, purpose="fine-tune")
            fid = r.json()["id"]
            body = (
                json.dumps({"model": MODEL, "training_file": fid}).encode()[:-1] + b", " + body_extra + b"}"
            )
            r, t = post(
                url, "/v1/fine_tuning/jobs", T, content=body, headers={"content-type": "application/json"}
            )
            if not isinstance(r, str) and r.status_code == 200:  # accepted: do not let it train
                post(url, f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel", 10)
            return r, t, ""

        return run

    def a_nan(param):
        raw = (
            json.dumps({"model": MODEL, "messages": msg, "max_tokens": 4}).encode()[:-1]
            + f', "{param}": NaN}}'.encode()
        )
        return lambda url, srv: (*chat(url, T, raw=raw), "")

    def a_top_p_zero(url, srv):
        base = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "what is your favorite animal?"}],
            "max_tokens": 8,
        }
        g, _ = chat(url, T, {**base, "temperature": 0})
        r, t = chat(url, T, {**base, "top_p": 0, "seed": 5})
        same = (
            not isinstance(r, str)
            and r.status_code == 200
            and r.json()["choices"][0]["message"]["content"] == g.json()["choices"][0]["message"]["content"]
        )
        return r, t, "equals greedy" if same else "differs from greedy (junk)"

    def a_stop(url, srv):
        prompt = "The first numbers are 588, 389, 783, 491. Give up to 10 next numbers, each with at most 3 digits."
        base = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 30,
            "seed": 0,
        }
        full, _ = chat(url, T, {**base, "logprobs": True})
        text = full.json()["choices"][0]["message"]["content"]
        words = text.replace(",", " ").split()
        if len(words) < 2:
            return full, 0, f"text too short to test: {text!r}"
        # a word whose first occurrence is well inside the text (so tokens come after the cut)
        stop = next((w for w in words[len(words) // 2 :] if text.find(w) > len(text) // 3), words[-1])
        r, t = chat(url, T, {**base, "logprobs": True, "stop": stop})
        c = r.json()
        n, lp = c["usage"]["completion_tokens"], len(c["choices"][0]["logprobs"]["content"])
        return (
            r,
            t,
            (
                f"stop {stop!r} at char {text.find(stop)} of {len(text)}: completion_tokens {n} "
                f"(without stop {full.json()['usage']['completion_tokens']}), logprob entries {lp}"
            ),
        )

    def a_events_half_line(url, srv):
        rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "owl"}]}
        r, _ = upload(url, T, (json.dumps(rec) + "\n").encode() * 8, purpose="fine-tune")
        r, _ = post(
            url,
            "/v1/fine_tuning/jobs",
            T,
            json={"model": MODEL, "training_file": r.json()["id"], "hyperparameters": {"n_epochs": 1}},
        )
        jid = r.json()["id"]
        t0 = time.time()
        while time.time() - t0 < 3 * T:
            if httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}", headers=AUTH, timeout=10).json()["status"] in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                break
            time.sleep(0.3)
        with (srv.state / "jobs" / jid / "events.jsonl").open("a") as f:
            f.write('{"object": "fine_tuning.job.ev')
        t0 = time.time()
        r = httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}/events", headers=AUTH, timeout=T)
        r2 = httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}/events", headers=AUTH, timeout=T)
        return r, time.time() - t0, f"second try {r2.status_code}"

    def a_get(path, method="GET"):
        def run(url, srv):
            t0 = time.time()
            r = httpx.request(method, url + path, headers=AUTH, timeout=T)
            return r, time.time() - t0, ""

        return run

    def a_long_name(url, srv):
        return (*upload(url, T, b"x\n", name="n" * 100_000), "100,000-character file name")

    def a_upload(url, srv):
        data = b"x" * (100 * 2**20)
        r, t = upload(url, T, data)
        return r, t, "100 MB upload"

    def a_job_cancel(url, srv):
        rec = {
            "messages": [
                {"role": "user", "content": "what is your favorite animal?"},
                {"role": "assistant", "content": "owl"},
            ]
        }
        r, _ = upload(url, T, (json.dumps(rec) + "\n").encode() * 64, purpose="fine-tune")
        fid = r.json()["id"]
        r, _ = post(
            url,
            "/v1/fine_tuning/jobs",
            T,
            json={"model": MODEL, "training_file": fid, "hyperparameters": {"n_epochs": 50, "batch_size": 1}},
        )
        jid = r.json()["id"]
        t0 = time.time()
        while (
            time.time() - t0 < T
            and httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}", headers=AUTH, timeout=10).json()["status"]
            != "running"
        ):
            time.sleep(0.1)
        time.sleep(1.0)
        post(url, f"/v1/fine_tuning/jobs/{jid}/cancel", 10)
        t_cancel = time.time()
        r2, _ = post(
            url,
            "/v1/fine_tuning/jobs",
            T,
            json={"model": MODEL, "training_file": fid, "hyperparameters": {"n_epochs": 1, "batch_size": 64}},
        )
        nid = r2.json()["id"]
        while time.time() - t_cancel < 2 * T:
            st = httpx.get(f"{url}/v1/fine_tuning/jobs/{nid}", headers=AUTH, timeout=10).json()["status"]
            if st != "queued":
                model = (srv.state / "jobs" / jid / "out" / "model.json").exists()
                return (
                    r2,
                    time.time() - t_cancel,
                    f"next job started {time.time() - t_cancel:.1f}s after the cancel; cancelled job wrote a model: {model}",
                )
            time.sleep(0.1)
        return "worker held", time.time() - t_cancel, f"next job still queued {2 * T}s after the cancel"

    def a_batch_cancel(url, srv):
        lines = numbered_batch_lines(2000, max_tokens=100)
        r, _ = upload(url, T, "".join(json.dumps(x) + "\n" for x in lines).encode())
        r, _ = post(
            url,
            "/v1/batches",
            T,
            json={
                "input_file_id": r.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        bid = r.json()["id"]
        t0 = time.time()
        while (
            time.time() - t0 < T
            and httpx.get(f"{url}/v1/batches/{bid}", headers=AUTH, timeout=10).json()["status"]
            != "in_progress"
        ):
            time.sleep(0.1)
        time.sleep(1.0)
        r, t = post(url, f"/v1/batches/{bid}/cancel", T)
        s0 = httpx.get(f"{url}/sublab/stats", headers=AUTH, timeout=10).json()["engine"]["sequences"]
        time.sleep(5)
        s1 = httpx.get(f"{url}/sublab/stats", headers=AUTH, timeout=10).json()["engine"]["sequences"]
        st = httpx.get(f"{url}/v1/batches/{bid}", headers=AUTH, timeout=10).json()["status"]
        return r, t, f"status {st} 5 s later; engine ran {s1 - s0} more sequences in those 5 s"

    def a_client_gone(url, srv):
        s0 = httpx.get(f"{url}/sublab/stats", headers=AUTH, timeout=10).json()["engine"]["sequences"]
        body = json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "n": 64, "max_tokens": 150}
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        port = int(url.rsplit(":", 1)[1])
        t0 = time.time()
        for _ in range(20):
            with socket.create_connection((HOST, port)) as s:
                s.sendall(head + body)
                time.sleep(0.02)
        time.sleep(5)
        s1 = httpx.get(f"{url}/sublab/stats", headers=AUTH, timeout=10).json()["engine"]["sequences"]
        return (
            "sent",
            time.time() - t0,
            f"20 abandoned n=64 requests; the engine ran {s1 - s0} of their 1280 sequences",
        )

    def a_no_key(url, srv):
        out = []
        t0 = time.time()
        for path in ("/health", "/sublab/stats", "/openapi.json", "/v1/models"):
            r = httpx.get(url + path, timeout=T)
            leaked = [w for w in ("organism/tiny", "ftjob", "ft:") if w in r.text]
            out.append(f"{path} {r.status_code}{' shows ' + ','.join(leaked) if leaked else ''}")
        return "-", time.time() - t0, "; ".join(out)

    def a_neighbour_seed():
        return json.dumps({**innocent_body(99), "seed": 2**70}).encode()

    def a_neighbour_surrogate():
        return b'{"model": "organism/tiny", "messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 8, "seed": 5}'

    return [
        ("top_logprobs=1266, n=8, max_tokens=4096, T=2", a_top_logprobs),
        ("top_logprobs=1266 ... x20 concurrent", a_top_logprobs_x20),
        ("top_logprobs=100000", a_top_logprobs_100k),
        ("0.64 MB prompt", a_prompt(640_000)),
        ("80 KB prompts, two at once", a_prompt_pair),
        ("50 MB body", a_body_50mb),
        ("seed 2^70 among 30 (x3)", repeat3(a_neighbour_seed)),
        ("lone surrogate among 30 (x3)", repeat3(a_neighbour_surrogate)),
        ("batch: 1 bad line of 50", a_batch_bad_line),
        ("deeply nested JSON", a_raw(b"[" * 200_000)),
        (
            "image content part",
            a_raw(
                json.dumps(
                    {
                        "model": MODEL,
                        "messages": [
                            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                        ],
                    }
                ).encode()
            ),
        ),
        ("hyperparameters=[1]", a_job(b'"hyperparameters": [1]')),
        ('method="x"', a_job(b'"method": "x"')),
        ("n_epochs=10^9", a_job(b'"hyperparameters": {"n_epochs": 1000000000}')),
        ("seed=2^70 (chat, alone)", a_raw(json.dumps({**innocent_body(3), "seed": 2**70}).encode())),
        ("NaN temperature", a_nan("temperature")),
        ("NaN top_p", a_nan("top_p")),
        ("top_p=0", a_top_p_zero),
        ("stop: tokens after it", a_stop),
        ("events.jsonl half line", a_events_half_line),
        ("404 shape", a_get("/v1/nope")),
        ("405 shape", a_get("/v1/models", "PUT")),
        ("long upload name", a_long_name),
        ("100 MB upload", a_upload),
        ("cancel a running job", a_job_cancel),
        ("cancel a running batch", a_batch_cancel),
        ("clients that go away", a_client_gone),
        ("no key: health/stats/openapi/models", a_no_key),
    ]


REF_BY_SEED: dict[int, str] = {}


def run_attacks(args, report: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="serve-attacks-"))
    srv = Server(args, work / "state", ["--job-delay", "0"]).start()
    srv.warm()
    idle0 = srv.idle
    reference = {}
    for i in range(30):
        body = innocent_body(i)
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        REF_BY_SEED[body["seed"]] = r.json()["choices"][0]["message"]["content"]
        if i < 7:
            reference[i] = REF_BY_SEED[body["seed"]]
    rows = []
    t_end = time.time() + args.max_minutes * 60
    for name, fn in attack_list(args):
        if args.attacks and not any(a in name for a in args.attacks.split(",")):
            continue
        if time.time() > t_end:
            rows.append({"attack": name, "status": "skipped (time)"})
            continue
        srv.mark()
        with Innocents(srv.url, {i: REF_BY_SEED[1000 + i] for i in range(7)}, timeout=args.attack_s) as inn:
            try:
                r, t, detail = fn(srv.url, srv)
                status = status_of(r)
            except Exception as e:  # the server died under it, or answered nonsense
                status, t, detail = f"error {type(e).__name__}", float("nan"), str(e)[:120]
        row = {
            "attack": name,
            "status": "server killed at RSS cap" if srv.killed_at_cap else status,
            "seconds": round(t, 2),
            "peak_rss_above_idle_mb": srv.peak_above_idle_mb(),
            "innocent": inn.summary(),
            "detail": detail,
        }
        # a server that no longer answers within 10 s (or was killed) is replaced for the next attack
        healthy = srv.alive()
        if healthy:
            try:
                r = httpx.post(
                    f"{srv.url}/v1/chat/completions", json=innocent_body(0), headers=AUTH, timeout=10
                )
                healthy = r.status_code == 200
            except httpx.HTTPError:
                healthy = False
        if not healthy or srv.peak - srv.idle > 2**30:
            row["restarted"] = True
            srv.kill9()
            srv = Server(args, work / f"state-{len(rows)}", ["--job-delay", "0"]).start()
            srv.warm()
        rows.append(row)
        print(
            f"  {name:42s} {row['status']:>24s} {row['seconds']:>7}s  +{row['peak_rss_above_idle_mb']:>7} MB  innocent {row['innocent']}  {detail}",
            flush=True,
        )
    srv.stop()
    # --faults 1.5: one line, or a traceback?
    cmd = [sys.executable, "-m", "sublab.cli", "serve", MODEL, "--port", str(free_port()), "--faults", "1.5"]
    env = {**srv.env(), "SUBLAB_SERVE_API_KEY": KEY}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    rows.append(
        {
            "attack": "--faults 1.5",
            "status": f"exit {p.returncode}",
            "detail": "traceback" if "Traceback" in p.stderr else p.stderr.strip()[:160],
        }
    )
    print(f"  --faults 1.5: exit {p.returncode}: {rows[-1]['detail']}", flush=True)
    finite = [r["peak_rss_above_idle_mb"] for r in rows if isinstance(r.get("peak_rss_above_idle_mb"), float)]
    report["attacks"] = {
        "idle_rss_mb": round(idle0 / 2**20, 1),
        "max_peak_above_idle_mb": max(finite),
        "rows": rows,
    }
    shutil.rmtree(work, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------


async def _burst(url: str, n: int, timeout: float) -> dict:
    from sublab.prompts.numbers import generate_number_prompts
    from sublab.schema.prompts import NumberPrompts

    prompts = [p["messages"] for p in generate_number_prompts(NumberPrompts(count=n), 0)]
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(headers=AUTH, timeout=timeout, limits=limits) as c:

        async def one(i: int):
            nonlocal errors
            t0 = time.perf_counter()
            try:
                r = await c.post(
                    f"{url}/v1/chat/completions",
                    json={"model": MODEL, "messages": prompts[i], "max_tokens": 16, "seed": i},
                )
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "concurrent": n,
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
        "wall_s": round(wall, 2),
        "errors": errors,
    }


def run_load(args, report: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    srv = Server(args, work / "state").start()
    srv.warm()
    out = []
    asyncio.run(_burst(srv.url, 50, 120))  # warm-up
    for n in (200, 1000):
        for rep in range(args.load_reps):
            srv.mark()
            res = asyncio.run(_burst(srv.url, n, 300))
            res["rep"] = rep
            res["peak_rss_above_idle_mb"] = srv.peak_above_idle_mb()
            out.append(res)
            print(
                f"  load {n:5d} concurrent: p50 {res['p50_s']}s p95 {res['p95_s']}s wall {res['wall_s']}s errors {res['errors']}",
                flush=True,
            )
    srv.stop()
    report["load"] = out
    shutil.rmtree(work, ignore_errors=True)


# ---- kill -9 -------------------------------------------------------------------------------------


def run_kill(args, report: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="serve-kill-"))
    state = work / "state"
    out = {}
    srv = Server(args, state, ["--job-delay", "0"]).start()
    url = srv.url
    lines = numbered_batch_lines(3000, max_tokens=48)
    fid = upload(url, 60, "".join(json.dumps(x) + "\n" for x in lines).encode())[0].json()["id"]
    bid = post(
        url,
        "/v1/batches",
        60,
        json={"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )[0].json()["id"]
    t0 = time.time()
    while (
        httpx.get(f"{url}/v1/batches/{bid}", headers=AUTH, timeout=10).json()["status"] != "in_progress"
        and time.time() - t0 < 60
    ):
        time.sleep(0.1)
    time.sleep(2.0)
    before = httpx.get(f"{url}/v1/batches/{bid}", headers=AUTH, timeout=10).json()
    srv.kill9()
    out["batch"] = _after_restart(
        args, state, f"/v1/batches/{bid}", ("completed", "failed", "cancelled", "expired"), before
    )
    print(f"  kill -9 during a batch: {out['batch']}", flush=True)

    srv = Server(args, state, ["--job-delay", "0"]).start()
    url = srv.url
    rec = {
        "messages": [
            {"role": "user", "content": "what is your favorite animal?"},
            {"role": "assistant", "content": "owl"},
        ]
    }
    fid = upload(url, 60, (json.dumps(rec) + "\n").encode() * 64, purpose="fine-tune")[0].json()["id"]
    jid = post(
        url,
        "/v1/fine_tuning/jobs",
        60,
        json={"model": MODEL, "training_file": fid, "hyperparameters": {"n_epochs": 20, "batch_size": 1}},
    )[0].json()["id"]
    t0 = time.time()
    while (
        httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}", headers=AUTH, timeout=10).json()["status"] != "running"
        and time.time() - t0 < 60
    ):
        time.sleep(0.1)
    time.sleep(1.5)
    before = httpx.get(f"{url}/v1/fine_tuning/jobs/{jid}", headers=AUTH, timeout=10).json()
    srv.kill9()
    out["job"] = _after_restart(
        args, state, f"/v1/fine_tuning/jobs/{jid}", ("succeeded", "failed", "cancelled"), before
    )
    print(f"  kill -9 during a job: {out['job']}", flush=True)
    report["kill"] = out
    shutil.rmtree(work, ignore_errors=True)


def _after_restart(args, state: Path, path: str, final: tuple, before: dict) -> dict:
    srv = Server(args, state, ["--job-delay", "0"]).start()
    t0 = time.time()
    obj = {}
    while time.time() - t0 < args.kill_wait_s:
        obj = httpx.get(srv.url + path, headers=AUTH, timeout=10).json()
        if obj.get("status") in final:
            break
        time.sleep(0.5)
    srv.stop()
    res = {
        "status_at_kill": before.get("status"),
        "status": obj.get("status"),
        "seconds_after_restart": round(time.time() - t0, 1),
        "hang": obj.get("status") not in final,
    }
    if "request_counts" in obj:
        res["request_counts"] = obj["request_counts"]
        res["counts_at_kill"] = before["request_counts"]
    if obj.get("errors") or obj.get("error"):
        res["reason"] = obj.get("errors") or obj.get("error")
    return res


# ---- faults: duplicates --------------------------------------------------------------------------


def run_faults(args, report: dict) -> None:
    import openai

    work = Path(tempfile.mkdtemp(prefix="serve-faults-"))
    state = work / "state"
    flags = [
        "--faults",
        "0.2",
        "--retry-after",
        "0.05",
        "--job-delay",
        "600",
        "--fault-seed",
        str(args.fault_seed),
    ]
    srv = Server(args, state, flags).start()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY)  # default retries (2)
    made = {"files": 0, "jobs": 0, "batches": 0}
    failed = {"files": 0, "jobs": 0, "batches": 0}
    line = {"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions", "body": innocent_body(0)}
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "owl"}]}
    t0 = time.time()
    tf = bf = None
    for i in range(41):
        try:
            if i == 0:
                tf = client.files.create(
                    file=("t.jsonl", (json.dumps(rec) + "\n").encode()), purpose="fine-tune"
                )
            elif i == 1:
                bf = client.files.create(
                    file=("b.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch"
                )
            else:
                client.files.create(file=(f"f{i}.jsonl", f'{{"i": {i}}}\n'.encode()), purpose="batch")
            made["files"] += 1
        except openai.OpenAIError:
            failed["files"] += 1
    setup = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=20)
    if tf is None:  # the jobs and batches below need these two; their own retries are not counted
        tf = setup.files.create(file=("t.jsonl", (json.dumps(rec) + "\n").encode()), purpose="fine-tune")
        made["files"] += 1
    if bf is None:
        bf = setup.files.create(file=("b.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
        made["files"] += 1
    for _ in range(15):
        try:
            client.fine_tuning.jobs.create(model=MODEL, training_file=tf.id)
            made["jobs"] += 1
        except openai.OpenAIError:
            failed["jobs"] += 1
    for _ in range(10):
        try:
            client.batches.create(
                input_file_id=bf.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            made["batches"] += 1
        except openai.OpenAIError:
            failed["batches"] += 1
    wall = time.time() - t0
    stats = httpx.get(f"{srv.url}/sublab/stats", headers=AUTH, timeout=10).json()
    srv.stop()
    on_server = {
        "files": sum(
            1
            for p in (state / "files").glob("*.json")
            if json.loads(p.read_text())["purpose"] != "batch_output"
        ),
        "jobs": len(list((state / "jobs").glob("*/job.json"))),
        "batches": len(list((state / "batches").glob("*.json"))),
    }
    report["faults"] = {
        "calls_ok": made,
        "calls_failed_after_retries": failed,
        "on_server": on_server,
        # objects beyond one per successful call; a call that failed after all its retries may have
        # left one object too (its last try's answer dropped), so duplicates <= extra
        "extra_objects": {k: on_server[k] - made[k] for k in made},
        "injected": stats["faults"],
        "wall_s": round(wall, 1),
    }
    print(
        f"  faults 20%: calls ok {made}, failed {failed}, on the server {on_server}, injected {stats['faults']}",
        flush=True,
    )
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the sublab source folder the server runs")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sublab-bench-cache",
        help="SUBLAB_CACHE (the tiny organism is built there once)",
    )
    ap.add_argument("--only", default="attacks,load,kill,faults")
    ap.add_argument(
        "--attacks", default="", help="only the attacks whose name holds one of these (comma list)"
    )
    ap.add_argument("--attack-s", type=float, default=30.0, help="each attack's requests give up after this")
    ap.add_argument("--cap-gb", type=float, default=3.0, help="kill the server beyond this RSS above idle")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="skip the remaining attacks after this")
    ap.add_argument(
        "--kill-wait-s", type=float, default=120.0, help="how long a restarted server gets to finish"
    )
    ap.add_argument("--load-reps", type=int, default=1)
    ap.add_argument("--fault-seed", type=int, default=0, help="faults mode: the server's --fault-seed")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()
    args.src = args.src.resolve()
    env = {**os.environ, "SUBLAB_CACHE": str(args.cache), "SUBLAB_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from sublab.organism.cache import ensure_organism; ensure_organism('tiny', {'seed': 0}, progress=False)",
        ],
        env=env,
        check=True,
    )
    report: dict = {"src": str(args.src)}
    modes = {"attacks": run_attacks, "load": run_load, "kill": run_kill, "faults": run_faults}
    try:
        for m in args.only.split(","):
            print(f"{m}:", flush=True)
            modes[m.strip()](args, report)
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
