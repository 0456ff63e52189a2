"""Benchmark 1 (and 6 on a GPU): SVI epoch time of pyrovae's VAE trained by its Trainer.

Contenders, interleaved epoch by epoch after one warm-up epoch each:

* ``pyrovae``: ``VAE(VAEConfig())`` trained by ``pyrovae.training.Trainer`` (one ``fit`` call of
  one epoch per round; the model and trainer persist across rounds).
* ``reference``: the plain PyTorch loop of :mod:`benchmarks.references` (same network, same
  data tensor, same slicing, same estimator, same Adam flavour).
* ``conventional`` (Trace_ELBO only): the tutorial Pyro pattern (``pyro.module``,
  ``pyro.optim.Adam``, a torchvision ``DataLoader``).

For ``TraceMeanField_ELBO`` and the IWAE bound (``k = 5``) pyrovae runs against the matching
reference loop. Figures: per-epoch times, medians, ratios of medians, images per second, and the
compute lower bound ``3 x forward matmul FLOPs / matmul rate``.
"""

from __future__ import annotations

import torch

from .common import (
    HIDDEN,
    LATENT,
    Settings,
    decoder_widths,
    encoder_widths,
    interleave,
    linear_flops,
    load_mnist,
    matmul_rate,
    median,
    timed,
    timed_call,
)
from .references import (
    ConventionalPyroVAE,
    ReferenceVAE,
    conventional_epoch,
    conventional_loader,
    iwae_loss,
    make_adam,
    meanfield_elbo_loss,
    reference_epoch,
    trace_elbo_loss,
)

__all__ = ["bench_svi", "pyrovae_vae_runner", "reference_runner", "train_flops"]

ELBOS = {"trace": (trace_elbo_loss, 1), "meanfield": (meanfield_elbo_loss, 1), "iwae": (iwae_loss, 5)}


def train_flops(n: int, hidden=HIDDEN, latent=LATENT, particles: int = 1) -> float:
    """Matmul FLOPs of one epoch of ``n`` images: 3 x forward (forward, and backward's two matmuls per layer).

    With ``particles`` samples per image the encoder runs once and the decoder ``particles`` times.
    """
    forward = linear_flops(encoder_widths(hidden, latent), n) + particles * linear_flops(decoder_widths(hidden, latent), n)
    return 3.0 * forward


def _fused_adam(device: torch.device) -> bool:
    """Whether the trainer asks for fused Adam, so that the reference does the same."""
    from pyrovae import training

    return bool(getattr(training, "FUSED_ADAM", False))


class TrainerEpochs:
    """Calling it trains one more epoch with a pyrovae ``Trainer`` (one ``fit`` call) and returns the wall-clock seconds.

    Each ``fit`` call starts a run: it checks the whole training set and builds a fresh optimizer
    before its epoch, work that a run of many epochs does once. The epoch time of a run is
    therefore the trainer's own per-epoch ``seconds`` (its history row: the batch loop and the
    end-of-epoch work, from a clock started before the first batch is drawn); :meth:`epochs` gives
    those, :meth:`fit_calls` the wall-clock time of the whole calls and the difference, the per-run setup.
    """

    def __init__(self, trainer, x: torch.Tensor, device: torch.device):
        self.trainer, self.x, self.device = trainer, x, device
        self.wall: list[float] = []
        self.in_loop: list[float] = []

    def __call__(self) -> float:
        seconds, history = timed_call(lambda: self.trainer.fit(self.x), self.device)
        self.wall.append(seconds)
        self.in_loop.append(history[-1]["seconds"])
        return seconds

    def epochs(self, last: int) -> list[float]:
        """The trainer's own seconds of the ``last`` epochs."""
        return self.in_loop[-last:]

    def fit_calls(self, last: int) -> dict:
        """Median wall-clock seconds of the ``last`` fit calls, and their median excess over the epoch (the per-run setup)."""
        wall, in_loop = self.wall[-last:], self.in_loop[-last:]
        return {"fit_call_median_s": median(wall), "setup_per_run_s": median([w - e for w, e in zip(wall, in_loop)])}


def pyrovae_vae_runner(settings: Settings, x: torch.Tensor, elbo: str = "trace", num_particles: int = 1, batch_size: int = 256, lr: float = 1e-3, hidden=HIDDEN, latent=LATENT) -> TrainerEpochs:
    """A :class:`TrainerEpochs` over a fresh pyrovae VAE (784-hidden-latent, Bernoulli likelihood, normal prior)."""
    from pyrovae import VAE, NetworkConfig, VAEConfig
    from pyrovae.training import Trainer, TrainingConfig

    torch.manual_seed(settings.seed)
    network = NetworkConfig(input_shape=tuple(x.shape[1:]), hidden=tuple(hidden), latent_dim=latent)
    model = VAE(VAEConfig(network=network, elbo=elbo, num_particles=num_particles)).to(settings.device)
    config = TrainingConfig(epochs=1, batch_size=batch_size, lr=lr, seed=settings.seed, progress=False)
    return TrainerEpochs(Trainer(model, config), x, settings.device)


def reference_runner(settings: Settings, x: torch.Tensor, loss_fn, batch_size: int = 256, lr: float = 1e-3, hidden=HIDDEN, latent=LATENT):
    """A function that trains the plain-PyTorch reference for one more epoch on ``x`` and returns the seconds."""
    torch.manual_seed(settings.seed)
    model = ReferenceVAE(x[0].numel(), tuple(hidden), latent).to(settings.device)
    optimizer = make_adam(model.parameters(), lr=lr, fused=_fused_adam(settings.device))
    generator = torch.Generator().manual_seed(settings.seed)
    return lambda: timed(lambda: reference_epoch(model, loss_fn, optimizer, x, batch_size, generator), settings.device)


def conventional_runner(settings: Settings, subset: int | None, batch_size: int = 256, lr: float = 1e-3):
    """A function that trains the tutorial-style Pyro VAE for one more epoch and returns the seconds."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    torch.manual_seed(settings.seed)
    pyro.clear_param_store()
    vae = ConventionalPyroVAE().to(settings.device)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    loader = conventional_loader(settings.data_dir, batch_size, subset=subset, seed=settings.seed)
    return lambda: timed(lambda: conventional_epoch(svi, loader, settings.device), settings.device)


def _summary(times: list[float], images: int) -> dict:
    m = median(times)
    return {"median_s": m, "epoch_s": [round(t, 4) for t in times], "images_per_s": images / m}


def bench_svi(
    settings: Settings,
    epochs: int | None = None,
    subset: int | None = None,
    elbos=("trace", "meanfield", "iwae"),
    conventional: bool = True,
    batch_size: int = 256,
    lr: float = 1e-3,
    data=None,
) -> dict:
    """Epoch times of pyrovae against the references for each ELBO in ``elbos``; a dict of figures.

    ``epochs`` timed epochs per contender after one warm-up (default 3 quick, 5 full);
    ``subset`` images of MNIST's training set (default 20,000 quick, all 60,000 full).
    """
    epochs = epochs or (3 if settings.quick else 5)
    if data is None:
        data = load_mnist(settings, subset=subset, quick_subset=20_000)
    x = data.train[:]
    n = len(x)
    result: dict = {"images": n, "batch_size": batch_size, "epochs_timed": epochs, "device": str(settings.device)}
    for elbo in elbos:
        loss_fn, k = ELBOS[elbo]
        contenders = {
            "pyrovae": pyrovae_vae_runner(settings, x, elbo=elbo, num_particles=k, batch_size=batch_size, lr=lr),
            "reference": reference_runner(settings, x, loss_fn, batch_size=batch_size, lr=lr),
        }
        if elbo == "trace" and conventional:
            contenders["conventional"] = conventional_runner(settings, subset=n if n < 60_000 else None, batch_size=batch_size, lr=lr)
        times = interleave(contenders, epochs)
        if "conventional" in contenders:
            import pyro

            pyro.clear_param_store()  # leave Pyro's global store as found: empty of the conventional VAE's parameters
        rate = matmul_rate(settings.device, batch_size=batch_size, seconds=settings.rate_seconds)  # the best so far
        times["pyrovae"] = contenders["pyrovae"].epochs(epochs)
        row = {name: _summary(t, n) for name, t in times.items()}
        row["pyrovae"].update(contenders["pyrovae"].fit_calls(epochs))
        row["num_particles"] = k
        row["matmul_flops"] = train_flops(n, particles=k)
        row["ratio_reference"] = row["pyrovae"]["median_s"] / row["reference"]["median_s"]
        if "conventional" in row:
            row["ratio_conventional"] = row["pyrovae"]["median_s"] / row["conventional"]["median_s"]
        result[elbo] = row
    result["matmul_gflops"] = rate / 1e9
    for elbo in elbos:  # bounds at the best rate measured in the whole run
        row = result[elbo]
        row["compute_bound_s"] = row["matmul_flops"] / rate
        row["reference_over_bound"] = row["reference"]["median_s"] / row["compute_bound_s"]
    return result
