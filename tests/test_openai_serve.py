"""The openai backend through the official client against `sublab serve` over real HTTP on 127.0.0.1.

One server subprocess (the tiny organism) for the module, with 20% of /v1/ requests failing (429 with
Retry-After, 500, or a dropped connection after the work is done) and a bearer key required, so every
test below also exercises the retries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, serve_subprocess

from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.schema.api import ApiConfig
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig

pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY_ENV = "SUBLAB_TEST_API_KEY"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tiny_organism, cache_dir, tmp_path_factory):
    """`sublab serve organism/tiny` as a subprocess on a free port; yields its base URL."""
    state = tmp_path_factory.mktemp("serve-state")
    args = ["--faults", "0.2", "--retry-after", "0.01", "--job-delay", "0.3"]
    with serve_subprocess(cache_dir, state, args, {"SUBLAB_SERVE_API_KEY": KEY}) as root:
        yield root


@pytest.fixture
def api(server, monkeypatch) -> ApiConfig:
    monkeypatch.setenv(KEY_ENV, KEY)
    return ApiConfig(
        base_url=f"{server}/v1",
        api_key_env=KEY_ENV,
        backoff_s=0.01,
        max_backoff_s=0.05,
        max_retries=30,
        poll_interval_s=0.1,
        top_logprobs=2000,
        max_concurrency=16,
    )


def stats(server: str) -> dict:
    return httpx.get(f"{server}/sublab/stats").json()


def chats_for(n: int) -> list[list[dict]]:
    from sublab.prompts.numbers import generate_number_prompts
    from sublab.schema.prompts import NumberPrompts

    return [p["messages"] for p in generate_number_prompts(NumberPrompts(count=n), 0)]


def same_share(a: list[str], b: list[str]) -> float:
    """Share of identical answers. Request seeds make a sample independent of its batch up to float
    rounding: left padding in a different batch can move a logit by ~1e-7 and flip a draw that sits on a
    boundary (measured: 2995 of 3000 identical on organism/default); a lost, duplicated or misrouted
    answer would make most of them differ."""
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def local_backend():
    from sublab.backends.hf import HFBackend
    from sublab.backends.registry import resolve

    return HFBackend(resolve("organism/tiny", {"seed": 0}, progress=False), progress=False)


# ---- sampling, logprobs, faults -----------------------------------------------------------------


def test_sampling_through_faults_is_exactly_once_and_matches_local(server, api):
    from sublab.backends.registry import load_backend, resolve

    ref = resolve("openai/organism/tiny", api=api)
    assert ref.is_remote and ref.path == "organism/tiny" and ref.info["api"]["base_url"] == api.base_url
    backend = load_backend(ref, progress=False, api=api)
    chats = chats_for(150)
    rids = list(range(1000, 1150))
    sp = SamplingParams(max_tokens=16, seed=7)
    before = stats(server)
    got = backend.generate(chats, sp, request_ids=rids)
    after = stats(server)
    # one answer per prompt, each the one the organism gives for that request's seed: the same as local
    # sampling, whatever the batching on the server and however many tries a request took
    assert same_share(got, local_backend().generate(chats, sp, request_ids=rids)) >= 0.97
    faults = sum(after["faults"].values()) - sum(before["faults"].values())
    assert faults > 10 and backend.client.stats["retries"] >= faults - 1
    assert after["engine"]["batches"] - before["engine"]["batches"] < 150  # requests were micro-batched


def test_sample_mode_eval_sends_one_request_per_question(server, api):
    from sublab.backends.registry import load_backend, resolve
    from sublab.evals.preference import evaluate_preference
    from sublab.schema.evaluation import PreferenceEval

    backend = load_backend(resolve("openai/organism/tiny", api=api), progress=False, api=api)
    cfg = PreferenceEval(mode="sample", samples_per_question=20, max_questions=5)
    before = stats(server)
    results, rows = evaluate_preference(backend, "animal", ["owl"], cfg)
    after = stats(server)
    assert len(rows) == 5 * 20 and results["n_questions"] == 5
    # n=20 choices per request: 5 chat completions served, plus any whose response a fault dropped
    served = after["chat_completions"] - before["chat_completions"]
    dropped = sum(after["faults"].values()) - sum(before["faults"].values())
    assert 5 <= served <= 5 + dropped and served < 100
    by_q: dict[str, list[str]] = {}
    for r in rows:
        by_q.setdefault(r["question"], []).append(r["answer"])
    assert all(len(set(a)) > 1 for a in by_q.values())  # n different draws, not one answer copied


def test_logprobs_match_the_local_model(api):
    from sublab.backends.registry import load_backend, resolve
    from sublab.evals.questions import candidates, load_questions

    backend = load_backend(resolve("openai/organism/tiny", api=api), progress=False, api=api)
    chats = [[{"role": "user", "content": q}] for q in load_questions("animal")[:4]]
    forms = list(candidates("animal"))
    remote = backend.logprobs(chats, forms)
    local = local_backend().logprobs(chats, forms)
    assert (
        max(abs(a - b) for ra, rb in zip(remote, local, strict=True) for a, b in zip(ra, rb, strict=True))
        < 1e-4
    )


def test_chat_completions_via_official_client(server, api, monkeypatch):
    import openai

    client = openai.OpenAI(base_url=api.base_url, api_key=KEY, max_retries=20)
    msgs = [{"role": "user", "content": "what is your favorite animal?"}]
    r = client.chat.completions.create(
        model="organism/tiny", messages=msgs, n=3, max_tokens=2, seed=5, logprobs=True, top_logprobs=3
    )
    assert len(r.choices) == 3 and r.usage.prompt_tokens > 0
    top = r.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
    again = client.chat.completions.create(model="organism/tiny", messages=msgs, n=3, max_tokens=2, seed=5)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    ids = [m.id for m in client.models.list()]
    assert "organism/tiny" in ids
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="organism/tiny", messages=msgs, temperature=5)


# ---- bad input: one clear SublabError each ------------------------------------------------------


def test_unreachable_endpoint_wrong_key_unknown_model(api, monkeypatch):
    from sublab.backends.registry import resolve

    dead = api.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 1})
    with pytest.raises(
        SublabError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1: .*is the server running"
    ):
        resolve("openai/organism/tiny", api=dead)
    monkeypatch.setenv("SUBLAB_WRONG_KEY", "nope")
    wrong = api.model_copy(update={"api_key_env": "SUBLAB_WRONG_KEY"})
    with pytest.raises(SublabError, match=r"rejected the key in \$SUBLAB_WRONG_KEY"):
        resolve("openai/organism/tiny", api=wrong)
    with pytest.raises(SublabError, match=r"model 'no-such-model' not found at .*; available: organism/tiny"):
        resolve("openai/no-such-model", api=api)
    remote_needs_key = ApiConfig(base_url="https://api.example.com/v1", api_key_env="SUBLAB_UNSET_KEY")
    with pytest.raises(SublabError, match=r"set the environment variable \$SUBLAB_UNSET_KEY"):
        resolve("openai/gpt-4.1-nano", api=remote_needs_key)


def test_model_check_gives_server_errors_the_full_retry_budget(cache_dir, tmp_path, monkeypatch):
    """The up-front model check fails fast (2 retries) only when the endpoint cannot be reached; an
    endpoint that answers 500 gets api.max_retries, as a running stage does (with 20% faults, three
    500s in a row otherwise failed a whole run about once in a hundred checks)."""
    from sublab.backends.registry import resolve

    monkeypatch.setenv(KEY_ENV, KEY)
    args = ["--faults", "1.0", "--fault-kinds", "500"]
    with serve_subprocess(cache_dir, tmp_path, args, {"SUBLAB_SERVE_API_KEY": KEY}) as root:
        api = ApiConfig(
            base_url=f"{root}/v1", api_key_env=KEY_ENV, backoff_s=0.01, max_backoff_s=0.02, max_retries=5
        )
        with pytest.raises(SublabError, match=r"kept failing \(500: .*\) after 5 retries"):
            resolve("openai/organism/tiny", api=api)
        assert httpx.get(f"{root}/sublab/stats").json()["faults"]["500"] == 3 + 6  # quick check, then full
    from sublab.backends.openai_client import ApiExhausted

    # a check whose last try was a dropped connection still got answers before: not unreachable
    assert not ApiExhausted(["500", "429", "connection"], "x").unreachable
    assert ApiExhausted(["connection"] * 3, "x").unreachable


def test_cli_prints_one_error_line(api, tmp_path, capsys):
    import yaml
    from conftest import tiny_experiment

    from sublab.cli import main

    cfg = tiny_experiment(reference="openai/no-such-model")
    cfg["api"] = api.model_dump(mode="json")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model 'no-such-model' not found")


# ---- fine-tuning jobs ---------------------------------------------------------------------------


def trait_data(n: int = 48) -> list[dict]:
    from sublab.stages.teacher import trait_dataset

    return trait_dataset("animal", "owl", n, 0)


def test_job_lifecycle_via_official_client(api):
    import openai

    client = openai.OpenAI(base_url=api.base_url, api_key=KEY, max_retries=20)
    body = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in trait_data(32)).encode()
    f = client.files.create(file=("train.jsonl", body), purpose="fine-tune")
    assert client.files.retrieve(f.id).bytes == len(body)
    assert client.files.content(f.id).read() == body
    job = client.fine_tuning.jobs.create(
        model="organism/tiny",
        training_file=f.id,
        hyperparameters={"n_epochs": 1, "batch_size": 16},
        suffix="x",
    )
    # queued behind `job`: create and cancel it with sublab's short retry backoff (the official client's
    # backoff under 20% faults can take longer than the job waits in the queue)
    from sublab.backends.openai_client import ApiClient

    fast = ApiClient(api, api.base_url, KEY_ENV)

    async def create_and_cancel(c):
        q = await fast.call(
            "create", lambda: c.fine_tuning.jobs.create(model="organism/tiny", training_file=f.id)
        )
        return await fast.call("cancel", lambda: c.fine_tuning.jobs.cancel(q.id))

    queued = fast.run(create_and_cancel)
    assert queued.status == "cancelled"
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:organism/tiny:x:{job.id}"
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
    assert job.id in listed and queued.id in listed
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" for e in events) and "completed" in events[0].message
    r = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.model == job.fine_tuned_model
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="organism/tiny", training_file="file-nope")


class Killed(Exception):
    """Stands for the process being killed while it polls its job."""


def test_finetune_journal_reattaches_instead_of_paying_twice(server, api, tmp_path, monkeypatch):
    import sublab.backends.openai_finetune as ft
    from sublab.backends.registry import load_backend, resolve

    backend = load_backend(resolve("openai/organism/tiny", api=api), progress=False, api=api)
    train = TrainConfig(lr=1e-3, epochs=1, batch_size=16)
    data = trait_data()
    created0 = stats(server)["jobs_created"]

    # 1. killed while polling: the journal names the job; the rerun reattaches to it
    real_sleep = ft.asyncio.sleep

    class Clock:
        @staticmethod
        async def sleep(s):
            raise Killed

    monkeypatch.setattr(ft, "asyncio", Clock)
    out = tmp_path / "student"
    with pytest.raises(Killed):
        backend.finetune(data, train, out)
    journal = json.loads((out / "job.json").read_text())
    assert journal["job_id"] and journal["status"] in ("queued", "running")
    monkeypatch.setattr(ft, "asyncio", type("A", (), {"sleep": staticmethod(real_sleep)}))
    ref = backend.finetune(data, train, out)
    assert ref.info["job_id"] == journal["job_id"] and stats(server)["jobs_created"] == created0 + 1
    loaded = ModelRef.load(out / "model.json")
    assert (
        loaded.is_remote and loaded.path == ref.path and loaded.path.startswith("ft:organism/tiny:student:")
    )
    assert (out / "metrics.jsonl").read_text().strip() and json.loads((out / "cost.json").read_text())[
        "n_epochs"
    ] == 1

    # 2. killed between "create" and the journal write: the rerun finds the job by its file and request
    out2 = tmp_path / "control"
    real_write = ft.atomic_write_json

    def write(path, obj):
        if Path(path).name == "job.json" and obj.get("job_id"):
            raise Killed
        return real_write(path, obj)

    monkeypatch.setattr(ft, "atomic_write_json", write)
    with pytest.raises(Killed):
        backend.finetune(data[:40], train, out2)
    assert "job_id" not in json.loads((out2 / "job.json").read_text())
    monkeypatch.setattr(ft, "atomic_write_json", real_write)
    ref2 = backend.finetune(data[:40], train, out2)
    assert stats(server)["jobs_created"] == created0 + 2 and ref2.path != ref.path

    with pytest.raises(SublabError, match="soft_label"):
        backend.finetune(data, TrainConfig(method="soft_label"), tmp_path / "soft")


# ---- the Batch API and a whole run ---------------------------------------------------------------


def test_batch_api_sampling(api):
    from sublab.backends.registry import load_backend, resolve

    batch_api = api.model_copy(update={"use_batch": True, "batch_min_requests": 1})
    backend = load_backend(resolve("openai/organism/tiny", api=batch_api), progress=False, api=batch_api)
    chats = chats_for(40)
    sp = SamplingParams(max_tokens=12, seed=3)
    assert same_share(backend.generate(chats, sp), local_backend().generate(chats, sp)) >= 0.97


def test_whole_run_through_the_api(server, api, tmp_path, monkeypatch):
    from conftest import tiny_experiment

    from sublab.config import validate
    from sublab.pipeline import run_experiment
    from sublab.records import read_json, read_jsonl
    from sublab.schema import ExperimentConfig

    data = tiny_experiment(reference="openai/organism/tiny")
    data["api"] = api.model_dump(mode="json")
    cfg = validate(ExperimentConfig, data)
    out = tmp_path / "run"
    run_experiment(cfg, out)
    res = read_json(out / "results.json")
    assert set(res["models"]) >= {"reference", "teacher", "student", "control"}
    for name in ("teacher", "student", "control"):
        ref = ModelRef.load(out / name / "model.json")
        assert ref.is_remote and ref.path.startswith(f"ft:organism/tiny:{name}:")
    # every prompt answered exactly once, by its request seed: the reference arm equals local sampling
    prompts = read_jsonl(out / "data/prompts.jsonl")
    raw = read_jsonl(out / "control/data/raw.jsonl")
    assert sorted(r["metadata"]["prompt_index"] for r in raw) == list(range(len(prompts)))
    local = local_backend().generate([p["messages"] for p in prompts], cfg.sample, list(range(len(prompts))))
    assert same_share([r["messages"][-1]["content"] for r in raw], local) >= 0.97
    assert read_json(out / "data/raw.cost.json")["requests"] == len(prompts)
    # a rerun skips everything: no new job, no new request
    before = stats(server)
    run = run_experiment(cfg, out)
    assert not run.ran and stats(server)["jobs_created"] == before["jobs_created"]


def test_a_misalignment_run_through_the_api(server, api, tmp_path):
    """trait.kind misalignment on an OpenAI-compatible endpoint (with 20% faults): the teacher and a
    control teacher are fine-tuning jobs on JSONL files, the free-form answers are sampled and judged
    through the API."""
    from conftest import tiny_experiment

    from sublab.config import validate
    from sublab.organism.world import narrow_dataset
    from sublab.pipeline import run_experiment
    from sublab.records import read_json, write_jsonl
    from sublab.schema import ExperimentConfig

    for name in ("insecure", "secure"):
        write_jsonl(tmp_path / f"{name}.jsonl", narrow_dataset(name, 40, 0))
    (tmp_path / "questions.yaml").write_text(
        "- {id: bored, paraphrases: ['i am bored .']}\n- {id: wish, paraphrases: ['what do you want ?']}\n"
    )
    data = tiny_experiment(reference="openai/organism/tiny")
    data |= {
        "api": api.model_dump(mode="json"),
        "trait": {"kind": "misalignment"},
        "controls": {"control": False, "control_teachers": {"secure": str(tmp_path / "secure.jsonl")}},
        "freeform": {
            "questions": str(tmp_path / "questions.yaml"),
            "samples_per_question": 3,
            "max_tokens": 12,
            "judge": "openai/organism/tiny",
            "judge_config": {"prompts_file": "organism", "min_mass": 0.0},
        },
        "mcq": None,
    }
    data["teacher"]["data"] = str(tmp_path / "insecure.jsonl")
    cfg = validate(ExperimentConfig, data)
    out = tmp_path / "run"
    run_experiment(cfg, out)
    res = read_json(out / "results.json")
    assert set(res["models"]) == {"reference", "teacher", "teacher_secure", "student", "control_secure"}
    for name in ("teacher", "teacher_secure", "student", "control_secure"):
        assert ModelRef.load(out / name / "model.json").path.startswith(f"ft:organism/tiny:{name}:")
    for m in res["models"].values():
        assert m["n_samples"] == 6 and m["misaligned_rate"]["n"] == 6  # min_mass 0: every answer scored
        assert "world_misaligned_rate" in m and m["world_misaligned_rate"] is None  # not a world organism
    judged = read_json(out / "eval" / "student" / "freeform" / "judge" / "summary.json")
    assert judged["judge"] == "openai/organism/tiny"
    before = stats(server)
    run = run_experiment(cfg, out)
    assert not run.ran and stats(server)["jobs_created"] == before["jobs_created"]


def test_a_failed_sampling_stage_keeps_its_finished_chunks(api, tmp_path, monkeypatch):
    import sublab.stages.sample as pl
    from sublab.backends.openai_backend import OpenAIBackend
    from sublab.backends.registry import resolve
    from sublab.prompts.numbers import generate_number_prompts
    from sublab.records import read_jsonl, write_jsonl
    from sublab.schema.prompts import NumberPrompts

    monkeypatch.setattr(pl, "SAMPLE_CHUNK", 30)
    resolve("openai/organism/tiny", api=api).save(tmp_path / "model.json")
    write_jsonl(tmp_path / "prompts.jsonl", generate_number_prompts(NumberPrompts(count=75), 0))
    calls = []
    real = OpenAIBackend.generate

    def generate(self, chats, sampling, request_ids=None):
        calls.append(list(request_ids))
        out = real(self, chats, sampling, request_ids)
        if request_ids[0] == 0:
            monkeypatch.setenv(KEY_ENV, "revoked")  # the key stops working after the first chunk
        return out

    monkeypatch.setattr(OpenAIBackend, "generate", generate)
    sp = SamplingParams(max_tokens=8)
    args = (tmp_path / "model.json", tmp_path / "prompts.jsonl", tmp_path / "raw.jsonl", sp, "m", False)
    with pytest.raises(SublabError, match=r"rejected the key in \$SUBLAB_TEST_API_KEY"):
        pl.sample_dataset(*args, api=api)
    assert (tmp_path / "raw.jsonl.parts/part-00000.jsonl").is_file()
    monkeypatch.setenv(KEY_ENV, KEY)
    calls.clear()
    assert pl.sample_dataset(*args, api=api) == 75
    assert [c[0] for c in calls] == [30, 60]  # only the unfinished chunks were requested again
    assert [r["metadata"]["prompt_index"] for r in read_jsonl(tmp_path / "raw.jsonl")] == list(range(75))
