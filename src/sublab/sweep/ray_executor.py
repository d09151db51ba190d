"""The Ray executor of `sublab sweep --executor ray`: each run of the sweep is one Ray task running the
same function as the local executor (`sweep._run_one`), with the CPUs/GPUs of `resources` in the sweep
config. Run folders and the shared stage store must be on storage every node sees.

    sublab sweep SWEEP.yaml --executor ray                     # starts a local Ray instance, then stops it
    sublab sweep SWEEP.yaml --executor ray --address auto      # joins the cluster `ray start` made here
    sublab sweep SWEEP.yaml --executor ray --address 10.0.0.5:6379

A local instance is started with the dashboard off and node address 127.0.0.1. Ray's gRPC servers may
still listen on every interface of the machine (Ray 2.60 has no setting for that; its token
authentication is on by default): on a shared host, run the sweep inside a network namespace with only
loopback (`unshare --net`), as tests/test_sweep_ray.py does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from sublab.errors import SublabError

FORWARDED_ENV = ("SUBLAB_CACHE", "SUBLAB_THREADS", "HF_HOME", "HF_HUB_OFFLINE", "OPENAI_API_KEY")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise SublabError(
            "the ray executor needs Ray: pip install 'sublab[ray]' (or use --executor local)"
        ) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port address must accept a TCP connection before ray.init spends minutes retrying it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SublabError(f"--address {address!r} is not 'auto' or host:port (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise SublabError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one there with "
            "`ray start --head`, check the address and port, or drop --address to start a local Ray instance"
        ) from None


def connect(address: str | None, num_cpus: int) -> dict:
    """Join the cluster at `address`, or start a local instance with `num_cpus` CPUs."""
    ray = _import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
    # passed to the workers in memory (runtime_env), never written; a joined cluster's nodes lack our env
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kw: dict = {"log_to_driver": False, "runtime_env": {"env_vars": env}}
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kw)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        where = "a running cluster (`--address auto`)" if address == "auto" else address or "a local instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SublabError(
            f"could not start or join Ray at {where}: {first}; "
            "start a cluster with `ray start --head` or drop --address"
        ) from None
    res = ray.cluster_resources()
    return {"version": ray.__version__, "address": address or "local", "cluster_cpus": res.get("CPU", 0)}


def run_on_ray(
    tasks: dict[str, tuple],
    resources,
    threads: int,
    finished: Callable[[str, dict], None],
    retries: int = 0,
) -> float:
    """Submit every run as a Ray task (after `connect`); call finished(name, record) as each completes.
    A run that raises is retried inside the task (`retries`); a worker process that dies is resubmitted
    by Ray up to max(1, retries) times.
    Shuts Ray down (a local instance stops; a cluster is only left). -> seconds."""
    from sublab.sweep.local import _run_one

    ray = _import_ray()
    t0 = time.time()
    try:
        cpus = resources.cpus if resources.cpus is not None else threads
        opts: dict = {"num_cpus": cpus, "num_gpus": resources.gpus, "max_retries": max(1, retries)}
        if resources.memory_gb:
            opts["memory"] = int(resources.memory_gb * 2**30)
        remote = ray.remote(_run_one).options(**opts)
        pending = {remote.remote(*args): name for name, args in tasks.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                name = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # a worker died (after Ray's own retry)
                    rec = {
                        "status": "failed",
                        "attempts": max(1, retries) + 1,
                        "error": f"{type(e).__name__}: {e}"[:500],
                    }
                finished(name, rec)
    finally:
        ray.shutdown()
    return round(time.time() - t0, 1)
