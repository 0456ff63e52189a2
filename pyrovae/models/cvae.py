"""The conditional VAE (Kingma et al. 2014; Sohn et al. 2015) as a Pyro program: ``model(x=None, y, ...)``
and ``guide(x, y, ...)``, a model of images given their labels.

Generative model, for each of the B images of a batch and its label ``y`` (one of K classes)::

    z ~ p(z)                              prior, event shape (L,), the same for every class
    x ~ p(x | decoder([z, onehot(y)]))    likelihood, event shape (C, H, W); observed when x is given

Guide (amortised variational posterior)::

    z ~ q(z | encoder([x, onehot(y)]))     Normal(loc, scale) by default, or a flow (config.posterior)

The label is observed in both, as an argument rather than a sample site: the model has no p(y),
so its ELBO is a bound on ``log p(x | y)`` and every figure of :mod:`pyrovae.evaluation` for a
CVAE is conditional on the labels. Without ``x`` the model generates images of the given classes::

    Predictive(cvae.model, num_samples=16)(y=torch.tensor([0, 1, 2]))   # x: (16, 3, C, H, W)

**How the label enters the shared networks** (:mod:`pyrovae.nets`, built with sizes widened by
K = ``config.num_classes``): the decoder is the one of ``config.network`` with latent size
``L + K``, fed ``[z, onehot(y)]``. The encoder of an MLP network is the shared MLP encoder with
``D + K`` inputs (``D = C * H * W``), fed ``[x.flatten(1), onehot(y)]``; that of a conv network is
the shared conv encoder with ``C + K`` channels, fed ``x`` with K constant planes ``onehot(y)``
stacked behind its channels. :meth:`CVAE.encoder_input` and :meth:`CVAE.decoder_input` build these
inputs; a user's ``encoder`` or ``decoder`` takes them.

The prior and the likelihood are swappable as in :class:`~pyrovae.models.vae.VAE` (any pyrovae
prior or likelihood object, or a user's), and so are the ELBO, ``num_particles``, beta and KL
warm-up. **Parameters** follow the VAE's rule exactly (see :mod:`pyrovae.models.vae`): each CVAE
has its own ``name``, by default ``"cvae"``, ``"cvae_1"``, ..., never one a live VAE or CVAE has,
and declares its parts as ``pyro.module(f"{name}.decoder", ...)`` and so on.

Labels ``y`` are int64 class indices ``(B,)`` in ``[0, K)``; where a batch of one class is meant
(the model, :meth:`CVAE.sample`), a plain ``int`` stands for that class for every image.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.util import is_validation_enabled
from torch import Tensor

from ..errors import InputError
from ..likelihoods import make_likelihood, outputs_per_value
from ..nets import ConvEncoder, MLPEncoder, NetworkConfig, build_decoder
from ..posteriors import make_posterior, point_estimate
from .base import AutoencoderMixin, Progress, Update
from .vae import (
    VAEConfig,
    _check_likelihood,
    _check_posterior,
    _claim_name,
    _declare_parts,
    _elbo_loss,
    _images_plate,
    _is_int,
    _kl_weight_set,
    _scaled,
    _set_prior_likelihood_objective,
    _warmed_up_kl_weight,
)

__all__ = ["CVAE", "CVAEConfig", "CVAE_LATENT_DIM"]

#: the CVAE's default code size (see :class:`CVAEConfig`)
CVAE_LATENT_DIM = 2


@dataclass(frozen=True)
class CVAEConfig(VAEConfig):
    """The conditional VAE and its training objective: every field of :class:`~pyrovae.models.vae.VAEConfig`
    (network, prior, likelihood, beta, elbo, num_particles, kl_warmup_epochs), and

    num_classes: K, the number of classes; labels are ``0, ..., K - 1``.

    The code is small by default, :data:`CVAE_LATENT_DIM` = 2: the label carries the class, so z
    needs only the style (slant, width, thickness). A large code learns to carry the class as well
    (the encoder sees the image), and samples of one label then come out as other digits: on MNIST
    after 10 epochs (batch 256), a classifier recognised the requested digit in 99% of samples with
    a code of 2, 94% with 4, 88% with 6, 73% with 10 and 59% with 50
    (``examples/conditional_samples.py``). Set ``network.latent_dim`` for a better likelihood.
    """

    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(latent_dim=CVAE_LATENT_DIM))
    num_classes: int = 10

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.num_classes) or self.num_classes <= 0:
            raise InputError(f"num_classes must be a positive integer, got {self.num_classes!r}")


def _conditional_encoder(config: CVAEConfig, context_dim: int):
    """The shared encoder of ``config.network`` (a config with ``network`` and ``num_classes``: the CVAE's, M2's)
    widened for the one-hot label: ``D + K`` inputs (MLP) or
    ``C + K`` channels (conv); returns ``(loc, scale)``, each ``(B, L)``, and a context ``(B, context_dim)`` if any."""
    net, k = config.network, config.num_classes
    options = dict(gaussian=True, dropout=net.dropout, context_dim=context_dim)
    if net.conv:
        c, h, w = net.input_shape
        return ConvEncoder((c + k, h, w), net.latent_dim, net.activation, depth=net.conv_depth, **options)
    return MLPEncoder((math.prod(net.input_shape) + k,), net.latent_dim, net.hidden, net.activation, tanh_init=net.tanh_init, **options)


class CVAE(AutoencoderMixin, PyroModule):
    """A conditional VAE whose ``model`` and ``guide`` are Pyro programs over images ``x: (B, C, H, W)``
    given their labels ``y: (B,)`` (see the module docs).

    ``prior``, ``likelihood``, ``encoder`` and ``decoder`` default to what ``config`` names; pass
    your own to replace them. The encoder takes :meth:`encoder_input` and returns ``(loc, scale)``,
    each ``(B, L)``; the decoder takes :meth:`decoder_input`, ``(..., L + K)``, and returns
    ``(..., C, H, W)`` (``(..., P * C, H, W)`` for a likelihood with ``outputs_per_value = P``). ``name`` prefixes
    the names of its parameters in Pyro's param store.
    """

    #: training steps and validation losses take the batch's labels ``y`` (see :mod:`pyrovae.models.base`)
    conditional = True

    def __init__(
        self, config: CVAEConfig | None = None, *, prior=None, likelihood=None, posterior=None, encoder=None, decoder=None, name: str | None = None
    ):
        name = _claim_name(self, name, "cvae")
        super().__init__(name=name)
        self.name = name
        self.config = config = config or CVAEConfig()
        if not isinstance(config, CVAEConfig):
            raise InputError(f"CVAE needs a CVAEConfig, got {type(config).__name__}")
        net = config.network
        self.posterior = posterior if posterior is not None else make_posterior(config.posterior, net.latent_dim, config.flow_layers)
        self.encoder = encoder if encoder is not None else _conditional_encoder(config, getattr(self.posterior, "context_dim", 0))
        likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        widened = dataclasses.replace(net, latent_dim=net.latent_dim + config.num_classes)
        self.decoder = decoder if decoder is not None else build_decoder(widened, outputs_per_value(likelihood))
        _set_prior_likelihood_objective(self, config, prior, likelihood, net.latent_dim)
        with torch.no_grad():
            z, y = torch.zeros(2, self.latent_dim, device=self.device), torch.zeros(2, dtype=torch.int64, device=self.device)
            x = torch.zeros(2, *self.input_shape, device=self.device)
            _check_posterior(self.posterior, self.encoder(self.encoder_input(x, y)), self.latent_dim)
            _check_likelihood(self.likelihood, self.decoder(self.decoder_input(z, y)), self.input_shape)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    # ------------------------------------------------------------------ labels

    def check_labels(self, y: Tensor, n: int) -> None:
        """Raise :class:`~pyrovae.errors.InputError` unless ``y`` are int64 class indices ``(n,)`` in ``[0, K)``."""
        if not isinstance(y, Tensor):
            raise InputError(f"labels must be a tensor of int64 class indices, got {type(y).__name__}")
        if y.dtype != torch.int64:
            raise InputError(f"labels must be int64 class indices, got {y.dtype}: convert them with y.long()")
        if tuple(y.shape) != (n,):
            raise InputError(f"labels must be one per image, shape ({n},), got {tuple(y.shape)}")
        if n and (bool(y.min() < 0) or bool(y.max() >= self.num_classes)):
            raise InputError(
                f"labels must be class indices in [0, {self.num_classes}) (num_classes={self.num_classes}), "
                f"got values from {int(y.min())} to {int(y.max())}"
            )

    def _labels(self, y, n: int, check: bool = True) -> Tensor:
        """``y`` as labels ``(n,)``: the tensor ``y`` (checked if ``check``), or the class ``y`` (an int) for each image."""
        if y is None:
            raise InputError("a CVAE models images given their labels: pass y, the class of each image (or one int class for all)")
        if _is_int(y):
            if not 0 <= y < self.num_classes:
                raise InputError(f"the class must lie in [0, {self.num_classes}), got {y}")
            return torch.full((n,), y, dtype=torch.int64, device=self.device)
        if check:
            self.check_labels(y, n)
        return y

    def encoder_input(self, x: Tensor, y: Tensor) -> Tensor:
        """What the encoder sees of ``x: (B, C, H, W)`` and ``y: (B,)``: ``(B, D + K)`` for an MLP network,
        ``(B, C + K, H, W)`` (K one-hot planes behind the channels) for a conv network."""
        one_hot = F.one_hot(y.to(x.device), self.num_classes).to(x.dtype)  # (B, K)
        if self.config.network.conv:
            return torch.cat([x, one_hot[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return torch.cat([x.flatten(1), one_hot], dim=1)

    def decoder_input(self, z: Tensor, y: Tensor) -> Tensor:
        """What the decoder sees of ``z: (..., B, L)`` and ``y: (B,)``: ``[z, onehot(y)]``, ``(..., B, L + K)``."""
        one_hot = F.one_hot(y.to(z.device), self.num_classes).to(z.dtype)  # (B, K)
        return torch.cat([z, one_hot.expand(*z.shape[:-1], self.num_classes)], dim=-1)

    # ------------------------------------------------------------------ the Pyro program

    def model(self, x: Tensor | None = None, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, z | y) = p(z) p(x | z, y): scores ``x: (B, C, H, W)`` given ``y: (B,)``, or samples images without it.

        Without ``x``: one image per label of ``y: (B,)``, or ``batch_size`` images of the class ``y`` (an int).
        ``num_data``: the size of the dataset the batch stands for (default: the batch itself).
        Returns the images, ``(B, C, H, W)`` (``x`` itself when given).
        """
        validate = is_validation_enabled()
        if x is not None:
            if validate:
                self.check_input(x)
            batch_size = x.shape[0]
        elif isinstance(y, Tensor) and y.dim() == 1:
            batch_size = len(y)
        y = self._labels(y, batch_size, check=validate)
        _declare_parts(self, "decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            with _scaled(self.kl_weight):
                z = pyro.sample("z", self.prior())  # (B, L)
            out = self.decoder(self.decoder_input(z, y))  # (B, C, H, W)
            return pyro.sample("x", self.likelihood(out), obs=x)

    def guide(self, x: Tensor, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(z | x, y) = posterior(encoder(x, y)), by default Normal(loc, scale), for ``x: (B, C, H, W)`` and ``y: (B,)``; returns ``z: (B, L)``."""
        validate = is_validation_enabled()
        if validate:
            self.check_input(x)
        y = self._labels(y, x.shape[0], check=validate)
        _declare_parts(self, "encoder", "posterior")
        with _images_plate(x.shape[0], num_data, x.device):
            q = self.posterior(*self.encoder(self.encoder_input(x, y)))  # batch (B,), event (L,)
            with _scaled(self.kl_weight):
                return pyro.sample("z", q)

    # ------------------------------------------------------------------ training interface

    def training_step(self, x: Tensor, update: Update, progress: Progress, y: Tensor | None = None) -> dict[str, Tensor | float]:
        """One step of the configured ELBO on ``x: (B, C, H, W)`` given ``y: (B,)``, the batch standing for
        ``progress.num_data`` images. Figures: ``loss`` (the negative ELBO of log p(x|y) per image) and ``kl_weight``."""
        weight = _warmed_up_kl_weight(self.config, progress)
        with _kl_weight_set(self, weight):
            loss = update("model", lambda: _elbo_loss(self, x, progress.num_data, training=True, batch_mean=update.batch_mean, y=y))
        return {"loss": loss, "kl_weight": weight}

    def validation_loss(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The configured objective's loss per image on ``x: (B, C, H, W)`` given ``y: (B,)``, with the full KL weight."""
        return _elbo_loss(self, x, None, y=y).detach()

    # ------------------------------------------------------------------ using a trained model

    def encode(self, x: Tensor, y: Tensor) -> Tensor:
        """The code ``(B, L)`` of ``x: (B, C, H, W)`` given ``y: (B,)``: the posterior mean (see :meth:`VAE.encode`)."""
        y = self._labels(y, len(x))
        return point_estimate(self.posterior(*self.encoder(self.encoder_input(x, y))))

    def decode(self, z: Tensor, y: Tensor | int) -> Tensor:
        """The mean of p(x | z, y), ``(B, C, H, W)``, for ``z: (B, L)`` and ``y: (B,)`` (or one int class for all)."""
        y = self._labels(y, len(z))
        return self.likelihood(self.decoder(self.decoder_input(z, y))).mean

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: decode the code of ``x`` given ``y: (B,)``, with the same labels."""
        return self.decode(self.encode(x, y), y)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | int) -> Tensor:
        """``n`` images ``(n, C, H, W)`` of the classes ``y: (n,)`` (or all of the class ``y``, an int):
        means of p(x | z, y) for z drawn from the prior."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        y = self._labels(y, n)
        return self.decode(self.prior().sample((n,)).to(self.device), y)
