"""Packaged organisms: the quickstart's proto seed 0 ships with the package and is installed into the cache
instead of being pretrained (pretraining is deterministic on one machine, not across CPUs); `organism
build --from-scratch` pretrains into its own folder and says whether the weights are the packaged ones."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from sublab.errors import SublabError
from sublab.organism import cache
from sublab.organism.cache import build_from_scratch, ensure_organism, prebuilt_dir, recipe_for


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", [0, 1000])  # the quickstart's organism and its cross-init control's
def test_packaged_proto_is_whole_and_matches_the_tokenizer(seed):
    from sublab.organism.tokenizer import build_tokenizer

    recipe = recipe_for("proto", {"seed": seed})
    d = prebuilt_dir("proto", recipe)
    assert d is not None, f"proto seed {seed} must ship with the package"
    info = json.loads((d / "organism.json").read_text())
    assert info["weights_sha256"] == _sha(d / "model.safetensors")
    assert info["recipe"] == recipe.model_dump() and info["cpu_capability"] == "AVX2"
    config = json.loads((d / "config.json").read_text())
    assert config["vocab_size"] == len(build_tokenizer())
    assert prebuilt_dir("proto", recipe_for("proto", {"seed": 1})) is None  # other seeds are pretrained


def test_missing_proto_is_installed_from_the_package_not_pretrained(tmp_path, monkeypatch):
    def no_pretraining(*a, **k):
        raise AssertionError("pretrained although a packaged copy exists")

    monkeypatch.setenv("SUBLAB_CACHE", str(tmp_path))
    monkeypatch.setattr("sublab.organism.pretrain.pretrain", no_pretraining)
    path = ensure_organism("proto", {"seed": 0}, progress=False)
    packaged = prebuilt_dir("proto", recipe_for("proto"))
    assert path.parent == tmp_path / "organisms" and path.name == packaged.name
    assert _sha(path / "model.safetensors") == _sha(packaged / "model.safetensors")
    assert json.loads((path / "organism.json").read_text())["installed_from"] == "package"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.is_dir()]
    assert ensure_organism("proto", {"seed": 0}, progress=False) == path  # cached now


def test_from_scratch_compares_with_the_packaged_copy(tmp_path, monkeypatch, cache_dir, tiny_organism):
    # tiny has no packaged copy: the build reports none
    out, cmp = build_from_scratch("tiny", {"seed": 0}, tmp_path / "a", progress=False)
    assert cmp["packaged_sha256"] is None and not cmp["same_as_packaged"]
    assert cmp["weights_sha256"] == _sha(out / "model.safetensors")
    # the cached organism experiments use is untouched
    assert ensure_organism("tiny", {"seed": 0}, progress=False) == tiny_organism
    # with a packaged copy of tiny (this machine's own build): a rebuild here is bit-identical
    root = tmp_path / "prebuilt"
    shutil.copytree(tiny_organism, root / tiny_organism.name)
    monkeypatch.setattr(cache, "prebuilt_root", lambda: root)
    _, same = build_from_scratch("tiny", {"seed": 0}, tmp_path / "b", progress=False)
    assert same["same_as_packaged"] and same["weights_sha256"] == same["packaged_sha256"]
    with pytest.raises(SublabError, match="already exists"):
        build_from_scratch("tiny", {"seed": 0}, tmp_path / "b", progress=False)


def test_cli_from_scratch_prints_the_verdict(tmp_path, monkeypatch, capsys, cache_dir, tiny_organism):
    from sublab.cli import main

    root = tmp_path / "prebuilt"
    shutil.copytree(tiny_organism, root / tiny_organism.name)
    info = json.loads((root / tiny_organism.name / "organism.json").read_text())
    info["weights_sha256"] = "0" * 64  # as if another machine had built it
    (root / tiny_organism.name / "organism.json").write_text(json.dumps(info))
    monkeypatch.setattr(cache, "prebuilt_root", lambda: root)
    main(["organism", "build", "--preset", "tiny", "--from-scratch", "--out", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert "NOT the same as the packaged copy (0000000000000000)" in out
    assert f"built from scratch: {tmp_path / 'c'}" in out


def test_a_cached_local_build_that_is_not_the_packaged_one_is_named(
    tmp_path, monkeypatch, capsys, cache_dir, tiny_organism
):
    # an older local build stays in the cache and keeps being used: say so, once, and how to fix it
    root = tmp_path / "prebuilt"
    shutil.copytree(tiny_organism, root / tiny_organism.name)
    monkeypatch.setattr(cache, "prebuilt_root", lambda: root)
    monkeypatch.setattr(cache, "_WARNED", set())
    assert ensure_organism("tiny", {"seed": 0}, progress=False) == tiny_organism
    assert "warning" not in capsys.readouterr().err  # the cached weights are the packaged ones
    info = json.loads((root / tiny_organism.name / "organism.json").read_text())
    info["weights_sha256"] = "0" * 64  # the packaged copy came from another machine
    (root / tiny_organism.name / "organism.json").write_text(json.dumps(info))
    assert ensure_organism("tiny", {"seed": 0}, progress=False) == tiny_organism  # still used
    err = capsys.readouterr().err
    assert "is not the packaged build" in err and f"delete {tiny_organism}" in err
    ensure_organism("tiny", {"seed": 0}, progress=False)
    assert capsys.readouterr().err == ""  # once per process


def test_other_weights_behind_one_recipe_redo_the_stages_built_on_them(tmp_path, monkeypatch, tiny_organism):
    # stage keys name the weights, not only the recipe: a rebuilt organism (another CPU, a deleted
    # cache folder) must not reuse a teacher or students trained on the old one
    from conftest import tiny_experiment
    from safetensors.torch import load_file, save_file

    from sublab.backends.registry import model_identity
    from sublab.config import validate
    from sublab.pipeline import run_experiment
    from sublab.records import read_json
    from sublab.schema import ExperimentConfig

    monkeypatch.setenv("SUBLAB_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "cache" / "organisms" / tiny_organism.name
    shutil.copytree(tiny_organism, mine)
    cfg = validate(ExperimentConfig, tiny_experiment(**{"eval.max_questions": 2}))
    run_experiment(cfg, tmp_path / "run")
    ref = read_json(tmp_path / "run" / "reference" / "model.json")
    assert ref["info"]["weights_sha256"] == _sha(mine / "model.safetensors")
    before = model_identity("organism/tiny")
    assert run_experiment(cfg, tmp_path / "run").ran == []  # same weights: nothing to redo
    weights = load_file(mine / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01  # the same recipe, other weights
    save_file(weights, mine / "model.safetensors", metadata={"format": "pt"})
    again = run_experiment(cfg, tmp_path / "run")
    assert {"reference", "teacher", "train:student", "train:control"} <= set(again.ran)
    assert model_identity("organism/tiny") != before  # a judge or classifier organism too
