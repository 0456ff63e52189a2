"""One trainer for every model: epochs of minibatches, a torch optimizer, checkpoints, metrics.

The step depends on what the model offers, nothing else:

* a Pyro program (``model.model`` and ``model.guide``, the VAE): a Pyro ELBO gives the loss,
  ``Trace_ELBO().differentiable_loss(model.model, model.guide, x, num_data=N)`` (or
  ``TraceMeanField_ELBO``); for the IWAE bound, ``RenyiELBO(alpha=0, num_particles=k)``, which
  only offers ``loss_and_grads`` and is therefore called unscaled (a scale inside its
  log-mean-exp would change the bound);
* a deterministic model: ``model.loss(x)``;

then ``backward``, optional gradient clipping and the optimizer's step. Gradients are those of
the loss per example, for every model, so ``lr`` and ``grad_clip`` mean the same thing for all.
Losses are reported per example (nats for likelihoods and BCE).

Speed: the data stays one tensor on the model's device, sliced by :func:`pyrovae.data.batches`;
it is checked once with ``model.check_input`` before training, after which steps run with Pyro's
validation off; losses stay on the device and are read about once a second (non-finite values
are found then, and reported with the step where they first appeared); Adam and AdamW use their
fused kernel.

Seeding: a new run seeds torch's global RNG (``torch.manual_seed(config.seed)``, CPU and CUDA)
and draws batches from a ``torch.Generator`` seeded with ``config.seed``.

Interrupts: ``SIGINT`` or ``SIGTERM`` during :meth:`Trainer.fit` (handlers are installed in the
main thread only, and restored afterwards) stops training at the next step boundary, saves a
checkpoint of that exact position (with ``out_dir``), and raises :class:`KeyboardInterrupt`.
Calling ``fit`` again, or ``Trainer.resume(out_dir).fit(...)``, continues to the very same
parameters, bit for bit on the CPU, as an uninterrupted run.

A run folder (``out_dir``) holds ``config.json`` (written before training), ``metrics.csv`` and
``metrics.json`` (the history, after every epoch), ``checkpoint.pt`` (after every epoch, written
atomically) and, when TensorBoard is installed, ``tensorboard/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import signal
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoints import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    write_text_atomic,
)
from .data import batches
from .devices import resolve_device
from .errors import InputError
from .models import MODELS, build_model, config_from_dict, config_to_dict

__all__ = [
    "TrainingConfig", "TrainingError", "Trainer", "load_model", "ELBOS", "LR_SCHEDULES", "OPTIMIZERS",
    "FUSED_ADAM", "HISTORY_COLUMNS", "CHECKPOINT_FILE", "CONFIG_FILE", "METRICS_CSV", "METRICS_JSON",
]

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"

ELBOS = ("trace", "meanfield", "iwae")
LR_SCHEDULES = (None, "cosine", "step")
#: torch.optim classes by lower-case name; LBFGS (needs a closure) and SparseAdam (sparse gradients only) are left out
OPTIMIZERS = {
    name.lower(): cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    and cls not in (torch.optim.Optimizer, torch.optim.LBFGS, torch.optim.SparseAdam)
}
#: Adam and AdamW run their fused kernel (one kernel for all parameters) wherever torch has one
FUSED_ADAM = True
#: the keys of a history row, in the order of metrics.csv
HISTORY_COLUMNS = (
    "phase", "epoch", "train_loss", "val_loss", "best_val_loss", "best_epoch", "lr", "kl_weight",
    "skipped_steps", "seconds", "stopped_early",
)
#: how often (seconds) the losses on the device are read for the progress bar and the non-finite check
SYNC_SECONDS = 1.0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainingConfig:
    """How to train; every field is checked on construction (a :class:`~pyrovae.errors.InputError` names the problem).

    epochs:          epochs of end-to-end training (the stacked AE pretrains first, see :class:`Trainer`).
    batch_size:      images per step.
    lr:              learning rate.
    optimizer:       a :data:`OPTIMIZERS` name, any case (``"adam"``, ``"AdamW"``, ``"sgd"``, ...).
    lr_schedule:     ``None``; ``"cosine"`` (cosine decay to 0 over the epochs of each phase);
                     ``"step"`` (halve the rate every ``lr_step_epochs`` epochs).
    grad_clip:       largest global gradient norm, or ``None``.
    elbo:            SVI models only: ``"trace"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO,
                     analytic KL where known) or ``"iwae"`` (RenyiELBO with alpha=0, the IWAE bound per
                     image; Pyro's RenyiELBO returns its loss as a float, a device sync per step on CUDA).
    num_particles:   SVI models only: samples of z per image (k of the IWAE bound); vectorized.
    kl_warmup_epochs: models with a ``kl_weight`` (the VAE): raise it linearly, step by step, from
                     0 to ``model.config.beta`` over this many epochs.
    early_stopping_patience: stop after this many epochs without a better validation loss (needs ``val``).
    skip_nonfinite:  skip (and count) steps whose loss is NaN or infinite instead of raising
                     :class:`TrainingError`; this reads the loss every step (a device sync on CUDA).
    seed:            seeds torch's global RNG and the batch order when a run starts.
    progress:        show a tqdm bar per epoch with the running loss.
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    lr_schedule: str | None = None
    lr_step_epochs: int = 10
    grad_clip: float | None = None
    elbo: str = "trace"
    num_particles: int = 1
    kl_warmup_epochs: int = 0
    early_stopping_patience: int | None = None
    skip_nonfinite: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not _is_int(self.epochs) or self.epochs < 0:
            raise InputError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.optimizer, str) and self.optimizer.lower() in ("lbfgs", "sparseadam"):
            raise InputError(
                f"optimizer {self.optimizer!r} is not supported (LBFGS needs a closure, SparseAdam sparse gradients); "
                f"choose from {sorted(OPTIMIZERS)}"
            )
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {LR_SCHEDULES}")
        if not _is_int(self.lr_step_epochs) or self.lr_step_epochs <= 0:
            raise InputError(f"lr_step_epochs must be a positive integer, got {self.lr_step_epochs!r}")
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or not 0 < self.grad_clip < math.inf):
            raise InputError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.elbo not in ELBOS:
            raise InputError(f"unknown elbo {self.elbo!r}; choose from {ELBOS}")
        if not _is_int(self.num_particles) or self.num_particles <= 0:
            raise InputError(f"num_particles must be a positive integer, got {self.num_particles!r}")
        if not _is_int(self.kl_warmup_epochs) or self.kl_warmup_epochs < 0:
            raise InputError(f"kl_warmup_epochs must be a non-negative integer, got {self.kl_warmup_epochs!r}")
        patience = self.early_stopping_patience
        if patience is not None and (not _is_int(patience) or patience <= 0):
            raise InputError(f"early_stopping_patience must be a positive integer or None, got {patience!r}")
        if not _is_int(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


class TrainingError(RuntimeError):
    """Training cannot go on, e.g. the loss became NaN or infinite."""


@dataclass
class _Position:
    """Where a run stands: enough, with the RNG states, to continue it exactly."""

    n_train: int
    dynamic_binarization: bool
    epoch_rng: Tensor  # the batch generator's state at the start of the current epoch
    phase: int = 0  # index into Trainer._phases()
    epoch: int = 0  # completed epochs of this phase
    step: int = 0  # completed steps of the current epoch
    phase_step: int = 0  # completed steps of this phase (KL warm-up)
    losses: Tensor | None = None  # (steps per epoch,) loss per example of each step; NaN: not run or skipped
    checked: int = 0  # steps of the current epoch already checked for non-finite losses
    skipped: int = 0  # skipped steps in the current epoch
    seconds: float = 0.0  # time spent in the current epoch
    best_val_loss: float | None = None
    best_epoch: int | None = None
    since_best: int = 0
    done: bool = False

    _SAVED = ("n_train", "dynamic_binarization", "phase", "epoch", "step", "phase_step", "skipped", "seconds",
              "best_val_loss", "best_epoch", "since_best", "done")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._SAVED}


@dataclass(frozen=True)
class _Seen:
    """A tensor by weak reference and in-place version: equal only for the same, unmodified tensor."""

    ref: weakref.ref
    version: int

    @classmethod
    def of(cls, x) -> "_Seen | None":
        return cls(weakref.ref(x), x._version) if isinstance(x, Tensor) else None

    def __eq__(self, other) -> bool:
        return isinstance(other, _Seen) and self.ref() is not None and self.ref() is other.ref() and self.version == other.version


def _model_name(model) -> str | None:
    return next((name for name, (cls, _) in MODELS.items() if type(model) is cls), None)


def _build_elbo(config: TrainingConfig):
    vectorize = config.num_particles > 1
    if config.elbo == "iwae":
        return RenyiELBO(alpha=0, num_particles=config.num_particles, vectorize_particles=vectorize)
    elbo_class = Trace_ELBO if config.elbo == "trace" else TraceMeanField_ELBO
    return elbo_class(num_particles=config.num_particles, vectorize_particles=vectorize)


class Trainer:
    """Train ``model`` (the VAE or any deterministic autoencoder) as ``config`` says.

    out_dir:    run folder to write (see the module docs); ``None`` writes nothing.
    model_name: the :data:`pyrovae.models.MODELS` name the run folder records, so that
                :func:`load_model` can rebuild the model; found from the model's class when omitted.
    metadata:   JSON-ready facts about the run that ``config.json`` keeps beside the configs
                (the command line stores how it loaded the data there).

    Phases: a model with ``pretrain_layers > 0`` (the stacked AE) first trains each layer ``k``
    alone (``model.active_layer = k``) for ``model.config.pretrain_epochs`` epochs, each with a
    fresh optimizer and schedule, then end to end (``active_layer = None``) for ``config.epochs``.
    History rows name their ``phase`` (``"pretrain-k"`` or ``"train"``); early stopping watches
    the ``"train"`` phase only.

    Each :meth:`fit` call is one run from the model's current weights, with a fresh optimizer and
    reseeded RNG, unless the trainer holds an unfinished run (interrupted in this process, or
    loaded by :meth:`resume`): then ``fit`` continues it. The model stays on its device.
    """

    def __init__(self, model, config: TrainingConfig = TrainingConfig(), out_dir=None, model_name: str | None = None, metadata: dict | None = None):
        if not isinstance(config, TrainingConfig):
            raise InputError(f"config must be a TrainingConfig, got {type(config).__name__}")
        self.svi = callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None))
        if not self.svi and not callable(getattr(model, "loss", None)):
            raise InputError(f"{type(model).__name__} has neither model/guide (a Pyro program) nor loss(x): nothing to train")
        if config.kl_warmup_epochs and not hasattr(model, "kl_weight"):
            raise InputError(f"kl_warmup_epochs needs a model with a kl_weight (the VAE), not {type(model).__name__}")
        model_name = model_name if model_name is not None else _model_name(model)
        if model_name is not None and model_name not in MODELS:
            raise InputError(f"unknown model_name {model_name!r}; choose from {sorted(MODELS)}")
        if model_name is not None and type(getattr(model, "config", None)) is not MODELS[model_name][1]:
            raise InputError(
                f"model_name {model_name!r} is for models with config class {MODELS[model_name][1].__name__}, not a "
                f"{type(model).__name__} with config class {type(getattr(model, 'config', None)).__name__}"
            )
        if out_dir is not None and model_name is None:
            raise InputError(f"a run folder records the model's name: pass model_name (one of {sorted(MODELS)}) for a {type(model).__name__}")
        self.model = model
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_name = model_name
        self.metadata = dict(metadata or {})
        self.history: list[dict] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self._elbo = _build_elbo(config) if self.svi else None
        self._params = list(model.parameters())
        self._pos: _Position | None = None
        self._pending: dict | None = None  # state of an unfinished run for the next fit to continue
        self._generator = torch.Generator()
        self._signal: int | None = None
        self._checked_data = None  # what _check_data last accepted
        self._tensorboard = None

    # ------------------------------------------------------------------ public

    @property
    def device(self) -> torch.device:
        """Where the model is, and where the data goes."""
        return next(self.model.parameters()).device

    def fit(self, train: Tensor, val: Tensor | None = None, dynamic_binarization: bool = False) -> list[dict]:
        """Train on ``train: (N, C, H, W)``; validate on ``val: (M, C, H, W)`` after every epoch.

        dynamic_binarization: train on a fresh ``Bernoulli(pixels)`` draw of every batch.
        A new run seeds torch's global RNG with ``config.seed`` (see the module docs).
        Returns the history: one dict per epoch with the keys :data:`HISTORY_COLUMNS`.
        Raises :class:`~pyrovae.errors.InputError` for unusable data (before training or writing any file),
        :class:`TrainingError` for a non-finite loss, :class:`KeyboardInterrupt` on SIGINT/SIGTERM.
        """
        train, val = self._check_data(train, val, dynamic_binarization)
        if self._pending is not None:
            self._restore(self._pending, len(train), dynamic_binarization)
            self._pending = None
            if self._pos.done:
                return [dict(row) for row in self.history]
        else:
            self._start(len(train), dynamic_binarization)
        try:
            with self._catch_signals(), self._open_tensorboard(), pyro.validation_enabled(False):
                self._warm_up_elbo(train)
                self.model.train()
                while not self._pos.done:
                    self._enter_phase()
                    self._train_epoch(train, dynamic_binarization)
                    self._end_epoch(val)
                    if self._signal is not None:
                        self._interrupt()
        finally:
            self._leave_phase()
        return [dict(row) for row in self.history]

    @classmethod
    def resume(cls, out_dir, device="auto") -> "Trainer":
        """A trainer that continues the run saved in ``out_dir`` (its model, optimizer, RNG and history) on ``device``.

        Call :meth:`fit` with the same data to go on; the run's own training config is used.
        A finished run's ``fit`` returns its history without training.
        """
        model, state = load_model(out_dir, device=device)
        missing = [key for key in ("training_config", "position", "rng", "history", "optimizer_state") if key not in state]
        if missing:
            raise CheckpointError(f"the checkpoint in {out_dir} is not a training checkpoint: it lacks {missing}")
        try:
            config = TrainingConfig(**state["training_config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the training config in {out_dir} is not usable: {error}") from None
        trainer = cls(model, config, out_dir=out_dir, model_name=state["model_name"])
        trainer._pending = state
        return trainer

    # ------------------------------------------------------------------ setup

    def _check_data(self, train, val, dynamic_binarization: bool) -> tuple[Tensor, Tensor | None]:
        """Check every image and move the data to the model's device; nothing is written before.

        The same tensors, unchanged since (same in-place version), are not checked again by a later fit.
        """
        key = (_Seen.of(train), _Seen.of(val), dynamic_binarization)
        if key != self._checked_data:
            if dynamic_binarization:
                if not isinstance(train, Tensor) or not train.is_floating_point() or not bool(((train >= 0) & (train <= 1)).all()):
                    raise InputError("dynamic binarization draws Bernoulli(pixels): the training images must be floats in [0, 1]")
                self.model.check_input((train[:1] > 0.5).to(train.dtype))  # batches will be binary images like this one
            else:
                self.model.check_input(train)
            if val is not None:
                self.model.check_input(val)
            self._checked_data = key
        if self.config.batch_size > len(train):
            raise InputError(
                f"batch_size={self.config.batch_size} is larger than the training set ({len(train)} images); use a smaller batch_size"
            )
        if self.config.early_stopping_patience is not None and val is None:
            raise InputError("early_stopping_patience watches the validation loss: pass val data, or set it to None")
        return train.to(self.device), None if val is None else val.to(self.device)

    def _phases(self) -> list[tuple[str, int | None, int]]:
        """(name, active layer, epochs) of each phase with epochs to run."""
        layers = getattr(self.model, "pretrain_layers", 0)
        phases = [(f"pretrain-{k}", k, self.model.config.pretrain_epochs) for k in range(layers)]
        phases.append(("train", None, self.config.epochs))
        return [phase for phase in phases if phase[2] > 0]

    def _start(self, n_train: int, dynamic_binarization: bool) -> None:
        """Begin a new run: seed, fresh optimizer, empty history; write config.json and a first checkpoint."""
        torch.manual_seed(self.config.seed)
        self._generator.manual_seed(self.config.seed)
        self.history = []
        self._pos = _Position(n_train=n_train, dynamic_binarization=dynamic_binarization, epoch_rng=self._generator.get_state())
        self._pos.done = not self._phases()
        self._new_optimizer()
        if self.out_dir is not None:
            config = {
                "model_name": self.model_name,
                "model_config": config_to_dict(self.model.config),
                "training_config": dataclasses.asdict(self.config),
                "metadata": self.metadata,
            }
            write_text_atomic(self.out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
            self._write_files()

    def _new_optimizer(self) -> None:
        """The optimizer and schedule of the current phase (none once the run is done)."""
        if self._pos.done:
            self.optimizer = self.scheduler = None
            return
        config = self.config
        optimizer_class = OPTIMIZERS[config.optimizer]
        params = list(self.model.parameters())
        self.optimizer = None
        if FUSED_ADAM and optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
            try:
                self.optimizer = optimizer_class(params, lr=config.lr, fused=True)
            except RuntimeError:  # no fused kernel for these parameters' device or dtype
                pass
        if self.optimizer is None:
            self.optimizer = optimizer_class(params, lr=config.lr)
        epochs = self._phases()[self._pos.phase][2]
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=epochs)
        elif config.lr_schedule == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_step_epochs, gamma=0.5)
        else:
            self.scheduler = None

    def _warm_up_elbo(self, train: Tensor) -> None:
        """Let a vectorized ELBO find the model's plate nesting now, on RNG draws that are then undone.

        Pyro does that on the ELBO's first call; here it happens outside the run's random stream,
        so that a resumed run draws exactly what the uninterrupted one drew.
        """
        elbo = self._elbo
        if elbo is None or not elbo.vectorize_particles or elbo.max_plate_nesting != math.inf:
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            elbo.loss(self.model.model, self.model.guide, train[:2])

    # ------------------------------------------------------------------ the loop

    def _enter_phase(self) -> None:
        layer = self._phases()[self._pos.phase][1]
        if getattr(self.model, "pretrain_layers", 0):
            self.model.active_layer = layer

    def _leave_phase(self) -> None:
        """Leave the model as after training: end to end, with its full KL weight."""
        if getattr(self.model, "pretrain_layers", 0):
            self.model.active_layer = None
        if self.config.kl_warmup_epochs:
            self.model.kl_weight = float(self.model.config.beta)

    def _kl_weight(self, steps_per_epoch: int) -> float:
        warmup_steps = self.config.kl_warmup_epochs * steps_per_epoch
        return float(self.model.config.beta) * min(1.0, self._pos.phase_step / warmup_steps)

    def _backward(self, x: Tensor) -> Tensor:
        """Loss per example of the batch ``x: (B, C, H, W)`` (a detached scalar); its gradients are in ``.grad``."""
        model = self.model
        if not self.svi:
            loss = model.loss(x)
        elif hasattr(self._elbo, "differentiable_loss"):
            n = self._pos.n_train
            loss = self._elbo.differentiable_loss(model.model, model.guide, x, num_data=n) / n
        else:  # RenyiELBO: backward happens inside; the float is the loss of the whole batch
            value = self._elbo.loss_and_grads(model.model, model.guide, x)
            for param in self._params:
                if param.grad is not None:
                    param.grad.div_(len(x))
            return torch.tensor(value / len(x))
        loss.backward()
        return loss.detach()

    def _train_epoch(self, train: Tensor, dynamic_binarization: bool) -> None:
        pos, config, model = self._pos, self.config, self.model
        name, _, epochs = self._phases()[pos.phase]
        steps = math.ceil(len(train) / config.batch_size)
        if pos.losses is None:
            pos.losses = torch.full((steps,), math.nan, device=self.device)
        warmup = config.kl_warmup_epochs > 0 and name == "train"
        self._generator.set_state(pos.epoch_rng)
        epoch_batches = batches(train, config.batch_size, self._generator, binarize=dynamic_binarization)
        for _ in range(pos.step):  # an interrupted epoch: the same permutation (and binarization), from where it stopped
            next(epoch_batches)
        bar = tqdm(total=steps, initial=pos.step, desc=f"{name} epoch {pos.epoch + 1}/{epochs}", disable=not config.progress, dynamic_ncols=True)
        start = last_sync = time.perf_counter()
        try:
            for x in epoch_batches:
                if warmup:
                    model.kl_weight = self._kl_weight(steps)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._backward(x)
                if config.skip_nonfinite and not bool(torch.isfinite(loss)):
                    pos.skipped += 1
                else:
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(self._params, config.grad_clip)
                    self.optimizer.step()
                    pos.losses[pos.step] = loss
                pos.step += 1
                pos.phase_step += 1
                bar.update()
                if self._signal is not None:
                    break
                if time.perf_counter() - last_sync >= SYNC_SECONDS:
                    self._sync(bar)
                    last_sync = time.perf_counter()
            self._sync(bar)  # waits for the device, so the epoch's time includes its work
            pos.seconds += time.perf_counter() - start
            if self._signal is not None and pos.step < steps:
                self._interrupt()
        finally:
            bar.close()

    def _sync(self, bar) -> None:
        """Read the losses on the device: raise at the first non-finite one; show the running loss."""
        pos = self._pos
        if not self.config.skip_nonfinite:  # there every step was read already
            finite = torch.isfinite(pos.losses[pos.checked : pos.step])
            if not bool(finite.all()):
                name = self._phases()[pos.phase][0]
                first = pos.checked + int((~finite).nonzero()[0])
                where = f"epoch {pos.epoch + 1}" + ("" if name == "train" else f" of phase {name}")
                kept = f"; the last checkpoint, {self.out_dir / CHECKPOINT_FILE}, is kept" if self.out_dir is not None else ""
                raise TrainingError(
                    f"the loss became {float(pos.losses[first])} at {where}, step {first + 1} of {len(pos.losses)}{kept}. "
                    "Lower lr, set grad_clip, or set skip_nonfinite=True to skip such steps"
                )
            pos.checked = pos.step
        if not bar.disable and pos.step:
            bar.set_postfix(loss=f"{float(pos.losses[: pos.step].nanmean()):.3f}", refresh=False)

    def _epoch_loss(self) -> float | None:
        """Mean loss per example over the epoch's steps that ran (``None`` if all were skipped)."""
        pos = self._pos
        steps, batch_size = len(pos.losses), self.config.batch_size
        sizes = torch.full((steps,), float(batch_size), dtype=torch.float64, device=self.device)
        sizes[-1] = pos.n_train - batch_size * (steps - 1)
        losses = pos.losses.double()
        ran = ~losses.isnan()
        examples = float(sizes[ran].sum())
        return float((losses.nan_to_num(0.0) * sizes).sum()) / examples if examples else None

    @torch.no_grad()
    def _validate(self, val: Tensor) -> float:
        """Loss per example on ``val`` in eval mode (the full KL weight for the VAE)."""
        model = self.model
        model.eval()
        if self.config.kl_warmup_epochs:
            model.kl_weight = float(model.config.beta)
        total = 0.0
        for x in batches(val, self.config.batch_size, shuffle=False):
            if not self.svi:
                total = total + model.loss(x) * len(x)
            elif hasattr(self._elbo, "differentiable_loss"):
                total = total + self._elbo.differentiable_loss(model.model, model.guide, x)
            else:
                total = total + self._elbo.loss(model.model, model.guide, x)
        model.train()
        return float(total) / len(val)

    def _end_epoch(self, val: Tensor | None) -> None:
        """Validate, record the epoch, step the schedule, move on (maybe to the next phase), write files."""
        pos, phases = self._pos, self._phases()
        name, _, epochs = phases[pos.phase]
        start = time.perf_counter()
        train_loss = self._epoch_loss()
        lr = float(self.optimizer.param_groups[0]["lr"])
        val_loss = self._validate(val) if val is not None else None
        if self.scheduler is not None:
            self.scheduler.step()
        stopped = False
        if name == "train" and val_loss is not None:
            if pos.best_val_loss is None or val_loss < pos.best_val_loss:
                pos.best_val_loss, pos.best_epoch, pos.since_best = val_loss, pos.epoch + 1, 0
            else:
                pos.since_best += 1
            patience = self.config.early_stopping_patience
            stopped = patience is not None and pos.since_best >= patience and pos.epoch + 1 < epochs
        kl_weight = getattr(self.model, "kl_weight", None)
        self.history.append({
            "phase": name,
            "epoch": pos.epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "best_val_loss": pos.best_val_loss if name == "train" else None,
            "best_epoch": pos.best_epoch if name == "train" else None,
            "lr": lr,
            "kl_weight": None if kl_weight is None else float(kl_weight),
            "skipped_steps": pos.skipped,
            "seconds": pos.seconds + time.perf_counter() - start,
            "stopped_early": stopped,
        })
        pos.epoch += 1
        pos.step = pos.checked = pos.skipped = 0
        pos.losses, pos.seconds = None, 0.0
        pos.epoch_rng = self._generator.get_state()
        if stopped or (pos.epoch == epochs and pos.phase + 1 == len(phases)):
            pos.done = True
        elif pos.epoch == epochs:
            pos.phase, pos.epoch, pos.phase_step = pos.phase + 1, 0, 0
            self._new_optimizer()
        self._write_files()

    def _interrupt(self) -> None:
        """Keep the exact position (and save it with ``out_dir``), then raise :class:`KeyboardInterrupt`."""
        pos = self._pos
        name = self._phases()[pos.phase][0]
        self._pending = self._state()
        saved = ""
        if self.out_dir is not None:
            if pos.step:  # at an epoch boundary the checkpoint was just written
                save_checkpoint(self.out_dir / CHECKPOINT_FILE, self._pending)
            saved = f"; the position is saved in {self.out_dir / CHECKPOINT_FILE}"
        if pos.done:
            where = "after the last epoch"
        elif pos.step:
            where = f"at step {pos.step} of {name} epoch {pos.epoch + 1}"
        else:
            where = f"before {name} epoch {pos.epoch + 1}"
        raise KeyboardInterrupt(
            f"training stopped by {signal.Signals(self._signal).name} {where}{saved}; "
            "call fit again, or Trainer.resume(out_dir).fit(...), to continue"
        )

    # ------------------------------------------------------------------ state, files, signals

    def _state(self) -> dict:
        """Everything a run needs to continue exactly: weights, optimizer, schedule, position, RNG, history."""
        pos = self._pos
        rng = {"torch": torch.get_rng_state(), "batches": pos.epoch_rng.clone()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model_name": self.model_name,
            "model_config": config_to_dict(self.model.config),
            "training_config": dataclasses.asdict(self.config),
            "model_state": self.model.state_dict(),
            "optimizer_state": None if self.optimizer is None else self.optimizer.state_dict(),
            "scheduler_state": None if self.scheduler is None else self.scheduler.state_dict(),
            "position": pos.to_dict(),
            "epoch_losses": None if pos.losses is None else pos.losses.cpu(),
            "rng": rng,
            "history": [dict(row) for row in self.history],
        }

    def _restore(self, state: dict, n_train: int, dynamic_binarization: bool) -> None:
        """Continue the run ``state`` (from :meth:`_state`); the model already holds its weights."""
        saved = state["position"]
        if saved["n_train"] != n_train:
            raise InputError(f"this run was trained on {saved['n_train']} images, not {n_train}: pass the same training set to continue it")
        if saved["dynamic_binarization"] != dynamic_binarization:
            raise InputError(f"this run was trained with dynamic_binarization={saved['dynamic_binarization']}: pass the same to continue it")
        self.history = [dict(row) for row in state["history"]]
        self._pos = _Position(**saved, epoch_rng=state["rng"]["batches"].clone())
        if state["epoch_losses"] is not None:
            self._pos.losses = state["epoch_losses"].to(self.device)
        self._new_optimizer()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler_state"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _write_files(self) -> None:
        """metrics.json, metrics.csv, TensorBoard scalars of the last row, and checkpoint.pt (all but TensorBoard atomic)."""
        if self.out_dir is None:
            return
        write_text_atomic(self.out_dir / METRICS_JSON, json.dumps(self.history, indent=2) + "\n")
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        write_text_atomic(self.out_dir / METRICS_CSV, text.getvalue())
        if self._tensorboard is not None and self.history:
            row = self.history[-1]
            for key in ("train_loss", "val_loss", "lr", "kl_weight"):
                if row[key] is not None:
                    self._tensorboard.add_scalar(f"{row['phase']}/{key}", row[key], row["epoch"])
        save_checkpoint(self.out_dir / CHECKPOINT_FILE, self._state())

    @contextmanager
    def _open_tensorboard(self):
        """A SummaryWriter in ``out_dir/tensorboard`` while training, if TensorBoard is installed."""
        if self.out_dir is None:
            yield
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            yield
            return
        self._tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))
        try:
            yield
        finally:
            self._tensorboard.close()
            self._tensorboard = None

    @contextmanager
    def _catch_signals(self):
        """Turn SIGINT and SIGTERM into a request to stop at the next step boundary (main thread only)."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._signal = signum

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def load_model(path, model=None, device="cpu"):
    """Rebuild the model saved in ``path`` (a run folder or a checkpoint file) and load its weights.

    The model comes from the checkpoint's model name and config (:func:`pyrovae.models.build_model`);
    pass ``model`` to load the weights into that one instead, after checking that it is the same
    kind of model with the same config. Returns ``(model, checkpoint dict)``, the model on ``device``.
    Raises :class:`CheckpointError` when the checkpoint is unusable or does not fit.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise CheckpointError(f"{path} holds no {CHECKPOINT_FILE}: not a run folder, or its training never started")
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
