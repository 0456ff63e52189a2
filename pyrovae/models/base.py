"""What every model offers: the training interface the Trainer uses, and ``encode`` / ``decode``.

Shapes: images ``x`` are ``(B, C, H, W)`` (``C, H, W = config.network.input_shape``), codes
``z`` are ``(B, L)``. ``decode`` returns images in data space (probabilities for a Bernoulli
likelihood or BCE loss, means otherwise), never logits.

**Training interface.** :class:`TrainableModel` is all that :class:`pyrovae.training.Trainer`
knows of a model; adding a model never edits the loop:

* :meth:`~TrainableModel.parameter_groups`: one optimizer per entry, built by the Trainer with
  the training config's optimizer and learning rate (a group may carry its own ``lr``, as in
  torch's per-group dicts);
* :meth:`~TrainableModel.training_phases`: the phases of a run, each with fresh optimizers
  (one phase, ``"train"``, for most models), and :meth:`~TrainableModel.end_phase`, called with the
  training images when a phase ends and another follows (the mixture VAE starts its components there);
* :meth:`~TrainableModel.training_step`: one step on a batch; the model says which losses
  update which group, through ``update(group, compute_loss)``, and the Trainer does the rest
  (zeroing, backward, clipping, gradient averaging across processes, the optimizer's step);
  a loss that is not a mean of per-image terms takes its batch statistics from
  ``update.batch_mean`` (in several processes the batch is split across them);
* :meth:`~TrainableModel.validation_loss`: the loss per example on held-out images;
* :attr:`~TrainableModel.conditional`: whether the model also takes each image's label ``y``.

**Conditional models.** A model of images given their labels (the conditional VAE, which
models log p(x|y)) sets ``conditional = True``. Its ``training_step`` and ``validation_loss``
then take the batch's labels as the keyword argument ``y: (B,)`` (int64 class indices), and
:meth:`~TrainableModel.check_labels` accepts labels it can use. The Trainer checks the labels
of every split with ``check_labels`` before training and slices them with the same permutation as
the images; it refuses to train a conditional model without labels, and labels for any other
(whose ``check_labels`` refuses every label).

A model that needs several optimizers per step (an adversarial autoencoder: reconstruction,
then discriminator, then generator) calls ``update`` once per group, in order.
"""

from __future__ import annotations

import dataclasses
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..likelihoods import check_observations

__all__ = ["TrainableModel", "AutoencoderMixin", "Phase", "Progress", "Update", "config_to_dict", "evaluating"]


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own optimizers: ``epochs`` epochs called ``name``."""

    name: str
    epochs: int


@dataclass(frozen=True)
class Progress:
    """Where a run stands when a step starts.

    num_data:    images in the whole training set (across all processes): the ELBO's scale.
    phase:       the name of the current :class:`Phase`.
    epochs_done: epochs of this phase completed before this step, fractional (KL warm-up reads it).
    num_labelled: images of the whole training set with a label (``>= 0``; -1 marks an unlabelled image), 0 when
                 the run has no training labels: with ``num_data``, the share of a batch that is labelled on average.
    """

    num_data: int
    phase: str = "train"
    epochs_done: float = 0.0
    num_labelled: int = 0


class Update(Protocol):
    """``update(group, compute_loss) -> loss``: one optimizer step of parameter group ``group``.

    ``compute_loss()`` returns the loss per example, a scalar. If it still requires grad, the
    caller runs ``backward``; otherwise ``compute_loss`` has already filled the gradients (as
    Pyro's ``RenyiELBO.loss_and_grads`` does). Gradients of the group are zeroed first. Returns the
    loss, detached.
    """

    def __call__(self, group: str, compute_loss: Callable[[], Tensor]) -> Tensor: ...

    def batch_mean(self, local: Tensor) -> Tensor:
        """The mean over the whole batch of a statistic whose mean over the images of this step's ``x`` is
        ``local`` (any shape): ``local`` itself in one process; under data parallelism, where ``x`` is this
        process's shard, the mean over every shard of the global batch, differentiable so that the
        gradients, once averaged across processes, are one process's. A loss that is a non-linear
        function of a batch mean (free bits, a sparse penalty) takes its mean from here."""
        ...


class TrainableModel:
    """The interface of every model the Trainer trains (see the module docs).

    Subclasses define :meth:`training_step` and :meth:`validation_loss`; the defaults give one
    parameter group, ``"model"``, with all parameters, and one phase.
    """

    #: False: the model is of images alone. True: its ``training_step`` and ``validation_loss`` also
    #: take the batch's labels, ``y: (B,)`` int64, by keyword, and :meth:`check_labels` accepts labels.
    conditional: bool = False

    def check_labels(self, y: Tensor, n: int) -> None:
        """Raise :class:`~pyrovae.errors.InputError` unless ``y`` are labels ``(n,)`` this model takes for ``n`` images.

        A model that is not conditional takes none, so this refuses every ``y``.
        """
        raise InputError(f"a {type(self).__name__} is not conditional: it takes images alone, without labels")

    def requires_labels(self, split: str) -> bool:
        """Whether the Trainer must refuse the split ``split`` (``"train"``, ``"val"`` or ``"test"``) without labels:
        every split of a conditional model; the training split of a semi-supervised one."""
        return self.conditional

    def parameter_groups(self) -> dict[str, list]:
        """Group name -> what a torch optimizer takes: parameters, or torch's per-group dicts."""
        return {"model": list(self.parameters())}

    def training_phases(self, epochs: int) -> list[Phase]:
        """The phases of a run of ``epochs`` end-to-end epochs, in order."""
        return [Phase("train", epochs)]

    def end_phase(self, phase: str, train) -> None:
        """Called by the Trainer after the last epoch of the phase named ``phase`` when another phase follows, with the
        training images ``train`` (an :class:`~pyrovae.data.ImageSet`, ``(N, C, H, W)``), before the checkpoint of
        that epoch is written (so a resumed run starts the next phase from what this did). Does nothing by default.
        Under torch.distributed every process calls it with the same images: it must come to the same result."""

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor | float]:
        """Train on the batch ``x: (B, C, H, W)``; return the step's figures, ``"loss"`` (per example) first.

        Every figure (a scalar tensor or float) becomes a column of the history, averaged over
        the epoch's images. A conditional model also takes ``y: (B,)``, the batch's labels.
        """
        raise NotImplementedError

    def validation_loss(self, x: Tensor) -> Tensor:
        """The loss per example on ``x: (B, C, H, W)`` (and ``y: (B,)`` for a conditional model), a scalar;
        called in eval mode without gradients."""
        raise NotImplementedError


class AutoencoderMixin(TrainableModel):
    """Shared interface of the VAE and the deterministic autoencoders.

    Subclasses set ``config`` (a frozen dataclass with a ``network`` field) and ``support``
    (the constraint input pixels must satisfy), and define ``encode`` and ``decode``.
    """

    config: object
    support: object = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.config.network.input_shape

    @property
    def latent_dim(self) -> int:
        return self.config.network.latent_dim

    @property
    def device(self) -> torch.device:
        """Where the parameters (or buffers) are; the CPU for a model with neither (a fixed, hand-built one)."""
        tensor = self._first_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' (or buffers') dtype; torch's default for a model with neither."""
        tensor = self._first_tensor()
        return tensor.dtype if tensor is not None else torch.get_default_dtype()

    def _first_tensor(self) -> Tensor | None:
        return next(itertools.chain(self.parameters(), self.buffers()), None)

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`~pyrovae.errors.InputError` unless ``x`` is a finite batch ``(B, C, H, W)`` in the support, of the model's dtype."""
        check_observations(x, self.input_shape, self.support)
        dtype = self.dtype
        if x.dtype != dtype:
            raise InputError(f"the images are {x.dtype} but the model computes in {dtype}: convert them with x.to({dtype})")

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(B, C, H, W) -> (B, L)``."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(B, L) -> (B, C, H, W)`` in data space."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: decode the code of ``x``."""
        return self.decode(self.encode(x))


def config_to_dict(config) -> dict:
    """A plain, JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


@contextmanager
def evaluating(*models):
    """Inside, every model given (those that are ``nn.Module``) is in eval mode: dropout is off and
    the results are deterministic; after, each is back in the mode it was in."""
    modes = [(model, model.training) for model in models if isinstance(model, nn.Module)]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)
