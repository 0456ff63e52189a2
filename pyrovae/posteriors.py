"""Posteriors q(z|x): objects that turn what the encoder gives into a Pyro distribution over z.

A posterior object is called with the encoder's outputs, ``loc`` and ``scale`` (each ``(B, L)``)
and, when its ``context_dim`` is ``C > 0``, a context vector ``h: (B, C)`` that the encoder
computes from ``x`` as well (build the encoder with ``context_dim=C``, see :mod:`pyrovae.nets`).
It returns a distribution with batch shape ``(B,)`` and event shape ``(L,)``.

* :class:`DiagonalGaussian`: ``Normal(loc, scale)``, the usual amortised posterior.
* :class:`FlowPosterior`: that Gaussian pushed through ``k`` transforms of
  :mod:`pyro.distributions.transforms`, each conditioned on ``h``, as a Pyro
  ``TransformedDistribution``::

      z_0 ~ Normal(loc, scale),   z_k = f_k(z_{k-1}; h),   log q(z_k|x) = log N(z_0) - sum_k log |det df_k/dz_{k-1}|

  ``"iaf"``: inverse autoregressive flows (Kingma et al. 2016), Pyro's
  ``ConditionalAffineAutoregressive`` in its "stable" (gated) form, a MADE of two hidden layers
  of :data:`IAF_HIDDEN` units per step that sees ``h``, the order of the latent coordinates
  reversed from one step to the next. ``"planar"``: planar flows (Rezende and Mohamed 2015),
  Pyro's ``ConditionalPlanar``, whose ``u, w, b`` a dense network computes from ``h``.

**Densities.** ``q.log_prob(z)`` of a ``z`` that ``q`` drew itself is exact and cheap: each
Pyro transform keeps the input of its last call, so no inverse is computed. This is how the
ELBO, the IWAE bound and the importance-sampled log-likelihood of :mod:`pyrovae.evaluation`
score it (they draw z from the guide and score the same tensor). At any other ``z`` an IAF
inverts itself (``L`` sequential passes) and a planar flow cannot (Pyro raises).

Write your own: any ``nn.Module`` with a ``context_dim`` attribute whose ``forward(loc, scale[,
h])`` returns such a distribution, passed as ``VAE(config, posterior=..., encoder=...)``.
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, conditional_planar
from pyro.nn import ConditionalAutoRegressiveNN
from torch import Tensor, nn

from .errors import InputError

__all__ = ["DiagonalGaussian", "FlowPosterior", "iaf_posterior", "planar_posterior", "POSTERIORS", "make_posterior", "point_estimate"]

#: hidden widths of each IAF step's MADE (the IAF paper's MNIST model: two layers of 320)
IAF_HIDDEN = (320, 320)
#: hidden widths of the network that gives each planar step its parameters from the context
PLANAR_HIDDEN = (100,)


class DiagonalGaussian(nn.Module):
    """q(z|x) = Normal(loc, scale), diagonal, over ``(L,)``; no context, no parameters."""

    context_dim = 0

    def forward(self, loc: Tensor, scale: Tensor) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)


class FlowPosterior(nn.Module):
    """q(z|x): ``Normal(loc, scale)`` pushed through ``flows``, Pyro conditional transforms, each conditioned on the
    context ``h: (B, context_dim)``; see the module docs. ``flows`` is a list of ``ConditionalTransformModule``."""

    def __init__(self, flows: list, context_dim: int):
        super().__init__()
        if not flows:
            raise InputError("a flow posterior needs at least one flow")
        self.flows = nn.ModuleList(flows)
        self.context_dim = context_dim

    def forward(self, loc: Tensor, scale: Tensor, context: Tensor) -> dist.Distribution:
        base = dist.Normal(loc, scale).to_event(1)  # batch (B,), event (L,)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])


def iaf_posterior(latent_dim: int, flow_layers: int, context_dim: int | None = None, hidden: tuple[int, ...] = IAF_HIDDEN) -> FlowPosterior:
    """``flow_layers`` inverse autoregressive flows over ``(latent_dim,)``, conditioned on a context of
    ``context_dim`` (default ``latent_dim``) values; odd steps read the coordinates in reverse order."""
    _check_flow_layers(flow_layers)
    context_dim = latent_dim if context_dim is None else context_dim
    flows = []
    for step in range(flow_layers):
        order = torch.arange(latent_dim)
        made = ConditionalAutoRegressiveNN(latent_dim, context_dim, list(hidden), permutation=order.flip(0) if step % 2 else order)
        flows.append(ConditionalAffineAutoregressive(made, stable=True))
    return FlowPosterior(flows, context_dim)


def planar_posterior(latent_dim: int, flow_layers: int, context_dim: int | None = None, hidden: tuple[int, ...] = PLANAR_HIDDEN) -> FlowPosterior:
    """``flow_layers`` planar flows over ``(latent_dim,)`` whose parameters come from a context of
    ``context_dim`` (default ``latent_dim``) values."""
    _check_flow_layers(flow_layers)
    context_dim = latent_dim if context_dim is None else context_dim
    return FlowPosterior([conditional_planar(latent_dim, context_dim, list(hidden)) for _ in range(flow_layers)], context_dim)


def _check_flow_layers(flow_layers) -> None:
    if not isinstance(flow_layers, int) or isinstance(flow_layers, bool) or flow_layers <= 0:
        raise InputError(f"flow_layers must be a positive integer, got {flow_layers!r}")


POSTERIORS: dict[str, Callable[..., nn.Module]] = {
    "gaussian": lambda latent_dim, flow_layers: DiagonalGaussian(),
    "iaf": iaf_posterior,
    "planar": planar_posterior,
}


def make_posterior(name: str, latent_dim: int, flow_layers: int) -> nn.Module:
    """The built-in posterior called ``name`` (one of :data:`POSTERIORS`) over ``(latent_dim,)``;
    ``flow_layers`` steps for a flow (ignored by ``"gaussian"``)."""
    if name not in POSTERIORS:
        raise InputError(f"unknown posterior {name!r}; choose from {sorted(POSTERIORS)} or pass your own")
    return POSTERIORS[name](latent_dim, flow_layers)


def point_estimate(q: dist.Distribution) -> Tensor:
    """One code per image of a posterior ``q`` (batch ``(B,)``, event ``(L,)``): ``(B, L)``.

    The mean of a Gaussian; for a flow, the base Gaussian's mean pushed through the flows (its
    image under the flow, cheap and deterministic; the flow's mean has no closed form).
    """
    if isinstance(q, dist.TransformedDistribution):
        z = q.base_dist.mean
        for transform in q.transforms:
            z = transform(z)
        return z
    return q.mean
