"""What `sublab serve` takes: ServeOptions, its command-line flags and their checks.

The limits keep one cheap request from taking the server down for everyone. Where OpenAI's API has a
limit, the default is OpenAI's (n <= 128, top_logprobs <= 20, max_tokens within the model's context,
50,000 requests per batch, n_epochs <= 50); the rest are sized for a shared box. A request over a limit
is answered 400 (413 for a body or upload over its size) in OpenAI's error shape before any work
starts; queued work over its limit is answered 429 with Retry-After.

`add_arguments(parser)` adds every flag to an argparse parser and `options_from_args(args)` reads them
back; `python -m sublab.serve` uses both.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from sublab.errors import SublabError

MiB = 1 << 20
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


@dataclass
class ServeOptions:
    """What `sublab serve` takes on its command line."""

    models: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path | None = None
    api_key_env: str = "SUBLAB_SERVE_API_KEY"
    allow_no_key: bool = False
    faults: float = 0.0
    fault_kinds: tuple[str, ...] = ("429", "500", "drop")
    retry_after_s: float = 0.05
    fault_seed: int = 0
    base_lr: float = 3e-4
    job_delay_s: float = 0.0
    batch_window_ms: float = 5.0
    max_batch: int = 256
    threads: int | None = None
    # ---- limits -------------------------------------------------------------------------------
    max_body_bytes: int = 4 * MiB
    max_upload_bytes: int = 64 * MiB
    max_prompt_tokens: int | None = None  # None: the model's context
    max_n: int = 128
    max_top_logprobs: int = 20
    max_scoring_top_logprobs: int = 2048
    max_logprob_entries: int = 200_000
    max_queued: int = 4096
    max_queued_jobs: int = 16
    max_active_batches: int = 8
    max_batch_requests: int = 50_000
    max_epochs: int = 50
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """SublabError naming the first option out of range."""
        from sublab.serve.faults import KINDS

        if not 0 <= self.faults <= 1:
            raise SublabError(f"--faults must be a share in [0, 1] (0.2 = 20%), got {self.faults:g}")
        bad = [k for k in self.fault_kinds if k not in KINDS]
        if bad or not self.fault_kinds:
            raise SublabError(
                f"--fault-kinds must be a comma list of {', '.join(KINDS)}, got {bad or 'none'}"
            )
        if not 0 < self.port < 65536:
            raise SublabError(f"--port must be in 1..65535, got {self.port}")
        for f in fields(self):
            if f.name.startswith("max_"):
                v = getattr(self, f.name)
                if v is not None and (not isinstance(v, int) or v < 1):
                    flag = "--" + f.name.replace("_", "-")
                    raise SublabError(f"{flag} must be a positive integer, got {v!r}")
        if self.max_top_logprobs > self.max_scoring_top_logprobs:
            raise SublabError("--max-top-logprobs must be at most --max-scoring-top-logprobs")
        for name in ("retry_after_s", "job_delay_s", "batch_window_ms", "base_lr"):
            v = getattr(self, name)
            if not 0 <= v < float("inf"):
                raise SublabError(f"{name} must be a finite number >= 0, got {v}")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_check(opts: ServeOptions) -> str | None:
    """Refuse (SublabError) to serve beyond loopback without a key unless --allow-no-key; otherwise
    the warning to print when the server is reachable from other machines (None on loopback)."""
    if is_loopback(opts.host):
        return None
    if not os.environ.get(opts.api_key_env):
        if not opts.allow_no_key:
            raise SublabError(
                f"refusing to serve on {opts.host} without a key: anyone who can reach it could use the "
                f"models and read every file, job and batch. Set ${opts.api_key_env} (clients send it as "
                "'Authorization: Bearer <key>'), bind 127.0.0.1, or pass --allow-no-key"
            )
        return (
            f"warning: serving on {opts.host} WITHOUT a key (--allow-no-key): anyone who can reach this "
            "port can use the models and read every file, job and batch"
        )
    return (
        f"warning: serving on {opts.host}, reachable from other machines; requests need the key in "
        f"${opts.api_key_env}, and plain HTTP is not encrypted (put TLS in front on an untrusted network)"
    )


def add_arguments(sv: argparse.ArgumentParser) -> None:
    """Every `sublab serve` flag (defaults in the help)."""
    d = ServeOptions(models=[])
    sv.add_argument("model", nargs="+", help="model specs or folders with a model.json (organism/default)")
    sv.add_argument("--host", default=d.host, help="interface to bind (default: this machine only)")
    sv.add_argument("--port", type=int, default=d.port)
    sv.add_argument("--state-dir", default=None, help="files, jobs, batches (default: $SUBLAB_CACHE/serve)")
    sv.add_argument(
        "--api-key-env",
        default=d.api_key_env,
        help="if this environment variable is set, require 'Authorization: Bearer <its value>'",
    )
    sv.add_argument(
        "--allow-no-key",
        action="store_true",
        help="serve beyond 127.0.0.1 without a key (refused otherwise)",
    )
    sv.add_argument("--faults", type=float, default=0.0, help="share of /v1/ requests that fail (0.2 = 20%%)")
    sv.add_argument("--fault-kinds", default="429,500,drop", help="comma list of 429, 500, drop")
    sv.add_argument(
        "--retry-after", type=float, default=d.retry_after_s, help="seconds a 429 asks to wait (%(default)s)"
    )
    sv.add_argument("--fault-seed", type=int, default=0)
    sv.add_argument(
        "--base-lr", type=float, default=d.base_lr, help="job lr = learning_rate_multiplier x this"
    )
    sv.add_argument("--job-delay", type=float, default=0.0, help="seconds a fine-tuning job stays queued")
    lim = sv.add_argument_group("limits (a request over one is refused before any work starts)")
    lim.add_argument(
        "--max-body-mb",
        type=float,
        default=d.max_body_bytes / MiB,
        help="JSON request body, MiB (413 beyond; default: %(default)g)",
    )
    lim.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_bytes / MiB,
        help="uploaded file, MiB (413 beyond; default: %(default)g)",
    )
    lim.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="prompt tokens of a chat request (default: the model's context); max_tokens is at most the "
        "context, and a completion stops where prompt + completion fill it",
    )
    lim.add_argument(
        "--max-n", type=int, default=d.max_n, help="choices per request (default and OpenAI: %(default)s)"
    )
    lim.add_argument(
        "--max-top-logprobs",
        type=int,
        default=d.max_top_logprobs,
        help="top_logprobs (default and OpenAI: %(default)s)",
    )
    lim.add_argument(
        "--max-scoring-top-logprobs",
        type=int,
        default=d.max_scoring_top_logprobs,
        help="top_logprobs of a one-token scoring request (n=1, max_tokens=1: sublab's exact evaluation "
        "lists every candidate answer; default: %(default)s)",
    )
    lim.add_argument(
        "--max-logprob-entries",
        type=int,
        default=d.max_logprob_entries,
        help="n x max_tokens x (1 + top_logprobs) of a request with logprobs (default: %(default)s)",
    )
    lim.add_argument(
        "--max-queued",
        type=int,
        default=d.max_queued,
        help="sequences (n summed) waiting for the engine; beyond: 429 with Retry-After (default: %(default)s)",
    )
    lim.add_argument(
        "--max-queued-jobs",
        type=int,
        default=d.max_queued_jobs,
        help="queued + running fine-tuning jobs (429 beyond; default: %(default)s)",
    )
    lim.add_argument(
        "--max-active-batches",
        type=int,
        default=d.max_active_batches,
        help="unfinished batches (429 beyond; default: %(default)s)",
    )
    lim.add_argument(
        "--max-batch-requests",
        type=int,
        default=d.max_batch_requests,
        help="lines of a batch (default and OpenAI: %(default)s)",
    )
    lim.add_argument(
        "--max-epochs",
        type=int,
        default=d.max_epochs,
        help="n_epochs of a job (default and OpenAI: %(default)s)",
    )


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    kinds = tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip())
    return ServeOptions(
        models=args.model,
        host=args.host,
        port=args.port,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        api_key_env=args.api_key_env,
        allow_no_key=getattr(args, "allow_no_key", False),
        faults=args.faults,
        fault_kinds=kinds,
        retry_after_s=args.retry_after,
        fault_seed=args.fault_seed,
        base_lr=args.base_lr,
        job_delay_s=args.job_delay,
        threads=getattr(args, "threads", None),
        max_body_bytes=int(args.max_body_mb * MiB),
        max_upload_bytes=int(args.max_upload_mb * MiB),
        max_prompt_tokens=args.max_prompt_tokens,
        max_n=args.max_n,
        max_top_logprobs=args.max_top_logprobs,
        max_scoring_top_logprobs=args.max_scoring_top_logprobs,
        max_logprob_entries=args.max_logprob_entries,
        max_queued=args.max_queued,
        max_queued_jobs=args.max_queued_jobs,
        max_active_batches=args.max_active_batches,
        max_batch_requests=args.max_batch_requests,
        max_epochs=args.max_epochs,
    )
