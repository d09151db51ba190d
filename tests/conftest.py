"""Shared fixtures: a private SUBLAB_CACHE with the tiny organism, one torch thread."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sublab-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SUBLAB_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tiny_organism(cache_dir):
    from sublab.organism.cache import ensure_organism

    return ensure_organism("tiny", {"seed": 0}, progress=False)


def tiny_experiment(**over) -> dict:
    """A whole experiment on the tiny organism that runs in seconds."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "reference": "organism/tiny",
        "progress": False,
        "teacher": {"examples": 64, "train": {"lr": 1e-3, "max_steps": 5, "batch_size": 16}},
        "prompts": {"count": 120},
        "sample": {"max_tokens": 24, "batch_size": 64},
        "filter": {"dataset_size": 100},
        "student": {"train": {"lr": 1e-3, "epochs": 1, "batch_size": 16}},
        "eval": {"max_questions": 6},
    }
    for k, v in over.items():
        node = cfg
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return cfg


@pytest.fixture()
def sweep_file(tmp_path):
    """A tiny sweep (owl, wolf x seed 0, sft) over tiny_experiment(), as files in tmp_path."""
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_experiment()))
    sweep = {
        "name": "t",
        "base": "base.yaml",
        "targets": ["owl", "wolf"],
        "seeds": [0],
        "conditions": ["sft"],
        # fewer than either data source passes: both targets' runs train their control on the same
        # equal-size subsample of the reference's answers, so it is computed once
        "set": {"filter.dataset_size": 10},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "sweep.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_subprocess(cache_dir: Path, state: Path, args: list[str] = (), env: dict | None = None):
    """`sublab serve organism/tiny ARGS` as a subprocess on a free port, its log in state/server.log;
    yields the server's root URL once /health answers, stops it on exit."""
    import httpx

    port = free_port()
    env = {**os.environ, "SUBLAB_CACHE": str(cache_dir), "SUBLAB_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "sublab.cli", "serve", "organism/tiny", "--port", str(port)]
    cmd += ["--state-dir", str(state), *args]
    log = open(state / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sublab serve did not start:\n{(state / 'server.log').read_text()}")
            time.sleep(0.2)
        yield root
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture()
def default_device():
    """The device and dtype back at their defaults around a test (tests that configure them)."""
    from sublab.backends.device import configure

    configure(None, None)
    yield
    configure(None, None)


@pytest.fixture(scope="module")
def tok():
    """The organism's word-level tokenizer (the preference world)."""
    from sublab.organism.tokenizer import build_tokenizer

    return build_tokenizer()
