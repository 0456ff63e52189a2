"""How good is a model: test ELBO, importance-sampled log-likelihood, reconstruction error,
linear-probe accuracy of its codes, and a PCA baseline with the same interface.

Shapes: images ``x`` are ``(N, C, H, W)``, codes ``(N, L)``; ``D = C * H * W``. Log-densities
are in nats per image. Every function runs the model in eval mode (dropout off: the same
images and seed give the same figures) and leaves it in the mode it found it in.

The Pyro models' densities (the ELBO, the importance-sampled log-likelihood) are read off
Pyro traces of the model's own ``guide`` and ``model`` (:func:`log_weights`): every sample site
counts, with the distribution the program built. So any prior, likelihood and posterior work (a
flow posterior is scored by its own density, never by its base Gaussian), and so does a model
with several latent layers (the two-layer VAE's z1 and z2). :func:`log_likelihood` takes one
shortcut: for the common program of one latent site (pyrovae's own VAE and CVAE programs, with
whatever prior, likelihood and posterior), it draws and scores ``z`` without tracing, encoding
each batch once, and gets the same numbers (see :func:`_one_latent_site`).

A conditional model (the CVAE, ``model.conditional``) models images given their labels: pass
``labels: (N,)``, one per image, and its figures are conditional on them. The ELBO and the
importance-sampled likelihood are then those of ``log p(x|y)`` (its ``guide`` and ``model`` are
given ``y``); reconstructions decode each code with its image's label.

Several processes: when a :mod:`torch.distributed` process group of more than one process is
initialised, :func:`test_elbo` and :func:`log_likelihood` are collectives: every rank calls them
with the same images, scores its contiguous shard (:func:`pyrovae.training.distributed.shard_bounds`)
with its own random draws, and the results are all-reduced, so every rank returns the whole
set's. One process computes exactly as before.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import constraints

from .data import ImageData, ImageSet
from .errors import InputError
from .likelihoods import check_observations
from .models import CVAE, VAE
from .models.base import evaluating
from .priors import StandardNormal
from .training import distributed

__all__ = [
    "log_weights",
    "elbo_per_example",
    "test_elbo",
    "discretization_offset",
    "log_likelihood",
    "reconstruction_error",
    "linear_probe",
    "probe_predictions",
    "per_class_accuracy",
    "mmd",
    "aggregate_posterior_samples",
    "prior_mmd",
    "active_units",
    "PCA",
    "predict_classes",
    "confusion_matrix",
    "clustering_accuracy",
    "class_accuracy",
    "evaluate",
]

#: On the CPU, decoder passes much larger than the caches run 1.5-3 times slower per image
#: (measured: 784-400-50 MLP, Bernoulli log_prob), so a chunk holds at most this many bytes there.
CPU_CHUNK_BYTES = 2**26
#: Reconstructions are clipped to [BCE_EPS, 1 - BCE_EPS] before the binary cross-entropy.
BCE_EPS = 1e-6
#: Images in one batch of :func:`log_likelihood` when ``batch_size`` is not given.
DEFAULT_NLL_BATCH = 100


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_labels(model, x: Tensor, labels: Tensor | None) -> None:
    """Labels ``(N,)`` of the images ``x: (N, C, H, W)`` for a conditional model, none for another."""
    conditional = getattr(model, "conditional", False)
    if labels is None and conditional:
        raise InputError(f"a {type(model).__name__} models images given their labels: pass labels, one per image")
    if labels is not None and not conditional:
        raise InputError(f"a {type(model).__name__} is not conditional: it takes no labels")
    if labels is not None:
        model.check_labels(labels, len(x))


def _networks(model):
    """``encode(x, y)``, the encoder's output (``(loc, scale)`` of q for a VAE), and ``decode(z, y)``, the
    decoder's, of ``model`` for images ``x: (B, C, H, W)``, codes ``z: (B, L)`` and labels ``y: (B,)``;
    ``y`` matters only to a conditional model (pass ``None`` for another)."""
    if not getattr(model, "conditional", False):
        if callable(getattr(model, "decoder_input", None)):  # a class summed out (M2, the mixture VAE): decode with class 0
            return (lambda x, y: model.encoder(x)), (lambda z, y: model.decoder(model.decoder_input(z, _class_zero(z))))
        return (lambda x, y: model.encoder(x)), (lambda z, y: model.decoder(z))
    return (lambda x, y: model.encoder(model.encoder_input(x, y))), (lambda z, y: model.decoder(model.decoder_input(z, y)))


def _class_zero(z: Tensor) -> Tensor:
    """Class 0 for each code of ``z: (..., L)``: int64 ``(...)``."""
    return torch.zeros(z.shape[:-1], dtype=torch.int64, device=z.device)


def _placeholder_labels(model, n: int) -> Tensor | None:
    """``n`` labels of class 0 for a conditional model, where any label does (shapes, supports); ``None`` for another."""
    return torch.zeros(n, dtype=torch.int64, device=model.device) if getattr(model, "conditional", False) else None


# --------------------------------------------------------------------------- ELBO


def _is_pyro_model(model) -> bool:
    """Whether ``model`` is a Pyro program with a ``model`` and a ``guide`` (the VAEs), whose densities are defined."""
    return callable(getattr(model, "guide", None)) and callable(getattr(model, "model", None))


def _is_enumerated(site) -> bool:
    """Whether Pyro enumerated the sample ``site`` (``poutine.enum`` on a site marked ``infer={"enumerate": "parallel"}``)."""
    return site["infer"].get("_enumerate_dim") is not None


def _density_sites(trace) -> list[dict]:
    """The sample sites of ``trace`` that have a density, in order: not a plate's subsample, not auxiliary."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site) and not site["infer"].get("is_auxiliary")
    ]


def _log_density(trace, observed: bool, enumerated: bool = True) -> Tensor:
    """The sum of ``log_prob`` over the sample sites of ``trace`` (observed ones too if ``observed``; enumerated ones
    unless ``enumerated`` is False), unscaled and unmasked (no KL weight, no minibatch scale): ``(..., K, B)`` under
    the plates of :func:`log_weights`, an enumerated site's values on the dims left of them."""
    total = 0.0
    for site in _density_sites(trace):
        if not enumerated and _is_enumerated(site):
            continue
        if observed or not site["is_observed"]:
            total = total + site["fn"].log_prob(site["value"])
    return total


def _enumerated_log_weights(model, x: Tensor, num_samples: int, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The traces behind :func:`log_weights` and :func:`elbo_per_example`, with discrete sites enumerated.

    ``model.guide`` runs under a plate of ``K`` particles (dim -2; the plate over images is dim -1) and
    ``poutine.enum`` (first enumeration dim -3), ``model.model`` under ``poutine.enum`` replayed on its
    draws, as Pyro's ``TraceEnum_ELBO`` runs them: a site marked ``infer={"enumerate": "parallel"}`` takes all
    its values at once, on a dim of its own left of the particles. Returns

    * ``log_w``: ``log p(x, y, z) - log q(z | x, y)``, ``(K, B)`` without enumerated sites, else ``(E..., K, B)``
      with one dim per value combination: every model site counts, guide sites that are enumerated do not
      (their values are summed over, not drawn), and model-only enumerated sites (a model's own discrete
      latent) are already summed out, ``log sum_c p(x, c, z)``;
    * ``log_q``: the guide's enumerated sites' ``log q(y | x)``, broadcastable to ``log_w`` (``None`` without any).
    """
    kwargs = {} if labels is None else {"y": labels}
    with pyro.plate("particles", num_samples, dim=-2):
        guide_trace = poutine.trace(poutine.enum(model.guide, first_available_dim=-3)).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(poutine.enum(model.model), trace=guide_trace)).get_trace(x, **kwargs)
    log_w = _log_density(model_trace, observed=True) - _log_density(guide_trace, observed=False, enumerated=False)
    model_only = [
        site["infer"]["_enumerate_dim"]
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and _is_enumerated(site) and name not in guide_trace.nodes
    ]
    model_only = [dim for dim in model_only if -dim <= log_w.dim()]
    if model_only:
        log_w = log_w.logsumexp(dim=model_only, keepdim=True)
    enumerated = [site for site in guide_trace.nodes.values() if site["type"] == "sample" and _is_enumerated(site)]
    log_q = sum(site["fn"].log_prob(site["value"]) for site in enumerated) if enumerated else None
    return log_w, log_q


def _leading_dims(t: Tensor) -> tuple[int, ...]:
    """The dims of ``t`` left of the particles and the images: the enumerated values'."""
    return tuple(range(t.dim() - 2))


def log_weights(model, x: Tensor, num_samples: int = 1, labels: Tensor | None = None) -> Tensor:
    """Importance log-weights ``log p(x, z_k) - log q(z_k | x)`` of ``num_samples = K`` draws ``z_k ~ q(z | x)``
    for each image of ``x: (B, C, H, W)``: ``(K, B)`` nats (given ``labels: (B,)`` for a conditional model).

    Read off Pyro traces: ``model.guide`` runs under a plate of ``K`` particles (dim -2; the
    model's plate over images is dim -1), ``model.model`` is replayed on its draws, and every
    sample site's ``log_prob`` is summed, the observed images in the model included. ``z`` is
    whatever the program samples: one site or several (the two-layer VAE's z1 and z2). The mean over
    ``K = 1`` is the ELBO's estimator; a log-mean-exp over ``K`` is the IWAE bound. The KL weight
    and the minibatch scale of the program are ignored (these are densities, not losses). Draws
    from torch's global generator; gradients flow unless the caller turns them off.

    **Discrete sites summed out exactly.** A site marked for parallel enumeration
    (``infer={"enumerate": "parallel"}``, or ``config_enumerate``) is not sampled: in the guide (M2's
    ``y``, the mixture VAE's ``c``), the weight of draw k sums over its values,
    ``log sum_y p(x, y, z_{k,y}) / q(z_{k,y} | x, y)`` with ``z_{k,y} ~ q(z | x, y)``, an unbiased estimate
    of ``p(x)`` whatever q(y|x) is; in the model alone, ``log sum_c p(x, c, z_k) - log q(z_k | x)``. See
    :func:`_enumerated_log_weights`. Then the log-mean-exp over ``K`` estimates ``log p(x)`` as for any VAE,
    but the mean over ``K = 1`` bounds it more tightly than the ELBO (which :func:`elbo_per_example` gives).
    """
    log_w, _ = _enumerated_log_weights(model, x, num_samples, labels)
    return log_w.logsumexp(dim=_leading_dims(log_w)) if log_w.dim() > 2 else log_w


def _one_latent_site(model, x: Tensor, labels: Tensor | None = None) -> bool:
    """Whether :func:`log_weights` of ``model`` on images like ``x: (B, C, H, W)`` (and ``labels: (B,)``) is
    ``log p(x|z) + log p(z) - log q(z|x)`` of one latent site, which :func:`_log_weight_sampler` computes without
    tracing: ``model`` runs pyrovae's own VAE (or CVAE) program, its class overrides neither ``model`` nor
    ``guide``, and a trace of one image finds the sites ``z`` in the guide and ``z``, ``x`` (observed) in the
    model, nothing else. Any other program (two latent layers, a subclass's own program, a prior, likelihood
    or posterior of the user's that samples sites of its own) is left to the traces. Draws nothing from
    torch's global generator (the trace's draw is undone), so either way the estimates are the same.
    """
    program = next((cls for cls in (CVAE, VAE) if isinstance(model, cls)), None)
    if program is None or type(model).model is not program.model or type(model).guide is not program.guide:
        return False
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.plate("particles", 1, dim=-2):
        kwargs = {} if labels is None else {"y": labels[:1]}
        guide_trace = poutine.trace(model.guide).get_trace(x[:1], **kwargs)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x[:1], **kwargs)
    guide_sites, model_sites = _density_sites(guide_trace), _density_sites(model_trace)
    return (
        [(site["name"], site["is_observed"]) for site in guide_sites] == [("z", False)]
        and [(site["name"], site["is_observed"]) for site in model_sites] == [("z", False), ("x", True)]
    )


def _log_weight_sampler(model, x: Tensor, labels: Tensor | None, one_site: bool):
    """A function ``k -> (k, B)``: the log-weights of :func:`log_weights` for ``k`` fresh draws for each image of
    ``x: (B, C, H, W)`` (given ``labels: (B,)`` for a conditional model).

    With ``one_site`` (:func:`_one_latent_site` said so), without traces: the images are encoded once, here,
    and each call draws ``z = q.rsample((k,))``, ``(k, B, L)``, the very draw the traced guide makes under the
    particles plate (one standard-normal tensor of that shape, whatever q is), and sums the same three
    densities. Otherwise each call is :func:`log_weights`, which traces the guide (encoding again) and the model.
    """
    if not one_site:
        return lambda k: log_weights(model, x, k, labels)
    encode, decode = _networks(model)
    q = model.posterior(*encode(x, labels))  # batch (B,), event (L,)
    prior = model.prior()  # batch (), event (L,)

    def sample(k: int) -> Tensor:
        z = q.rsample((k,))  # (k, B, L)
        return model.likelihood(decode(z, labels)).log_prob(x) + prior.log_prob(z) - q.log_prob(z)

    return sample


def elbo_per_example(vae, x: Tensor, batch_size: int = 1000, labels: Tensor | None = None) -> Tensor:
    """The ELBO of each image, ``(N,)`` nats, with beta = 1 whatever ``vae.kl_weight`` is.

    For a conditional model, ``labels: (N,)`` are the images' labels and the ELBO bounds ``log p(x|y)``.

    ``ELBO(x) = E_q[log p(x, z) - log q(z|x)]``, estimated with one draw ``z ~ q(z|x)`` per image
    (:func:`log_weights` with ``K = 1``), the estimator of Pyro's ``Trace_ELBO``: unbiased, for
    any prior, posterior and number of latent layers; the mean over a test set is the test ELBO.
    A discrete guide site marked for enumeration is summed over exactly, as ``TraceEnum_ELBO`` does:
    ``sum_y q(y|x) [log p(x, y, z_y) - log q(z_y | x, y) - log q(y|x)]``, one draw ``z_y`` per value; a model-only
    one is summed out of ``p`` (see :func:`_enumerated_log_weights`).
    Draws from torch's global random number generator.
    """
    _check_batch_size(batch_size)
    vae.check_input(x)
    _check_labels(vae, x, labels)
    device = vae.device
    parts = []
    with torch.no_grad(), pyro.validation_enabled(False), evaluating(vae):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = None if labels is None else labels[start : start + batch_size].to(device)
            log_w, log_q = _enumerated_log_weights(vae, xb, 1, yb)
            if log_q is not None:
                terms = log_q.exp() * (log_w - log_q)  # (E..., 1, B)
                log_w = terms.sum(dim=_leading_dims(terms))
            parts.append(log_w.reshape(-1, len(xb))[0])  # (B,)
    return torch.cat(parts).to(x.device)


def test_elbo(vae, x: Tensor, batch_size: int = 1000, labels: Tensor | None = None) -> dict:
    """The mean ELBO over ``x: (N, C, H, W)`` (nats per image) and, where it means something, the
    negative ELBO in bits per dimension; for a conditional model, of ``log p(x|y)`` given ``labels: (N,)``.

    Returns floats ``{"elbo": ..., "bits_per_dim": ... or None}`` (see :func:`elbo_per_example`
    for the estimator; beta = 1). ``bits_per_dim`` is ``(-elbo + D * offset) / (D ln 2)``, with
    the offset from :func:`discretization_offset`: 0 for a discrete likelihood on the values it
    has probabilities for (a Bernoulli on binary images; the discretized logistic on 8-bit images
    ``k / 255``, where the figure is ``-ELBO / (D ln 2)``, the bound's bits per 8-bit value, with no
    1/255 Jacobian: the [0, 1] values are the 256 bins themselves); ``ln 256`` for a density on [0, 1] images, the standard discretisation of
    8-bit data (the density of 256 bins of width 1/256), so that bits/dim of densities and of
    discrete models compare; ``None`` when neither holds (a Bernoulli on
    grey levels is a relaxation, not a likelihood).
    """
    if distributed.is_distributed():  # each rank its shard; the sum of the ELBOs is all-reduced
        vae.check_input(x)
        _check_labels(vae, x, labels)  # every rank refuses bad input alike, before any collective
        lo, hi = distributed.shard_bounds(len(x))
        mine = elbo_per_example(vae, x[lo:hi], batch_size, labels=None if labels is None else labels[lo:hi]) if hi > lo else None
        elbo = distributed.all_sum(0.0 if mine is None else mine.double().sum().item()) / len(x)
    else:
        elbo = elbo_per_example(vae, x, batch_size, labels=labels).mean().item()
    offset = discretization_offset(vae, x)
    dims = math.prod(vae.input_shape)
    bits = None if offset is None else (-elbo + dims * offset) / (dims * math.log(2))
    return {"elbo": elbo, "bits_per_dim": bits}


test_elbo.__test__ = False  # pytest would collect it from ``from pyrovae.evaluation import test_elbo``


def discretization_offset(vae, x: Tensor) -> float | None:
    """Nats per dimension to add to ``-log p(x)`` for a log-probability of discrete data, or ``None``.

    Decided by the support of the likelihood's distribution (``vae.likelihood(...).support``)
    and the values of ``x``: a discrete support (Bernoulli: ``boolean``; the discretized logistic:
    :data:`~pyrovae.likelihoods.eight_bit`, the values ``k / 255``) that holds every pixel
    gives ``0.0`` (log_prob is already a log-probability); a continuous support (Normal,
    Laplace, continuous Bernoulli, a user's density) on images in [0, 1] gives ``log 256``
    (8-bit data: ``P(bin) ~= p(x) / 256`` per pixel); anything else gives ``None``.
    """
    with torch.no_grad(), pyro.validation_enabled(False), evaluating(vae):
        code = torch.zeros(1, vae.latent_dim, device=vae.device)
        support = vae.likelihood(_networks(vae)[1](code, _placeholder_labels(vae, 1))).support
    if support.is_discrete:
        return 0.0 if bool(support.check(x).all()) else None
    return math.log(256) if bool(constraints.unit_interval.check(x).all()) else None


# --------------------------------------------------------------------------- log-likelihood


def _bytes_per_unit(vae, dtype: torch.dtype) -> int:
    """Bytes that one (sample, image) pair of a chunk needs in :func:`log_likelihood`.

    Measured, not guessed: forward hooks on every submodule add up the outputs of one pass of
    :func:`log_weights` for one image with 1 and with 2 samples; the difference is what one more
    sample costs (decoder activations and the like; what is computed once per batch, the encoder
    on the images or a VampPrior's on its pseudo-inputs, cancels). Six image-sized buffers
    cover the likelihood's ``log_prob`` temporaries, and a mixture prior's ``log_prob`` holds
    each component's density of each sample, ``components * L`` values.
    """
    sizes: list[int] = []

    def record(module, inputs, output):
        for out in output if isinstance(output, tuple) else (output,):
            if isinstance(out, Tensor):
                sizes.append(out.numel())

    x = torch.zeros(1, *vae.input_shape, device=vae.device, dtype=dtype)
    labels = _placeholder_labels(vae, 1)
    handles = [module.register_forward_hook(record) for module in vae.modules()]
    counts = []
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            for k in (1, 2):
                sizes.clear()
                log_weights(vae, x, k, labels)
                counts.append(sum(sizes))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        prior = vae.prior()
    mixture = prior.component_distribution.batch_shape.numel() if isinstance(prior, dist.MixtureSameFamily) else 1
    element = torch.finfo(dtype).bits // 8
    per_sample = max(counts[1] - counts[0], 0) + 6 * math.prod(vae.input_shape) + (6 + mixture) * vae.latent_dim
    return element * per_sample


def log_likelihood(
    vae,
    x: Tensor,
    num_samples: int = 1000,
    batch_size: int | None = None,
    max_memory_bytes: int = 2**30,
    labels: Tensor | None = None,
) -> Tensor:
    """Importance-sampled estimates of ``log p(x)`` for each image of ``x: (N, C, H, W)``: ``(N,)`` nats.

    For a conditional model, ``labels: (N,)`` are the images' labels and the estimates are of
    ``log p(x|y)``: every term below is given ``y``.

    ``log p(x) ~= logsumexp_k [log p(x, z_k) - log q(z_k|x)] - log K`` with ``z_k ~ q(z|x)``,
    ``K = num_samples`` (Burda et al., 2016), the weights from :func:`log_weights` (so ``z`` is
    every latent site of the program, and q a flow's density where the posterior is a flow). It
    is a lower bound in expectation that tightens as ``K`` grows, equals the ELBO's estimator at
    ``K = 1``, and is exact for every ``K`` when q is the true posterior.

    For a batch of ``B`` images (``batch_size``, default 100) the samples are processed in
    chunks: one trace of guide and model with ``K_c`` particles, so ``z`` is ``(K_c, B, L)`` and
    the decoder runs on all of them at once, and a running logsumexp over the chunks (the encoder
    runs once per chunk, on the ``B`` images; once per batch for a program of one latent site, which
    is scored without traces, with the same draws and densities: see :func:`_one_latent_site`).
    ``K_c`` is chosen from the bytes one (sample, image) pair needs (:func:`_bytes_per_unit`) so
    that a chunk stays under ``max_memory_bytes`` (on the CPU also under :data:`CPU_CHUNK_BYTES`,
    which is faster), whatever ``K`` is; when even one sample of the whole batch does not fit, the
    batch is made smaller.

    The noise comes from torch's global generator: the same seed and chunking give the same
    estimate; another chunking draws other noise (the same estimator). Runs under
    ``torch.no_grad()`` and with Pyro's validation off after one check of ``x``.
    """
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if batch_size is not None:
        _check_batch_size(batch_size)
    if not isinstance(max_memory_bytes, int) or max_memory_bytes <= 0:
        raise InputError(f"max_memory_bytes must be a positive integer, got {max_memory_bytes!r}")
    vae.check_input(x)
    _check_labels(vae, x, labels)
    device = vae.device
    chunk_bytes = max_memory_bytes if device.type != "cpu" else min(max_memory_bytes, CPU_CHUNK_BYTES)
    unit_bytes = _bytes_per_unit(vae, x.dtype)
    units = chunk_bytes // unit_bytes  # (sample, image) pairs per chunk
    if units == 0:
        raise InputError(
            f"max_memory_bytes={max_memory_bytes} cannot hold one decoder pass of one image, which needs about "
            f"{unit_bytes} bytes; allow more memory"
        )
    if not distributed.is_distributed():
        return _log_likelihood(vae, x, labels, num_samples, batch_size, units)
    lo, hi = distributed.shard_bounds(len(x))  # each rank its shard, placed in a tensor of zeros that is all-reduced
    estimates = torch.zeros(len(x), dtype=x.dtype, device=device)
    if hi > lo:
        estimates[lo:hi] = _log_likelihood(vae, x[lo:hi], None if labels is None else labels[lo:hi], num_samples, batch_size, units).to(device)
    return distributed.all_sum(estimates).to(x.device)


def _log_likelihood(vae, x: Tensor, labels: Tensor | None, num_samples: int, batch_size: int | None, units: int) -> Tensor:
    """:func:`log_likelihood` of ``x: (N, C, H, W)`` (checked, ``N > 0``) in this process, ``(N,)``, with chunks
    of at most ``units`` (sample, image) pairs."""
    device = vae.device
    batch = min(batch_size or DEFAULT_NLL_BATCH, len(x), units)
    samples_per_chunk = min(num_samples, units // batch)
    log_k = math.log(num_samples)

    results = []
    with torch.no_grad(), pyro.validation_enabled(False), evaluating(vae):
        one_site = _one_latent_site(vae, x[:1].to(device), None if labels is None else labels[:1].to(device))
        for start in range(0, len(x), batch):
            xb = x[start : start + batch].to(device)  # (B, C, H, W)
            yb = None if labels is None else labels[start : start + batch].to(device)  # (B,)
            log_weights_of = _log_weight_sampler(vae, xb, yb, one_site)
            total = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=device)
            for first in range(0, num_samples, samples_per_chunk):
                log_w = log_weights_of(min(samples_per_chunk, num_samples - first))  # (K_c, B)
                total = torch.logaddexp(total, torch.logsumexp(log_w.double(), dim=0))
            results.append((total - log_k).to(x.dtype))
    return torch.cat(results).to(x.device)


# --------------------------------------------------------------------------- reconstruction


def reconstruction_error(model, x: Tensor, batch_size: int = 1000, labels: Tensor | None = None) -> dict:
    """How well ``model.reconstruct`` gives back ``x: (N, C, H, W)``.

    Returns floats ``{"mse": ..., "bce": ...}``: the squared error summed over the pixels of an
    image, and the binary cross-entropy (nats) summed likewise, each averaged over images. For
    the BCE the reconstruction is clipped to ``[1e-6, 1 - 1e-6]`` (a PCA or MSE-trained
    reconstruction may leave ``[0, 1]``); ``"bce"`` is ``None`` when ``x`` itself is not in ``[0, 1]``.
    Works for any model with ``reconstruct`` and ``input_shape`` (the VAE, the autoencoders, :class:`PCA`);
    a conditional model reconstructs each image given its label, ``labels: (N,)``.
    """
    _check_batch_size(batch_size)
    check_observations(x, tuple(model.input_shape))
    _check_labels(model, x, labels)
    in_unit_interval = bool(constraints.unit_interval.check(x).all())
    device = model.device
    squared, cross_entropy = 0.0, 0.0
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            recon = model.reconstruct(xb) if labels is None else model.reconstruct(xb, labels[start : start + batch_size].to(device))
            squared += (recon - xb).square().flatten(1).sum(1).double().sum().item()
            if in_unit_interval:
                clipped = recon.clamp(BCE_EPS, 1 - BCE_EPS)
                cross_entropy += F.binary_cross_entropy(clipped, xb, reduction="none").flatten(1).sum(1).double().sum().item()
    return {"mse": squared / len(x), "bce": cross_entropy / len(x) if in_unit_interval else None}


# --------------------------------------------------------------------------- linear probe


def _encode_all(encode, x: Tensor, batch_size: int, labels: Tensor | None = None) -> Tensor:
    """Codes ``(N, L)`` of ``x: (N, C, H, W)`` (given ``labels: (N,)`` if any), encoded in batches without gradients."""
    with torch.no_grad():
        if labels is None:
            codes = [encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        else:
            codes = [encode(x[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        codes = torch.cat(codes).flatten(1)
    if not torch.isfinite(codes).all():
        raise InputError("the encoder gave NaN or Inf codes; the model may have diverged")
    return codes


def linear_probe(
    encode,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    steps: int = 200,
    l2: float = 1e-3,
    batch_size: int = 1000,
    encode_with_labels: bool = False,
) -> float:
    """Test accuracy, in ``[0, 1]``, of a multinomial logistic regression on the codes (see :func:`probe_predictions`)."""
    predicted = probe_predictions(encode, train_x, train_y, test_x, test_y, steps, l2, batch_size, encode_with_labels)
    return (predicted == test_y.to(predicted.device)).double().mean().item()


def per_class_accuracy(predicted: Tensor, labels: Tensor, class_names=None) -> dict[str, float]:
    """The accuracy of ``predicted: (N,)`` within each class of ``labels: (N,)``, keyed by the class's name
    (``class_names[k]`` for class ``k``; ``str(k)`` without names), for the classes present, in index order."""
    predicted, labels = predicted.cpu(), labels.cpu()
    classes = labels.unique().tolist()
    if class_names is not None and classes and max(classes) >= len(class_names):
        raise InputError(f"class_names has {len(class_names)} names, not one for each class index up to {max(classes)}")
    return {
        (str(k) if class_names is None else str(class_names[k])): (predicted[labels == k] == k).double().mean().item() for k in classes
    }


def probe_predictions(
    encode,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    steps: int = 200,
    l2: float = 1e-3,
    batch_size: int = 1000,
    encode_with_labels: bool = False,
) -> Tensor:
    """The classes ``(N_test,)`` that a multinomial logistic regression on the codes predicts for ``test_x``.

    ``encode`` maps images ``(B, C, H, W)`` to codes ``(B, L)`` (``model.encode``); labels are
    int64 ``(N,)``. With ``encode_with_labels``, ``encode`` also takes each image's own label
    ``(B,)`` (a conditional model's ``encode(x, y)``, the mean of q(z|x, y)): the accuracy then
    says how much of the class the code keeps besides the label it was given. Codes are standardised with the training codes' mean and standard deviation;
    the weights ``(L, classes)`` and biases start at zero and are fitted by full-batch L-BFGS
    (at most ``steps`` iterations) on the mean cross-entropy plus ``l2 * ||W||^2``. Deterministic.
    """
    _check_batch_size(batch_size)
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if l2 < 0:
        raise InputError(f"l2 must be non-negative, got {l2}")
    for name, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        if labels.dim() != 1 or len(labels) != len(images) or labels.dtype != torch.int64:
            raise InputError(
                f"{name}_y must be int64 labels of shape ({len(images)},), one per image, "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        if len(images) == 0:
            raise InputError(f"{name}_x is empty")
        if labels.min() < 0:
            raise InputError(f"{name}_y holds negative labels; use class indices 0, 1, ...")
    train_codes = _encode_all(encode, train_x, batch_size, train_y if encode_with_labels else None)
    test_codes = _encode_all(encode, test_x, batch_size, test_y if encode_with_labels else None)
    device = train_codes.device
    train_y, test_y = train_y.to(device), test_y.to(device)
    mean, std = train_codes.mean(0), train_codes.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant code stays constant
    train_codes, test_codes = (train_codes - mean) / std, (test_codes - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1

    weight = torch.zeros(train_codes.shape[1], classes, device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_codes @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (test_codes @ weight + bias).argmax(1)


# --------------------------------------------------------------------------- classes and clusters


def predict_classes(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """``model.classify`` (the most probable class under q(y|x) of M2, the cluster of the mixture VAE) of each image
    of ``x: (N, C, H, W)``, in batches, in eval mode: int64 ``(N,)`` on ``x``'s device."""
    _check_batch_size(batch_size)
    model.check_input(x)
    with torch.no_grad(), evaluating(model):
        parts = [model.classify(x[i : i + batch_size].to(model.device)) for i in range(0, len(x), batch_size)]
    return torch.cat(parts).to(x.device)


def confusion_matrix(predicted: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Counts ``(K, K)``, int64: entry ``[i, j]`` is the number of images of label ``i`` predicted as ``j``, for
    ``predicted`` and ``labels``, int64 ``(N,)`` in ``[0, K)`` (``K``: ``num_classes``, or the largest value + 1)."""
    if predicted.shape != labels.shape or predicted.dim() != 1:
        raise InputError(f"predicted and labels must be (N,) alike, got {tuple(predicted.shape)} and {tuple(labels.shape)}")
    k = num_classes if num_classes is not None else int(max(predicted.max(), labels.max())) + 1
    flat = labels.long().cpu() * k + predicted.long().cpu()
    return torch.bincount(flat, minlength=k * k).reshape(k, k)


def clustering_accuracy(clusters: Tensor, labels: Tensor) -> float:
    """Unsupervised clustering accuracy in ``[0, 1]``: the fraction of images whose cluster, under the best
    one-to-one matching of clusters to labels, is their label (``clusters`` and ``labels``: int64 ``(N,)``).

    The matching maximises the images matched, found by the Hungarian method (scipy's
    ``linear_sum_assignment`` on the clusters-by-labels counts); with more clusters than labels the
    unmatched clusters' images count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    if clusters.shape != labels.shape or clusters.dim() != 1 or len(labels) == 0:
        raise InputError(f"clusters and labels must be (N,) alike with N > 0, got {tuple(clusters.shape)} and {tuple(labels.shape)}")
    if bool(clusters.min() < 0) or bool(labels.min() < 0):
        raise InputError("clusters and labels must be non-negative integers")
    k = int(max(clusters.max(), labels.max())) + 1
    counts = confusion_matrix(clusters, labels, k).T.numpy()  # [cluster, label]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / len(labels)


def class_accuracy(model, x: Tensor, labels: Tensor) -> dict[str, float]:
    """How well the classes of a model with a discrete latent (``classify``) match ``labels: (N,)`` on ``x: (N, C, H, W)``,
    in ``[0, 1]``: ``{"accuracy": ...}`` where the classes are the labels (``classes_are_labels``: M2's q(y|x)), else
    ``{"cluster_accuracy": ...}`` (:func:`clustering_accuracy`: the mixture VAE's clusters)."""
    if not callable(getattr(model, "classify", None)):
        raise InputError(f"a {type(model).__name__} has no discrete latent to classify images with")
    predicted = predict_classes(model, x)
    labels = labels.to(predicted.device)
    if getattr(model, "classes_are_labels", False):
        if predicted.shape != labels.shape:
            raise InputError(f"labels must be one per image, shape {tuple(predicted.shape)}, got {tuple(labels.shape)}")
        return {"accuracy": (predicted == labels).double().mean().item()}
    return {"cluster_accuracy": clustering_accuracy(predicted, labels)}


# --------------------------------------------------------------------------- aggregated posterior vs prior

#: Scales ``s`` of the MMD's inverse multiquadric kernel, ``C_s = 2 L s`` (as in Tolstikhin et al.'s WAE).
MMD_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: Test images (and as many prior samples) that :func:`evaluate` compares by MMD.
MMD_IMAGES = 2000


def mmd(a: Tensor, b: Tensor, scales: tuple[float, ...] = MMD_SCALES) -> float:
    """The unbiased estimate of the squared maximum mean discrepancy between samples ``a: (N, L)`` and ``b: (M, L)``.

    Kernel: a sum of inverse multiquadrics, ``k(u, v) = sum_s C_s / (C_s + ||u - v||^2)`` with
    ``C_s = 2 L s`` for ``s`` in ``scales``: its heavy tails still see samples far apart (an
    autoencoder's codes may sit on another scale altogether), and it is characteristic, so the
    population MMD is 0 only when the two distributions are equal. The estimate is unbiased (the
    diagonal terms are left out), so it scatters around 0 for equal distributions and may be
    slightly negative; larger means further apart. Needs ``N, M >= 2``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise InputError(f"mmd compares two samples (N, L) and (M, L) with N, M >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()

    def kernel(u: Tensor, v: Tensor) -> Tensor:
        distance = torch.cdist(u, v).square()
        return sum(2 * u.shape[1] * s / (2 * u.shape[1] * s + distance) for s in scales)

    def mean_off_diagonal(k: Tensor) -> Tensor:
        return (k.sum() - k.diagonal().sum()) / (len(k) * (len(k) - 1))

    return (mean_off_diagonal(kernel(a, a)) + mean_off_diagonal(kernel(b, b)) - 2 * kernel(a, b).mean()).item()


def aggregate_posterior_samples(model, x: Tensor, batch_size: int = 1000, labels: Tensor | None = None) -> Tensor:
    """One code per image of ``x: (N, C, H, W)``, ``(N, L)``: a sample of the aggregated posterior ``q(z) = E_x q(z|x)``
    (for a conditional model, ``E_{x,y} q(z|x, y)`` with the images' ``labels: (N,)``).

    A Pyro model (the VAEs) draws from its own guide: the value of the sample site its prior is
    on (``model.prior_site``, ``"z"`` by default; the two-layer VAE's top layer ``"z2"``), so a
    flow posterior's draws are the flow's. A Gaussian encoder (an AAE's with ``gaussian_posterior``)
    gives a draw ``z ~ Normal(loc, scale)``; a deterministic one (the autoencoders') gives its code.
    Draws from torch's global generator; in eval mode, without gradients.
    """
    _check_batch_size(batch_size)
    model.check_input(x)
    _check_labels(model, x, labels)
    encode = _networks(model)[0]
    site = getattr(model, "prior_site", "z")
    parts = []
    with torch.no_grad(), pyro.validation_enabled(False), evaluating(model):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(model.device)
            yb = None if labels is None else labels[start : start + batch_size].to(model.device)
            if _is_pyro_model(model):
                parts.append(poutine.trace(model.guide).get_trace(xb, **({} if yb is None else {"y": yb})).nodes[site]["value"])
                continue
            out = encode(xb, yb)
            parts.append(out[0] + out[1] * torch.randn_like(out[0]) if isinstance(out, tuple) else out)
    return torch.cat(parts).flatten(1)


def prior_mmd(model, x: Tensor, prior=None, seed: int = 0, labels: Tensor | None = None) -> float:
    """:func:`mmd` between the aggregated posterior on ``x: (N, C, H, W)`` and ``N`` samples of the prior.

    ``prior``: a callable returning a distribution with event ``(L,)`` (a pyrovae prior object);
    default: the model's own (``model.prior``: the VAE's, the AAE's), or ``N(0, I)`` for a model
    without one (the autoencoders), so that every model is measured on the same footing. The
    draws come from a generator seeded with ``seed`` (the global RNG is left as it was), so the
    figure is repeatable. A conditional model's codes are given the images' ``labels: (N,)``.
    """
    if prior is None:
        prior = model.prior if callable(getattr(model, "prior", None)) else StandardNormal(model.latent_dim)
    prior = prior.to(model.device) if isinstance(prior, nn.Module) else prior
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        codes = aggregate_posterior_samples(model, x, labels=labels)
        with torch.no_grad():
            reference = prior().sample((len(codes),)).reshape(len(codes), -1)
    return mmd(codes, reference.to(codes.device))


def active_units(model, x: Tensor, threshold: float = 0.01, num_samples: int = 100, batch_size: int = 500) -> dict[str, int]:
    """How many units of each latent layer of a Pyro model (the VAEs) are active on ``x: (N, C, H, W)``, by site name
    (``{"z": ...}`` for the VAE, ``{"z1": ..., "z2": ...}`` for the two-layer ones).

    Burda et al. (2016): unit ``u`` of a layer is active when ``Var_x(E_q[z_u | x]) > threshold`` (0.01 in their
    paper), the variance over the images of the unit's posterior mean. ``E_q[z | x]`` of each sample site of
    ``model.guide`` is the mean of the site's distribution averaged over ``num_samples`` draws of the guide (a plate
    of particles, as in :func:`log_weights`): exact for a site whose distribution depends on ``x`` alone (the VAE's
    z, the hierarchical VAE's z2), a Monte Carlo average over its latent parents otherwise (z1 given z2; z2 given
    z1 in the IWAE paper's two-layer VAE); a site whose distribution has no closed-form mean (a flow) averages its
    draws, whose noise adds about ``Var_q(z_u) / num_samples`` to each unit's variance. Draws from torch's global
    generator; in eval mode, without gradients. Discrete sites (M2's class y, drawn from q(y|x)) are not counted,
    only the continuous layers. A conditional model is not offered.
    """
    if not _is_pyro_model(model) or getattr(model, "conditional", False):
        raise InputError(f"active units are counted for the Pyro VAEs of images alone, not for a {type(model).__name__}")
    _check_batch_size(batch_size)
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise InputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if len(x) < 2:
        raise InputError(f"a variance over images needs at least 2 images, got {len(x)}")
    model.check_input(x)
    means: dict[str, list[Tensor]] = {}
    with torch.no_grad(), pyro.validation_enabled(False), evaluating(model):
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(model.device)
            with pyro.plate("particles", num_samples, dim=-2):
                trace = poutine.trace(model.guide).get_trace(xb)
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site) or site["infer"].get("is_auxiliary"):
                    continue
                if site["fn"].support.is_discrete:  # a class (M2's y) is not a layer of units
                    continue
                try:
                    mean = site["fn"].mean
                except NotImplementedError:  # a flow: no closed-form mean
                    mean = site["value"]
                mean = mean.expand(site["value"].shape)  # (K, B, L)
                means.setdefault(name, []).append(mean.double().mean(0).flatten(1))  # (B, L)
    return {name: int((torch.cat(parts).var(0) > threshold).sum()) for name, parts in means.items()}


# --------------------------------------------------------------------------- PCA


class PCA:
    """Principal component analysis with the models' interface: a linear baseline with ``L`` codes.

    ``fit(x)`` on ``x: (N, *shape)`` keeps the mean ``(D,)`` and the top ``L`` principal directions
    ``components: (L, D)`` (orthonormal rows), found as eigenvectors of the covariance, accumulated
    in float64 over batches (as accurate as an SVD of the centred ``(N, D)`` data here, and several
    times faster for MNIST-sized ``N``). Then ``encode: (B, *shape) -> (B, L)``,
    ``decode: (B, L) -> (B, *shape)`` and ``reconstruct`` work like the models', on the device and
    dtype of the data it was fitted on.
    """

    def __init__(self, latent_dim: int):
        if not isinstance(latent_dim, int) or latent_dim <= 0:
            raise InputError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim
        self.mean: Tensor | None = None
        self.components: Tensor | None = None
        self.explained_variance: Tensor | None = None  # (L,), variance along each component
        self.input_shape: tuple[int, ...] | None = None

    def fit(self, x: Tensor | ImageSet, batch_size: int = 10000) -> "PCA":
        """Fit to ``x: (N, *shape)`` (a tensor, or an :class:`~pyrovae.data.ImageSet` read in batches); returns ``self``."""
        if isinstance(x, ImageSet):
            return self._fit_batches(x, batch_size)
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise InputError(f"PCA.fit expects a float tensor (N, ...) of at least two dimensions, got {getattr(x, 'shape', type(x).__name__)}")
        n, features = len(x), math.prod(x.shape[1:])
        if self.latent_dim > min(n, features):
            raise InputError(f"cannot keep {self.latent_dim} components of {n} examples with {features} features; use latent_dim <= {min(n, features)}")
        if not torch.isfinite(x).all():
            raise InputError("PCA.fit: the data contain NaN or Inf values")
        flat = x.flatten(1)
        mean = flat.double().mean(0)
        covariance = torch.zeros(features, features, dtype=torch.float64, device=x.device)
        for start in range(0, n, batch_size):
            centred = flat[start : start + batch_size].double() - mean
            covariance += centred.T @ centred
        return self._set(mean, covariance / max(n - 1, 1), tuple(x.shape[1:]), x.dtype)

    def _fit_batches(self, images: ImageSet, batch_size: int) -> "PCA":
        """:meth:`fit` on ``images`` read ``batch_size`` at a time: the mean, then the covariance, in float64."""
        n, features = len(images), math.prod(images.image_shape)
        if self.latent_dim > min(n, features):
            raise InputError(f"cannot keep {self.latent_dim} components of {n} examples with {features} features; use latent_dim <= {min(n, features)}")
        total = 0.0
        for start in range(0, n, batch_size):
            total = total + images[start : start + batch_size].flatten(1).double().sum(0)
        mean = total / n
        covariance = torch.zeros(features, features, dtype=torch.float64, device=images.device)
        for start in range(0, n, batch_size):
            centred = images[start : start + batch_size].flatten(1).double() - mean
            covariance += centred.T @ centred
        return self._set(mean, covariance / max(n - 1, 1), images.image_shape, images.dtype)

    def _set(self, mean: Tensor, covariance: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> "PCA":
        variances, vectors = torch.linalg.eigh(covariance)  # ascending
        self.mean = mean.to(dtype)
        self.components = vectors[:, -self.latent_dim :].flip(1).T.contiguous().to(dtype)
        self.explained_variance = variances[-self.latent_dim :].flip(0).clamp_min(0).to(dtype)
        self.input_shape = tuple(shape)
        return self

    def _check_fitted(self) -> None:
        if self.components is None:
            raise InputError("this PCA is not fitted yet: call pca.fit(x) first")

    @property
    def device(self) -> torch.device:
        self._check_fitted()
        return self.mean.device

    def encode(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, L)``: coordinates along the principal components."""
        self._check_fitted()
        if tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"this PCA was fitted on examples of shape {self.input_shape}, got {tuple(x.shape[1:])}")
        return (x.flatten(1) - self.mean) @ self.components.T

    def decode(self, z: Tensor) -> Tensor:
        """``(B, L) -> (B, *shape)``: the point of the principal subspace with these coordinates."""
        self._check_fitted()
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise InputError(f"expected codes of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        return (z @ self.components + self.mean).unflatten(1, self.input_shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, *shape)``: the projection of ``x`` onto the principal subspace."""
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------- everything


def evaluate(model, data: ImageData, num_samples: int = 1000) -> dict:
    """Every measure that applies to ``model``, on ``data.test`` (the probe trains on ``data.train``).

    All models (VAE, autoencoders, :class:`PCA`): ``"mse"``, ``"bce"`` (see
    :func:`reconstruction_error`), ``"probe_accuracy"`` (see :func:`linear_probe`) and
    ``"probe_accuracy_per_class"``, the probe's accuracy on each test class, a dict keyed by the
    class's name where the data have names (``data.class_names``), else by its index. All but
    PCA: ``"prior_mmd"``, how far the codes of the first :data:`MMD_IMAGES` test images are from
    the prior (see :func:`prior_mmd`).
    The VAEs (the Pyro models: a ``model`` and a ``guide``) also: ``"elbo"`` and ``"bits_per_dim"`` (see :func:`test_elbo`; may be ``None``) and, when
    ``num_samples > 0``, ``"nll"``: minus the mean of :func:`log_likelihood` with that many
    importance samples (nats per image). Values are floats (``"bce"`` may be ``None``), but for the per-class dict.
    A model with a discrete latent (``classify``) also gets ``"accuracy"`` (M2: q(y|x)'s most probable class
    against the test labels) or ``"cluster_accuracy"`` (the mixture VAE: :func:`clustering_accuracy`); its
    ``"elbo"`` and ``"nll"`` sum the class out exactly (:func:`log_weights`).
    A conditional model (the CVAE) is given the test labels throughout: ``"elbo"`` and ``"nll"`` are
    of ``log p(x|y)``, reconstructions use each image's label, and the codes (probe, MMD) are those of q(z|x, y).
    Unlabelled images (``data.train_labels`` is ``None``) have no ``"probe_accuracy"``. The test images
    are made floats at once (on their device); the training images, which the probe encodes, batch by batch.
    """
    if not isinstance(num_samples, int) or num_samples < 0:
        raise InputError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    results: dict = {}
    conditional = getattr(model, "conditional", False)
    labels = data.test_labels if conditional else None
    test = data.test[:] if isinstance(data.test, ImageSet) else data.test
    with evaluating(model):
        if _is_pyro_model(model):
            results.update(test_elbo(model, test, labels=labels))
            if num_samples > 0:
                results["nll"] = -log_likelihood(model, test, num_samples=num_samples, labels=labels).double().mean().item()
        if callable(getattr(model, "classify", None)) and data.test_labels is not None:  # a discrete latent: M2's classes, the mixture VAE's clusters
            results.update(class_accuracy(model, test, data.test_labels))
        results.update(reconstruction_error(model, test, labels=labels))
        if not isinstance(model, PCA):
            results["prior_mmd"] = prior_mmd(model, test[:MMD_IMAGES], labels=None if labels is None else labels[:MMD_IMAGES])
        if conditional:  # data may sit on another device than the model
            encode = lambda images, y: model.encode(images.to(model.device), y.to(model.device))  # noqa: E731
        else:
            encode = lambda images: model.encode(images.to(model.device))  # noqa: E731
        if data.train_labels is not None and data.test_labels is not None:
            predicted = probe_predictions(encode, data.train, data.train_labels, test, data.test_labels, encode_with_labels=conditional)
            results["probe_accuracy"] = (predicted == data.test_labels.to(predicted.device)).double().mean().item()
            results["probe_accuracy_per_class"] = per_class_accuracy(predicted, data.test_labels, getattr(data, "class_names", None))
    return results
