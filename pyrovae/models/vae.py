"""The variational autoencoder as a Pyro program: ``model(x)`` and ``guide(x)``.

Generative model, for each of the B images in the batch::

    z ~ p(z)                      prior, event shape (L,)
    x ~ p(x | decoder(z))         likelihood, event shape (C, H, W)

Guide (amortised variational posterior)::

    z ~ Normal(loc(x), scale(x))  diagonal Gaussian from the encoder

Train it with any Pyro ELBO, inside your own loop::

    vae = VAE(VAEConfig())
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for x in batches:
        svi.step(x, num_data=60000)

``num_data`` scales the batch to the dataset size (a minibatch estimate of the full ELBO);
``kl_weight`` (beta) scales the latent site in both model and guide, which multiplies the KL term
(a weight of 0 masks the site: only the reconstruction term is left).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.runtime import effectful
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.distributions import constraints

from ..errors import InputError
from ..likelihoods import LIKELIHOODS, make_likelihood
from ..nets import NetworkConfig, build_decoder, build_encoder
from ..priors import PRIORS, check_prior, make_prior
from .base import AutoencoderMixin

__all__ = ["VAE", "VAEConfig", "declare_parameters"]


@dataclass(frozen=True)
class VAEConfig:
    """network: the shared architecture; prior / likelihood: built-in names; beta: the KL weight."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    prior: str = "normal"
    likelihood: str = "bernoulli"
    beta: float = 1.0

    def __post_init__(self):
        if isinstance(self.network, dict):
            object.__setattr__(self, "network", NetworkConfig(**self.network))
        if not self.beta >= 0:
            raise InputError(f"beta must be non-negative, got {self.beta}")
        if self.prior not in PRIORS:
            raise InputError(f"unknown prior {self.prior!r}; choose from {sorted(PRIORS)} (or pass prior= to VAE)")
        if self.likelihood not in LIKELIHOODS:
            raise InputError(
                f"unknown likelihood {self.likelihood!r}; choose from {sorted(LIKELIHOODS)} (or pass likelihood= to VAE)"
            )


def _own_value(name, value, constraint=None, event_dim=None):
    return value


_param_site = effectful(_own_value, type="param")
# module -> (prefix, [(site name, parameter)]): walking the module tree on every step costs more
# than the rest of declare_parameters; a memo, not state (entries vanish with their modules)
_SITES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parameter_sites(module: nn.Module, prefix: str) -> list:
    """``[(prefix.name, parameter)]`` of ``module``, without the parameters of PyroModules inside it."""
    sites = []
    for module_name, submodule in module.named_modules(prefix=prefix):
        if isinstance(submodule, PyroModule):
            continue
        for name, param in submodule.named_parameters(prefix=module_name, recurse=False):
            if not hasattr(param, "unconstrained"):  # what SVI reads back; identity for real params
                param.unconstrained = weakref.ref(param)
            sites.append((name, param))
    return sites


def declare_parameters(module: nn.Module, prefix: str) -> None:
    """Record the parameters of ``module`` as Pyro ``param`` sites named ``prefix.name``.

    The value of each site is the module's own tensor: ``SVI`` with a ``pyro.optim`` optimizer
    finds and updates them, while nothing enters Pyro's global param store, so two models
    never share parameters by name. PyroModules declare their own parameters and are skipped.
    The list of parameters is gathered on the first call for each module; a parameter
    added to it later, inside, goes undeclared (assign a new module instead).
    """
    if not isinstance(module, nn.Module):
        return
    cached = _SITES.get(module)
    if cached is None or cached[0] != prefix:
        cached = _SITES[module] = (prefix, _parameter_sites(module, prefix))
    for name, param in cached[1]:
        _param_site(name, param, constraint=constraints.real, event_dim=None, name=name)


def _scaled(scale: float):
    """``poutine.scale(scale)``; nothing for 1; a mask for 0 (Pyro's scale must be positive)."""
    if scale == 1:
        return nullcontext()
    return poutine.mask(mask=False) if scale == 0 else poutine.scale(scale=scale)


class VAE(AutoencoderMixin, PyroModule):
    """A VAE whose ``model`` and ``guide`` are Pyro programs over a batch ``x: (B, C, H, W)``.

    ``prior``, ``likelihood``, ``encoder`` and ``decoder`` default to what ``config`` names;
    pass your own to replace them (see :mod:`pyrovae.priors` and :mod:`pyrovae.likelihoods`).
    The encoder must return ``(loc, scale)``, each ``(B, L)``; the decoder ``(B, L) -> (B, C, H, W)``.
    """

    def __init__(self, config: VAEConfig | None = None, *, prior=None, likelihood=None, encoder=None, decoder=None):
        super().__init__()
        self.config = config = config or VAEConfig()
        net = config.network
        self.encoder = encoder if encoder is not None else build_encoder(net, gaussian=True)
        self.decoder = decoder if decoder is not None else build_decoder(net)
        self.prior = prior if prior is not None else make_prior(config.prior, net.latent_dim)
        self.likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        self.kl_weight = float(config.beta)
        check_prior(self.prior, net.latent_dim)
        self._check_likelihood()

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    def _check_likelihood(self) -> None:
        with torch.no_grad():
            out = self.decoder(torch.zeros(2, self.latent_dim, device=self.device))
            d = self.likelihood(out)
        if not isinstance(d, torch.distributions.Distribution):
            raise InputError(f"the likelihood returned {type(d).__name__}, not a distribution")
        if tuple(d.batch_shape) != (2,) or tuple(d.event_shape) != self.input_shape:
            raise InputError(
                f"the likelihood must give batch_shape (B,) and event_shape {self.input_shape}, got "
                f"{tuple(d.batch_shape)} and {tuple(d.event_shape)}; use .to_event(3) on a per-pixel distribution"
            )

    def model(self, x: Tensor, num_data: int | None = None) -> None:
        """p(x, z) = p(z) p(x|z) for ``x: (B, C, H, W)``; the batch stands for ``num_data`` images."""
        if is_validation_enabled():
            self.check_input(x)
        declare_parameters(self.decoder, "decoder")
        declare_parameters(self.likelihood, "likelihood")
        declare_parameters(self.prior, "prior")
        batch_size = x.shape[0]
        with pyro.plate("data", batch_size, device=x.device), _scaled((num_data or batch_size) / batch_size):
            with _scaled(self.kl_weight):
                z = pyro.sample("z", self.prior())  # (B, L)
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: Tensor, num_data: int | None = None) -> None:
        """q(z|x) = Normal(loc(x), scale(x)) for ``x: (B, C, H, W)``."""
        if is_validation_enabled():
            self.check_input(x)
        declare_parameters(self.encoder, "encoder")
        batch_size = x.shape[0]
        with pyro.plate("data", batch_size, device=x.device), _scaled((num_data or batch_size) / batch_size):
            loc, scale = self.encoder(x)  # (B, L) each
            with _scaled(self.kl_weight):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean ``(B, L)`` of ``x: (B, C, H, W)``."""
        return self.encoder(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x|z), ``(B, C, H, W)``, for ``z: (B, L)``."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """``n`` images ``(n, C, H, W)``: means of p(x|z) for z drawn from the prior."""
        if n <= 0:
            raise InputError(f"n must be positive, got {n}")
        return self.decode(self.prior().sample((n,)))

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 10) -> Tensor:
        """Decode ``steps`` points on the line between the codes of two images ``(C, H, W)``: ``(steps, C, H, W)``."""
        if steps < 2:
            raise InputError(f"steps must be at least 2, got {steps}")
        z = self.encode(torch.stack([x1, x2]))
        t = torch.linspace(0, 1, steps, device=z.device).unsqueeze(1)
        return self.decode((1 - t) * z[0] + t * z[1])
