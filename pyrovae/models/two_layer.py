"""A VAE with two stochastic layers (the IWAE paper's, Burda et al. 2015) as a Pyro program with two latent sites.

Generative model, for each of the B images of a batch::

    z2 ~ p(z2)                          prior, event shape (L2,)         (L2 = config.top_latent_dim)
    z1 ~ Normal(top_decoder(z2))        event shape (L1,)                (L1 = config.network.latent_dim)
    x  ~ p(x | decoder(z1))             likelihood, event shape (C, H, W); observed when x is given

Guide::

    z1 ~ q(z1 | encoder(x))             a diagonal Gaussian (or a flow: config.posterior)
    z2 ~ Normal(top_encoder(z1))        event shape (L2,)

The paper's MNIST architecture is ``TwoLayerVAEConfig(network=NetworkConfig(hidden=(200, 200),
latent_dim=100, activation="tanh"), top_latent_dim=50, top_hidden=(100, 100))``:
784-200-200-100(z1)-100-100-50(z2), mirrored in the generative model. ``encoder`` and
``decoder`` are the shared networks of :mod:`pyrovae.nets` between x and z1; ``top_encoder``
and ``top_decoder`` are :class:`~pyrovae.nets.GaussianMLP` between z1 and z2.

Everything else is the :class:`~pyrovae.models.vae.VAE`'s: the ELBOs (Trace_ELBO and the IWAE bound, not
TraceMeanField_ELBO: see :class:`TwoLayerVAEConfig`), beta (which scales both latent sites, hence the whole KL), warm-up and free bits (a floor for
each site's KL term in training, which keeps z2 in use: see docs/quality.md),
parameters in Pyro's param store under the model's ``name`` (default ``"vae2"``, ``"vae2_1"``, ...).
The importance-sampled log-likelihood of :mod:`pyrovae.evaluation` weighs the joint latent
``(z1, z2)``: ``log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1)``.
The code of an image (``encode``, the figures, the linear probe) is its z1; the prior, and the
aggregated posterior it is compared with, are over z2 (``prior_site = "z2"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.util import is_validation_enabled
from torch import Tensor

from ..errors import InputError
from ..nets import GaussianMLP, NetworkConfig
from .vae import VAE, VAEConfig, _declare_parts, _images_plate, _is_int, _scaled

__all__ = ["TwoLayerVAE", "TwoLayerVAEConfig"]


@dataclass(frozen=True)
class TwoLayerVAEConfig(VAEConfig):
    """The two-layer VAE: every field of :class:`~pyrovae.models.vae.VAEConfig` (``network`` is the part between
    x and z1, so ``network.latent_dim`` is L1, 100 by default), and

    top_latent_dim: L2, the size of z2, the top layer the prior is on.
    top_hidden:     hidden widths between z1 and z2, from the z1 side (mirrored in p(z1|z2)).
    The VampPrior is not offered here (it would need q(z2|u) through both layers), nor ``elbo="meanfield"``:
    TraceMeanField_ELBO replaces each site's ``log q - log p`` by its KL divergence, integrated over that site
    alone, as if the guide's sites were independent; q(z2|z1) depends on z1 (and p(z1|z2) on z2), so it
    would estimate another objective, not the ELBO (on a model whose layers copy each other, 1353 nats per
    image where Trace_ELBO gives 557). Pyro warns of it only with validation on, which training turns off.
    """

    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(latent_dim=100))
    top_latent_dim: int = 50
    top_hidden: tuple[int, ...] = (100, 100)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "top_hidden", tuple(self.top_hidden))
        if not _is_int(self.top_latent_dim) or self.top_latent_dim <= 0:
            raise InputError(f"top_latent_dim must be a positive integer, got {self.top_latent_dim!r}")
        if any(not _is_int(width) or width <= 0 for width in self.top_hidden):
            raise InputError(f"top_hidden must be positive integers, got {self.top_hidden!r}")
        if self.prior == "vamp":
            raise InputError("the two-layer VAE does not offer the VampPrior; choose another prior for z2")
        if self.elbo == "meanfield":
            raise InputError(
                "the two-layer VAE takes elbo='trace' or 'iwae', not 'meanfield': TraceMeanField_ELBO integrates z1's KL as if "
                "z1 and z2 were independent in the guide, but q(z2|z1) depends on z1, so it would train another objective"
            )


class TwoLayerVAE(VAE):
    """A VAE with latent layers z1 ``(B, L1)`` and z2 ``(B, L2)`` over images ``x: (B, C, H, W)`` (see the module docs).

    ``prior`` is over ``(L2,)``; ``top_encoder`` maps z1 ``(..., L1)`` to the ``(loc, scale)`` of q(z2|z1), each
    ``(..., L2)``, and ``top_decoder`` z2 to those of p(z1|z2); the other arguments are the VAE's.
    """

    _name_prefix = "vae2"
    prior_site = "z2"

    def __init__(self, config: TwoLayerVAEConfig | None = None, *, top_encoder=None, top_decoder=None, **parts):
        config = config or TwoLayerVAEConfig()
        if not isinstance(config, TwoLayerVAEConfig):
            raise InputError(f"TwoLayerVAE needs a TwoLayerVAEConfig, got {type(config).__name__}")
        super().__init__(config, **parts)
        net, top = config.network, config.top_latent_dim
        if top_encoder is None:
            top_encoder = GaussianMLP(net.latent_dim, top, config.top_hidden, net.activation, net.dropout, net.tanh_init)
        if top_decoder is None:
            top_decoder = GaussianMLP(top, net.latent_dim, tuple(reversed(config.top_hidden)), net.activation, net.dropout, net.tanh_init)
        self.top_encoder, self.top_decoder = top_encoder, top_decoder

    @property
    def prior_dim(self) -> int:
        """The size of z2, the layer the prior is on."""
        return self.config.top_latent_dim

    def model(self, x: Tensor | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1): scores ``x: (B, C, H, W)``, or samples ``batch_size`` images without it.
        Returns the images ``(B, C, H, W)``."""
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        _declare_parts(self, "decoder", "top_decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            with _scaled(self.kl_weight):
                z2 = pyro.sample("z2", self.prior())  # (B, L2)
                z1 = pyro.sample("z1", dist.Normal(*self.top_decoder(z2)).to_event(1))  # (B, L1)
            return pyro.sample("x", self.likelihood(self.decoder(z1)), obs=x)  # (B, C, H, W)

    def guide(self, x: Tensor, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(z1, z2 | x) = q(z1|x) q(z2|z1) for ``x: (B, C, H, W)``; returns ``z1: (B, L1)``."""
        if is_validation_enabled():
            self.check_input(x)
        _declare_parts(self, "encoder", "posterior", "top_encoder")
        with _images_plate(x.shape[0], num_data, x.device):
            q1 = self.posterior(*self.encoder(x))  # batch (B,), event (L1,)
            with _scaled(self.kl_weight):
                z1 = pyro.sample("z1", q1)
                pyro.sample("z2", dist.Normal(*self.top_encoder(z1)).to_event(1))  # (B, L2)
            return z1

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images ``(n, C, H, W)``: z2 from the prior, z1 from p(z1|z2), and the mean of p(x|z1)."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        z2 = self.prior().sample((n,)).to(self.device)
        return self.decode(dist.Normal(*self.top_decoder(z2)).sample())
