"""One setting for torch's CPU threads: config `threads`, else env SUBLAB_THREADS, else 1.

On a busy 2-core machine two threads can be many times slower than one, so the default is 1; sublab
never starts parallel workers that would oversubscribe the cores.
"""

from __future__ import annotations

import os

from sublab.errors import SublabError


def resolve_threads(value: int | None = None) -> int:
    if value is None:
        raw = os.environ.get("SUBLAB_THREADS", "1")
        try:
            value = int(raw)
        except ValueError:
            raise SublabError(f"SUBLAB_THREADS={raw!r} is not an integer; set it to e.g. 1") from None
    if value < 1:
        raise SublabError(f"threads must be >= 1, got {value}")
    return value


def set_threads(value: int | None = None) -> int:
    import torch

    n = resolve_threads(value)
    torch.set_num_threads(n)
    return n
