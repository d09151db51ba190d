"""Configs as data: YAML files validated by pydantic models (extra keys forbidden), `--set a.b=v` overrides.

Precedence: CLI `--set` > YAML > defaults. `load_config(path, Model, overrides)` is shared by every
command (`sublab run`, `sublab mnist`, ...). Errors name the key, the problem and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sublab.errors import SublabError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, every field has a docstring."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SublabError(f"config file not found: {path} (ready configs live in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SublabError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SublabError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (so 3 -> int, [1,2] -> list)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise SublabError(f"--set {item!r}: expected KEY=VALUE, e.g. --set student.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise SublabError(f"--set {item!r}: empty key segment in {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise SublabError(f"--set {item!r}: {p!r} is a value, not a section")
            child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = value
    return data


def _fields_at(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names at a location of the config (for 'did you mean' hints)."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or part not in cls.model_fields:
            return []
        ann = cls.model_fields[part].annotation
        args = getattr(ann, "__args__", None)
        if args:
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        cls = ann
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model_cls, loc)
            hint = difflib.get_close_matches(loc[-1], valid, n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"valid keys here: {', '.join(valid)}"
            lines.append(f"  unknown key '{key}': {fix}")
        else:
            got = e.get("input")
            lines.append(f"  '{key}': {e['msg']} (got {got!r})")
    lines.append("Fix the YAML file or the --set override and rerun.")
    return "\n".join(lines)


def validate(model_cls: type[M], data: dict, source: str = "config") -> M:
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise SublabError(format_validation_error(e, model_cls, source)) from None


def load_config(path: str | Path | None, model_cls: type[M], overrides: list[str] | None = None) -> M:
    """YAML file (or nothing: defaults) + overrides -> validated config model."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(model_cls, data, str(path) if path else "defaults")


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
