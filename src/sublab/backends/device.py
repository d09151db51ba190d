"""Where local models run and in which precision: config `device: auto|cpu|cuda` and
`dtype: auto|float32|bfloat16` (else env SUBLAB_DEVICE / SUBLAB_DTYPE, else auto).

auto device = cuda when torch sees a GPU, else cpu; auto dtype = bfloat16 on cuda, float32 on cpu
(bf16 matmuls on a CPU are slow and the organism is tiny). Like the thread setting, this is a
process-wide choice made once per run (`configure`), so every stage's model loads the same way.
"""

from __future__ import annotations

import os
from typing import Literal

from sublab.errors import SublabError

DeviceName = Literal["auto", "cpu", "cuda"]
DTypeName = Literal["auto", "float32", "bfloat16"]
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")

_chosen: dict[str, str | None] = {"device": None, "dtype": None}


def configure(device: str | None = None, dtype: str | None = None) -> None:
    """Set the process-wide device and dtype (None = env, else auto)."""
    _chosen["device"], _chosen["dtype"] = device, dtype


def _setting(key: str, allowed: tuple[str, ...]) -> str:
    value = _chosen[key] or os.environ.get(f"SUBLAB_{key.upper()}") or "auto"
    if value not in allowed:
        raise SublabError(
            f"{key} {value!r} is not one of {', '.join(allowed)} (config `{key}:` or SUBLAB_{key.upper()})"
        )
    return value


def resolve_device(value: str | None = None):
    """-> torch.device. `value` overrides the configured setting."""
    import torch

    name = value or _setting("device", DEVICES)
    if name not in DEVICES:
        raise SublabError(f"device {name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SublabError(
            "device: cuda was asked for but torch sees no GPU (this torch build: "
            f"{torch.__version__}); use device: auto or cpu"
        )
    return torch.device(name)


def resolve_dtype(device, value: str | None = None):
    """-> torch.dtype for a model on `device`."""
    import torch

    name = value or _setting("dtype", DTYPES)
    if name not in DTYPES:
        raise SublabError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def model_device(model):
    """The device of a model's first parameter (cpu for a model without parameters)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")
