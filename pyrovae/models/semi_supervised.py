"""The semi-supervised VAE M2 (Kingma, Rezende, Mohamed and Welling 2014) as a Pyro program, the label
summed out exactly where it is missing.

Generative model, for each image of a batch::

    y ~ p(y) = Categorical(1/K)                 the class, observed for a labelled image
    z ~ p(z)                                   any pyrovae prior (``config.prior``), the style
    x ~ p(x | decoder([z, onehot(y)]))          the shared decoder, fed z and the one-hot class

Guide (amortised)::

    y ~ q(y | x) = Categorical(classifier(x))    the shared encoder with K outputs; infer={"enumerate": "parallel"}
    z ~ q(z | x, y) = Normal(encoder([x, onehot(y)]))    the shared encoder widened for the one-hot class

The guide's ``y`` is marked for parallel enumeration, so ``TraceEnum_ELBO(max_plate_nesting=1)`` sums it
over its K values exactly instead of sampling it: ``y`` is then ``arange(K)`` shaped ``(K, 1)`` (a dim
left of the plate over images), ``z`` is drawn once per class, ``(K, B, L)``, and the ELBO of an
unlabelled image is ``sum_y q(y|x) [log p(x, y, z_y) - log q(z_y | x, y)] + H[q(y|x)]``. Under an ELBO
that does not enumerate (``Trace_ELBO``, ``Predictive``) the same guide samples ``y``. Given labels
``y: (B,)``, model and guide take them as observed and the guide has no ``y`` site (Pyro's own M2
example runs labelled and unlabelled batches the same way). A user's ``config_enumerate(model)``
makes the model's ``y`` enumerable too, for ``infer_discrete``.

q(z | x, y) rather than q(z | x): the style of an image may then differ with the class it is read
as, and the NLL sums y inside each importance weight with the proposal that fits each class.

**Parameters** follow the VAE's rule (see :mod:`pyrovae.models.vae`): each M2 has its own ``name``
(default ``"m2"``, ``"m2_1"``, ...) and declares its parts as ``pyro.module(f"{name}.classifier", ...)``,
``.encoder``, ``.decoder``, ``.likelihood``, ``.prior``.

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
plate's minibatch scale), so the two ELBO terms are unbiased estimates of J's. The classification
term is unbiased too: each labelled image of the batch stands for N/(B N_l) of ``E_labelled``, with
N_l the labelled images of the training set (``Progress.num_labelled``). Per image (J / N) the
step's loss is therefore::

    (sum over the batch of its -ELBO) / B + alpha * (N / N_l) * (sum over its labelled images of -log q(y|x)) / B

With few labels most batches hold none and the few that do weigh more (100 labels among 60,000
images, batches of 100: 15% of the batches hold one, each weighing 6 times alpha); the
expectation over batches is the paper's objective whatever the share. The Trainer's loop is
untouched: it is the model's step.

The validation loss scores the images it is given the same way, without the classification term:
with no labels (or all ``-1``) it is the negative ELBO of log p(x), comparable with a VAE's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.util import is_validation_enabled
from torch import Tensor

from ..errors import InputError
from ..likelihoods import make_likelihood, outputs_per_value
from ..nets import ConvEncoder, MLPEncoder, NetworkConfig, build_decoder
from ..priors import check_prior, make_prior
from .base import AutoencoderMixin, Progress, Update
from .cvae import _conditional_encoder
from .discrete import build_enum_elbo, check_num_classes, enumerated_loss
from .vae import VAEConfig, _check_likelihood, _claim_name, _declare_parts, _images_plate, _is_int, _kl_weight_set, _scaled, _warmed_up_kl_weight

__all__ = ["SemiSupervisedVAE", "M2Config", "UNLABELLED", "balanced_label_draw"]

#: the label of an image whose class is not given
UNLABELLED = -1


@dataclass(frozen=True)
class M2Config(VAEConfig):
    """M2 and its objective: the fields of :class:`~pyrovae.models.vae.VAEConfig` it takes (network, prior,
    likelihood, beta, num_particles, kl_warmup_epochs), and

    num_classes: K >= 2, the classes; labels are ``0, ..., K - 1`` (``-1``: unlabelled).
    alpha:       the weight of the classification loss ``alpha * N * E_labelled[-log q(y|x)]`` (the paper's 0.1).

    The objective is Pyro's ``TraceEnum_ELBO`` (``elbo="trace"``) with ``num_particles`` draws of z per class;
    q(z|x, y) is a diagonal Gaussian (``posterior="gaussian"``); free bits are not offered (their loss does not
    enumerate); the VampPrior is not (its q(z|u) at pseudo-images has no label).
    """

    num_classes: int = 10
    alpha: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_num_classes(self.num_classes)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise InputError(f"alpha must be a non-negative number, got {self.alpha!r}")
        if self.elbo != "trace":
            raise InputError(f"M2 trains on TraceEnum_ELBO, its label summed out where missing (elbo='trace'), got elbo={self.elbo!r}")
        if self.posterior != "gaussian":
            raise InputError(f"M2's q(z|x, y) is a diagonal Gaussian: posterior='gaussian', got {self.posterior!r}")
        if self.free_bits:
            raise InputError("free bits floor a sampled ELBO's KL terms; M2, its label enumerated, takes none (free_bits=0)")
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


def _classifier(network: NetworkConfig, k: int):
    """q(y|x)'s network: the shared encoder of ``network`` with K outputs, the logits ``(B, K)``."""
    if network.conv:
        return ConvEncoder(network.input_shape, k, network.activation, depth=network.conv_depth, dropout=network.dropout)
    return MLPEncoder(network.input_shape, k, network.hidden, network.activation, dropout=network.dropout, tanh_init=network.tanh_init)


class SemiSupervisedVAE(AutoencoderMixin, PyroModule):
    """M2 (see the module docs): images ``x: (B, C, H, W)``, labels ``y: (B,)`` with ``-1`` where missing.

    ``prior`` and ``likelihood`` default to what ``config`` names; pass your own (as for the VAE) to replace
    them. The decoder takes :meth:`decoder_input`, ``(..., L + K)``. ``name`` prefixes its parameters' names.
    """

    #: its classes are the labels' (evaluation reports accuracy, not a matching of clusters)
    classes_are_labels = True

    def __init__(self, config: M2Config | None = None, *, prior=None, likelihood=None, name: str | None = None):
        name = _claim_name(self, name, "m2")
        super().__init__(name=name)
        self.name = name
        self.config = config = config or M2Config()
        if not isinstance(config, M2Config):
            raise InputError(f"SemiSupervisedVAE needs an M2Config, got {type(config).__name__}")
        net, self.k = config.network, config.num_classes
        self.classifier = _classifier(net, self.k)
        self.encoder = _conditional_encoder(config, 0)  # the CVAE's q(z|x, y) network
        self.likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        self.decoder = build_decoder(dataclasses.replace(net, latent_dim=net.latent_dim + self.k), outputs_per_value(self.likelihood))
        self.prior = prior if prior is not None else make_prior(config.prior, net.latent_dim)
        check_prior(self.prior, net.latent_dim)
        self.kl_weight = float(config.beta)
        self.elbo = build_enum_elbo(config)
        with torch.no_grad():
            z, y = torch.zeros(2, self.latent_dim, device=self.device), torch.zeros(2, dtype=torch.int64, device=self.device)
            _check_likelihood(self.likelihood, self.decoder(self.decoder_input(z, y)), self.input_shape)

    @property
    def num_classes(self) -> int:
        return self.k

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    # ------------------------------------------------------------------ distributions and networks

    def class_prior(self) -> dist.Categorical:
        """p(y) = Categorical(1/K), batch ``()``."""
        return dist.Categorical(logits=torch.zeros(self.k, device=self.device))

    def one_hot(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``y`` of any shape ``S`` as one-hot rows ``(*S, K)``."""
        return F.one_hot(y, self.k).to(dtype)

    def decoder_input(self, z: Tensor, y: Tensor) -> Tensor:
        """``[z, onehot(y)]``, ``(..., B, L + K)``, for ``z: (..., B, L)`` and ``y`` broadcastable with ``(..., B)`` (both expanded)."""
        one_hot = self.one_hot(y.to(z.device), z.dtype)
        shape = torch.broadcast_shapes(z.shape[:-1], y.shape)
        return torch.cat([z.expand(*shape, z.shape[-1]), one_hot.expand(*shape, self.k)], dim=-1)

    def encoder_input(self, x: Tensor, y: Tensor) -> Tensor:
        """What the encoder of q(z|x, y) sees of ``x: (B, C, H, W)`` and ``y: (B,)``: ``(B, D + K)`` for an MLP
        network, ``(B, C + K, H, W)`` (K one-hot planes behind the channels) for a conv network."""
        one_hot = self.one_hot(y.to(x.device), x.dtype)  # (B, K)
        if self.config.network.conv:
            return torch.cat([x, one_hot[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return torch.cat([x.flatten(1), one_hot], dim=1)

    def posterior(self, x: Tensor, y: Tensor) -> dist.Distribution:
        """q(z | x, y) for ``x: (B, C, H, W)`` and classes ``y`` broadcastable to ``(..., B)`` (an enumerated
        ``(K, 1)`` gives every class of every image): Normal with batch shape ``(..., B)``, event ``(L,)``."""
        shape = torch.broadcast_shapes(y.shape, (len(x),))
        flat_y = y.expand(shape).reshape(-1)
        flat_x = x.expand(*shape[:-1], *x.shape).reshape(-1, *x.shape[1:])
        loc, scale = self.encoder(self.encoder_input(flat_x, flat_y))
        return dist.Normal(loc.reshape(*shape, -1), scale.reshape(*shape, -1)).to_event(1)

    def class_logits(self, x: Tensor) -> Tensor:
        """The logits of q(y | x), ``(B, K)``, for ``x: (B, C, H, W)``."""
        return self.classifier(x)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class under q(y | x) of each image of ``x: (B, C, H, W)``: int64 ``(B,)``."""
        return self.class_logits(x).argmax(-1)

    # ------------------------------------------------------------------ the Pyro program

    def _labels(self, y: Tensor | int | None, n: int) -> Tensor | None:
        """``y`` checked as observed classes ``(n,)`` in ``[0, K)`` (an int: that class for every image)."""
        if y is None:
            return None
        if _is_int(y):
            if not 0 <= y < self.k:
                raise InputError(f"the class must lie in [0, {self.k}), got {y}")
            return torch.full((n,), y, dtype=torch.int64, device=self.device)
        if is_validation_enabled():
            if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (n,):
                raise InputError(f"classes must be int64 (n,) = ({n},), got {getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
            if n and (bool(y.min() < 0) or bool(y.max() >= self.k)):
                raise InputError(f"observed classes must lie in [0, {self.k}); the images without a label go to a call without y")
        return y

    def model(self, x: Tensor | None = None, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, y, z) = p(y) p(z) p(x | z, y): scores ``x: (B, C, H, W)`` (with ``y: (B,)`` observed if given), or
        samples images without ``x`` (of the classes ``y`` if given). Returns the images ``(B, C, H, W)``."""
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        elif isinstance(y, Tensor) and y.dim() == 1:
            batch_size = len(y)
        y = self._labels(y, batch_size)
        _declare_parts(self, "decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            y = pyro.sample("y", self.class_prior(), obs=y)  # (B,), or (K, 1) enumerated
            with _scaled(self.kl_weight):
                z = pyro.sample("z", self.prior())  # (B, L), or (K, B, L)
            return pyro.sample("x", self.likelihood(self.decoder(self.decoder_input(z, y))), obs=x)

    def guide(self, x: Tensor, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(y, z | x) = q(y|x) q(z|x, y) for ``x: (B, C, H, W)``, ``y`` marked for parallel enumeration; given
        ``y: (B,)``, q(z | x, y) alone. Returns ``z``."""
        if is_validation_enabled():
            self.check_input(x)
        y = self._labels(y, x.shape[0])
        _declare_parts(self, "classifier", "encoder")
        with _images_plate(x.shape[0], num_data, x.device):
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=self.class_logits(x)), infer={"enumerate": "parallel"})
            with _scaled(self.kl_weight):
                return pyro.sample("z", self.posterior(x, y))

    # ------------------------------------------------------------------ labels and training

    def check_labels(self, y: Tensor, n: int) -> None:
        """Raise :class:`InputError` unless ``y`` are int64 labels ``(n,)`` in ``[0, K)``, or ``-1`` for an unlabelled image."""
        if not isinstance(y, Tensor) or y.dtype != torch.int64:
            raise InputError(f"labels must be an int64 tensor of classes (-1: unlabelled), got {getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != (n,):
            raise InputError(f"labels must be one per image, shape ({n},), got {tuple(y.shape)}")
        if n and (bool(y.min() < UNLABELLED) or bool(y.max() >= self.k)):
            raise InputError(f"labels must be classes in [0, {self.k}) or -1 (unlabelled), got values from {int(y.min())} to {int(y.max())}")

    def requires_labels(self, split: str) -> bool:
        """Training needs the labels (``-1`` for each unlabelled image); validation and test score log p(x) without them."""
        return split == "train"

    def _split_losses(self, x: Tensor, y: Tensor | None, num_data: int | None) -> tuple[Tensor, Tensor]:
        """The negative ELBO of the batch ``x: (B, C, H, W)`` summed over images and divided by B (labelled images
        with y observed, the others with y enumerated), and the sum of ``-log q(y|x)`` over the labelled images
        divided by B (0 without any)."""
        n = len(x)
        labelled = torch.zeros(n, dtype=torch.bool, device=x.device) if y is None else y >= 0
        loss = torch.zeros((), device=x.device)
        count = int(labelled.sum())
        classification = torch.zeros((), device=x.device)
        if count:
            x_l, y_l = x[labelled], y[labelled]
            loss = loss + enumerated_loss(self, x_l, num_data, y=y_l) * (count / n)
            classification = F.cross_entropy(self.class_logits(x_l), y_l, reduction="sum") / n
        if count < n:
            x_u = x if count == 0 else x[~labelled]
            loss = loss + enumerated_loss(self, x_u, num_data) * ((n - count) / n)
        return loss, classification

    def training_step(self, x: Tensor, update: Update, progress: Progress, y: Tensor | None = None) -> dict[str, Tensor | float]:
        """One step of M2's objective on ``x: (B, C, H, W)`` and its labels ``y: (B,)`` (``-1``: unlabelled), the batch
        standing for ``progress.num_data`` images of which ``progress.num_labelled`` are labelled (see the module docs).
        Figures: ``loss`` (per image, the ELBO's part plus the classification term) and ``kl_weight``. Under
        torch.distributed the classification term's sum is over the whole batch (``update.batch_mean``), as one
        process computes it."""
        if y is None:
            raise InputError("M2 learns from labelled and unlabelled images: pass train_labels, -1 for each image without a label")
        if progress.num_labelled <= 0 and bool((y >= 0).any()):
            raise InputError("this batch holds labelled images but Progress.num_labelled is 0: it must count the training set's labelled images")
        weight = _warmed_up_kl_weight(self.config, progress)
        share = progress.num_data / max(progress.num_labelled, 1)  # N / N_l: what a labelled image of the batch stands for

        def loss():
            elbo_part, classification = self._split_losses(x, y, progress.num_data)
            return elbo_part + self.config.alpha * share * update.batch_mean(classification)

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

    def encode(self, x: Tensor) -> Tensor:
        """The code ``(B, L)`` of ``x: (B, C, H, W)``: the mean of q(z | x, y) at the most probable class of q(y|x)."""
        return self.posterior(x, self.class_logits(x).argmax(-1)).mean

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
