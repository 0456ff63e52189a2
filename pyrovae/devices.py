"""One way to name a device everywhere: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

Under torchrun (``LOCAL_RANK`` set), ``"auto"`` and ``"cuda"`` name this process's own GPU,
``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch

from .errors import InputError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a device name into a :class:`torch.device`, failing early and clearly.

    ``"auto"`` (or ``None``) picks CUDA when it is available and the CPU otherwise. Under torchrun
    (``LOCAL_RANK`` in the environment) ``"auto"`` and ``"cuda"`` pick ``cuda:LOCAL_RANK``, one GPU
    per process of a machine.
    Asking for CUDA on a machine without it, or for a GPU index that does not exist,
    raises :class:`~pyrovae.errors.InputError` naming what is available, instead of a crash deep in torch.
    """
    if isinstance(device, torch.device):
        name = str(device)
    elif device is None:
        name = "auto"
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise InputError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")

    local_rank = _local_rank() if name in ("auto", "cuda") else None
    if name == "auto" and local_rank is not None and torch.cuda.is_available():
        name = "cuda"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name[5:] if name.startswith("cuda:") else ""
        if name.startswith("cuda:") and not index_text.isdigit():
            raise InputError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not torch.cuda.is_available():
            raise InputError(
                f"device {device!r} was asked for, but CUDA is not available on this machine "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use device 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if not index_text and local_rank is not None:
            if local_rank >= count:
                raise InputError(
                    f"this is process LOCAL_RANK={local_rank} of a machine with {count} CUDA device(s): start at most "
                    f"{count} process(es) per machine (torchrun --nproc_per_node={count}), or use device 'cpu'"
                )
            return torch.device("cuda", local_rank)
        index = int(index_text) if index_text else torch.cuda.current_device()
        if index >= count:
            raise InputError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return torch.device("cuda", index)
    raise InputError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _local_rank() -> int | None:
    """``LOCAL_RANK`` (set by torchrun for each process of a machine), or ``None`` when unset."""
    text = os.environ.get("LOCAL_RANK")
    if text is None:
        return None
    if not text.strip().isdigit():
        raise InputError(f"LOCAL_RANK must be a non-negative integer, got {text!r}")
    return int(text)
