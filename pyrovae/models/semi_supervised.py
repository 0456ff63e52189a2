"""The semi-supervised VAE M2 (Kingma, Rezende, Mohamed and Welling 2014) as a Pyro program, the label
summed out exactly where it is missing.

Generative model, for each image of a batch::

    y ~ p(y) = Categorical(1/K)                 the class, observed for a labelled image
    z ~ p(z)                                   any pyrovae prior (``config.prior``), the style
    x ~ p(x | decoder([z, onehot(y)]))          the shared decoder, fed z and the one-hot class

Guide: ``y ~ q(y|x)`` (a classifier network, the shared encoder with K outputs; enumerated) and
``z ~ q(z | x, y)`` (the shared encoder fed ``[x, onehot(y)]``); see :mod:`pyrovae.models.discrete`.

**Labels.** ``y: (B,)`` int64, a class in ``[0, K)`` for a labelled image and ``-1`` for an
unlabelled one (:data:`UNLABELLED`); :meth:`SemiSupervisedVAE.check_labels` accepts these, so the
Trainer hands each batch's labels to the step (``Trainer.fit(train, train_labels=y, ...)``). The model
is of images (``conditional`` is False): its ELBO and NLL are of log p(x), the class summed out.
:func:`balanced_label_draw` keeps N labels of a labelled training set, N/K per class, with a seeded draw.

**The objective** (the paper's eq. 9), over a training set of N images of which N_l are labelled::

    J = sum_labelled -ELBO(x, y) + sum_unlabelled -ELBO(x) + alpha * N * E_labelled[-log q(y|x)]

with ``-ELBO(x, y)`` the bound on -log p(x, y) (y observed, no y site in the guide) and ``-ELBO(x)``
the bound on -log p(x) with y enumerated (``TraceEnum_ELBO``). ``alpha`` is ``config.alpha``
(the paper's 0.1).

**How a step mixes labelled and unlabelled images.** A step takes the Trainer's batch as it comes,
a uniform draw of B training images: its labelled images (``y >= 0``) are scored with y observed,
its unlabelled ones with y enumerated, each image standing for N/B of the training set (the
plate's minibatch scale), so the two ELBO terms are unbiased estimates of J's; the classification
term is ``alpha * N`` times the mean of ``-log q(y|x)`` over the batch's labelled images, and is
absent from a step whose batch holds none. Per image (J / N) the step's loss is therefore
``(sum over the batch of its -ELBO) / B + alpha * mean_labelled(-log q(y|x))``. With few labels
many batches hold none (100 labels among 50,000 images: about 40% of batches of 256 hold one), so
the classification term acts on fewer steps than the ELBO; raise ``alpha`` to compensate. The
Trainer's loop is untouched: it is the model's step.

The validation loss scores the images it is given the same way, without the classification term:
with no labels (or all ``-1``) it is the negative ELBO of log p(x), comparable with a VAE's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..nets import build_decoder
from ..priors import check_prior, make_prior
from .base import Progress, Update
from .discrete import DiscreteLatentVAE, DiscreteVAEConfig, check_num_classes, enumerated_loss
from .vae import _is_int, _kl_weight_set, _warmed_up_kl_weight

__all__ = ["SemiSupervisedVAE", "M2Config", "UNLABELLED", "balanced_label_draw"]

#: the label of an image whose class is not given
UNLABELLED = -1


@dataclass(frozen=True)
class M2Config(DiscreteVAEConfig):
    """M2 and its objective: the fields of :class:`~pyrovae.models.discrete.DiscreteVAEConfig` (network, prior,
    likelihood, beta, num_particles, kl_warmup_epochs), and

    num_classes: K >= 2, the classes; labels are ``0, ..., K - 1`` (``-1``: unlabelled).
    alpha:       the weight of the classification loss ``alpha * N * E_labelled[-log q(y|x)]`` (the paper's 0.1).
    """

    num_classes: int = 10
    alpha: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_num_classes(self.num_classes)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise InputError(f"alpha must be a non-negative number, got {self.alpha!r}")
        if self.prior == "vamp":
            raise InputError("the VampPrior mixes q(z|u) at pseudo-images u, but M2's q(z|x, y) also needs a label: choose another prior")


def balanced_label_draw(labels: Tensor, num_labels: int, num_classes: int, seed: int) -> Tensor:
    """The indices ``(num_labels,)``, ascending, of the images whose labels are kept: ``num_labels / K`` of
    each class of ``labels: (N,)`` (int64 in ``[0, K)``), drawn without replacement by a generator seeded with ``seed``.

    Raises :class:`InputError` unless ``num_labels`` is a positive multiple of K that every class can give.
    """
    if not _is_int(num_labels) or num_labels <= 0:
        raise InputError(f"the number of labels to keep must be a positive integer, got {num_labels!r}")
    if num_labels > len(labels):
        raise InputError(f"cannot keep {num_labels} labels of a training set of {len(labels)} images")
    if num_labels % num_classes:
        raise InputError(
            f"{num_labels} labels do not divide across {num_classes} classes: choose a multiple of {num_classes} "
            f"(e.g. {num_labels - num_labels % num_classes or num_classes})"
        )
    per_class = num_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    kept = []
    for k in range(num_classes):
        members = (labels == k).nonzero().squeeze(1)
        if len(members) < per_class:
            raise InputError(f"class {k} has {len(members)} images in the training set, fewer than the {per_class} labels per class asked for")
        kept.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(kept).sort().values


class SemiSupervisedVAE(DiscreteLatentVAE):
    """M2 (see the module docs): images ``x: (B, C, H, W)``, labels ``y: (B,)`` with ``-1`` where missing.

    ``prior`` and ``likelihood`` default to what ``config`` names; pass your own (as for the VAE) to replace
    them. The decoder takes :meth:`decoder_input`, ``(..., L + K)``. ``name`` prefixes its parameters' names.
    """

    site = "y"
    _name_prefix = "m2"
    #: its classes are the labels' (evaluation reports accuracy, not a matching of clusters)
    classes_are_labels = True
    _model_parts = ("decoder", "likelihood", "prior")

    def __init__(self, config: M2Config | None = None, *, prior=None, likelihood=None, name: str | None = None):
        config = config or M2Config()
        if not isinstance(config, M2Config):
            raise InputError(f"SemiSupervisedVAE needs an M2Config, got {type(config).__name__}")
        net = config.network
        decoder = build_decoder(dataclasses.replace(net, latent_dim=net.latent_dim + config.num_classes))
        super().__init__(config, config.num_classes, decoder, likelihood=likelihood, name=name)
        self.prior = prior if prior is not None else make_prior(config.prior, net.latent_dim)
        check_prior(self.prior, net.latent_dim)
        self._check_networks()

    @property
    def num_classes(self) -> int:
        return self.k

    # ------------------------------------------------------------------ the distributions

    def class_prior(self) -> dist.Categorical:
        """p(y) = Categorical(1/K)."""
        return dist.Categorical(logits=torch.zeros(self.k, device=self.device))

    def code_prior(self, y: Tensor):
        """p(z), the same for every class."""
        return self.prior()

    def decoder_input(self, z: Tensor, y: Tensor) -> Tensor:
        """``[z, onehot(y)]``, ``(..., B, L + K)``, for ``z: (..., B, L)`` and ``y`` broadcastable with ``(..., B)`` (both expanded)."""
        one_hot = self.one_hot(y.to(z.device), z.dtype)
        shape = torch.broadcast_shapes(z.shape[:-1], y.shape)
        return torch.cat([z.expand(*shape, z.shape[-1]), one_hot.expand(*shape, self.k)], dim=-1)

    # ------------------------------------------------------------------ labels and training

    def check_labels(self, y: Tensor, n: int) -> None:
        """Raise :class:`InputError` unless ``y`` are int64 labels ``(n,)`` in ``[0, K)``, or ``-1`` for an unlabelled image."""
        if not isinstance(y, Tensor) or y.dtype != torch.int64:
            raise InputError(f"labels must be an int64 tensor of classes (-1: unlabelled), got {getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != (n,):
            raise InputError(f"labels must be one per image, shape ({n},), got {tuple(y.shape)}")
        if n and (bool(y.min() < UNLABELLED) or bool(y.max() >= self.k)):
            raise InputError(f"labels must be classes in [0, {self.k}) or -1 (unlabelled), got values from {int(y.min())} to {int(y.max())}")

    def _split_losses(self, x: Tensor, y: Tensor | None, num_data: int | None) -> tuple[Tensor, Tensor | None]:
        """The negative ELBO of the batch ``x: (B, C, H, W)`` summed over images and divided by B (labelled images
        with y observed, the others with y enumerated), and the mean ``-log q(y|x)`` of the labelled ones (``None`` without)."""
        n = len(x)
        labelled = torch.zeros(n, dtype=torch.bool, device=x.device) if y is None else y >= 0
        loss, classification = 0.0, None
        count = int(labelled.sum())
        if count:
            x_l, y_l = x[labelled], y[labelled]
            loss = loss + enumerated_loss(self, x_l, num_data, y=y_l) * (count / n)
            classification = F.cross_entropy(self.class_logits(x_l), y_l)
        if count < n:
            x_u = x if count == 0 else x[~labelled]
            loss = loss + enumerated_loss(self, x_u, num_data) * ((n - count) / n)
        return loss, classification

    def training_step(self, x: Tensor, update: Update, progress: Progress, y: Tensor | None = None) -> dict[str, Tensor | float]:
        """One step of M2's objective on ``x: (B, C, H, W)`` and its labels ``y: (B,)`` (``-1``: unlabelled), the batch
        standing for ``progress.num_data`` images (see the module docs). Figures: ``loss`` (per image, the ELBO's
        part plus ``alpha`` times the labelled images' mean ``-log q(y|x)``) and ``kl_weight``."""
        if y is None:
            raise InputError("M2 learns from labelled and unlabelled images: pass train_labels, -1 for each image without a label")
        weight = _warmed_up_kl_weight(self.config, progress)

        def loss():
            elbo_part, classification = self._split_losses(x, y, progress.num_data)
            return elbo_part if classification is None else elbo_part + self.config.alpha * classification

        with _kl_weight_set(self, weight):
            value = update("model", loss)
        return {"loss": value, "kl_weight": weight}

    def validation_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The negative ELBO per image on ``x: (B, C, H, W)``: of log p(x, y) for images labelled in ``y: (B,)``, of
        log p(x) (y summed out) for the others (all of them without ``y``); with the full KL weight."""
        return self._split_losses(x, y, None)[0].detach()

    # ------------------------------------------------------------------ using a trained model

    def decode(self, z: Tensor, y: Tensor | int) -> Tensor:
        """The mean of p(x | z, y), ``(B, C, H, W)``, for ``z: (B, L)`` and classes ``y: (B,)`` (or one int for all)."""
        y = self._labels(y, len(z))
        return self.likelihood(self.decoder(self.decoder_input(z, y))).mean

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: decode the code of ``x`` (:meth:`encode`) with its most probable class."""
        return self.decode(self.encode(x), self.classify(x))

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | int | None = None) -> Tensor:
        """``n`` images ``(n, C, H, W)``: means of p(x | z, y) for z from the prior and ``y: (n,)`` (an int: that class
        for all; ``None``: drawn from p(y))."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        if y is None:
            y = self.class_prior().sample((n,))
        return self.decode(self.prior().sample((n,)).to(self.device), y)

    @torch.no_grad()
    def analogies(self, x: Tensor) -> Tensor:
        """The paper's analogies: the style z of each image of ``x: (B, C, H, W)`` (the mean of q(z | x, y) at its
        most probable class) decoded with every class: ``(K, B, C, H, W)``, row k of class k."""
        z = self.encode(x)
        return torch.stack([self.decode(z, k) for k in range(self.k)])
