"""Shared fixtures: a private SUBLAB_CACHE with the tiny organism, one torch thread."""

from __future__ import annotations

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
