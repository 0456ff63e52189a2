"""Checkpoint files: atomic writes, safe reads, a format version.

A checkpoint is a ``dict`` of tensors and plain Python values (numbers, strings, lists,
tuples, dicts, ``None``), written with :func:`torch.save`. :func:`save_checkpoint` adds
``"format_version"``; :func:`load_checkpoint` reads the file with ``weights_only=True``, so a
file that would run code when unpickled is refused instead of executed.

Writes are atomic: the data goes to a temporary file in the same folder, is flushed and
fsynced, then renamed over the target with :func:`os.replace`. A crash or ``kill -9`` in the
middle of a write leaves the previous file as it was (plus, at worst, a stray ``.tmp`` file).
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
from pathlib import Path
from typing import IO, Callable

import torch

from .errors import InputError

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "write_atomic", "write_text_atomic"]

#: version of the checkpoint layout; :func:`load_checkpoint` refuses any other
FORMAT_VERSION = 2


class CheckpointError(InputError):
    """A checkpoint is missing, damaged, unsafe, of another format version, or does not fit."""


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`save_checkpoint`."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save ``state`` (tensors and plain Python values) to ``path`` atomically, with ``"format_version"``."""
    if not isinstance(state, dict):
        raise InputError(f"a checkpoint is a dict, got {type(state).__name__}")
    payload = {**state, "format_version": FORMAT_VERSION}
    write_atomic(path, lambda file: torch.save(payload, file))


def _unpickler_reason(error: Exception) -> str:
    """The one line of torch's long ``weights_only`` message that says what was refused."""
    message = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", message, re.S)
    return " ".join((found.group(1) if found else message.splitlines()[0] if message else type(error).__name__).split())


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; tensors go to ``map_location``.

    Raises :class:`CheckpointError` when the file is missing, truncated, not a checkpoint,
    holds objects other than tensors and plain containers (a pickle that could run code is
    refused and not run), or has another format version.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} is not a pyrovae checkpoint: it does not unpickle as tensors and plain values "
            f"({_unpickler_reason(error)}). It is damaged, or holds objects that could run code when "
            "loaded; it was refused. Load only checkpoints you wrote."
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        reason = " ".join(str(error).split(". ")[0].split()) or type(error).__name__
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({type(error).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a pyrovae checkpoint (a dict)")
    version = state.get("format_version")
    if version is None:
        raise CheckpointError(f"{path} is not a pyrovae checkpoint: it has no format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}, but this pyrovae reads version {FORMAT_VERSION}; "
            "use the pyrovae version that wrote it"
        )
    return state
