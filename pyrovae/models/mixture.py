"""A mixture VAE for clustering (a Gaussian-mixture VAE, as in Jiang et al.'s VaDE, 2017), its component
summed out of the model exactly.

Generative model, for each image of a batch::

    c ~ p(c) = Categorical(1/K)                  the component (the cluster), marked infer={"enumerate": "parallel"}
    z ~ p(z | c) = Normal(mu_c, sigma_c)          a learned diagonal Gaussian per component, event (L,)
    x ~ p(x | decoder(z))                         the shared decoder; likelihood as the VAE's

Guide: ``z ~ q(z | x)``, the VAE's (a diagonal Gaussian, or a flow: ``config.posterior``). There is no
``c`` in the guide: ``TraceEnum_ELBO(max_plate_nesting=1)`` enumerates ``c`` in the model, so the ELBO is
``E_q(z|x)[log p(x|z) + log sum_c p(c) p(z|c) - log q(z|x)]``, the component summed out exactly; the
importance-sampled NLL sums it likewise inside each weight (:func:`pyrovae.evaluation.log_weights`).

**Why q(z | x) and no q(c | x).** Given z, the best q(c | x, z) is the model's own posterior
``p(c | z) = p(c) p(z|c) / sum_c' p(c') p(z|c')``; summing c in the model is that choice, so this ELBO is
at least as tight as that of any guide q(c|x) q(z|x), with no classifier to learn. The other choice,
q(c|x) q(z|x, c) (M2's guide without labels), has a degenerate optimum: with a decoder shared by all
components, each component can hold a copy of every digit (q(z|x, c) moves the code to the
component's mean), so q(c|x) need not cluster at all. Measured (3 epochs on 10,000 MNIST images,
``pyrovae train --model gmvae --subset 10000 --epochs 3 --binarize dynamic``), that guide put every
test image in one cluster, 11.4% clustering accuracy (the largest class's share), against 39.2% here.

**Clusters.** :meth:`MixtureVAE.classify` is ``argmax_c p(c | z)`` at z the mean of q(z|x), what Pyro's
``infer_discrete(config_enumerate(model), temperature=0)`` gives with z conditioned to that value.

p(c) is uniform and fixed: the clusters are what the components p(z|c) learn to be, and a learned
p(c) lets a component that fits little be starved of images until it is unused. The component means
start close together (:data:`INIT_SPREAD`), the scales at 1: from means drawn from N(0, I) in 50
dimensions, the codes all went to one component (11.4% after 3 epochs, as above).

**Pretraining (VaDE's start).** With ``config.pretrain_epochs > 0`` a run begins with a phase
``"pretrain"``: the encoder's mean and the decoder trained as an autoencoder, on the likelihood's
reconstruction loss ``-log p(x | decoder(mean of q(z|x)))`` (no prior, no KL). When it ends
(:meth:`MixtureVAE.end_phase`), k-means (scipy's ``kmeans2``, k-means++ start, seed
:data:`KMEANS_SEED`) on the codes of the training images places the components: each mean at a
centroid, each scale the spread of its cluster's codes. Jiang et al. start VaDE so, from a
pretrained autoencoder and a Gaussian mixture fitted to its codes; the ELBO's phase follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn

from ..errors import InputError
from .base import Phase, Progress, Update, evaluating
from .discrete import build_enum_elbo, check_num_classes, enumerated_loss
from .vae import VAE, VAEConfig, _images_plate, _is_int, _scaled

__all__ = ["MixtureVAE", "MixtureVAEConfig", "ComponentPrior", "INIT_SPREAD", "KMEANS_SEED", "MIN_START_SCALE"]

#: the component means start as draws from N(0, INIT_SPREAD^2 I): close together, so that every component
#: is near the codes at first and takes a share of them (from N(0, I) in 50 dimensions one component took
#: every code: see the module docs)
INIT_SPREAD = 0.1
#: the seed of the k-means that places the components after pretraining (the codes differ between runs)
KMEANS_SEED = 0
#: the smallest scale a component starts with after pretraining (a cluster of one code has no spread)
MIN_START_SCALE = 1e-2


@dataclass(frozen=True)
class MixtureVAEConfig(VAEConfig):
    """The mixture VAE and its objective: the fields of :class:`~pyrovae.models.vae.VAEConfig` (network, likelihood,
    posterior, flow_layers, beta, num_particles, kl_warmup_epochs), and

    num_components: K >= 2, the components of p(z) and so the clusters.
    pretrain_epochs: epochs of the ``"pretrain"`` phase before the ELBO's (see the module docs); 0: none.

    ``prior`` stays ``"normal"``: p(z) is the model's own mixture of K learned Gaussians. The objective is
    ``TraceEnum_ELBO`` (``elbo="trace"``); free bits are not offered (their loss does not enumerate).
    """

    num_components: int = 10
    pretrain_epochs: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_num_classes(self.num_components, "num_components")
        if not _is_int(self.pretrain_epochs) or self.pretrain_epochs < 0:
            raise InputError(f"pretrain_epochs must be a non-negative integer, got {self.pretrain_epochs!r}")
        if self.prior != "normal":
            raise InputError(f"the mixture VAE's p(z) is its own mixture of K learned Gaussians p(z|c): it takes no prior={self.prior!r}")
        if self.elbo != "trace":
            raise InputError(f"the mixture VAE trains on TraceEnum_ELBO, its component summed out (elbo='trace'), got elbo={self.elbo!r}")
        if self.free_bits:
            raise InputError("free bits floor a sampled ELBO's KL terms; the mixture VAE, its component enumerated, takes none (free_bits=0)")


class ComponentPrior(nn.Module):
    """The mixture p(z) = sum_c p(c) p(z | c) with p(c) uniform and p(z | c) = Normal(loc[c], softplus(raw_scale[c]) + 1e-5).

    ``loc`` and ``raw_scale`` are ``(K, L)``. Called with no argument it is a pyrovae prior (the mixture,
    batch ``()``, event ``(L,)``); :meth:`component` is p(z | c).
    """

    def __init__(self, k: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(INIT_SPREAD * torch.randn(k, latent_dim))
        self.raw_scale = nn.Parameter(torch.full((k, latent_dim), 0.5413))  # softplus(0.5413) = 1

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    def weights(self) -> dist.Categorical:
        """p(c) = Categorical(1/K), batch ``()``."""
        return dist.Categorical(logits=torch.zeros(self.num_components, device=self.loc.device, dtype=self.loc.dtype))

    def component(self, c: Tensor) -> dist.Distribution:
        """p(z | c) for components ``c`` of any shape ``S``: batch shape ``S``, event ``(L,)``."""
        return dist.Normal(self.loc[c], F.softplus(self.raw_scale[c]) + 1e-5).to_event(1)

    def forward(self) -> dist.Distribution:
        """p(z), the mixture with c summed out: batch ``()``, event ``(L,)``."""
        return dist.MixtureSameFamily(self.weights(), self.component(torch.arange(self.num_components, device=self.loc.device)))

    @torch.no_grad()
    def place(self, loc: Tensor, scale: Tensor) -> None:
        """Set p(z | c) = Normal(``loc[c]``, ``scale[c]``) for ``loc``, ``scale``: ``(K, L)``, ``scale`` > 1e-5."""
        self.loc.copy_(loc)
        self.raw_scale.copy_(torch.log(torch.expm1(scale - 1e-5)))  # the inverse of softplus


class MixtureVAE(VAE):
    """The mixture VAE (see the module docs) of images ``x: (B, C, H, W)``, without labels: a :class:`~pyrovae.models.vae.VAE`
    whose prior is :class:`ComponentPrior` and whose model samples the component ``c`` before ``z``.

    ``likelihood``, ``posterior``, ``encoder`` and ``decoder`` default to what ``config`` names, as for the VAE.
    ``name`` prefixes its parameters' names (default ``"gmvae"``, ``"gmvae_1"``, ...).
    """

    _name_prefix = "gmvae"

    def __init__(self, config: MixtureVAEConfig | None = None, *, likelihood=None, posterior=None, encoder=None, decoder=None, name: str | None = None):
        config = config or MixtureVAEConfig()
        if not isinstance(config, MixtureVAEConfig):
            raise InputError(f"MixtureVAE needs a MixtureVAEConfig, got {type(config).__name__}")
        prior = ComponentPrior(config.num_components, config.network.latent_dim)
        super().__init__(config, prior=prior, likelihood=likelihood, posterior=posterior, encoder=encoder, decoder=decoder, name=name)
        self.elbo = build_enum_elbo(config)

    @property
    def k(self) -> int:
        """K, the components."""
        return self.config.num_components

    num_components = k

    def model(self, x: Tensor | None = None, num_data: int | None = None, batch_size: int = 1) -> Tensor:
        """p(x, c, z) = p(c) p(z|c) p(x|z): scores ``x: (B, C, H, W)``, or samples ``batch_size`` images without it.
        The component site ``"c"`` is marked for parallel enumeration. Returns the images ``(B, C, H, W)``."""
        if x is not None:
            if is_validation_enabled():
                self.check_input(x)
            batch_size = x.shape[0]
        self._declare("decoder", "likelihood", "prior")
        with _images_plate(batch_size, num_data, x.device if x is not None else self.device):
            with _scaled(self.kl_weight):  # c too: an enumerated sum takes one scale, so beta weighs log p(z) as a whole
                c = pyro.sample("c", self.prior.weights(), infer={"enumerate": "parallel"})  # (B,), or (K, 1) enumerated
                z = pyro.sample("z", self.prior.component(c))  # (B, L)
            return pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def validation_loss(self, x: Tensor) -> Tensor:
        """The negative ELBO of log p(x) per image on ``x: (B, C, H, W)``, c summed out, with the full KL weight."""
        return enumerated_loss(self, x, None).detach()

    # ------------------------------------------------------------------ pretraining (see the module docs)

    def training_phases(self, epochs: int) -> list[Phase]:
        """``"pretrain"`` (``config.pretrain_epochs``; the Trainer skips it at 0), then ``"train"`` (``epochs``)."""
        return [Phase("pretrain", self.config.pretrain_epochs), Phase("train", epochs)]

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor | float]:
        """One step on ``x: (B, C, H, W)``: of the ELBO (as the VAE's), or in phase ``"pretrain"`` of the
        reconstruction loss per image, ``-log p(x | decoder(encode(x)))``, with the figure ``kl_weight`` 0."""
        if progress.phase != "pretrain":
            return super().training_step(x, update, progress)
        loss = update("model", lambda: -self.likelihood(self.decoder(self.encode(x))).log_prob(x).mean())
        return {"loss": loss, "kl_weight": 0.0}

    def end_phase(self, phase: str, train) -> None:
        """After ``"pretrain"``: k-means with K clusters on the codes (:meth:`encode`) of every training image of
        ``train: (N, C, H, W)`` places the components, each mean at a centroid and each scale (per dimension) the
        spread of its cluster's codes (at least :data:`MIN_START_SCALE`; an empty cluster keeps scale 1)."""
        if phase != "pretrain":
            return
        from scipy.cluster.vq import kmeans2

        with torch.no_grad(), evaluating(self):
            codes = torch.cat([self.encode(train[i : i + 1000].to(self.device)) for i in range(0, len(train), 1000)])
        codes = codes.double().cpu()
        centroids, cluster = kmeans2(codes.numpy(), self.k, iter=50, minit="++", seed=KMEANS_SEED)
        cluster = torch.from_numpy(cluster)
        scale = torch.ones(self.k, codes.shape[1], dtype=torch.float64)
        for c in range(self.k):
            members = codes[cluster == c]
            if len(members) > 1:
                scale[c] = members.std(0, unbiased=False).clamp_min(MIN_START_SCALE)
            elif len(members) == 1:
                scale[c] = MIN_START_SCALE
        self.prior.place(torch.from_numpy(centroids).to(self.prior.loc), scale.to(self.prior.loc))

    @torch.no_grad()
    def cluster_log_probs(self, z: Tensor) -> Tensor:
        """log p(c | z), ``(B, K)``, for codes ``z: (B, L)``."""
        c = torch.arange(self.k, device=z.device)
        joint = self.prior.component(c).log_prob(z.unsqueeze(-2)) + self.prior.weights().logits  # (B, K)
        return joint.log_softmax(-1)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The cluster of each image of ``x: (B, C, H, W)``: ``argmax_c p(c | z)`` at z = :meth:`encode` ``(x)``; int64 ``(B,)``."""
        return self.cluster_log_probs(self.encode(x)).argmax(-1)

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | int | None = None) -> Tensor:
        """``n`` images ``(n, C, H, W)``: means of p(x | z) for z from p(z | c), ``c: (n,)`` (an int: that component for all;
        ``None``: drawn from p(c))."""
        if not _is_int(n) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        if c is None:
            c = self.prior.weights().sample((n,))
        elif _is_int(c):
            if not 0 <= c < self.k:
                raise InputError(f"the component must lie in [0, {self.k}), got {c}")
            c = torch.full((n,), c, dtype=torch.int64, device=self.device)
        return self.decode(self.prior.component(c).sample())
