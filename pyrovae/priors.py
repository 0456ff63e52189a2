"""Priors p(z): objects that, called with no arguments, return a Pyro distribution over z.

The distribution has ``batch_shape == ()`` and ``event_shape == (L,)``; the VAE's plate
broadcasts it over the batch. Anything that behaves so plugs in, without editing the
library: a :class:`torch.nn.Module` (its parameters are trained with the VAE, its buffers
move with ``.to(device)``), a :class:`pyro.nn.PyroModule`, or a plain function::

    class Gumbel(nn.Module):
        def __init__(self, latent_dim):
            super().__init__()
            self.register_buffer("loc", torch.zeros(latent_dim))
        def forward(self):
            return dist.Gumbel(self.loc, 1.0).to_event(1)

    VAE(config, prior=Gumbel(config.network.latent_dim))

Built-in parameters are buffers (or parameters), never tensors created on the fly, so that
they sit on the model's device.
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = ["StandardNormal", "LaplacePrior", "StudentTPrior", "GaussianMixturePrior", "VampPrior", "PRIORS", "make_prior", "check_prior"]


class StandardNormal(nn.Module):
    """p(z) = N(0, I) over ``(L,)`` (the default)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LaplacePrior(nn.Module):
    """p(z) = prod_l Laplace(z_l; 0, scale): heavier tails, sparser codes."""

    def __init__(self, latent_dim: int, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.full((latent_dim,), float(scale)))

    def forward(self) -> dist.Distribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)


class StudentTPrior(nn.Module):
    """p(z) = prod_l StudentT(z_l; df, 0, 1): heavy tails, ``df`` degrees of freedom."""

    def __init__(self, latent_dim: int, df: float = 3.0):
        super().__init__()
        if not df > 0:
            raise InputError(f"df must be positive, got {df}")
        self.register_buffer("df", torch.full((latent_dim,), float(df)))
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


class GaussianMixturePrior(nn.Module):
    """A learnable mixture of ``K`` diagonal Gaussians over ``(L,)``.

    Parameters: ``logits (K,)``, ``locs (K, L)`` (spread at initialisation so components differ),
    ``raw_scales (K, L)`` with ``scale = softplus(raw) + 1e-5``.
    """

    def __init__(self, latent_dim: int, num_components: int = 10, seed: int = 0):
        super().__init__()
        if num_components <= 0:
            raise InputError(f"num_components must be positive, got {num_components}")
        generator = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, latent_dim, generator=generator))
        self.raw_scales = nn.Parameter(torch.full((num_components, latent_dim), 0.5413))  # softplus -> 1

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, F.softplus(self.raw_scales) + 1e-5).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(nn.Module):
    """The VampPrior (Tomczak and Welling 2018): p(z) = (1/K) sum_k q(z | u_k), the mixture of the
    encoder's own Gaussian posteriors at ``K`` learned pseudo-inputs ``u_k``.

    ``encoder`` is the VAE's (a Gaussian one: images ``(K, C, H, W)`` -> ``(loc, scale)``, each
    ``(K, L)``), shared, not copied: it is held by reference and is not a submodule of the prior,
    so its parameters stay the VAE's (declared once, by the guide) and learn from both the prior
    term and the guide. The pseudo-inputs are this module's parameter: ``u = hardtanh(raw, 0, 1)``
    with ``raw: (K, C, H, W)`` drawn from N(0.05, 0.01) at the start, as in the paper, so they stay images
    in [0, 1]. ``prior()`` is a ``MixtureSameFamily`` (uniform weights, ``K`` diagonal
    Gaussians): ``log_prob`` is the mixture's, and ``sample`` draws a component, then a z.
    """

    def __init__(self, latent_dim: int, *, encoder: nn.Module, input_shape: tuple[int, ...], num_pseudo_inputs: int = 500, seed: int = 0):
        super().__init__()
        if not isinstance(num_pseudo_inputs, int) or isinstance(num_pseudo_inputs, bool) or num_pseudo_inputs <= 0:
            raise InputError(f"num_pseudo_inputs must be a positive integer, got {num_pseudo_inputs!r}")
        generator = torch.Generator().manual_seed(seed)
        self.latent_dim = latent_dim
        self.raw_pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(num_pseudo_inputs, *input_shape, generator=generator))
        self._encoder = (encoder,)  # a reference, not a submodule (see the class docs)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The pseudo-inputs ``u: (K, C, H, W)`` in [0, 1]."""
        return F.hardtanh(self.raw_pseudo_inputs, 0.0, 1.0)

    def forward(self) -> dist.Distribution:
        loc, scale = self._encoder[0](self.pseudo_inputs)[:2]  # (K, L) each
        components = dist.Normal(loc, scale).to_event(1)
        weights = dist.Categorical(logits=torch.zeros(len(loc), device=loc.device, dtype=loc.dtype))
        return dist.MixtureSameFamily(weights, components)


PRIORS: dict[str, Callable[..., nn.Module]] = {
    "normal": StandardNormal,
    "laplace": LaplacePrior,
    "student_t": StudentTPrior,
    "mixture": GaussianMixturePrior,
    "vamp": VampPrior,
}


def make_prior(name: str, latent_dim: int, **options) -> nn.Module:
    """The built-in prior called ``name`` (one of :data:`PRIORS`) over ``(latent_dim,)``.

    ``options`` go to its constructor: the VampPrior needs ``encoder`` and ``input_shape`` (and
    takes ``num_pseudo_inputs``); the VAE passes them.
    """
    if name not in PRIORS:
        raise InputError(f"unknown prior {name!r}; choose from {sorted(PRIORS)} or pass your own callable")
    if name == "vamp" and "encoder" not in options:
        raise InputError("the VampPrior is a mixture of a VAE's own posteriors q(z|u_k): use it with the VAE (prior='vamp')")
    return PRIORS[name](latent_dim, **options)


def check_prior(prior, latent_dim: int) -> None:
    """Raise :class:`~pyrovae.errors.InputError` unless ``prior()`` is a distribution with event shape ``(latent_dim,)``."""
    if not callable(prior):
        raise InputError(f"a prior must be callable and return a distribution over z, got {type(prior).__name__}")
    d = prior()
    if not isinstance(d, torch.distributions.Distribution):
        raise InputError(f"the prior returned {type(d).__name__}, not a distribution")
    if tuple(d.event_shape) != (latent_dim,) or tuple(d.batch_shape) != ():
        raise InputError(
            f"the prior's distribution must have batch_shape () and event_shape ({latent_dim},), "
            f"got batch_shape {tuple(d.batch_shape)} and event_shape {tuple(d.event_shape)}; "
            "use .to_event(1) on a per-coordinate distribution"
        )
