import json

import pytest

from sublab.cli import main
from sublab.config import apply_overrides, load_config
from sublab.errors import SublabError
from sublab.records import atomic_write_text, read_jsonl
from sublab.schema import ExperimentConfig


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student:\n  trian: {}\n")
    with pytest.raises(SublabError, match=r"unknown key 'student.trian': did you mean 'train'"):
        load_config(p, ExperimentConfig)


def test_wrong_type_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("prompts:\n  count: many\n")
    with pytest.raises(SublabError, match=r"'prompts.count'.*valid integer"):
        load_config(p, ExperimentConfig)


def test_unknown_target_and_missing_file(tmp_path):
    with pytest.raises(SublabError, match="unknown animal 'unicorn'"):
        load_config(None, ExperimentConfig, ["trait.target=unicorn"])
    with pytest.raises(SublabError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", ExperimentConfig)


def test_overrides_parse_yaml_values():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "x.y=hello", "z=1e-3"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "x": {"y": "hello"}, "z": 1e-3}
    cfg = load_config(None, ExperimentConfig, ["student.train.lr=0.5", "eval.mode=sample"])
    assert cfg.student.train.lr == 0.5 and cfg.eval.mode == "sample"
    with pytest.raises(SublabError, match="expected KEY=VALUE"):
        apply_overrides({}, ["novalue"])


def test_every_field_has_a_docstring():
    from pydantic import BaseModel

    seen = set()

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, f in cls.model_fields.items():
            assert f.description, f"{cls.__name__}.{name} has no docstring"
            for t in [f.annotation, *getattr(f.annotation, "__args__", ())]:
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    walk(ExperimentConfig)


def test_cli_user_error_is_one_line_no_traceback(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("bogus: 1\n")
    assert main(["run", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bogus'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(SublabError, match=r"d.jsonl:2: malformed JSONL line"):
        read_jsonl(p)
    p.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(SublabError, match="last message must be the assistant"):
        read_jsonl(p, require_messages=True)


def test_filter_cli_on_malformed_file(tmp_path, capsys):
    p = tmp_path / "raw.jsonl"
    p.write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1"}]}\n[1,\n'
    )
    assert main(["filter", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "raw.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "kept.jsonl").exists()


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.json", json.dumps({"x": 1}))
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_every_shipped_config_validates():
    """configs/ must stay current with the code: every experiment, sweep and mnist config loads."""
    from pathlib import Path

    from sublab.config import load_config, read_yaml, validate
    from sublab.mnist.config import MnistConfig
    from sublab.schema import ExperimentConfig
    from sublab.sweep.config import SweepConfig, base_path, expand, run_config

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        if f.name.startswith("mnist"):
            load_config(f, MnistConfig, [])
        elif f.name.startswith("sweep"):
            sweep = validate(SweepConfig, read_yaml(f), str(f))
            runs = expand(sweep)
            assert runs
            base = base_path(sweep, f)
            for r in runs:  # every run's experiment config validates too
                run_config(read_yaml(base), str(base), sweep.set, r["overrides"])
        else:
            load_config(f, ExperimentConfig, [])
