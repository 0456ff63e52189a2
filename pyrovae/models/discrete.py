"""Pyro's exact sums over discrete latents, as the models with one use them (M2's label,
:mod:`pyrovae.models.semi_supervised`; the mixture VAE's component, :mod:`pyrovae.models.mixture`).

A sample site marked ``infer={"enumerate": "parallel"}`` (or by ``config_enumerate``) is summed over
its values by ``TraceEnum_ELBO`` rather than sampled: in the guide (M2's ``y``) the ELBO is an
expectation under q, computed exactly; in the model alone (the mixture VAE's ``c``) the site is
marginalised out of p. ``max_plate_nesting=1`` (the plate over images) puts the values on the dim left of it.
"""

from __future__ import annotations

import torch
from pyro.infer import TraceEnum_ELBO
from torch import Tensor

from ..errors import InputError
from .vae import VAEConfig, _is_int

__all__ = ["check_num_classes", "build_enum_elbo", "enumerated_loss"]


def check_num_classes(value, what: str = "num_classes") -> None:
    """Raise :class:`InputError` unless ``value`` is an integer K >= 2 (one class is no choice to sum over)."""
    if not _is_int(value) or value < 2:
        raise InputError(f"{what} must be an integer K >= 2 (a discrete latent needs at least two values), got {value!r}")


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
