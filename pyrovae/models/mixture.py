"""A mixture VAE for clustering (a Gaussian-mixture VAE, after Dilokthanakul et al. 2016 and Shu's
"GMVAE"), its component summed out exactly.

Generative model, for each image of a batch::

    c ~ p(c) = Categorical(1/K)                  the component (the cluster)
    z ~ p(z | c) = Normal(mu_c, sigma_c)          a learned diagonal Gaussian per component, event (L,)
    x ~ p(x | decoder(z))                         the shared decoder

Guide: ``c ~ q(c|x)`` (a classifier network; enumerated) and ``z ~ q(z | x, c)`` (the shared encoder fed
``[x, onehot(c)]``); see :mod:`pyrovae.models.discrete` for why q(z|x, c) and how ``TraceEnum_ELBO``
sums c out. The images' clusters are ``classify(x)``, the most probable component under q(c|x);
:func:`pyrovae.evaluation.clustering_accuracy` matches them to labels.

p(c) is uniform and fixed: the clusters are the components p(z|c) learn to be, and a learned
p(c) lets a component that fits little be starved of images until it is unused.
The component means start as draws from N(0, I), the scales at 1, so the components differ from the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..nets import build_decoder
from .discrete import DiscreteLatentVAE, DiscreteVAEConfig, check_num_classes
from .vae import _is_int

__all__ = ["MixtureVAE", "MixtureVAEConfig", "ComponentPrior"]


@dataclass(frozen=True)
class MixtureVAEConfig(DiscreteVAEConfig):
    """The mixture VAE and its objective: the fields of :class:`~pyrovae.models.discrete.DiscreteVAEConfig`
    (network, likelihood, beta, num_particles, kl_warmup_epochs), and

    num_components: K >= 2, the components of p(z) and so the clusters.

    ``prior`` must stay ``"normal"``: p(z) is the model's own mixture of learned Gaussians.
    """

    num_components: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_num_classes(self.num_components, "num_components")
        if self.prior != "normal":
            raise InputError(f"the mixture VAE's p(z) is its own mixture of K learned Gaussians p(z|c): it takes no prior={self.prior!r}")


class ComponentPrior(nn.Module):
    """p(z | c) = Normal(loc[c], softplus(raw_scale[c]) + 1e-5): ``loc`` and ``raw_scale`` are ``(K, L)``."""

    def __init__(self, k: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.randn(k, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((k, latent_dim), 0.5413))  # softplus(0.5413) = 1

    def forward(self, c: Tensor) -> dist.Distribution:
        """p(z | c) for components ``c`` of any shape ``S``: batch shape ``S``, event ``(L,)``."""
        return dist.Normal(self.loc[c], F.softplus(self.raw_scale[c]) + 1e-5).to_event(1)


class MixtureVAE(DiscreteLatentVAE):
    """The mixture VAE (see the module docs) of images ``x: (B, C, H, W)``, without labels.

    ``likelihood`` defaults to what ``config`` names. ``name`` prefixes its parameters' names.
    """

    site = "c"
    _name_prefix = "gmvae"
    _model_parts = ("decoder", "likelihood", "components")

    def __init__(self, config: MixtureVAEConfig | None = None, *, likelihood=None, name: str | None = None):
        config = config or MixtureVAEConfig()
        if not isinstance(config, MixtureVAEConfig):
            raise InputError(f"MixtureVAE needs a MixtureVAEConfig, got {type(config).__name__}")
        super().__init__(config, config.num_components, build_decoder(config.network), likelihood=likelihood, name=name)
        self.components = ComponentPrior(self.k, config.network.latent_dim)
        self._check_networks()

    @property
    def num_components(self) -> int:
        return self.k

    def class_prior(self) -> dist.Categorical:
        """p(c) = Categorical(1/K)."""
        return dist.Categorical(logits=torch.zeros(self.k, device=self.device))

    def code_prior(self, c: Tensor):
        """p(z | c), the component's Gaussian."""
        return self.components(c)

    def decoder_input(self, z: Tensor, c: Tensor) -> Tensor:
        """The decoder sees ``z`` alone: p(x | z) does not depend on c once z is known."""
        return z

    def prior(self) -> dist.Distribution:
        """p(z) = sum_c p(c) p(z | c), the mixture with c summed out: batch ``()``, event ``(L,)``."""
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(self.k, device=self.device)), self.components(torch.arange(self.k, device=self.device)))

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x | z), ``(B, C, H, W)``, for ``z: (B, L)``."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | int | None = None) -> Tensor:
        """``n`` images ``(n, C, H, W)``: means of p(x | z) for z from p(z | c), ``c: (n,)`` (an int: that component for all;
        ``None``: drawn from p(c))."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        c = self.class_prior().sample((n,)) if c is None else self._labels(c, n)
        return self.decode(self.components(c).sample())
