"""The variational autoencoder as a Pyro program: ``model(x=None, ...)`` and ``guide(x, ...)``.

Generative model, for each of the B images of a batch::

    z ~ p(z)                      prior, event shape (L,)
    x ~ p(x | decoder(z))         likelihood, event shape (C, H, W); observed when x is given

Guide (amortised variational posterior)::

    z ~ q(z | encoder(x))         a diagonal Gaussian Normal(loc(x), scale(x)) by default, or that
                                  Gaussian pushed through flows conditioned on a context h(x)
                                  (``posterior="iaf"`` or ``"planar"``, see :mod:`pyrovae.posteriors`)

Train it with any Pyro ELBO (the JIT ones too) and any ``pyro.optim`` optimizer, in your own loop::

    vae = VAE(VAEConfig())
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    for x in batches:
        svi.step(x, num_data=60000)

``num_data`` is the size of the dataset the batch comes from: the plate over images has that
size and the batch as its subsample, so Pyro scales the batch to a minibatch estimate of the full
ELBO. Without ``x`` the model generates: ``Predictive(vae.model, num_samples=16)(batch_size=1)``
draws ``z`` and ``x``. ``kl_weight`` (beta, ``config.beta``) scales the latent site in both
model and guide, which multiplies the KL term (a weight of 0 masks the site).

**Parameters, the Pyro way.** The model and guide declare their networks with
``pyro.module(f"{name}.decoder", decoder, update_module_params=True)`` (and likewise the
encoder, and a prior or likelihood that has parameters), so every parameter lives in Pyro's
param store under a name such as ``"vae.decoder$$$layers.0.weight"``. The store holds the very
tensors of the modules: SVI, the JIT ELBOs, per-parameter ``pyro.optim`` settings
(``module_name`` is ``"vae.decoder"``), ``pyro.optim`` state save/load and the param store's own
save/load all work, and so do ``state_dict`` and torch optimizers. The rule:

* each VAE has its own ``name``, the prefix of its parameters' names. By default the first VAE of a
  process is ``"vae"``, the next ``"vae_1"``, and so on; default names are never reused within a
  process, so two VAEs never share parameters, even after one is gone. A name given with
  ``name=`` is refused while another live VAE has it. The conditional VAE
  (:mod:`pyrovae.models.cvae`) follows the same rule, with default names ``"cvae"``,
  ``"cvae_1"``, ..., and the same registry of names in use.
* as in Pyro, the param store wins over the module when they disagree: after
  ``pyro.get_param_store().load(path)``, the next call of ``model`` or ``guide`` takes the loaded
  parameters into the modules. Use ``name=`` to find a model's parameters again in another
  process.

Why: a private, module-local parameter scheme (our first design) kept the store empty, and with
it broke every Pyro tool that looks parameters up there; a name shared by two models would make
them train one set of weights. ``copy.deepcopy`` keeps the name: build a new VAE and
``load_state_dict`` to have a second, independent one.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule
from pyro.poutine.util import is_validation_enabled, prune_subsample_sites
from torch import Tensor, nn

from ..errors import InputError
from ..likelihoods import LIKELIHOODS, make_likelihood, outputs_per_value
from ..nets import NetworkConfig, build_decoder, build_encoder
from ..posteriors import POSTERIORS, make_posterior, point_estimate
from ..priors import PRIORS, check_prior, make_prior
from .base import AutoencoderMixin, Progress, Update

__all__ = ["VAE", "VAEConfig", "ELBOS", "free_bits_loss"]

#: the objectives :meth:`VAE.training_step` can use: Trace_ELBO, TraceMeanField_ELBO, the IWAE bound
ELBOS = ("trace", "meanfield", "iwae")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class VAEConfig:
    """The VAE and its training objective.

    network:          the shared architecture.
    prior:            a built-in prior's name (:data:`pyrovae.priors.PRIORS`); or pass ``prior=`` to :class:`VAE`.
                      ``"vamp"``, the VampPrior, mixes the model's own Gaussian posteriors at learned pseudo-inputs.
    num_pseudo_inputs: K, the VampPrior's pseudo-inputs (the paper's 500); used by ``prior="vamp"`` only.
    posterior:        q(z|x): ``"gaussian"`` (diagonal), or a flow (``"iaf"``, ``"planar"``; see
                      :mod:`pyrovae.posteriors`); or pass ``posterior=`` to :class:`VAE`.
    flow_layers:      steps of a flow posterior (ignored by ``"gaussian"``).
    likelihood:       a built-in likelihood's name (:data:`pyrovae.likelihoods.LIKELIHOODS`).
    beta:             the KL weight.
    elbo:             ``"trace"`` (Trace_ELBO), ``"meanfield"`` (TraceMeanField_ELBO, analytic KL where
                      known) or ``"iwae"`` (RenyiELBO with alpha=0: the IWAE bound of each image).
    num_particles:    samples of z per image in the objective (k of the IWAE bound), vectorized.
    kl_warmup_epochs: raise the KL weight linearly, step by step, from 0 to ``beta`` over this many epochs.
    free_bits:        nats per image below which a latent site's KL term, averaged over the batch, is not
                      pushed lower in training (Kingma et al. 2016's "free bits", one group per sample site;
                      see :func:`free_bits_loss`). It keeps a layer from collapsing onto its prior before it
                      has something to code; validation and evaluation use the plain ELBO. 0: off.

    The IWAE bound is a log-mean-exp over particles of whole log-weights; a weight on the KL part
    inside it would change the bound itself, so ``elbo="iwae"`` needs ``beta=1`` and no warm-up.

    Which ELBOs each model takes (``elbo=``; every prior, posterior and likelihood alike)::

        model                          trace   meanfield   iwae
        vae   (VAE, any prior incl.     yes     yes         yes
              VampPrior; Gaussian,
              IAF or planar posterior)
        cvae  (CVAE, likewise)          yes     yes         yes
        vae2  (TwoLayerVAE)             yes     refused     yes
        hvae  (HierarchicalVAE)         yes     refused     yes

    TraceMeanField_ELBO replaces a site's ``log q - log p`` by ``KL(q || p)`` where torch knows it
    (a Gaussian q against the normal prior) and keeps the Monte Carlo term where it does not (flows,
    the other priors, the VampPrior): both estimate the ELBO when the guide has one latent site, as the
    VAE's and the CVAE's have. The two-layer VAE's q(z2|z1) depends on z1 (the hierarchical VAE's q(z1|x, z2)
    on z2), so there it would estimate another objective (see :class:`~pyrovae.models.two_layer.TwoLayerVAEConfig`).
    """

    network: NetworkConfig = field(default_factory=NetworkConfig)
    prior: str = "normal"
    likelihood: str = "bernoulli"
    beta: float = 1.0
    elbo: str = "trace"
    num_particles: int = 1
    kl_warmup_epochs: int = 0
    posterior: str = "gaussian"
    flow_layers: int = 2
    num_pseudo_inputs: int = 500
    free_bits: float = 0.0

    def __post_init__(self):
        if isinstance(self.network, dict):
            object.__setattr__(self, "network", NetworkConfig(**self.network))
        if not isinstance(self.beta, (int, float)) or not self.beta >= 0:
            raise InputError(f"beta must be a non-negative number, got {self.beta!r}")
        if self.prior not in PRIORS:
            raise InputError(f"unknown prior {self.prior!r}; choose from {sorted(PRIORS)} (or pass prior= to VAE)")
        if self.likelihood not in LIKELIHOODS:
            raise InputError(
                f"unknown likelihood {self.likelihood!r}; choose from {sorted(LIKELIHOODS)} (or pass likelihood= to VAE)"
            )
        if self.elbo not in ELBOS:
            raise InputError(f"unknown elbo {self.elbo!r}; choose from {ELBOS}")
        if not _is_int(self.num_particles) or self.num_particles <= 0:
            raise InputError(f"num_particles must be a positive integer, got {self.num_particles!r}")
        if self.posterior not in POSTERIORS:
            raise InputError(f"unknown posterior {self.posterior!r}; choose from {sorted(POSTERIORS)} (or pass posterior= to VAE)")
        for name in ("flow_layers", "num_pseudo_inputs"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.prior == "vamp" and self.posterior != "gaussian":
            raise InputError(
                f"the VampPrior mixes the encoder's Gaussian posteriors q(z|u_k); it needs posterior='gaussian', got {self.posterior!r}"
            )
        if not _is_int(self.kl_warmup_epochs) or self.kl_warmup_epochs < 0:
            raise InputError(f"kl_warmup_epochs must be a non-negative integer, got {self.kl_warmup_epochs!r}")
        if self.elbo == "iwae" and (self.beta != 1 or self.kl_warmup_epochs):
            raise InputError(
                "the IWAE bound (elbo='iwae') is defined with beta=1 and no KL warm-up: a weight inside its "
                f"log-mean-exp changes the bound (got beta={self.beta}, kl_warmup_epochs={self.kl_warmup_epochs})"
            )
        if isinstance(self.free_bits, bool) or not isinstance(self.free_bits, (int, float)) or not self.free_bits >= 0:
            raise InputError(f"free_bits must be a non-negative number of nats, got {self.free_bits!r}")
        if self.free_bits and (self.elbo != "trace" or self.num_particles != 1):
            raise InputError(
                f"free bits floor the KL terms of the one-sample ELBO: they need elbo='trace' and num_particles=1 "
                f"(got elbo={self.elbo!r}, num_particles={self.num_particles})"
            )


def _build_elbo(config: VAEConfig):
    """The Pyro ELBO of ``config``; one plate (the images), so no plate discovery is needed."""
    options = dict(num_particles=config.num_particles, vectorize_particles=config.num_particles > 1, max_plate_nesting=1)
    if config.elbo == "iwae":
        return RenyiELBO(alpha=0, **options)
    return (Trace_ELBO if config.elbo == "trace" else TraceMeanField_ELBO)(**options)


def _scaled(scale: float):
    """``poutine.scale(scale)``; nothing for 1; a mask for 0 (Pyro's scale must be positive)."""
    if scale == 1:
        return nullcontext()
    return poutine.mask(mask=False) if scale == 0 else poutine.scale(scale=scale)


#: prefix -> the counter of its default names ("vae", "vae_1", ...; "cvae", "cvae_1", ...)
_default_names: dict[str, itertools.count] = {}
#: name -> the live model (VAE or CVAE) that has it; a memo of names in use, not state (entries vanish with their models)
_live_names: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _new_name(prefix: str) -> str:
    counter = _default_names.setdefault(prefix, itertools.count())
    while True:
        index = next(counter)
        name = prefix if index == 0 else f"{prefix}_{index}"
        if name not in _live_names:
            return name


def _claim_name(model, name: str | None, prefix: str) -> str:
    """The name of ``model``'s parameters in Pyro's param store (see the module docs), recorded as in use.

    ``name`` if given and no other live model has it; else the next free default ``prefix``, ``prefix_1``, ...
    """
    if name is not None and (not isinstance(name, str) or not name or "$$$" in name):
        raise InputError(f"name must be a non-empty string without '$$$', got {name!r}")
    holder = _live_names.get(name) if name is not None else None
    if holder is not None:
        raise InputError(
            f"another {type(holder).__name__} in this process is called {name!r}: the two would share parameters; choose another name"
        )
    name = name if name is not None else _new_name(prefix)
    _live_names[name] = model
    return name


def _declare_parts(model, *parts: str) -> None:
    """Register the parameters of ``model.<part>`` in Pyro's param store, as ``<model.name>.<part>$$$<parameter>``.

    PyroModules (a user's prior, say) declare their own parameters; functions have none.
    """
    for part in parts:
        module = getattr(model, part)
        if isinstance(module, nn.Module) and not isinstance(module, PyroModule):
            pyro.module(f"{model.name}.{part}", module, update_module_params=True)


def _images_plate(batch_size: int, num_data: int | None, device):
    """The plate over images: ``batch_size`` of them, standing for ``num_data`` (scale ``num_data / batch_size``)."""
    if num_data is None or num_data == batch_size:
        return pyro.plate("data", batch_size, device=device)
    return pyro.plate("data", num_data, subsample=torch.arange(batch_size, device=device), device=device)


def _set_prior_likelihood_objective(model, config: VAEConfig, prior, likelihood, latent_dim: int) -> None:
    """Give ``model`` (a VAE or CVAE, its encoder built) its ``prior`` over ``(latent_dim,)`` and its ``likelihood``
    (those ``config`` names when ``None``), its KL weight and its ELBO; raise :class:`InputError` unless the
    prior's event shape is ``(latent_dim,)``."""
    if prior is None and config.prior == "vamp":
        if getattr(model, "conditional", False):
            raise InputError("the VampPrior needs q(z|u) of pseudo-images u alone; a CVAE's encoder also needs a label: choose another prior")
        prior = make_prior("vamp", latent_dim, encoder=model.encoder, input_shape=config.network.input_shape, num_pseudo_inputs=config.num_pseudo_inputs)
    model.prior = prior if prior is not None else make_prior(config.prior, latent_dim)
    model.likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
    model.kl_weight = float(config.beta)
    model.elbo = _build_elbo(config)
    check_prior(model.prior, latent_dim)


def _check_posterior(posterior, encoded: tuple, latent_dim: int) -> None:
    """Raise :class:`InputError` unless ``posterior(*encoded)``, for the encoder's output on two images, is a
    distribution with batch shape ``(2,)`` and event shape ``(latent_dim,)``."""
    if not isinstance(encoded, tuple):
        raise InputError(f"a VAE's encoder must return (loc, scale[, context]), got {type(encoded).__name__}")
    try:
        q = posterior(*encoded)
    except TypeError as error:
        raise InputError(
            f"the posterior does not take the encoder's {len(encoded)} outputs ({error}); a flow posterior needs an encoder "
            "built with its context_dim (build_encoder(network, gaussian=True, context_dim=posterior.context_dim))"
        ) from None
    if not isinstance(q, torch.distributions.Distribution) or tuple(q.batch_shape) != (2,) or tuple(q.event_shape) != (latent_dim,):
        raise InputError(f"the posterior must give a distribution with batch_shape (B,) and event_shape ({latent_dim},), got {q!r}")


def _check_likelihood(likelihood, out: Tensor, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`InputError` unless ``likelihood(out)``, for the decoder output ``out: (2, C, H, W)`` of two
    codes, is a distribution with batch shape ``(2,)`` and event shape ``input_shape``."""
    d = likelihood(out)
    if not isinstance(d, torch.distributions.Distribution):
        raise InputError(f"the likelihood returned {type(d).__name__}, not a distribution")
    if tuple(d.batch_shape) != (2,) or tuple(d.event_shape) != input_shape:
        raise InputError(
            f"the likelihood must give batch_shape (B,) and event_shape {input_shape}, got "
            f"{tuple(d.batch_shape)} and {tuple(d.event_shape)}; use .to_event(3) on a per-pixel distribution"
        )


@contextmanager
def _kl_weight_set(model, weight: float):
    """``model.kl_weight`` is ``weight`` inside, ``model.config.beta`` again after."""
    model.kl_weight = weight
    try:
        yield
    finally:
        model.kl_weight = float(model.config.beta)


def _warmed_up_kl_weight(config: VAEConfig, progress: Progress) -> float:
    """beta, raised linearly from 0 over ``config.kl_warmup_epochs`` epochs (``progress.epochs_done``)."""
    warmup = config.kl_warmup_epochs
    return float(config.beta) * (min(1.0, progress.epochs_done / warmup) if warmup else 1.0)


def free_bits_loss(model, guide, *args, free_bits: float, batch_mean=None, **kwargs) -> Tensor:
    """The one-sample negative ELBO of ``model`` and ``guide`` on ``*args, **kwargs``, with free bits: a latent
    site's KL term ``log q(z) - log p(z | parents)``, summed over its batch, counts as at least ``free_bits``
    nats for each example in the batch (Kingma et al. 2016, eq. 15, with each sample site a group).

    Below the floor the site gets no gradient from its KL term, so it is free to carry that much
    information; above it the loss is Trace_ELBO's. Like ``Trace_ELBO().differentiable_loss`` it is a
    sum scaled by the plates (and ``poutine.scale``/``mask``); the floor is scaled alike, so a site with
    weight beta counts ``beta * max(KL, free_bits)`` per example. Every guide site must be reparameterized.
    With ``free_bits=0`` it equals ``Trace_ELBO().differentiable_loss`` for the same draw.

    batch_mean: when the batch is one process's shard of a larger one (data parallelism), the function
        that turns a statistic averaged over the shard into that of the whole batch (the Trainer's
        ``update.batch_mean``): the floor is then compared with the whole batch's KL, as one process
        does. ``None``: the batch given is the whole batch.
    """
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(*args, **kwargs))
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs))
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    latent = {}  # site -> its KL term and its floor, each scaled like the site
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["fn"].has_rsample:
            raise InputError(f"free_bits_loss needs reparameterized guide sites; {name!r} is {type(site['fn']).__name__}")
        if name in model_trace.nodes:
            weights = scale_and_mask(torch.ones_like(site["unscaled_log_prob"]), site["scale"], site["mask"])
            latent[name] = ((site["log_prob"] - model_trace.nodes[name]["log_prob"]).sum(), free_bits * weights.sum())
    if latent and batch_mean is not None:  # one all-reduce for every site: (KL terms, floors) of the whole batch
        terms = batch_mean(torch.stack([torch.stack(pair) for pair in latent.values()]))
        latent = dict(zip(latent, terms))
    loss = 0.0
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name in latent:
            kl, floor = latent[name]
            loss = loss + torch.maximum(kl, floor)
        else:
            loss = loss + site["log_prob"].sum()
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and name not in guide_trace.nodes:
            loss = loss - site["log_prob"].sum()
    return loss


def _elbo_loss(model, x: Tensor, num_data: int | None, training: bool = False, batch_mean=None, **condition) -> Tensor:
    """``model.elbo``'s loss per example for ``model.model`` and ``model.guide`` on ``x: (B, C, H, W)`` (and
    ``condition``, the further keyword arguments both take), the batch standing for ``num_data`` images;
    in ``training``, with the config's free bits (:func:`free_bits_loss`, their floor on the KL of the whole
    batch that ``batch_mean`` gives, see :meth:`pyrovae.models.base.Update.batch_mean`) if it has any.

    Trace ELBOs return a differentiable loss (the caller runs backward); RenyiELBO offers
    ``loss_and_grads`` only and runs unscaled (a scale inside its log-mean-exp would change
    the bound), so its gradients are filled here and the returned loss is detached.
    """
    elbo = model.elbo
    if isinstance(elbo, RenyiELBO):
        objective = elbo.loss_and_grads if torch.is_grad_enabled() else elbo.loss
        value = objective(model.model, model.guide, x, **condition)
        for param in model.parameters():
            if param.grad is not None:
                param.grad.div_(len(x))
        return torch.tensor(value / len(x), device=x.device)
    n = num_data or len(x)
    if training and model.config.free_bits:
        free_bits = model.config.free_bits
        return free_bits_loss(model.model, model.guide, x, num_data=n, free_bits=free_bits, batch_mean=batch_mean, **condition) / n
    return elbo.differentiable_loss(model.model, model.guide, x, num_data=n, **condition) / n


class VAE(AutoencoderMixin, PyroModule):
    """A VAE whose ``model`` and ``guide`` are Pyro programs over a batch ``x: (B, C, H, W)``.

    ``prior``, ``likelihood``, ``posterior``, ``encoder`` and ``decoder`` default to what ``config`` names;
    pass your own to replace them (see :mod:`pyrovae.priors`, :mod:`pyrovae.likelihoods` and :mod:`pyrovae.posteriors`).
    The encoder must return ``(loc, scale)``, each ``(B, L)`` (and a context ``(B, C)`` after them for a flow
    posterior); the decoder ``(..., L) -> (..., C, H, W)``, or ``(..., P * C, H, W)`` for a likelihood with
    ``outputs_per_value = P`` (see :mod:`pyrovae.likelihoods`).
    ``name`` prefixes the names of its parameters in Pyro's param store (see the module docs).
    """

    def __init__(
        self, config: VAEConfig | None = None, *, prior=None, likelihood=None, posterior=None, encoder=None, decoder=None, name: str | None = None
    ):
        name = _claim_name(self, name, self._name_prefix)
        super().__init__(name=name)
        self.name = name
        self.config = config = config or VAEConfig()
        if not isinstance(config, VAEConfig):
            raise InputError(f"VAE needs a VAEConfig, got {type(config).__name__}")
        net = config.network
        self.posterior = posterior if posterior is not None else make_posterior(config.posterior, net.latent_dim, config.flow_layers)
        context_dim = getattr(self.posterior, "context_dim", 0)
        self.encoder = encoder if encoder is not None else build_encoder(net, gaussian=True, context_dim=context_dim)
        likelihood = likelihood if likelihood is not None else make_likelihood(config.likelihood)
        self.decoder = decoder if decoder is not None else build_decoder(net, outputs_per_value(likelihood))
        _set_prior_likelihood_objective(self, config, prior, likelihood, self.prior_dim)
        with torch.no_grad():
            _check_posterior(self.posterior, self.encoder(torch.zeros(2, *self.input_shape, device=self.device)), self.latent_dim)
            _check_likelihood(self.likelihood, self.decoder(torch.zeros(2, self.latent_dim, device=self.device)), self.input_shape)

    #: default names of instances: "vae", "vae_1", ... (see the module docs)
    _name_prefix = "vae"
    #: the sample site that ``prior`` is the distribution of
    prior_site = "z"

    @property
    def prior_dim(self) -> int:
        """The size of the latent that the prior is on: the code's, ``L``."""
        return self.latent_dim

    @property
    def support(self):
        return getattr(self.likelihood, "support", None)

    # ------------------------------------------------------------------ the Pyro program

    def _declare(self, *parts: str) -> None:
        """Register the parameters of ``self.<part>`` in Pyro's param store, as ``<name>.<part>$$$<parameter>``."""
        _declare_parts(self, *parts)

    def model(self, x: Tensor | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, z) = p(z) p(x|z): scores ``x: (B, C, H, W)``, or samples ``batch_size`` images without it.

        ``num_data``: the size of the dataset the batch stands for (default: the batch itself).
        Returns the images, ``(B, C, H, W)`` (``x`` itself when given).
        """
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        self._declare("decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            with _scaled(self.kl_weight):
                z = pyro.sample("z", self.prior())  # (B, L)
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)  # (B, C, H, W)

    def guide(self, x: Tensor, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """q(z|x) = posterior(encoder(x)) for ``x: (B, C, H, W)``, by default Normal(loc(x), scale(x)); returns ``z: (B, L)``."""
        if is_validation_enabled():
            self.check_input(x)
        self._declare("encoder", "posterior")
        with _images_plate(x.shape[0], num_data, x.device):
            q = self.posterior(*self.encoder(x))  # batch (B,), event (L,)
            with _scaled(self.kl_weight):
                return pyro.sample("z", q)

    # ------------------------------------------------------------------ training interface

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor | float]:
        """One step of the configured ELBO on ``x: (B, C, H, W)``, the batch standing for ``progress.num_data`` images.

        Figures: ``loss`` (the negative ELBO per image; with ``config.free_bits``, the loss with their floor,
        which is not a bound) and ``kl_weight`` (beta after warm-up).
        """
        weight = _warmed_up_kl_weight(self.config, progress)
        with _kl_weight_set(self, weight):
            loss = update("model", lambda: _elbo_loss(self, x, progress.num_data, training=True, batch_mean=update.batch_mean))
        return {"loss": loss, "kl_weight": weight}

    def validation_loss(self, x: Tensor) -> Tensor:
        """The configured objective's loss per image on ``x: (B, C, H, W)``, with the full KL weight."""
        return _elbo_loss(self, x, None).detach()

    # ------------------------------------------------------------------ using a trained model

    def encode(self, x: Tensor) -> Tensor:
        """The code ``(B, L)`` of ``x: (B, C, H, W)``: the posterior mean (a flow's: see :func:`~pyrovae.posteriors.point_estimate`)."""
        return point_estimate(self.posterior(*self.encoder(x)))

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
