"""The training loop: epochs of minibatches, one optimizer per parameter group, checkpoints, history.

The loop knows models only through :class:`pyrovae.models.base.TrainableModel`: their parameter
groups (one optimizer each), phases, training step and validation loss. For every step the model
calls ``update(group, compute_loss)`` once per group it trains, and the loop does the rest: zero
the group's gradients, ``backward``, clip (``grad_clip``), the optimizer's step. The VAE's step
is a Pyro ELBO, an autoencoder's one loss, an adversarial autoencoder's three updates in a row.
Losses are per example, for every model, so ``lr`` and ``grad_clip`` mean the same thing for all.

Labels: a conditional model (``model.conditional``, the CVAE) trains on images and their labels;
``fit`` takes the labels of each split (``train_labels``, ...), slices them with the images'
permutation, and hands them to the model's step and validation loss as ``y``. The loop itself is
the same for every model.

Speed: the data is an :class:`~pyrovae.data.ImageSet` (``uint8`` images on the model's device
when they fit: MNIST stays one tensor there; else in host memory or a memory map), sliced by
:func:`pyrovae.data.batches`, which makes each batch floats on the device;
it is checked once with ``model.check_input`` before training, after which steps run with Pyro's
validation off; the step's figures stay on the device and are read about once a second
(non-finite values are found then, and reported with the step where they first appeared);
Adam and AdamW use their fused kernel.

Seeding: a new run seeds torch's global RNG (``torch.manual_seed(config.seed)``, CPU and CUDA)
and draws batches from a ``torch.Generator`` seeded with ``config.seed``.

Interrupts: ``SIGINT`` or ``SIGTERM`` during :meth:`Trainer.fit` (handlers are installed in the
main thread only, and restored afterwards) stops training at the next step boundary, saves a
checkpoint of that exact position (with ``out_dir``), and raises :class:`KeyboardInterrupt`.
Calling ``fit`` again, or ``Trainer.resume(out_dir).fit(...)``, continues to the very same
parameters, bit for bit on the CPU, as an uninterrupted run.

Data parallel (:mod:`torch.distributed`, e.g. under torchrun; see :mod:`.distributed`): when a
process group of ``W > 1`` processes is initialised, every rank calls ``fit`` with the same data
and ``batch_size`` is the global batch. Every rank draws the same permutation (and binarization
noise) for the whole global batch and trains on its contiguous shard of it, labels sliced alike;
after each backward the gradients are averaged across ranks, each rank's weighted by its share of
the batch, so the optimizers step on the gradient of the global batch's mean loss, uneven last
batches included (every global batch must hold at least ``W`` images). A loss that is a non-linear
function of a mean over the batch (free bits, a sparse autoencoder's penalty) takes that mean of
the whole batch from ``update.batch_mean``, whose gradient composes with this averaging.
``Progress.num_data`` stays the dataset's size. The step's figures are reduced across ranks the
same way; validation and test losses are scored in the very batches one process scores, each rank
taking every ``W``-th, so the history is that of whole batches. Only rank 0 writes the run folder;
a new run copies rank 0's weights to every rank, and seeds torch's global RNG with
:func:`~.distributed.rank_seed` (``seed`` itself on rank 0), so the draws inside a step (a VAE's z,
dropout) are independent across shards: unlike the data, they are not those of one process.
Checkpoints keep every rank's RNG state, and :meth:`Trainer.resume` works on every rank.
Each step ends with one all-reduce of a few integers on the CPU (any rank's signal, and whether
any rank wants the figures read now), so a signal on any rank stops every rank at the same step
boundary, with one checkpoint, and a non-finite loss on any rank raises the same
:class:`TrainingError` on every rank. One process never communicates.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints import CheckpointError
from ..data import ImageSet, batches
from ..data.storage import as_image_set
from ..errors import InputError
from ..models import MODELS, config_to_dict
from ..models.base import Phase, Progress, TrainableModel
from . import distributed
from .config import OPTIMIZERS, StagedDecay, TrainingConfig
from .run_folder import RunFolder, load_model

__all__ = ["Trainer", "TrainingError", "FUSED_ADAM", "HISTORY_COLUMNS"]

#: Adam and AdamW run their fused kernel (one kernel for all parameters) wherever torch has one
FUSED_ADAM = True
#: the columns of every history row; the model's own figures (``kl_weight``, ...) come after ``train_loss``
HISTORY_COLUMNS = (
    "phase", "epoch", "train_loss", "val_loss", "test_loss", "best_val_loss", "best_epoch", "lr", "skipped_steps",
    "seconds", "stopped_early",
)
#: how often (seconds) the figures on the device are read for the progress bar and the non-finite check
SYNC_SECONDS = 1.0


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
    phase_step: int = 0  # completed steps of this phase
    figure_names: tuple = ()  # the names of the step's figures, "loss" first
    figures: Tensor | None = None  # (steps per epoch, figures) of each step; NaN: not run or skipped
    checked: int = 0  # steps of the current epoch already checked for non-finite figures
    skipped: int = 0  # skipped steps in the current epoch
    seconds: float = 0.0  # time spent in the current epoch
    best_val_loss: float | None = None
    best_epoch: int | None = None
    since_best: int = 0
    done: bool = False
    reduced: int = 0  # steps of the current epoch whose figures are already reduced across ranks (W > 1)

    _SAVED = ("n_train", "dynamic_binarization", "phase", "epoch", "step", "phase_step", "figure_names", "skipped",
              "seconds", "best_val_loss", "best_epoch", "since_best", "done")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self._SAVED}


@dataclass(frozen=True)
class _Seen:
    """A tensor by weak reference and in-place version: equal only for the same, unmodified tensor."""

    ref: weakref.ref
    version: int

    @classmethod
    def of(cls, x) -> "_Seen | None":
        if isinstance(x, ImageSet):  # the images it holds: a tensor (with its version) or an array
            return cls(weakref.ref(x), x.images._version if isinstance(x.images, Tensor) else 0)
        return cls(weakref.ref(x), x._version) if isinstance(x, Tensor) else None

    def __eq__(self, other) -> bool:
        return isinstance(other, _Seen) and self.ref() is not None and self.ref() is other.ref() and self.version == other.version


class _Updater:
    """The ``update(group, compute_loss)`` a model's step calls (see :class:`pyrovae.models.base.Update`)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], grad_clip: float | None, skip_nonfinite: bool, parallel: bool = False):
        self.optimizers = optimizers
        self.grad_clip = grad_clip
        self.skip_nonfinite = skip_nonfinite
        self.params = {group: [p for g in opt.param_groups for p in g["params"]] for group, opt in optimizers.items()}
        self.skipped = False  # a non-finite loss skipped an update of the current step
        self.parallel = parallel  # average the gradients across the ranks of torch.distributed
        self.share = 1.0  # this rank's images / the step's global batch (set by the Trainer for each step)

    def __call__(self, group: str, compute_loss: Callable[[], Tensor]) -> Tensor:
        optimizer = self.optimizers.get(group)
        if optimizer is None:
            raise InputError(f"the model updated parameter group {group!r}, but its groups are {sorted(self.optimizers)}")
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        if loss.requires_grad:
            loss.backward()
        loss = loss.detach()
        global_loss = self._average(group, loss) if self.parallel else loss
        if self.skip_nonfinite and not bool(torch.isfinite(global_loss)):
            self.skipped = True
            return loss
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params[group], self.grad_clip)
        optimizer.step()
        return loss

    def batch_mean(self, local: Tensor) -> Tensor:
        """The global batch's mean of a statistic, from ``local``, its mean over this rank's shard (see
        :func:`.distributed.batch_mean`: its gradient composes with the averaging of :meth:`_average`)."""
        return distributed.batch_mean(local, self.share) if self.parallel else local

    def _average(self, group: str, loss: Tensor) -> Tensor:
        """Make every gradient of ``group`` the global batch's, on every rank; return the global batch's loss.

        Each rank's gradients and ``loss`` (of its shard's mean loss) are weighted by its
        ``share`` and summed over the ranks in one all-reduce per dtype, with a flag per parameter
        that says whether any rank has its gradient: a parameter no rank's loss reached keeps
        ``grad=None``, as in one process. Returns this rank's copy of the global loss, a scalar.
        """
        params = self.params[group]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        reference = params[0] if params else loss
        present = torch.tensor([p.grad is not None for p in params], dtype=reference.dtype, device=reference.device)
        total = loss.reshape(1).clone()
        distributed.all_reduce_([*grads, present, total], scale=self.share)
        if any(p.grad is None for p in params):  # only then read the flags (a device sync on a GPU)
            for p, grad, flag in zip(params, grads, present.tolist()):
                if p.grad is None and flag > 0:
                    p.grad = grad
        return total[0]


#: bytes of float images checked at once by ``model.check_input`` before training (all images, chunk by chunk;
#: of a memory map the first chunk only)
CHECK_BYTES = 2**26


def _chunks(images: ImageSet):
    """The float images of ``images`` in chunks of about :data:`CHECK_BYTES` (of a memory map: the first chunk only)."""
    size = max(1, CHECK_BYTES // (math.prod(images.image_shape) * images.dtype.itemsize))
    stop = min(len(images), size) if images.storage == "mmap" else len(images)
    for start in range(0, stop, size):
        yield images[start : min(start + size, stop)]


def _labelled(batch) -> tuple[Tensor, dict]:
    """A batch of :func:`pyrovae.data.batches` as a model's step takes it: the images, and ``{"y": labels}``
    when the batch comes with labels (for a conditional model), else nothing more."""
    if isinstance(batch, tuple):
        x, y = batch
        return x, {"y": y}
    return batch, {}


def _check_longer(out_dir, config: TrainingConfig, state: dict, epochs) -> None:
    """Raise :class:`~pyrovae.errors.InputError` unless the run ``state`` (of ``config``) in ``out_dir`` can go on to
    ``epochs`` epochs exactly as a run of ``epochs`` would have (see :meth:`Trainer.resume`)."""
    history, position = state["history"], state["position"]
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < config.epochs:
        raise InputError(f"{out_dir} is a run of {config.epochs} epochs: resuming can only extend it, not to epochs={epochs!r}")
    if history and history[-1]["stopped_early"]:
        raise InputError(f"{out_dir} stopped early at epoch {history[-1]['epoch']} (its validation loss stopped improving): it cannot be extended")
    patience = config.early_stopping_patience
    if position["done"] and patience is not None and position["since_best"] >= patience:
        raise InputError(
            f"the validation loss of {out_dir} had not improved for {position['since_best']} validations at its last epoch: "
            f"a run of {epochs} epochs would have stopped there (early_stopping_patience={patience})"
        )
    if config.lr_schedule in ("cosine", "iwae"):
        raise InputError(
            f"the {config.lr_schedule} learning-rate schedule of {out_dir} is fitted to its {config.epochs} epochs, so a run of "
            f"{epochs} would have run other rates from the start: it cannot be extended; train a new run"
        )


def _model_name(model) -> str | None:
    return next((name for name, (cls, _) in MODELS.items() if type(model) is cls), None)


class Trainer:
    """Train ``model`` (any :class:`~pyrovae.models.base.TrainableModel`) as ``config`` says.

    out_dir:    run folder to write (see :mod:`pyrovae.training.run_folder`); ``None`` writes nothing.
    model_name: the :data:`pyrovae.models.MODELS` name the run folder records, so that
                :func:`load_model` can rebuild the model; found from the model's class when omitted.
    metadata:   JSON-ready facts about the run that ``config.json`` keeps beside the configs
                (the command line stores how it loaded the data there).

    Phases (:meth:`~pyrovae.models.base.TrainableModel.training_phases`) run in order, each with
    fresh optimizers and schedules; between two, the model's ``end_phase`` sees the training images.
    History rows name their ``phase``, and early stopping watches the ``"train"`` phase only.

    Each :meth:`fit` call is one run from the model's current weights, with fresh optimizers and
    reseeded RNG, unless the trainer holds an unfinished run (interrupted in this process, or
    loaded by :meth:`resume`): then ``fit`` continues it. The model stays on its device.

    Under :mod:`torch.distributed` (a process group of ``W > 1`` processes initialised before
    ``fit``), every rank builds a Trainer with the same model, config and ``out_dir`` and calls
    ``fit`` with the same data: ``config.batch_size`` is then the global batch, each rank trains on
    its shard of every batch, and only rank 0 writes ``out_dir`` (see the module docs).
    """

    def __init__(self, model, config: TrainingConfig = TrainingConfig(), out_dir=None, model_name: str | None = None, metadata: dict | None = None):
        if not isinstance(config, TrainingConfig):
            raise InputError(f"config must be a TrainingConfig, got {type(config).__name__}")
        if not isinstance(model, TrainableModel):
            raise InputError(f"{type(model).__name__} is not a pyrovae.models.base.TrainableModel: nothing to train")
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
        self.folder = RunFolder(out_dir) if out_dir is not None else None
        self.model_name = model_name
        self.metadata = dict(metadata or {})
        self.history: list[dict] = []
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, object] = {}
        self._updater: _Updater | None = None
        self._pos: _Position | None = None
        self._pending: dict | None = None  # state of an unfinished run for the next fit to continue
        self._generator = torch.Generator()
        self._signal: int | None = None  # the signal that stops training (with W > 1: agreed by every rank)
        self._received: int | None = None  # (W > 1) a signal this rank received, not yet agreed
        self._checked_data = None  # what _check_data last accepted
        self._scores: dict = {}  # fit's scores
        self._ranks = (0, 1)  # (rank, world size) of the current fit, from torch.distributed
        self._cpu_group = None  # the group of the per-step flags (W > 1): None, the default group, unless that is NCCL alone

    # ------------------------------------------------------------------ public

    @property
    def out_dir(self):
        return None if self.folder is None else self.folder.path

    @property
    def device(self) -> torch.device:
        """Where the model is, and where the data goes."""
        return next(self.model.parameters()).device

    @property
    def _main(self) -> bool:
        """Whether this process writes the run folder and shows progress: rank 0 (the only one without a group)."""
        return self._ranks[0] == 0

    def fit(
        self,
        train: ImageSet | Tensor,
        val: ImageSet | Tensor | None = None,
        dynamic_binarization: bool = False,
        test: ImageSet | Tensor | None = None,
        *,
        train_labels: Tensor | None = None,
        val_labels: Tensor | None = None,
        test_labels: Tensor | None = None,
        scores: dict[str, Callable[[TrainableModel], float]] | None = None,
    ) -> list[dict]:
        """Train on ``train: (N, C, H, W)``; validate on ``val: (M, C, H, W)`` every ``config.eval_every`` epochs.

        Each split is an :class:`~pyrovae.data.ImageSet` (``uint8`` images wherever they live, made
        floats batch by batch on the model's device; see :mod:`pyrovae.data`) or a tensor of images.

        dynamic_binarization: train on a fresh ``Bernoulli(pixels)`` draw of every batch.
        test: images ``(T, C, H, W)`` scored like ``val`` (the model's validation loss) as the
            history's ``test_loss``, to watch over- or under-fitting; never used for a decision.
        train_labels, val_labels, test_labels: int64 labels ``(N,)``, ``(M,)``, ``(T,)`` of the images
            of each split given, for a conditional model (``model.conditional``), which needs them;
            a model of images alone takes none. They change no random draw of the run.
        scores: name -> a function of the model giving a number (a test accuracy, say), called at every
            evaluation (when the validation loss is) in eval mode without gradients, on every process; each
            is a column of the history after ``test_loss`` (``None`` in the epochs between). Its random
            draws are its own (torch's RNG is forked): scores change no draw of the run. Pass the same
            scores again to continue a run; epochs before a score was given hold ``None``.
        A new run seeds torch's global RNG with ``config.seed`` (see the module docs).
        Returns the history: one dict per epoch with the keys :data:`HISTORY_COLUMNS` and the
        model's own figures. Raises :class:`~pyrovae.errors.InputError` for unusable data (before
        training or writing any file), :class:`TrainingError` for a non-finite loss,
        :class:`KeyboardInterrupt` on SIGINT/SIGTERM.
        """
        self._ranks = (distributed.rank(), distributed.world_size())
        self._scores = self._check_scores(scores)
        (train, train_labels), val, test = self._check_data(
            {"train": (train, train_labels), "val": (val, val_labels), "test": (test, test_labels)}, dynamic_binarization
        )
        if self._ranks[1] > 1:
            self._check_same_data(train, val, test)
        with self._catch_signals():  # from before the first checkpoint: a signal while it is written stops at the first step
            if self._pending is not None:
                self._restore(self._pending, len(train), dynamic_binarization)
                self._pending = None
                if self._pos.done:
                    return [dict(row) for row in self.history]
            else:
                self._start(len(train), dynamic_binarization)
            tensorboard = self.folder.tensorboard() if self.folder is not None and self._main else nullcontext()
            with tensorboard, pyro.validation_enabled(False):
                self.model.train()
                while not self._pos.done:
                    self._train_epoch(train, train_labels, dynamic_binarization)
                    self._end_epoch(train, val, test)
                    if self._ranks[1] > 1:
                        self._agree()  # a signal on any rank during the epoch's end stops every rank
                    if self._signal is not None:
                        self._interrupt()
        return [dict(row) for row in self.history]

    @classmethod
    def resume(cls, out_dir, device="auto", epochs: int | None = None, progress: bool | None = None) -> "Trainer":
        """A trainer that continues the run saved in ``out_dir`` (its model, optimizers, RNG and history) on ``device``.

        Call :meth:`fit` with the same data to go on; the run's own training config is used, but for:

        epochs:   more epochs than the run's extend it, finished or not: :meth:`fit` trains on to ``epochs``,
                  as a run of ``epochs`` would have gone on from there (bit for bit on the CPU, when
                  ``eval_every`` divides the run's epochs: the run validated its last epoch). Refused (an
                  :class:`~pyrovae.errors.InputError`) when the run's ``lr_schedule`` is ``"cosine"`` or
                  ``"iwae"``, fitted to the total epochs (the rates it already ran would change), when it stopped
                  early or its patience had run out at its last epoch, and for fewer epochs than the run's.
        progress: show the progress bar or not (``None``: as the run did).

        A finished run's ``fit`` returns its history without training.
        """
        model, state = load_model(out_dir, device=device)
        missing = [key for key in ("training_config", "position", "rng", "history", "optimizer_states") if key not in state]
        if missing:
            raise CheckpointError(f"the checkpoint in {out_dir} is not a training checkpoint: it lacks {missing}")
        try:
            config = TrainingConfig(**state["training_config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"the training config in {out_dir} is not usable: {error}") from None
        if epochs is not None and epochs != config.epochs:
            _check_longer(out_dir, config, state, epochs)
            config = dataclasses.replace(config, epochs=epochs)
        if progress is not None:
            config = dataclasses.replace(config, progress=progress)
        folder = RunFolder(out_dir)
        trainer = cls(model, config, out_dir=out_dir, model_name=state["model_name"], metadata=folder.read_config().get("metadata"))
        trainer._pending = state
        return trainer

    # ------------------------------------------------------------------ setup

    def _check_data(self, splits: dict, dynamic_binarization: bool) -> list:
        """Check every image and label and place the data for the model's device; nothing is written before.

        ``splits`` maps ``"train"``, ``"val"``, ``"test"`` to ``(images, labels)``; returns, in that
        order, ``(images, labels)`` for each split (the images an :class:`~pyrovae.data.ImageSet` drawing
        batches on the device, the labels on the device), ``None`` for a split without images.
        The same images, unchanged since (same in-place version), are not checked again by a later fit.
        Images in a memory map are checked on their first :data:`CHECK_BYTES` (the others are read
        batch by batch; their values were checked when they were prepared).
        """
        key = (*(_Seen.of(t) for pair in splits.values() for t in pair), dynamic_binarization)
        for name, (images, labels) in splits.items():
            if images is not None and not isinstance(images, (Tensor, ImageSet)):
                raise InputError(f"{name} must be images: an ImageSet or a tensor (N, C, H, W), got {type(images).__name__}")
        placed = {name: (None if images is None else as_image_set(images, self.device), labels) for name, (images, labels) in splits.items()}
        (train, _), (val, _), (test, _) = placed.values()
        if key != self._checked_data:
            if dynamic_binarization:
                if not train.dtype.is_floating_point or not all(bool(((x >= 0) & (x <= 1)).all()) for x in _chunks(train)):
                    raise InputError("dynamic binarization draws Bernoulli(pixels): the training images must be floats in [0, 1]")
                first = train[:1]
                self.model.check_input((first > 0.5).to(first.dtype))  # batches will be binary images like this one
            else:
                for chunk in _chunks(train):
                    self.model.check_input(chunk)
            for held_out in (val, test):
                if held_out is not None:
                    for chunk in _chunks(held_out):
                        self.model.check_input(chunk)
            self._check_labels(splits)
            self._checked_data = key
        if self.config.batch_size > len(train):
            raise InputError(
                f"batch_size={self.config.batch_size} is larger than the training set ({len(train)} images); use a smaller batch_size"
            )
        if self.config.early_stopping_patience is not None and val is None:
            raise InputError("early_stopping_patience watches the validation loss: pass val data, or set it to None")
        world, batch_size = self._ranks[1], self.config.batch_size
        last = len(train) - batch_size * (math.ceil(len(train) / batch_size) - 1)
        if min(batch_size, last) < world:
            raise InputError(
                f"{world} processes share every global batch, so each needs at least {world} images; batch_size={batch_size} "
                f"leaves {min(batch_size, last)} in a batch of the {len(train)} training images: choose another batch_size"
            )
        return [
            None if images is None else (images, None if labels is None else labels.to(self.device))
            for images, labels in placed.values()
        ]

    def _check_scores(self, scores) -> dict:
        """``scores`` (name -> callable, or None) checked: callables under names no other column of the history has."""
        scores = {} if scores is None else scores
        if not isinstance(scores, dict):
            raise InputError(f"scores must map a column name to a function of the model, got {type(scores).__name__}")
        for name, score in scores.items():
            if not isinstance(name, str) or not name or name in HISTORY_COLUMNS:
                raise InputError(f"a score needs a name of its own, not one of the history's columns {HISTORY_COLUMNS}: got {name!r}")
            if not callable(score):
                raise InputError(f"score {name!r} must be a function of the model, got {type(score).__name__}")
        return dict(scores)

    def _check_score_figures(self, names: tuple) -> None:
        """Raise :class:`InputError` if a score has one of the ``names`` of the model's own figures (known from its first step)."""
        clash = sorted(set(names) & set(self._scores))
        if clash:
            raise InputError(f"the scores {clash} have the names of the model's own figures {names}: rename them")

    @torch.no_grad()
    def _score(self) -> dict[str, float]:
        """Each of the scores given to ``fit``, of the model in eval mode, with torch's RNG forked."""
        model = self.model
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return {name: float(score(model)) for name, score in self._scores.items()}
        finally:
            model.train()

    def _check_same_data(self, train: Tensor, val: Tensor | None, test: Tensor | None) -> None:
        """(W > 1) Raise the same :class:`InputError` on every rank unless all were given splits of the same sizes;
        make the group of the per-step flags (a collective call, on every rank alike)."""
        if self._cpu_group is None:
            self._cpu_group = distributed.cpu_group()
        sizes = [len(train), -1 if val is None else len(val[0]), -1 if test is None else len(test[0])]
        highest = distributed.all_max([*sizes, *(-size for size in sizes)], group=self._cpu_group)
        if highest[:3] != sizes or [-size for size in highest[3:]] != sizes:
            raise InputError(
                f"every process must train on the same data; rank {self._ranks[0]} has train, val, test sizes {sizes} "
                "(-1: none), another differs"
            )

    def _check_labels(self, splits: dict) -> None:
        """Labels of every split with images the model requires them for (:meth:`~pyrovae.models.base.TrainableModel.requires_labels`),
        each checked by the model."""
        model = self.model
        for name, (images, labels) in splits.items():
            if images is None:
                if labels is not None:
                    raise InputError(f"{name}_labels were given without {name} images")
            elif labels is not None:
                try:
                    model.check_labels(labels, len(images))
                except InputError as error:
                    raise InputError(f"{name}_labels: {error}") from None
            elif model.requires_labels(name):
                raise InputError(f"a {type(model).__name__} needs the labels of its {name} images: pass {name}_labels")

    def _phases(self) -> list[Phase]:
        """The model's phases that have epochs to run."""
        return [phase for phase in self.model.training_phases(self.config.epochs) if phase.epochs > 0]

    def _start(self, n_train: int, dynamic_binarization: bool) -> None:
        """Begin a new run: seed, fresh optimizers, empty history; write config.json and a first checkpoint."""
        rank, world = self._ranks
        torch.manual_seed(distributed.rank_seed(self.config.seed, rank))  # config.seed itself on rank 0
        self._generator.manual_seed(self.config.seed)
        if world > 1:  # every rank starts from rank 0's weights
            distributed.broadcast_([*self.model.parameters(), *self.model.buffers()])
        self.history = []
        self._pos = _Position(n_train=n_train, dynamic_binarization=dynamic_binarization, epoch_rng=self._generator.get_state())
        self._pos.done = not self._phases()
        self._new_optimizers()
        self._write_config()
        self._write_files()

    def _write_config(self) -> None:
        """config.json, when there is a run folder (rank 0 writes)."""
        if self.folder is not None and self._main:
            self.folder.write_config({
                "model_name": self.model_name,
                "model_config": config_to_dict(self.model.config),
                "training_config": dataclasses.asdict(self.config),
                "metadata": self.metadata,
            })

    def _new_optimizer(self, params) -> torch.optim.Optimizer:
        config = self.config
        optimizer_class = OPTIMIZERS[config.optimizer]
        options = {"lr": config.lr}
        if config.weight_decay:
            options["weight_decay"] = config.weight_decay
        if config.optimizer_eps is not None:
            options["eps"] = config.optimizer_eps
        if FUSED_ADAM and optimizer_class in (torch.optim.Adam, torch.optim.AdamW):
            try:
                return optimizer_class(params, fused=True, **options)
            except RuntimeError:  # no fused kernel for these parameters' device or dtype
                pass
        return optimizer_class(params, **options)

    def _new_optimizers(self) -> None:
        """The optimizers and schedules of the current phase, one per parameter group (none without a phase)."""
        self.optimizers, self.schedulers, self._updater = {}, {}, None
        if self._pos.phase >= len(self._phases()):
            return
        config = self.config
        epochs = self._phases()[self._pos.phase].epochs
        for group, params in self.model.parameter_groups().items():
            optimizer = self.optimizers[group] = self._new_optimizer(list(params))
            if config.lr_schedule == "cosine":
                self.schedulers[group] = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            elif config.lr_schedule == "step":
                self.schedulers[group] = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epochs, gamma=0.5)
            elif config.lr_schedule == "iwae":
                self.schedulers[group] = torch.optim.lr_scheduler.LambdaLR(optimizer, StagedDecay(epochs))
        self._updater = _Updater(self.optimizers, config.grad_clip, config.skip_nonfinite, parallel=self._ranks[1] > 1)

    # ------------------------------------------------------------------ the loop

    def _record(self, figures: dict, steps: int) -> None:
        """Keep the step's figures (scalar tensors or floats) in row ``pos.step`` of the epoch's table, on the device."""
        pos = self._pos
        if not pos.figure_names:
            names = tuple(figures)
            if not names or names[0] != "loss":
                raise InputError(f"a training step must return its figures with 'loss' first, got {names}")
            self._check_score_figures(names)
            pos.figure_names = names
        if pos.figures is None:
            pos.figures = torch.full((steps, len(pos.figure_names)), math.nan, device=self.device)
        row = pos.figures[pos.step]
        for column, name in enumerate(pos.figure_names):
            row[column] = figures[name]

    def _train_epoch(self, train: ImageSet, train_labels: Tensor | None, dynamic_binarization: bool) -> None:
        pos, config, model = self._pos, self.config, self.model
        phase = self._phases()[pos.phase]
        steps = math.ceil(len(train) / config.batch_size)
        rank, world = self._ranks
        self._generator.set_state(pos.epoch_rng)
        # an interrupted epoch goes on with the same permutation (and binarization) from where it stopped (first=);
        # with W > 1 ranks each draws only its contiguous shard of every global batch, labels alike
        num_labelled = 0 if train_labels is None else int((train_labels >= 0).sum())
        epoch_batches = batches(train, config.batch_size, self._generator, binarize=dynamic_binarization, labels=train_labels,
                                shard=(rank, world) if world > 1 else None, first=pos.step)
        bar = tqdm(total=steps, initial=pos.step, desc=f"{phase.name} epoch {pos.epoch + 1}/{phase.epochs}", disable=not config.progress or not self._main, dynamic_ncols=True)
        update = self._updater
        start = last_sync = time.perf_counter()
        try:
            for batch in epoch_batches:
                x, given = _labelled(batch)
                if world > 1:  # this rank's share of the global batch
                    update.share = len(x) / min(config.batch_size, pos.n_train - pos.step * config.batch_size)
                update.skipped = False
                progress = Progress(num_data=pos.n_train, phase=phase.name, epochs_done=pos.phase_step / steps, num_labelled=num_labelled)
                figures = model.training_step(x, update, progress, **given)
                if update.skipped:
                    pos.skipped += 1
                else:
                    self._record(figures, steps)
                pos.step += 1
                pos.phase_step += 1
                bar.update()
                if world > 1:  # every rank learns, at the same step, whether to stop and whether to read the figures
                    read = self._agree(time.perf_counter() - last_sync >= SYNC_SECONDS)
                    if self._signal is not None:
                        break
                    if read:
                        self._sync(bar)
                        last_sync = time.perf_counter()
                    continue
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
        """Read the figures on the device: raise at the first non-finite one; show the running loss.

        With ``W > 1`` ranks (which all call this at the same step) the new rows are first reduced
        to the whole batches' figures, so every rank reads, and raises, alike.
        """
        pos = self._pos
        if pos.figures is None:
            return
        if self._ranks[1] > 1 and pos.reduced < pos.step:
            self._reduce_figures()
        if not self.config.skip_nonfinite:  # there every update was read already
            finite = torch.isfinite(pos.figures[pos.checked : pos.step]).all(1)
            if not bool(finite.all()):
                name = self._phases()[pos.phase].name
                first = pos.checked + int((~finite).nonzero()[0])
                values = {n: float(v) for n, v in zip(pos.figure_names, pos.figures[first])}
                where = f"epoch {pos.epoch + 1}" + ("" if name == "train" else f" of phase {name}")
                kept = f"; the last checkpoint, {self.folder.checkpoint}, is kept" if self.folder is not None else ""
                raise TrainingError(
                    f"the loss became non-finite ({values}) at {where}, step {first + 1} of {len(pos.figures)}{kept}. "
                    "Lower lr, set grad_clip, or set skip_nonfinite=True to skip such steps"
                )
            pos.checked = pos.step
        if not bar.disable and pos.step:
            bar.set_postfix(loss=f"{float(pos.figures[: pos.step, 0].nanmean()):.3f}", refresh=False)

    def _reduce_figures(self) -> None:
        """(W > 1) Turn rows ``pos.reduced:pos.step`` of the figures, this rank's shard means, into the global
        batches' means: each weighted by the rank's share of its batch and summed over ranks."""
        pos, batch_size = self._pos, self.config.batch_size
        rank, world = self._ranks
        steps = len(pos.figures)
        shares = []
        for step in range(pos.reduced, pos.step):
            size = batch_size if step < steps - 1 else pos.n_train - batch_size * (steps - 1)
            lo, hi = distributed.shard_bounds(size, rank, world)
            shares.append((hi - lo) / size)
        rows = pos.figures[pos.reduced : pos.step]
        rows.mul_(torch.tensor(shares, dtype=rows.dtype, device=rows.device)[:, None])
        distributed.all_reduce_([rows])
        pos.reduced = pos.step

    def _agree(self, read: bool = False) -> bool:
        """(W > 1) One all-reduce of two integers on the CPU: every rank takes the signal any rank received
        (the highest number) as the one that stops training, and learns whether any rank asks to ``read``
        the figures now; returns that. Every stop is decided here, never by a rank's handler alone."""
        signum, read = distributed.all_max([self._received or 0, int(read)], group=self._cpu_group)
        if signum:
            self._signal = signum
        return bool(read)

    def _epoch_figures(self) -> dict[str, float | None]:
        """Each figure's mean per example over the epoch's steps that ran (``None`` if all were skipped)."""
        pos = self._pos
        names = pos.figure_names or ("loss",)
        if pos.figures is None:
            return dict.fromkeys(names)
        steps, batch_size = len(pos.figures), self.config.batch_size
        sizes = torch.full((steps,), float(batch_size), dtype=torch.float64, device=self.device)
        sizes[-1] = pos.n_train - batch_size * (steps - 1)
        figures = pos.figures.double()
        ran = ~figures[:, 0].isnan()
        examples = float(sizes[ran].sum())
        if not examples:
            return dict.fromkeys(names)
        means = (figures[ran] * sizes[ran, None]).sum(0) / examples
        return {name: float(value) for name, value in zip(names, means)}

    @torch.no_grad()
    def _validate(self, val: ImageSet, labels: Tensor | None) -> float:
        """Loss per example on ``val`` (with its ``labels``, for a conditional model) in eval mode.

        With ``W > 1`` ranks, rank ``r`` scores batches ``r, r + W, ...`` of the very batches one process
        scores (a loss that depends on its batch, as a sparse autoencoder's penalty does, is then one
        process's), and the sums are all-reduced.
        """
        model = self.model
        model.eval()
        total = 0.0
        rank, world = self._ranks
        for index, batch in enumerate(batches(val, self.config.batch_size, shuffle=False, labels=labels)):
            if index % world == rank:
                x, given = _labelled(batch)
                total = total + model.validation_loss(x, **given) * len(x)
        model.train()
        if world > 1:
            return distributed.all_sum(float(total), group=self._cpu_group) / len(val)
        return float(total) / len(val)

    def _end_epoch(self, train: ImageSet, val: tuple | None, test: tuple | None) -> None:
        """Validate on ``val`` and score ``test`` (each ``(images, labels)`` or ``None``), record the epoch,
        step the schedules, move on (maybe to the next phase, after the model's ``end_phase`` with the
        ``train`` images), write files."""
        pos, phases = self._pos, self._phases()
        phase = phases[pos.phase]
        start = time.perf_counter()
        figures = self._epoch_figures()
        lr = float(next(iter(self.optimizers.values())).param_groups[0]["lr"])
        evaluate = (pos.epoch + 1) % self.config.eval_every == 0 or pos.epoch + 1 == phase.epochs
        val_loss = self._validate(*val) if val is not None and evaluate else None
        test_loss = self._validate(*test) if test is not None and evaluate else None
        scored = self._score() if evaluate else dict.fromkeys(self._scores)
        for scheduler in self.schedulers.values():
            scheduler.step()
        stopped = False
        if phase.name == "train" and val_loss is not None:
            if pos.best_val_loss is None or val_loss < pos.best_val_loss:
                pos.best_val_loss, pos.best_epoch, pos.since_best = val_loss, pos.epoch + 1, 0
            else:
                pos.since_best += 1
            patience = self.config.early_stopping_patience
            stopped = patience is not None and pos.since_best >= patience and pos.epoch + 1 < phase.epochs
        row = {"phase": phase.name, "epoch": pos.epoch + 1, "train_loss": figures.pop("loss")}
        row.update(figures)
        row.update({
            "val_loss": val_loss,
            "test_loss": test_loss,
            **scored,
            "best_val_loss": pos.best_val_loss if phase.name == "train" else None,
            "best_epoch": pos.best_epoch if phase.name == "train" else None,
            "lr": lr,
            "skipped_steps": pos.skipped,
            "seconds": pos.seconds + time.perf_counter() - start,
            "stopped_early": stopped,
        })
        self.history.append(row)
        pos.epoch += 1
        pos.step = pos.checked = pos.skipped = pos.reduced = 0
        pos.figures, pos.seconds = None, 0.0
        pos.epoch_rng = self._generator.get_state()
        if stopped or (pos.epoch == phase.epochs and pos.phase + 1 == len(phases)):
            pos.done = True  # the optimizers stay, and their checkpoint: a longer run goes on from them (Trainer.resume)
        elif pos.epoch == phase.epochs:
            self.model.end_phase(phase.name, train)
            pos.phase, pos.epoch, pos.phase_step = pos.phase + 1, 0, 0
            self._new_optimizers()
        self._write_files()

    def _interrupt(self) -> None:
        """Keep the exact position (and save it with ``out_dir``), then raise :class:`KeyboardInterrupt`."""
        pos = self._pos
        self._pending = self._state(self._rank_rng_states())
        saved = ""
        if self.folder is not None:
            if pos.step and self._main:  # at an epoch boundary the checkpoint was just written
                self.folder.save_checkpoint(self._pending)
            saved = f"; the position is saved in {self.folder.checkpoint}"
        if pos.done:
            where = "after the last epoch"
        else:
            name = self._phases()[pos.phase].name
            where = f"at step {pos.step} of {name} epoch {pos.epoch + 1}" if pos.step else f"before {name} epoch {pos.epoch + 1}"
        raise KeyboardInterrupt(
            f"training stopped by {signal.Signals(self._signal).name} {where}{saved}; "
            "call fit again, or Trainer.resume(out_dir).fit(...), to continue"
        )

    # ------------------------------------------------------------------ state, files, signals

    def _state(self, rank_rng: list | None = None) -> dict:
        """Everything a run needs to continue exactly: weights, optimizers, schedules, position, RNG, history.

        ``rank_rng``: with ``W > 1`` ranks, every rank's RNG states (:meth:`_rank_rng_states`), kept as
        ``rng["ranks"]`` beside this rank's own.
        """
        pos = self._pos
        rng = {"torch": torch.get_rng_state(), "batches": pos.epoch_rng.clone()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if rank_rng is not None:
            rng["ranks"] = rank_rng
        return {
            "model_name": self.model_name,
            "model_config": config_to_dict(self.model.config),
            "training_config": dataclasses.asdict(self.config),
            "model_state": self.model.state_dict(),
            "optimizer_states": {group: optimizer.state_dict() for group, optimizer in self.optimizers.items()},
            "scheduler_states": {group: scheduler.state_dict() for group, scheduler in self.schedulers.items()},
            "position": pos.to_dict(),
            "epoch_figures": None if pos.figures is None else pos.figures.cpu(),
            "rng": rng,
            "history": [dict(row) for row in self.history],
        }

    def _restore(self, state: dict, n_train: int, dynamic_binarization: bool) -> None:
        """Continue the run ``state`` (from :meth:`_state`); the model already holds its weights."""
        saved = dict(state["position"])
        if saved["n_train"] != n_train:
            raise InputError(f"this run was trained on {saved['n_train']} images, not {n_train}: pass the same training set to continue it")
        if saved["dynamic_binarization"] != dynamic_binarization:
            raise InputError(f"this run was trained with dynamic_binarization={saved['dynamic_binarization']}: pass the same to continue it")
        saved["figure_names"] = tuple(saved["figure_names"])
        self._check_score_figures(saved["figure_names"])
        self.history = [dict(row) for row in state["history"]]
        self._pos = _Position(**saved, epoch_rng=state["rng"]["batches"].clone())
        if state["epoch_figures"] is not None:
            self._pos.figures = state["epoch_figures"].to(self.device)
        fresh = False  # the current phase starts here, with new optimizers
        if self.config.epochs != state["training_config"]["epochs"]:  # a longer run (Trainer.resume checked it)
            fresh = self._go_on_longer(state)
            self._write_config()
        if self._pos.done:
            return
        self._new_optimizers()
        if not fresh:
            if set(self.optimizers) != set(state["optimizer_states"]):
                raise CheckpointError(f"the checkpoint holds optimizers {sorted(state['optimizer_states'])}, the model has groups {sorted(self.optimizers)}")
            for group, optimizer in self.optimizers.items():
                optimizer.load_state_dict(state["optimizer_states"][group])
            for group, scheduler in self.schedulers.items():
                scheduler.load_state_dict(state["scheduler_states"][group])
        self._pos.reduced = self._pos.step  # a saved epoch's figures are the global ones
        rank, world = self._ranks
        ranks = state["rng"].get("ranks")
        if world > 1 and ranks is not None and len(ranks) == world:  # the same ranks: each continues its own draws
            mine = ranks[rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            return
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if rank > 0:  # another number of processes than the run's: fresh draws, seeded by rank and position
            torch.manual_seed(distributed.rank_seed(self.config.seed, rank, salt=1 + self._pos.phase_step))

    def _go_on_longer(self, state: dict) -> bool:
        """Make the restored position that of a run of ``config.epochs``, more than the run ``state`` had: a finished
        run is not done any more. Returns whether its current phase starts now (no optimizer state to load)."""
        pos, phases = self._pos, self._phases()
        if not pos.done:
            return False
        pos.done = False
        if not self.history:  # it had no epochs to run: the first phase starts
            return True
        if pos.epoch >= phases[pos.phase].epochs:  # its last phase was one before the end-to-end phase, which starts
            pos.phase, pos.epoch, pos.phase_step = pos.phase + 1, 0, 0
            return True
        if not state["optimizer_states"]:
            raise CheckpointError(
                f"{self.folder.checkpoint if self.folder else 'the run'} was finished by a pyrovae that kept no optimizer "
                "state at the end of a run: it cannot go on exactly; train a new run with more epochs"
            )
        return False

    def _rank_rng_states(self) -> list | None:
        """(W > 1) Every rank's RNG states, ``[{"torch": ..., "cuda": ...}, ...]`` in rank order (a collective
        call); ``None`` for one process."""
        if self._ranks[1] == 1:
            return None
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        return distributed.all_gather_objects(mine, group=self._cpu_group)

    def _write_files(self) -> None:
        """The history files and the checkpoint, when there is a run folder (rank 0 writes, every rank calls this)."""
        rank_rng = self._rank_rng_states()
        if self.folder is not None and self._main:
            self.folder.write_history(self.history)
            self.folder.save_checkpoint(self._state(rank_rng))

    @contextmanager
    def _catch_signals(self):
        """Turn SIGINT and SIGTERM into a request to stop at the next step boundary (main thread only).

        With ``W > 1`` ranks the handler only records the signal (``_received``): the stop
        (``_signal``) is decided by :meth:`_agree`, at the same step on every rank. A handler
        setting ``_signal`` itself could run on one rank right after an all-reduce that saw no
        signal, and that rank alone would stop, leaving the others waiting.
        """
        self._signal = self._received = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._ranks[1] > 1:
                self._received = signum
            else:
                self._signal = signum

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
