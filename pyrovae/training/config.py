"""How to train: :class:`TrainingConfig`, and the optimizers and schedules it can name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError

__all__ = ["TrainingConfig", "OPTIMIZERS", "LR_SCHEDULES", "StagedDecay"]

LR_SCHEDULES = (None, "cosine", "step", "iwae")
#: torch.optim classes by lower-case name; LBFGS (needs a closure) and SparseAdam (sparse gradients only) are left out
OPTIMIZERS = {
    name.lower(): cls
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    and cls not in (torch.optim.Optimizer, torch.optim.LBFGS, torch.optim.SparseAdam)
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainingConfig:
    """How to train; every field is checked on construction (an :class:`~pyrovae.errors.InputError` names the problem).

    What a step computes is the model's business (its config: the VAE's ELBO, KL warm-up, ...);
    this is the loop's: time, optimizers and failure.

    epochs:          epochs of end-to-end training (a model may add phases before, see
                     :meth:`pyrovae.models.base.TrainableModel.training_phases`).
    batch_size:      images per step: the global batch. Under torch.distributed the ``W`` processes share
                     each batch (contiguous shards of ``batch_size // W`` or one more images), so a run
                     sees the same batches, and its gradients are those of the same batch means,
                     whatever ``W`` is (see :mod:`pyrovae.training.trainer`).
    lr:              learning rate of every parameter group (a model's config may set a group's own: the AAE's per-phase rates).
    optimizer:       an :data:`OPTIMIZERS` name, any case (``"adam"``, ``"AdamW"``, ``"sgd"``, ...).
    weight_decay:    the optimizer's weight decay (L2 for Adam, decoupled for AdamW).
    optimizer_eps:   the optimizer's ``eps``, where it has one; ``None`` keeps torch's default (Adam: 1e-8).
    lr_schedule:     ``None``; ``"cosine"`` (cosine decay to 0 over the epochs of each phase);
                     ``"step"`` (halve the rate every ``lr_step_epochs`` epochs); ``"iwae"`` (the
                     IWAE paper's stages, :class:`StagedDecay`, fitted to the epochs of each phase).
    grad_clip:       largest global gradient norm of each parameter group, or ``None``.
    eval_every:      validate (and score ``test``) every this many epochs, and after the last epoch of each phase.
    early_stopping_patience: stop after this many validations without a better validation loss (needs ``val``).
    skip_nonfinite:  skip (and count) steps whose loss is NaN or infinite instead of raising
                     :class:`~pyrovae.training.TrainingError`; this reads the loss every step (a device sync on CUDA).
    seed:            seeds torch's global RNG and the batch order when a run starts.
    progress:        show a tqdm bar per epoch with the running loss.
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    optimizer_eps: float | None = None
    lr_schedule: str | None = None
    lr_step_epochs: int = 10
    grad_clip: float | None = None
    eval_every: int = 1
    early_stopping_patience: int | None = None
    skip_nonfinite: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not _is_int(self.epochs) or self.epochs < 0:
            raise InputError(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not _is_number(self.lr) or not 0 < self.lr < math.inf:
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.optimizer, str) and self.optimizer.lower() in ("lbfgs", "sparseadam"):
            raise InputError(
                f"optimizer {self.optimizer!r} is not supported (LBFGS needs a closure, SparseAdam sparse gradients); "
                f"choose from {sorted(OPTIMIZERS)}"
            )
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose from {sorted(OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", self.optimizer.lower())
        if not _is_number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise InputError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if self.optimizer_eps is not None and (not _is_number(self.optimizer_eps) or not 0 < self.optimizer_eps < math.inf):
            raise InputError(f"optimizer_eps must be a positive number or None, got {self.optimizer_eps!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"unknown lr_schedule {self.lr_schedule!r}; choose from {LR_SCHEDULES}")
        if not _is_int(self.lr_step_epochs) or self.lr_step_epochs <= 0:
            raise InputError(f"lr_step_epochs must be a positive integer, got {self.lr_step_epochs!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or not 0 < self.grad_clip < math.inf):
            raise InputError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if not _is_int(self.eval_every) or self.eval_every <= 0:
            raise InputError(f"eval_every must be a positive integer, got {self.eval_every!r}")
        patience = self.early_stopping_patience
        if patience is not None and (not _is_int(patience) or patience <= 0):
            raise InputError(f"early_stopping_patience must be a positive integer or None, got {patience!r}")
        if not _is_int(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


class StagedDecay:
    """The IWAE paper's learning-rate schedule (Burda et al. 2016), fitted to ``epochs`` epochs.

    The paper trains 3^i epochs at ``lr * 10^(-i/7)`` for i = 0..7: 3,280 epochs in all. Here
    stage i takes the same share of ``epochs`` (3^i / 3280 of them, rounded at the stage ends), but
    at least one epoch, so ``epochs=3280`` is the paper's schedule exactly, fewer epochs compress it,
    and the first epoch always runs at ``lr`` itself. With 1,000 epochs the stages take 1, 1, 2, 8,
    25, 74, 222 and 667 epochs; with 10, one epoch each and the last stage three. With fewer epochs
    than the 8 stages, the first ``epochs`` stages run one epoch each and the others none. Called
    with an epoch index (0-based), it returns the factor on ``lr``, as
    ``torch.optim.lr_scheduler.LambdaLR`` wants; its state is the plain attribute ``epochs``, so
    schedulers save and load it.

    Before the one-epoch floor, a stage whose rounded share was no epoch was dropped: with fewer than
    1,641 epochs the run never used ``lr`` itself (1,000 epochs started at ``lr * 10^(-1/7)``, 10 at
    ``lr * 10^(-5/7)``). The committed results of docs/quality.md were trained so; it says what changed.
    """

    STAGES = 8

    def __init__(self, epochs: int):
        self.epochs = epochs

    def stage_ends(self) -> list[int]:
        """The epoch (exclusive) where each stage ends: ``[1, 4, 13, ..., 3280]`` for 3,280 epochs, ``[1, 2, ..., 7, 10]`` for 10."""
        total = (3**self.STAGES - 1) // 2
        ends, end = [], 0
        for i in range(self.STAGES):
            share = round(self.epochs * ((3 ** (i + 1) - 1) // 2) / total)
            end = min(max(share, end + 1), self.epochs)  # at least one epoch for each stage while there are epochs
            ends.append(end)
        return ends

    def __call__(self, epoch: int) -> float:
        stage = next((i for i, end in enumerate(self.stage_ends()) if epoch < end), self.STAGES - 1)
        return 10.0 ** (-stage / 7)
