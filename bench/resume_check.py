"""Kill a run with SIGKILL during sampling and again during training, rerun it to completion, and
compare with an uninterrupted run of the same config and seed (datasets and results byte for byte). One
replicate (`replicates=null`): the config's `seed`.
Also runs the same config twice from scratch to check byte-identical outputs.

    python bench/resume_check.py [--config configs/quickstart.yaml] [--out runs/resume-check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FILES = [
    "data/prompts.jsonl",
    "data/raw.jsonl",
    "data/kept.jsonl",
    "data/filter/rejected.jsonl",
    "control/data/kept.jsonl",
    "results.json",
    "report.md",
]


def sublab(config: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sublab.cli",
            "run",
            config,
            "--out",
            str(out),
            "--set",
            "progress=false",
            "--set",
            "replicates=null",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_when_running(config: str, out: Path, stage: str, after: float) -> None:
    proc = sublab(config, out)
    manifest = out / "manifest.json"
    while proc.poll() is None:
        if manifest.is_file():
            try:
                st = json.loads(manifest.read_text())["stages"].get(stage, {})
            except json.JSONDecodeError:
                st = {}
            if st.get("status") == "running":
                time.sleep(after)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                print(f"killed (SIGKILL) during {stage}")
                return
        time.sleep(0.2)
    raise SystemExit(f"the run ended before {stage} started: {proc.stdout.read()[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="runs/resume-check")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    a, b, killed = out / "clean-1", out / "clean-2", out / "killed"
    for d in (a, b):
        t = time.time()
        p = sublab(args.config, d)
        p.wait()
        print(f"uninterrupted run {d.name}: exit {p.returncode}, {time.time() - t:.0f} s")
    kill_when_running(args.config, killed, "sample:teacher", 4.0)
    parts = sorted((killed / "data" / "raw.jsonl.parts").glob("part-*.jsonl"))
    print(f"  sampling chunks finished before the kill: {len(parts)}")
    kill_when_running(args.config, killed, "train:student", 3.0)
    p = sublab(args.config, killed)
    log = p.communicate()[0]
    print(f"rerun: exit {p.returncode}; {log.strip().splitlines()[0] if log.strip() else ''}")
    for f in FILES:
        same_ab = (a / f).read_bytes() == (b / f).read_bytes()
        same_killed = (a / f).read_bytes() == (killed / f).read_bytes()
        print(f"{f:28s} clean twice identical: {same_ab}   killed+resumed == clean: {same_killed}")


if __name__ == "__main__":
    main()
