"""The hand-written contenders pyrovae is measured against.

* :class:`ReferenceVAE` and :func:`reference_epoch`: a plain PyTorch loop, no Pyro, over the
  identical network (784-400-2L encoder split into loc and ``softplus(raw) + 1e-5`` scale,
  L-400-784 decoder giving Bernoulli logits) and the identical data path (one float tensor on the
  device, sliced by a permutation drawn from a seeded CPU generator). It computes the *same
  estimator* as Pyro's ``Trace_ELBO``: one reparameterised sample ``z = loc + scale * eps`` and
  ``log p(x|z) + log p(z) - log q(z|x)`` with each log-density written out, gradients flowing
  through ``z`` and through ``loc`` and ``scale`` as they do in Pyro, averaged over the batch
  (the trainer's loss per example: Trace_ELBO scaled to ``num_data`` and divided by it). For ``TraceMeanField_ELBO``
  the reference uses the analytic KL, as Pyro does; for the IWAE bound it draws ``k`` samples per
  image from one encoder pass and takes a log-mean-exp over them, as ``RenyiELBO(alpha=0)`` with
  vectorised particles does.
* :class:`ReferenceAE`: the same for the deterministic autoencoder (784-400-50-400-784, BCE with
  logits summed over pixels, averaged over the batch).
* :class:`ConventionalPyroVAE` and :func:`conventional_loader`: the way Pyro's tutorials write a
  VAE: ``pyro.module`` inside ``model`` and ``guide``, ``pyro.optim.Adam``, ``SVI.step`` and a
  ``DataLoader`` over torchvision MNIST with ``ToTensor`` (per-item PIL decoding), with Pyro's
  default settings (argument validation on).
* :func:`per_image_log_likelihood`: an importance-sampled ``log p(x)`` computed one image at a time
  by encoding ``k`` copies of the image, the way some libraries do it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import HIDDEN, INPUT_DIM, LATENT

__all__ = [
    "ReferenceVAE",
    "ReferenceAE",
    "trace_elbo_loss",
    "meanfield_elbo_loss",
    "iwae_loss",
    "ae_loss",
    "reference_epoch",
    "make_adam",
    "ConventionalPyroVAE",
    "conventional_loader",
    "conventional_epoch",
    "per_image_log_likelihood",
]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
MIN_SCALE = 1e-5


def _mlp(widths) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with ReLU between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """``(B, 1, 28, 28) -> loc (B, L), scale (B, L)``: one MLP to ``2L`` outputs, split, softplus scale."""

    def __init__(self, input_dim=INPUT_DIM, hidden=HIDDEN, latent=LATENT):
        super().__init__()
        self.net = _mlp([input_dim, *hidden, 2 * latent])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        loc, raw = self.net(x.flatten(1)).chunk(2, dim=-1)
        return loc, F.softplus(raw) + MIN_SCALE


class ReferenceVAE(nn.Module):
    """The VAE's networks in plain PyTorch: ``encoder(x) -> (loc, scale)``, ``decoder(z) -> logits (..., 784)``."""

    def __init__(self, input_dim=INPUT_DIM, hidden=HIDDEN, latent=LATENT):
        super().__init__()
        self.encoder = GaussianEncoder(input_dim, hidden, latent)
        self.decoder = _mlp([latent, *reversed(hidden), input_dim])


class ReferenceAE(nn.Module):
    """The deterministic autoencoder in plain PyTorch: 784-h-L encoder, L-h-784 decoder (logits)."""

    def __init__(self, input_dim=INPUT_DIM, hidden=HIDDEN, latent=LATENT):
        super().__init__()
        self.encoder = _mlp([input_dim, *hidden, latent])
        self.decoder = _mlp([latent, *reversed(hidden), input_dim])


def _normal_log_prob(z: Tensor, loc, scale) -> Tensor:
    """``log N(z; loc, scale)`` summed over the last dimension, written out as Pyro computes it."""
    return (-0.5 * ((z - loc) / scale).square() - torch.log(scale) - HALF_LOG_2PI).sum(-1)


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return (-0.5 * z.square() - HALF_LOG_2PI).sum(-1)


def _bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """``log p(x | logits)`` summed over the pixels (the negative BCE, also for grey levels)."""
    return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def trace_elbo_loss(model: ReferenceVAE, x: Tensor, eps: Tensor | None = None) -> Tensor:
    """``-mean_b [log p(x_b|z_b) + log p(z_b) - log q(z_b|x_b)]``, one sample per image (Trace_ELBO's estimator).

    ``eps`` (``(B, L)``, default a fresh standard normal draw) fixes the sample ``z = loc + scale * eps``.
    """
    x = x.flatten(1)
    loc, sd = model.encoder(x)
    z = loc + sd * (torch.randn_like(loc) if eps is None else eps)
    elbo = _bernoulli_log_prob(model.decoder(z), x) + _std_normal_log_prob(z) - _normal_log_prob(z, loc, sd)
    return -elbo.mean()


def meanfield_elbo_loss(model: ReferenceVAE, x: Tensor) -> Tensor:
    """Like :func:`trace_elbo_loss` with the analytic ``KL(q(z|x) || N(0, I))`` (TraceMeanField_ELBO's estimator)."""
    x = x.flatten(1)
    loc, sd = model.encoder(x)
    z = loc + sd * torch.randn_like(loc)
    kl = 0.5 * (loc.square() + sd.square() - 1).sum(-1) - torch.log(sd).sum(-1)
    return -(_bernoulli_log_prob(model.decoder(z), x) - kl).mean()


def iwae_loss(model: ReferenceVAE, x: Tensor, k: int = 5) -> Tensor:
    """``-mean_b log (1/k) sum_i w_bi``: the IWAE bound with ``k`` samples from one encoder pass."""
    x = x.flatten(1)
    loc, sd = model.encoder(x)  # (B, L)
    z = loc + sd * torch.randn((k, *loc.shape), device=loc.device, dtype=loc.dtype)  # (k, B, L)
    log_w = _bernoulli_log_prob(model.decoder(z), x) + _std_normal_log_prob(z) - _normal_log_prob(z, loc, sd)  # (k, B)
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def ae_loss(model: ReferenceAE, x: Tensor) -> Tensor:
    """Binary cross-entropy of the reconstruction, summed over pixels, averaged over the batch."""
    x = x.flatten(1)
    logits = model.decoder(model.encoder(x))
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1).mean()


def make_adam(params, lr: float = 1e-3, fused: bool = True) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused (one kernel for all parameters) when asked and torch has the kernel, as the trainer does."""
    params = list(params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.Adam(params, lr=lr)


def reference_epoch(model: nn.Module, loss_fn, optimizer, x: Tensor, batch_size: int, generator: torch.Generator) -> float:
    """One epoch of the plain loop over ``x`` sliced by a fresh permutation; returns the mean loss per batch.

    The permutation is drawn on the CPU from ``generator`` and moved to ``x``'s device, as
    :func:`pyrovae.data.batches` does; the loss is accumulated on the device and read once.
    """
    n = len(x)
    index = torch.randperm(n, generator=generator).to(x.device)
    total = torch.zeros((), device=x.device)
    steps = 0
    for start in range(0, n, batch_size):
        loss = loss_fn(model, x[index[start : start + batch_size]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    return float(total) / steps


# --------------------------------------------------------------------------- the conventional Pyro pattern


class ConventionalPyroVAE(nn.Module):
    """A VAE written the way Pyro's tutorials write one, over the same networks as :class:`ReferenceVAE`."""

    def __init__(self, input_dim=INPUT_DIM, hidden=HIDDEN, latent=LATENT):
        super().__init__()
        nets = ReferenceVAE(input_dim, hidden, latent)
        self.encoder, self.decoder = nets.encoder, nets.decoder
        self.latent = latent

    def model(self, x: Tensor) -> None:
        import pyro
        import pyro.distributions as dist

        pyro.module("decoder", self.decoder)
        x = x.reshape(x.shape[0], -1)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(x.shape[0], self.latent)
            z_scale = x.new_ones(x.shape[0], self.latent)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            # grey-level pixels are not in the Bernoulli's {0, 1} support, hence validate_args=False
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        import pyro
        import pyro.distributions as dist

        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def conventional_loader(data_dir, batch_size: int, subset: int | None = None, seed: int = 0):
    """``DataLoader`` over torchvision's MNIST training set with ``ToTensor`` (per-item PIL images).

    ``subset`` keeps the same images as ``pyrovae.data.load_dataset(subset=..., seed=...)``.
    """
    import torchvision
    from torch.utils.data import DataLoader, Subset

    dataset = torchvision.datasets.MNIST(str(data_dir), train=True, download=False, transform=torchvision.transforms.ToTensor())
    if subset is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, order[:subset].tolist())
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def conventional_epoch(svi, loader, device: torch.device) -> float:
    """One epoch of ``svi.step`` over the loader's batches; returns the mean loss per batch."""
    total, steps = 0.0, 0
    for x, _ in loader:
        total += svi.step(x.to(device))
        steps += 1
    return total / steps


# --------------------------------------------------------------------------- per-image NLL


@torch.no_grad()
def per_image_log_likelihood(encoder, decoder, x: Tensor, k: int) -> Tensor:
    """``log p(x_n) ~ log (1/k) sum_i p(x_n|z_i) p(z_i) / q(z_i|x_n)`` one image at a time: ``(N,)``.

    Written the way some libraries write it: for each image, ``k`` copies of it go through the
    encoder (``k`` encoder passes where one would do), one ``z`` is drawn per copy from
    ``torch.distributions``, decoded, scored, and log-mean-exp'ed. ``encoder(x) -> (loc, scale)``,
    ``decoder(z) -> logits`` of any shape that flattens to the image.
    """
    from torch.distributions import Bernoulli, Normal

    out = torch.empty(len(x), device=x.device)
    for n in range(len(x)):
        copies = x[n : n + 1].repeat(k, *([1] * (x.dim() - 1)))  # (k, C, H, W)
        loc, scale = encoder(copies)
        q = Normal(loc, scale)
        z = q.sample()
        logits = decoder(z).reshape(k, -1)
        log_lik = Bernoulli(logits=logits, validate_args=False).log_prob(copies.reshape(k, -1)).sum(-1)
        log_w = log_lik + Normal(torch.zeros_like(z), torch.ones_like(z)).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        out[n] = torch.logsumexp(log_w, 0) - math.log(k)
    return out
