"""Tomczak and Welling's hierarchical VAE (2018, "VAE with a VampPrior", their HVAE) as a Pyro program with two
latent sites, whose decoder sees both latents.

Generative model, for each of the B images of a batch::

    z2 ~ p(z2)                          prior, event shape (L2,): the VampPrior by default (L2 = config.top_latent_dim)
    z1 ~ Normal(top_decoder(z2))        p(z1 | z2), event shape (L1,)                     (L1 = config.network.latent_dim)
    x  ~ p(x | decoder(z1, z2))         likelihood, event shape (C, H, W); observed when x is given

Guide, top-down: z2 first, from the image alone, then z1 from the image and z2::

    z2 ~ Normal(encoder(x))             q(z2 | x)
    z1 ~ Normal(bottom_encoder(x, z2))  q(z1 | x, z2)

The VampPrior is on z2 and mixes the guide's own q(z2 | u_k) at learned pseudo-inputs u_k: ``encoder`` is
the network of q(z2 | x), and :class:`~pyrovae.priors.VampPrior` holds a reference to it. Unlike
:class:`~pyrovae.models.two_layer.TwoLayerVAE` (z2 -> z1 -> x, whose top layer the plain ELBO leaves unused,
docs/quality.md), the decoder reads z2 directly, and z2 is inferred from x, not from z1.

Networks (:mod:`pyrovae.nets`), for ``config.network.hidden = (H_1, ..., H_n)`` (the paper's: (300, 300), with
L1 = L2 = 40, the defaults here): q(z2|x) is the shared MLP encoder ``D-H_1-...-H_n-L2``; p(z1|z2) a
:class:`~pyrovae.nets.GaussianMLP` ``L2-H_n-...-H_1-L1``; q(z1|x, z2) a :class:`~pyrovae.nets.JointMLP` with a
first layer of H_1 units for x and one for z2, concatenated, then ``H_2-...-H_n-L1``; p(x|z1, z2) the mirror
image, a JointMLP with H_n units for each of z1 and z2, then ``H_(n-1)-...-H_1-D``. The paper's layers are gated
(h = (W x + b) * sigmoid(V x + c)); these are plain layers of ``network.activation`` (tanh, Glorot's start by
default, as the one-layer VampPrior row needs), so each has half a gated layer's weights.

Everything else is the :class:`~pyrovae.models.vae.VAE`'s: the ELBOs (Trace_ELBO, TraceMeanField_ELBO, the IWAE
bound), beta (on both latent sites), KL warm-up, free bits (a floor on each site's KL term), and the parameters in
Pyro's param store under the model's ``name`` (default ``"hvae"``, ``"hvae_1"``, ...). The importance-sampled
log-likelihood of :mod:`pyrovae.evaluation` weighs the joint latent:
``log p(x|z1,z2) + log p(z1|z2) + log p(z2) - log q(z2|x) - log q(z1|x,z2)``.

The code of an image (``encode``: the figures, the linear probe) is both latents, ``[z1, z2]`` ``(B, L1 + L2)``,
at their guide means (z2's, then z1's given it), since the decoder needs both: ``latent_dim`` is ``L1 + L2``.
The prior, and the aggregated posterior it is compared with, are over z2 (``prior_site = "z2"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.poutine.util import is_validation_enabled
from torch import Tensor

from ..errors import InputError
from ..likelihoods import make_likelihood, outputs_per_value
from ..nets import GaussianMLP, JointMLP, NetworkConfig, build_encoder
from .base import AutoencoderMixin, Progress, Update
from .vae import (
    VAEConfig,
    _check_likelihood,
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

__all__ = ["HierarchicalVAE", "HierarchicalVAEConfig"]


@dataclass(frozen=True)
class HierarchicalVAEConfig(VAEConfig):
    """The hierarchical VAE: every field of :class:`~pyrovae.models.vae.VAEConfig`, with the paper's defaults
    (``network``: 300-300 tanh layers, ``latent_dim`` = L1 = 40; the VampPrior with 500 pseudo-inputs), and

    top_latent_dim: L2, the size of z2, the layer the prior is on (the paper's 40).

    ``network.hidden`` sets every network's widths (see the module docs); the networks are MLPs
    (``network.conv`` is refused) and q is a diagonal Gaussian at each layer (``posterior="gaussian"``).
    """

    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(latent_dim=40, hidden=(300, 300), activation="tanh"))
    prior: str = "vamp"
    top_latent_dim: int = 40

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.top_latent_dim) or self.top_latent_dim <= 0:
            raise InputError(f"top_latent_dim must be a positive integer, got {self.top_latent_dim!r}")
        if self.network.conv:
            raise InputError("the hierarchical VAE's networks are MLPs (their joint layers read x and z2, or z1 and z2): use conv=False")
        if not self.network.hidden:
            raise InputError("the hierarchical VAE's joint networks need at least one hidden layer (network.hidden)")
        if self.posterior != "gaussian":
            raise InputError(f"the hierarchical VAE's q(z2|x) and q(z1|x, z2) are diagonal Gaussians; posterior={self.posterior!r} is not offered")
        if self.elbo == "meanfield":
            raise InputError(
                "the hierarchical VAE takes elbo='trace' or 'iwae', not 'meanfield': TraceMeanField_ELBO integrates z1's KL as if "
                "z1 and z2 were independent in the guide, but q(z1|x, z2) depends on z2, so it would train another objective"
            )


class HierarchicalVAE(AutoencoderMixin, PyroModule):
    """Tomczak and Welling's two-layer VAE over images ``x: (B, C, H, W)`` (see the module docs).

    Parts, each replaceable by keyword: ``encoder`` maps images to the ``(loc, scale)`` of q(z2|x), each ``(B, L2)``
    (and is what the VampPrior mixes); ``bottom_encoder(x.flatten(1), z2)`` gives those of q(z1|x, z2), each
    ``(..., B, L1)``; ``top_decoder(z2)`` those of p(z1|z2); ``decoder(z1, z2)`` (or ``decoder`` of their concatenation) the
    decoder output ``(..., C, H, W)``; ``prior`` over ``(L2,)`` and ``likelihood`` as in the VAE.
    ``name`` prefixes the names of its parameters in Pyro's param store.
    """

    _name_prefix = "hvae"
    prior_site = "z2"

    def __init__(
        self, config: HierarchicalVAEConfig | None = None, *, prior=None, likelihood=None, encoder=None, bottom_encoder=None,
        top_decoder=None, decoder=None, name: str | None = None,
    ):
        name = _claim_name(self, name, self._name_prefix)
        super().__init__(name=name)
        self.name = name
        self.config = config = config or HierarchicalVAEConfig()
        if not isinstance(config, HierarchicalVAEConfig):
            raise InputError(f"HierarchicalVAE needs a HierarchicalVAEConfig, got {type(config).__name__}")
        net, l1, l2 = config.network, config.network.latent_dim, config.top_latent_dim
        hidden = net.hidden
        options = dict(activation=net.activation, dropout=net.dropout, tanh_init=net.tanh_init)
        d = self.input_dim
        self.encoder = encoder if encoder is not None else build_encoder(replace(net, latent_dim=l2), gaussian=True)
        self.bottom_encoder = bottom_encoder if bottom_encoder is not None else JointMLP((d, l2), (l1,), hidden, gaussian=True, **options)
        self.top_decoder = top_decoder if top_decoder is not None else GaussianMLP(l2, l1, tuple(reversed(hidden)), **options)
        likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        c, h, w = net.input_shape
        output_shape = (outputs_per_value(likelihood) * c, h, w)  # P values per pixel for a likelihood with P parameters
        self.decoder = decoder if decoder is not None else JointMLP((l1, l2), output_shape, tuple(reversed(hidden)), **options)
        _set_prior_likelihood_objective(self, config, prior, likelihood, l2)
        with torch.no_grad():
            _check_likelihood(self.likelihood, self.decoder(torch.zeros(2, self.latent_dim, device=self.device)), self.input_shape)

    @property
    def input_dim(self) -> int:
        """D = C * H * W."""
        c, h, w = self.input_shape
        return c * h * w

    @property
    def latent_dim(self) -> int:
        """The size of a code ``[z1, z2]``: L1 + L2."""
        return self.config.network.latent_dim + self.config.top_latent_dim

    @property
    def prior_dim(self) -> int:
        """The size of z2, the layer the prior is on."""
        return self.config.top_latent_dim

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    # ------------------------------------------------------------------ the Pyro program

    def model(self, x: Tensor | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1, z2): scores ``x: (B, C, H, W)``, or samples ``batch_size`` images
        without it. ``num_data``: the size of the dataset the batch stands for. Returns the images ``(B, C, H, W)``."""
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        _declare_parts(self, "decoder", "top_decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            with _scaled(self.kl_weight):
                z2 = pyro.sample("z2", self.prior())  # (B, L2)
                z1 = pyro.sample("z1", dist.Normal(*self.top_decoder(z2)).to_event(1))  # (B, L1)
            return pyro.sample("x", self.likelihood(self.decoder(z1, z2)), obs=x)  # (B, C, H, W)

    def guide(self, x: Tensor, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(z1, z2 | x) = q(z2|x) q(z1|x, z2) for ``x: (B, C, H, W)``; returns ``z1: (B, L1)``."""
        if is_validation_enabled():
            self.check_input(x)
        _declare_parts(self, "encoder", "bottom_encoder")
        with _images_plate(x.shape[0], num_data, x.device):
            with _scaled(self.kl_weight):
                z2 = pyro.sample("z2", dist.Normal(*self.encoder(x)).to_event(1))  # (B, L2)
                return pyro.sample("z1", dist.Normal(*self.bottom_encoder(x.flatten(1), z2)).to_event(1))  # (B, L1)

    # ------------------------------------------------------------------ training interface

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor | float]:
        """One step of the configured ELBO on ``x: (B, C, H, W)`` (see :meth:`pyrovae.models.vae.VAE.training_step`)."""
        weight = _warmed_up_kl_weight(self.config, progress)
        with _kl_weight_set(self, weight):
            loss = update("model", lambda: _elbo_loss(self, x, progress.num_data, training=True, batch_mean=update.batch_mean))
        return {"loss": loss, "kl_weight": weight}

    def validation_loss(self, x: Tensor) -> Tensor:
        """The configured objective's loss per image on ``x: (B, C, H, W)``, with the full KL weight."""
        return _elbo_loss(self, x, None).detach()

    # ------------------------------------------------------------------ using a trained model

    def encode(self, x: Tensor) -> Tensor:
        """The code ``[z1, z2]`` ``(B, L1 + L2)`` of ``x: (B, C, H, W)``: z2 at the mean of q(z2|x), z1 at that of q(z1|x, z2)."""
        z2 = self.encoder(x)[0]
        return torch.cat([self.bottom_encoder(x.flatten(1), z2)[0], z2], dim=-1)

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x|z1, z2), ``(B, C, H, W)``, for codes ``[z1, z2]``, ``(B, L1 + L2)``."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images ``(n, C, H, W)``: z2 from the prior, z1 from p(z1|z2), and the mean of p(x|z1, z2)."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        z2 = self.prior().sample((n,)).to(self.device)
        return self.decode(torch.cat([dist.Normal(*self.top_decoder(z2)).sample(), z2], dim=-1))

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 10) -> Tensor:
        """Decode ``steps`` points on the line between the codes ``[z1, z2]`` of two images ``(C, H, W)``: ``(steps, C, H, W)``."""
        if not _is_int(steps) or steps < 2:
            raise InputError(f"steps must be at least 2, got {steps}")
        z = self.encode(torch.stack([x1, x2]))
        t = torch.linspace(0, 1, steps, device=z.device).unsqueeze(1)
        return self.decode((1 - t) * z[0] + t * z[1])
