"""The local executor of `sublab sweep` (and of `sublab run` with replicate seeds): every run of a
sweep in one process or a spawn process pool, with every stage that two runs share computed once (a
content-addressed stage store under <sweep>/stages/), then one aggregated report.

    sublab sweep configs/sweep-replicates.yaml [--workers 2] [--executor ray]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from sublab.config import apply_overrides, read_yaml, validate
from sublab.errors import SublabError
from sublab.records import atomic_write_json
from sublab.schema import ExperimentConfig
from sublab.sweep.config import SweepConfig, base_path, expand, run_config


def _run_one(cfg_json: dict, run_dir: str, shared: str, retries: int) -> dict:
    """One experiment of a sweep (also the process-pool worker): retries crashes, returns its record."""
    from sublab.backends.registry import quiet_transformers
    from sublab.pipeline import run_experiment

    quiet_transformers()  # pool workers do not go through the CLI's main()
    ecfg = ExperimentConfig.model_validate(cfg_json)
    rec: dict = {"status": "failed", "attempts": 0}
    for attempt in range(retries + 1):
        rec["attempts"] = attempt + 1
        try:
            run = run_experiment(ecfg, run_dir, shared=shared)
        except SublabError as e:  # a user error: retrying will not help
            rec["error"] = str(e)[:500]
            break
        except Exception as e:  # a crashed run: retry, then record and go on
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            continue
        rec.update(
            status="done",
            stages_run=len(run.ran),
            stages_skipped=len(run.skipped),
            stages_shared=len(run.reused),
        )
        rec.pop("error", None)
        break
    return rec


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Pool-worker initializer: a daemon thread ends this process as soon as the sweep's process is gone
    (killed, even with SIGKILL, the worker would be re-parented and train on). What it was writing is
    safe to drop: stages and files are written atomically, and the stage lock dies with the process."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_sweep(
    sweep_file: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    workers: int = 1,
    executor: Literal["local", "ray"] = "local",
    address: str | None = None,
) -> Path:
    """Expand and run every experiment of the sweep (resumable), then write the aggregated report.
    local, workers > 1: a process pool; each worker uses the experiment's `threads`, and workers x
    threads may not exceed the machine's cores. ray: one Ray task per run (see ray_executor.py);
    `address` joins a running cluster ("auto" or host:port), else a local Ray instance is started and
    shut down. Either way shared stages are computed once (a lock per stage in the shared store)."""
    sweep_file = Path(sweep_file)
    cfg = validate(SweepConfig, apply_overrides(read_yaml(sweep_file), overrides or []), str(sweep_file))
    expand(cfg)  # axis and condition errors first, before the base config is read
    base = base_path(cfg, sweep_file)
    base_data = read_yaml(base)
    base_cfg = validate(ExperimentConfig, base_data, str(base))
    return execute(
        cfg,
        base_data,
        str(base),
        base_cfg.replicates,
        out,
        progress,
        workers,
        executor,
        address,
        str(sweep_file),
    )


def hold_sweep_lock(root: Path):
    """The sweep folder's lock (root/sweep.lock), taken without waiting: two sweeps writing one folder
    would train the same run twice at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(root / "sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SublabError(
            f"another sweep is running in {root} (it holds {root / 'sweep.lock'}); wait for it to finish, "
            "or give this one another --out"
        ) from None
    return lock


def run_replicates(cfg: ExperimentConfig, out: str | Path, progress: bool = True, workers: int = 1) -> Path:
    """`sublab run` with `replicates`: one run per replicate seed under <out>/runs/, sharing the reference
    and the teacher through the stage store, and the effect across replicates in <out>/report.md."""
    sweep = SweepConfig(name=cfg.name, base="(the experiment config)", seeds=cfg.replicates)
    return execute(sweep, cfg.model_dump(mode="json"), f"experiment {cfg.name}", None, out, progress, workers)


def execute(
    cfg: SweepConfig,
    base_data: dict,
    source: str,
    base_replicates: list[int] | None,
    out: str | Path | None,
    progress: bool = True,
    workers: int = 1,
    executor: Literal["local", "ray"] = "local",
    address: str | None = None,
    sweep_file: str | None = None,
) -> Path:
    """Run the expanded sweep over `base_data` (an experiment config as a dict) and write its report."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from sublab.analysis.sweep_report import write_sweep_report
    from sublab.threads import resolve_threads

    runs = expand(cfg, base_replicates)
    configs = {r["name"]: run_config(base_data, source, cfg.set, r["overrides"]) for r in runs}  # all first
    threads = max(resolve_threads(c.threads) for c in configs.values())
    cores = os.cpu_count() or 1
    if executor == "local" and (workers < 1 or workers * threads > cores):
        raise SublabError(
            f"--workers {workers} x {threads} thread(s) per run would oversubscribe this machine's {cores} "
            f"cores; use --workers {max(1, cores // threads)} or fewer"
        )
    root = Path(out or f"runs/{cfg.name}").resolve()  # absolute: Ray workers may start elsewhere
    root.mkdir(parents=True, exist_ok=True)
    lock = hold_sweep_lock(root)
    try:
        state = {
            "sweep": cfg.model_dump(mode="json"),
            "sweep_file": sweep_file,
            "runs": [],
            "executor": executor,
            "workers": workers,
        }
        if executor == "ray":  # connect first: a bad address fails before anything starts
            from sublab.sweep.ray_executor import connect

            state["ray"] = connect(address, num_cpus=min(cores, max(1, workers) * threads))
            parallel = max(1, int(state["ray"]["cluster_cpus"] // (cfg.resources.cpus or threads)))
        else:
            parallel = workers
        bar = tqdm(total=len(runs), desc=f"sweep {cfg.name}", disable=not progress)
        counts = {"done": 0, "failed": 0, "stages_run": 0, "stages_skipped": 0, "stages_shared": 0}
        t0 = time.time()
        tasks = {
            r["name"]: (
                configs[r["name"]]
                .model_copy(update={"progress": False, "name": r["name"]})
                .model_dump(mode="json"),
                str(root / "runs" / r["name"]),
                str(root / "stages"),
                cfg.retries,
            )
            for r in runs
        }
        records: dict[str, dict] = {}

        def finished(name: str, rec: dict) -> None:
            records[name] = rec
            counts[rec["status"]] += 1
            for k in ("stages_run", "stages_skipped", "stages_shared"):
                counts[k] += rec.get(k, 0)
            done = [
                {**r, "folder": f"runs/{r['name']}", **records[r["name"]]}
                for r in runs
                if r["name"] in records
            ]
            state.update(runs=done, counts=counts, seconds=round(time.time() - t0, 1))
            atomic_write_json(root / "sweep.json", state)  # progress on disk after every run
            bar.update(1)
            left = len(runs) - len(records)
            bar.set_postfix(
                done=counts["done"],
                failed=counts["failed"],
                running=min(parallel, left),
                queued=max(0, left - parallel),
            )

        if executor == "ray":
            from sublab.sweep.ray_executor import run_on_ray

            state["ray"]["seconds"] = run_on_ray(tasks, cfg.resources, threads, finished, cfg.retries)
        elif workers == 1:
            for r in runs:
                finished(r["name"], _run_one(*tasks[r["name"]]))
        else:
            # spawn, not fork: a forked child of a process that already ran torch can deadlock
            # a worker ends with the sweep: killed, it would otherwise train on into the folder a rerun resumes
            with ProcessPoolExecutor(
                max_workers=workers,
                mp_context=get_context("spawn"),
                initializer=exit_with_parent,
                initargs=(os.getpid(),),
            ) as pool:
                futures = {pool.submit(_run_one, *tasks[r["name"]]): r["name"] for r in runs}
                for fut in as_completed(futures):
                    finished(futures[fut], fut.result())
        bar.close()
        write_sweep_report(root)
        if counts["failed"]:
            errs = "; ".join(
                f"{e['name']}: {e.get('error')}" for e in state["runs"] if e["status"] == "failed"
            )
            raise SublabError(f"{counts['failed']} run(s) failed ({errs}); rerun the sweep to retry them")
        return root
    finally:
        lock.release()
