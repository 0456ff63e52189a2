"""What the VAEs with one discrete latent summed out exactly share: the semi-supervised VAE (M2,
:mod:`pyrovae.models.semi_supervised`) and the mixture VAE for clustering (:mod:`pyrovae.models.mixture`).

Both are Pyro programs over a batch ``x: (B, C, H, W)`` with a class ``y`` (M2's label, the mixture
VAE's component ``c``), one of K values, and a Gaussian code ``z: (B, L)``::

    model:  y ~ p(y)   z ~ p(z | y)   x ~ p(x | decoder(...))         (what p(z|y) and the decoder see: the subclass's)
    guide:  y ~ q(y | x) = Categorical(classifier(x))                  marked infer={"enumerate": "parallel"}
            z ~ q(z | x, y) = Normal(encoder([x, onehot(y)]))

The guide's class site is marked for parallel enumeration, so ``TraceEnum_ELBO(max_plate_nesting=1)``
sums it over its K values exactly instead of sampling it: the value of ``y`` is then the tensor
``arange(K)`` of shape ``(K, 1)`` (an enumeration dim left of the plate over images), ``z`` is drawn
once per class, ``(K, B, L)``, and the ELBO is ``sum_y q(y|x) [log p(x, y, z_y) - log q(z_y | x, y)] + H[q(y|x)]``.
Under an ELBO that does not enumerate (``Trace_ELBO``, ``Predictive``) the same guide samples ``y``.
Given ``y`` (an int64 tensor ``(B,)``), model and guide take it as observed and the guide has no ``y`` site.

Why q(z | x, y) rather than q(z | x): the code of an image may then lie in a different place for each
class it could belong to (near the mean of p(z | c) of each component, for the mixture VAE; the style
that makes it a 3 or an 8, for M2), so no class pays for a posterior fitted to another; and the
NLL sums the class inside each importance weight with the proposal q(z | x, y) that fits it.

**Parameters** follow the VAE's rule (see :mod:`pyrovae.models.vae`): each model has its own ``name``
(default ``"m2"``, ``"m2_1"``, ...; ``"gmvae"``, ...) and declares its parts as
``pyro.module(f"{name}.classifier", ...)``, ``.encoder``, ``.decoder`` and so on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import TraceEnum_ELBO
from pyro.nn import PyroModule
from pyro.poutine.util import is_validation_enabled
from torch import Tensor

from ..errors import InputError
from ..likelihoods import make_likelihood
from ..nets import ConvEncoder, MLPEncoder, NetworkConfig
from .base import AutoencoderMixin, Progress, Update
from .vae import (
    VAEConfig,
    _check_likelihood,
    _claim_name,
    _declare_parts,
    _images_plate,
    _is_int,
    _kl_weight_set,
    _scaled,
    _warmed_up_kl_weight,
)

__all__ = ["DiscreteVAEConfig", "DiscreteLatentVAE", "check_num_classes", "enumerated_loss"]


def check_num_classes(value, what: str = "num_classes") -> None:
    """Raise :class:`InputError` unless ``value`` is an integer K >= 2 (one class is no choice to sum over)."""
    if not _is_int(value) or value < 2:
        raise InputError(f"{what} must be an integer K >= 2 (a discrete latent needs at least two values), got {value!r}")


@dataclass(frozen=True)
class DiscreteVAEConfig(VAEConfig):
    """The fields of :class:`~pyrovae.models.vae.VAEConfig` that a VAE with an enumerated class takes.

    Its objective is always Pyro's ``TraceEnum_ELBO`` (``elbo="trace"``), with ``num_particles`` draws
    of z per class, ``beta`` and ``kl_warmup_epochs`` weighting the z site as in the VAE. q(z|x, y)
    is a diagonal Gaussian (``posterior="gaussian"``); free bits are not offered (their loss does
    not enumerate).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.elbo != "trace":
            raise InputError(
                f"a VAE with an enumerated class trains on TraceEnum_ELBO (elbo='trace'), got elbo={self.elbo!r}"
            )
        if self.posterior != "gaussian":
            raise InputError(f"q(z|x, y) of a VAE with an enumerated class is a diagonal Gaussian: posterior='gaussian', got {self.posterior!r}")
        if self.free_bits:
            raise InputError("free bits floor a sampled ELBO's KL terms; a VAE with an enumerated class takes none (free_bits=0)")


def encoder_with_class(network: NetworkConfig, k: int):
    """The shared encoder of ``network`` widened for a one-hot class: ``D + K`` inputs (MLP) or ``C + K``
    channels (conv); returns ``(loc, scale)``, each ``(B, L)``."""
    options = dict(gaussian=True, dropout=network.dropout)
    if network.conv:
        c, h, w = network.input_shape
        return ConvEncoder((c + k, h, w), network.latent_dim, network.activation, **options)
    return MLPEncoder((math.prod(network.input_shape) + k,), network.latent_dim, network.hidden, network.activation, tanh_init=network.tanh_init, **options)


def classifier_network(network: NetworkConfig, k: int):
    """q(y|x)'s network: the shared encoder of ``network`` with K outputs, the logits ``(B, K)``."""
    if network.conv:
        return ConvEncoder(network.input_shape, k, network.activation, dropout=network.dropout)
    return MLPEncoder(network.input_shape, k, network.hidden, network.activation, dropout=network.dropout, tanh_init=network.tanh_init)


def build_enum_elbo(config: VAEConfig) -> TraceEnum_ELBO:
    """Pyro's ``TraceEnum_ELBO`` for one plate (the images), with ``config.num_particles`` vectorized draws."""
    n = config.num_particles
    return TraceEnum_ELBO(max_plate_nesting=1, num_particles=n, vectorize_particles=n > 1, strict_enumeration_warning=False)


def enumerated_loss(model, x: Tensor, num_data: int | None, **condition) -> Tensor:
    """``model.elbo``'s (``TraceEnum_ELBO``'s) loss per example for ``model.model`` and ``model.guide`` on
    ``x: (B, C, H, W)`` (and ``condition``, further keyword arguments of both), the batch standing for
    ``num_data`` images; differentiable where gradients are on, else (validation) a detached value."""
    n = num_data or len(x)
    if torch.is_grad_enabled():
        return model.elbo.differentiable_loss(model.model, model.guide, x, num_data=n, **condition) / n
    return torch.tensor(model.elbo.loss(model.model, model.guide, x, num_data=n, **condition) / n, device=x.device)


class DiscreteLatentVAE(AutoencoderMixin, PyroModule):
    """A VAE with a class ``y`` of K values summed out exactly (see the module docs).

    Subclasses say what p(y) and p(z | y) are (:meth:`class_prior`, :meth:`code_prior`), what the
    decoder sees (:meth:`decoder_input`), and set ``site`` (the class site's name) and ``_name_prefix``.
    """

    #: the name of the discrete sample site
    site = "y"
    #: default names of instances
    _name_prefix = "discrete"
    #: the parts declared in the model and the guide (``pyro.module``)
    _model_parts: tuple[str, ...] = ("decoder", "likelihood")
    _guide_parts: tuple[str, ...] = ("classifier", "encoder")

    def __init__(self, config, k: int, decoder, *, likelihood=None, name: str | None = None):
        name = _claim_name(self, name, self._name_prefix)
        super().__init__(name=name)
        self.name = name
        self.config = config
        self.k = k
        net = config.network
        self.classifier = classifier_network(net, k)
        self.encoder = encoder_with_class(net, k)
        self.decoder = decoder
        self.likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        self.kl_weight = float(config.beta)
        self.elbo = build_enum_elbo(config)

    def _check_networks(self) -> None:
        """Raise :class:`InputError` unless the likelihood takes the decoder's output (called by subclasses, once built)."""
        with torch.no_grad():
            z, y = torch.zeros(2, self.latent_dim, device=self.device), torch.zeros(2, dtype=torch.int64, device=self.device)
            _check_likelihood(self.likelihood, self.decoder(self.decoder_input(z, y)), self.input_shape)

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    # ------------------------------------------------------------------ what subclasses define

    def class_prior(self) -> dist.Categorical:
        """p(y): a Categorical over K values, batch shape ``()``."""
        raise NotImplementedError

    def code_prior(self, y: Tensor):
        """p(z | y) for classes ``y`` of any shape ``S``: a distribution with batch shape ``S`` (or broadcastable) and event ``(L,)``."""
        raise NotImplementedError

    def decoder_input(self, z: Tensor, y: Tensor) -> Tensor:
        """What the decoder sees of ``z: (..., B, L)`` and classes ``y`` broadcastable to ``(..., B)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ networks

    def one_hot(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``y`` of any shape ``S`` as one-hot rows ``(*S, K)``."""
        return F.one_hot(y, self.k).to(dtype)

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
        loc, scale = self.encoder(self.encoder_input(flat_x, flat_y))[:2]
        return dist.Normal(loc.reshape(*shape, -1), scale.reshape(*shape, -1)).to_event(1)

    def class_logits(self, x: Tensor) -> Tensor:
        """The logits of q(y | x), ``(B, K)``, for ``x: (B, C, H, W)``."""
        return self.classifier(x)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class under q(y | x) of each image of ``x: (B, C, H, W)``: int64 ``(B,)``."""
        return self.class_logits(x).argmax(-1)

    # ------------------------------------------------------------------ the Pyro program

    def _labels(self, y: Tensor | None, n: int) -> Tensor | None:
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
                raise InputError(f"observed classes must lie in [0, {self.k}); an image without a label goes to the call without y")
        return y

    def model(self, x: Tensor | None = None, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, y, z) = p(y) p(z|y) p(x|z, y): scores ``x: (B, C, H, W)`` (with ``y: (B,)`` observed if given),
        or samples images without ``x`` (of the classes ``y`` if given). Returns the images ``(B, C, H, W)``."""
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        elif isinstance(y, Tensor) and y.dim() == 1:
            batch_size = len(y)
        y = self._labels(y, batch_size)
        _declare_parts(self, *self._model_parts)
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            y = pyro.sample(self.site, self.class_prior(), obs=y)  # (B,), or (K, 1) enumerated
            with _scaled(self.kl_weight):
                z = pyro.sample("z", self.code_prior(y))  # (B, L), or (K, B, L)
            return pyro.sample("x", self.likelihood(self.decoder(self.decoder_input(z, y))), obs=x)

    def guide(self, x: Tensor, y: Tensor | int | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(y, z | x) = q(y|x) q(z|x, y) for ``x: (B, C, H, W)``, the class site marked for parallel enumeration;
        given ``y: (B,)``, q(z | x, y) alone. Returns ``z``."""
        if is_validation_enabled():
            self.check_input(x)
        y = self._labels(y, x.shape[0])
        _declare_parts(self, *self._guide_parts)
        with _images_plate(x.shape[0], num_data, x.device):
            if y is None:
                y = pyro.sample(self.site, dist.Categorical(logits=self.class_logits(x)), infer={"enumerate": "parallel"})
            with _scaled(self.kl_weight):
                return pyro.sample("z", self.posterior(x, y))

    # ------------------------------------------------------------------ training interface (unlabelled images)

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor | float]:
        """One step of ``TraceEnum_ELBO`` on ``x: (B, C, H, W)``, the class summed out, the batch standing for
        ``progress.num_data`` images. Figures: ``loss`` (the negative ELBO of log p(x) per image) and ``kl_weight``."""
        weight = _warmed_up_kl_weight(self.config, progress)
        with _kl_weight_set(self, weight):
            loss = update("model", lambda: enumerated_loss(self, x, progress.num_data))
        return {"loss": loss, "kl_weight": weight}

    def validation_loss(self, x: Tensor) -> Tensor:
        """The negative ELBO of log p(x) per image on ``x: (B, C, H, W)``, the class summed out, with the full KL weight."""
        return enumerated_loss(self, x, None).detach()

    # ------------------------------------------------------------------ using a trained model

    def encode(self, x: Tensor) -> Tensor:
        """The code ``(B, L)`` of ``x: (B, C, H, W)``: the mean of q(z | x, y) at the most probable class of q(y|x)."""
        return self.posterior(x, self.class_logits(x).argmax(-1)).mean
