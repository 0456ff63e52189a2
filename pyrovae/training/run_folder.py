"""A run folder: what a run writes, and how a model is rebuilt from it.

``config.json`` (written before training: model name and config, training config, metadata),
``metrics.csv`` and ``metrics.json`` (the history, after every epoch), ``checkpoint.pt``
(after every epoch, and on an interrupt; see :mod:`pyrovae.checkpoints`) and, when TensorBoard
is installed, ``tensorboard/``. Every file but TensorBoard's is written atomically.

A published run (the reproductions in ``docs/quality*/``) keeps ``config.json`` and ``weights.pt``
(:data:`WEIGHTS_FILE`: the trained model alone, :func:`save_weights`) in place of the checkpoint;
:func:`load_model`, and so ``pyrovae eval``/``sample``/``interpolate``, read either.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path

from ..checkpoints import CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic
from ..devices import resolve_device
from ..models import build_model, config_from_dict, config_to_dict

__all__ = ["RunFolder", "load_model", "save_weights", "CHECKPOINT_FILE", "WEIGHTS_FILE", "CONFIG_FILE", "METRICS_CSV", "METRICS_JSON"]

CHECKPOINT_FILE = "checkpoint.pt"
#: the trained model alone (name, config, float32 ``state_dict``; no optimizer, no position), as a published run keeps it
WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"


class RunFolder:
    """The files of one run in ``path`` (see the module docs)."""

    def __init__(self, path):
        self.path = Path(path)
        self._tensorboard = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    def write_config(self, config: dict) -> None:
        write_text_atomic(self.path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict:
        """What :meth:`write_config` wrote; ``{}`` when there is no config.json."""
        file = self.path / CONFIG_FILE
        return json.loads(file.read_text()) if file.exists() else {}

    def write_history(self, history: list[dict]) -> None:
        """metrics.json, metrics.csv (every row's columns in the order they first appear; empty where a row has none, as
        rows written before a score was given) and the last row to TensorBoard."""
        write_text_atomic(self.path / METRICS_JSON, json.dumps(history, indent=2) + "\n")
        text = io.StringIO()
        columns = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.path / METRICS_CSV, text.getvalue())
        if self._tensorboard is not None and history:
            row = history[-1]
            for key, value in row.items():
                if isinstance(value, float) and key not in ("seconds", "best_val_loss"):
                    self._tensorboard.add_scalar(f"{row['phase']}/{key}", value, row["epoch"])

    def save_checkpoint(self, state: dict) -> None:
        save_checkpoint(self.checkpoint, state)

    @contextmanager
    def tensorboard(self):
        """Scalars go to ``tensorboard/`` inside, when TensorBoard is installed (it is optional)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            yield
            return
        self._tensorboard = SummaryWriter(str(self.path / "tensorboard"))
        try:
            yield
        finally:
            self._tensorboard.close()
            self._tensorboard = None


def load_model(path, model=None, device="cpu"):
    """Rebuild the model saved in ``path`` (a run folder: its checkpoint, or a published run's :data:`WEIGHTS_FILE`;
    or a checkpoint or weights file) and load its weights.

    The model comes from the checkpoint's model name and config (:func:`pyrovae.models.build_model`);
    pass ``model`` to load the weights into that one instead, after checking that it is the same
    kind of model with the same config. Returns ``(model, checkpoint dict)``, the model on ``device``.
    Raises :class:`CheckpointError` when the checkpoint is unusable or does not fit.
    """
    path = Path(path)
    file = path
    if path.is_dir():  # a run folder's checkpoint, else a published run's weights
        file = path / CHECKPOINT_FILE if (path / CHECKPOINT_FILE).exists() or not (path / WEIGHTS_FILE).exists() else path / WEIGHTS_FILE
        if not file.exists():
            raise CheckpointError(f"{path} holds no {CHECKPOINT_FILE} (nor {WEIGHTS_FILE}): not a run folder, or its training never started")
    state = load_checkpoint(file)
    missing = [key for key in ("model_name", "model_config", "model_state") if key not in state]
    if missing:
        raise CheckpointError(f"{file} holds no model: it lacks {missing}")
    name = state["model_name"]
    try:
        config = config_from_dict(name, state["model_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file} records a model that cannot be rebuilt ({name!r}): {error}") from None
    if model is None:
        model = build_model(name, config)
    elif type(model.config) is not type(config) or config_to_dict(model.config) != config_to_dict(config):
        raise CheckpointError(
            f"{file} holds a {name!r} model with config {config_to_dict(config)}, which does not match the "
            f"{type(model).__name__} given, with config {config_to_dict(model.config)}"
        )
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"the weights in {file} do not fit the {name!r} model of its config: {reason}") from None
    return model.to(resolve_device(device)), state


def save_weights(path, model, model_name: str) -> Path:
    """Write ``model`` alone to ``path`` (a file, or a folder to hold :data:`WEIGHTS_FILE`): its name (``model_name``,
    as :func:`pyrovae.models.build_model` takes it), config and ``state_dict``; :func:`load_model` rebuilds it and
    ``torch.load(path, weights_only=True)`` reads it. Returns the file's path."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    save_checkpoint(file, {"model_name": model_name, "model_config": config_to_dict(model.config), "model_state": model.state_dict()})
    return file
