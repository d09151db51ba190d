"""Time per stage of an experiment, from a fresh run folder (the organism cache is reused unless
--fresh-cache, which builds the organism into a temporary cache first and times that too).

    python bench/stage_times.py [--config configs/quickstart.yaml] [--fresh-cache] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--fresh-cache", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if args.fresh_cache:
        os.environ["SUBLAB_CACHE"] = tempfile.mkdtemp(prefix="sublab-cache-")
    from sublab.config import load_config
    from sublab.pipeline import run_experiment
    from sublab.records import read_json
    from sublab.schema import ExperimentConfig

    cfg = load_config(args.config, ExperimentConfig, ["progress=false", *args.set])
    out = Path(tempfile.mkdtemp(prefix="sublab-bench-run-"))
    t = time.perf_counter()
    run_experiment(cfg, out)
    total = time.perf_counter() - t
    stages = read_json(out / "manifest.json")["stages"]
    print(f"{'stage':28s} seconds")
    for name, st in sorted(stages.items(), key=lambda kv: kv[1]["started"]):
        print(f"{name:28s} {st['seconds']:8.2f}")
    print(f"{'total (wall)':28s} {total:8.2f}")
    res = read_json(out / "results.json")
    for m, v in res["models"].items():
        p = v["p_target"]
        print(f"P({res['trait']['target']}) {m:10s} {p['mean']:.4f} [{p['lo']:.4f}, {p['hi']:.4f}]")
    shutil.rmtree(out)
    if args.fresh_cache:
        shutil.rmtree(os.environ["SUBLAB_CACHE"])


if __name__ == "__main__":
    main()
