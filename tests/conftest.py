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
