"""Benchmark 2: epoch time of pyrovae's deterministic AE (its Trainer) against a plain PyTorch loop.

Same network (784-400-50-400-784), same loss (BCE with logits summed over pixels, averaged over
the batch), same data tensor and slicing, same Adam; interleaved epoch by epoch after a warm-up.
"""

from __future__ import annotations

import torch

from .bench_svi import TrainerEpochs, _fused_adam
from .common import HIDDEN, LATENT, Settings, decoder_widths, interleave, linear_flops, load_mnist, matmul_rate, median, timed
from .references import ReferenceAE, ae_loss, make_adam, reference_epoch

__all__ = ["bench_ae", "pyrovae_ae_runner"]


def pyrovae_ae_runner(settings: Settings, x: torch.Tensor, batch_size: int = 256, lr: float = 1e-3, hidden=HIDDEN, latent=LATENT):
    """A function that trains a fresh pyrovae AE for one more epoch on ``x`` and returns the seconds."""
    from pyrovae import AE, AEConfig, NetworkConfig
    from pyrovae.training import Trainer, TrainingConfig

    torch.manual_seed(settings.seed)
    model = AE(AEConfig(network=NetworkConfig(input_shape=tuple(x.shape[1:]), hidden=tuple(hidden), latent_dim=latent))).to(settings.device)
    trainer = Trainer(model, TrainingConfig(epochs=1, batch_size=batch_size, lr=lr, seed=settings.seed, progress=False))
    return TrainerEpochs(trainer, x, settings.device)


def reference_ae_runner(settings: Settings, x: torch.Tensor, batch_size: int = 256, lr: float = 1e-3, hidden=HIDDEN, latent=LATENT):
    """A function that trains the plain-PyTorch AE for one more epoch on ``x`` and returns the seconds."""
    torch.manual_seed(settings.seed)
    model = ReferenceAE(x[0].numel(), tuple(hidden), latent).to(settings.device)
    optimizer = make_adam(model.parameters(), lr=lr, fused=_fused_adam(settings.device))
    generator = torch.Generator().manual_seed(settings.seed)
    return lambda: timed(lambda: reference_epoch(model, ae_loss, optimizer, x, batch_size, generator), settings.device)


def bench_ae(settings: Settings, epochs: int | None = None, subset: int | None = None, batch_size: int = 256, lr: float = 1e-3, data=None) -> dict:
    """Epoch times of pyrovae's AE and the plain loop; a dict of figures (``ratio_reference`` is the target's)."""
    epochs = epochs or (3 if settings.quick else 5)
    if data is None:
        data = load_mnist(settings, subset=subset, quick_subset=20_000)
    x = data.train[:]
    n = len(x)
    contenders = {"pyrovae": pyrovae_ae_runner(settings, x, batch_size, lr), "reference": reference_ae_runner(settings, x, batch_size, lr)}
    times = interleave(contenders, epochs)
    rate = matmul_rate(settings.device, batch_size=batch_size, seconds=settings.rate_seconds)
    flops = 3.0 * (linear_flops([x[0].numel(), *HIDDEN, LATENT], n) + linear_flops(decoder_widths(), n))
    result = {"images": n, "batch_size": batch_size, "epochs_timed": epochs, "device": str(settings.device), "compute_bound_s": flops / rate}
    times["pyrovae"] = contenders["pyrovae"].epochs(epochs)  # the trainer's epoch time, without the per-run setup
    for name, t in times.items():
        result[name] = {"median_s": median(t), "epoch_s": [round(s, 4) for s in t], "images_per_s": n / median(t)}
    result["pyrovae"].update(contenders["pyrovae"].fit_calls(epochs))
    result["ratio_reference"] = result["pyrovae"]["median_s"] / result["reference"]["median_s"]
    return result
