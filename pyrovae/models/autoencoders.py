"""Deterministic baselines built from the very same encoder and decoder as the VAE.

Each has ``loss(x)``: a scalar, the mean over the batch of a per-image loss summed over
pixels (nats for ``"bce"``, so it reads on the scale of a negative ELBO). Like the VAE,
``loss`` checks its input while Pyro validation is on (``pyro.validation_enabled(False)``
turns that off once the data was checked). Their training step is one optimizer step of
``loss`` on the single parameter group ``"model"`` (see :mod:`pyrovae.models.base`).

* :class:`AE`: reconstruction loss only.
* :class:`SparseAE`: sigmoid codes ``rho_hat`` and ``weight * sum_j KL(rho || mean_batch rho_hat_j)``.
* :class:`StackedAE`: greedy layer-wise pretraining (phase ``"pretrain-k"`` trains the k-th
  encoder layer with its mirror decoder layer as a shallow autoencoder), then end to end.
* :class:`DenoisingAE`: corrupt the input (Gaussian noise, masking noise) when training;
  the loss is against the clean input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pyro.poutine.util import is_validation_enabled
from torch import Tensor, nn
from torch.distributions import constraints

from ..errors import InputError
from ..nets import MLPDecoder, MLPEncoder, NetworkConfig, build_decoder, build_encoder
from .base import AutoencoderMixin, Phase, Progress, Update

__all__ = ["AEConfig", "SparseAEConfig", "StackedAEConfig", "DenoisingAEConfig", "AE", "SparseAE", "StackedAE", "DenoisingAE"]

RECONSTRUCTION_LOSSES = ("bce", "mse")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AEConfig:
    """network: the shared architecture; loss: ``"bce"`` (decoder gives logits) or ``"mse"``."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    loss: str = "bce"

    def __post_init__(self):
        if isinstance(self.network, dict):
            object.__setattr__(self, "network", NetworkConfig(**self.network))
        if self.loss not in RECONSTRUCTION_LOSSES:
            raise InputError(f"unknown reconstruction loss {self.loss!r}; choose from {RECONSTRUCTION_LOSSES}")


@dataclass(frozen=True)
class SparseAEConfig(AEConfig):
    """sparsity_target: rho, the wanted mean activation; sparsity_weight: the penalty's weight."""

    sparsity_target: float = 0.05
    sparsity_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.sparsity_target < 1:
            raise InputError(f"sparsity_target must lie in (0, 1), got {self.sparsity_target}")
        if not self.sparsity_weight >= 0:
            raise InputError(f"sparsity_weight must be non-negative, got {self.sparsity_weight}")


@dataclass(frozen=True)
class StackedAEConfig(AEConfig):
    """pretrain_epochs: epochs of greedy pretraining for each layer before fine-tuning."""

    pretrain_epochs: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.network.conv:
            raise InputError("the stacked autoencoder pretrains fully connected layers: use conv=False")
        if not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < 0:
            raise InputError(f"pretrain_epochs must be a non-negative integer, got {self.pretrain_epochs!r}")


@dataclass(frozen=True)
class DenoisingAEConfig(AEConfig):
    """noise_std: sigma of additive Gaussian noise; mask_prob: chance that a pixel is set to 0."""

    noise_std: float = 0.3
    mask_prob: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not self.noise_std >= 0:
            raise InputError(f"noise_std must be non-negative, got {self.noise_std}")
        if not 0 <= self.mask_prob < 1:
            raise InputError(f"mask_prob must lie in [0, 1), got {self.mask_prob}")


class AE(AutoencoderMixin, nn.Module):
    """Plain autoencoder: ``loss(x) = mean_b recon(decoder(encoder(x_b)), x_b)``."""

    config_class = AEConfig

    def __init__(self, config: AEConfig | None = None, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        config = config or self.config_class()
        if not isinstance(config, self.config_class):
            raise InputError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.encoder = encoder if encoder is not None else build_encoder(config.network)
        self.decoder = decoder if decoder is not None else build_decoder(config.network)

    @property
    def support(self):
        return constraints.unit_interval if self.config.loss == "bce" else constraints.real

    def encode(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, L)``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """``(B, L) -> (B, C, H, W)``: probabilities for BCE, values for MSE."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.config.loss == "bce" else out

    def reconstruction_loss(self, out: Tensor, target: Tensor) -> Tensor:
        """Raw decoder output and target ``(B, ...)`` -> per-image loss summed over features, averaged: scalar."""
        if self.config.loss == "bce":
            per_feature = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        else:
            per_feature = (out - target).square()
        return per_feature.flatten(1).sum(1).mean()

    def loss(self, x: Tensor) -> Tensor:
        """Training loss on ``x: (B, C, H, W)``: a scalar."""
        if is_validation_enabled():
            self.check_input(x)
        return self._loss(x)

    def _loss(self, x: Tensor) -> Tensor:
        """The loss of each kind of autoencoder, on an input already checked."""
        return self.reconstruction_loss(self.decoder(self.encode(x)), x)

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor]:
        """One optimizer step of :meth:`loss` on ``x: (B, C, H, W)``."""
        return {"loss": update("model", lambda: self.loss(x))}

    def validation_loss(self, x: Tensor) -> Tensor:
        """:meth:`loss` on ``x: (B, C, H, W)`` (in eval mode: the denoising AE does not corrupt)."""
        return self.loss(x)


class SparseAE(AE):
    """Sparse autoencoder: sigmoid codes and a KL(rho || rho_hat_j) penalty on their batch means."""

    config_class = SparseAEConfig

    def encode(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, L)`` activations in (0, 1)."""
        return torch.sigmoid(self.encoder(x))

    def sparsity_penalty(self, code: Tensor, batch_mean=None) -> Tensor:
        """``sum_j KL(Bernoulli(rho) || Bernoulli(rho_hat_j))`` for codes ``(B, L)``: scalar.

        ``rho_hat`` is the mean of the codes over the batch; ``batch_mean`` (a training step's
        ``update.batch_mean``) turns it into the mean over the whole batch when ``code`` is one
        process's shard of it (data parallelism).
        """
        rho = self.config.sparsity_target
        rho_hat = code.mean(0)
        if batch_mean is not None:
            rho_hat = batch_mean(rho_hat)
        rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()

    def _loss(self, x: Tensor, batch_mean=None) -> Tensor:
        code = self.encode(x)
        return self.reconstruction_loss(self.decoder(code), x) + self.config.sparsity_weight * self.sparsity_penalty(code, batch_mean)

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor]:
        """One optimizer step of :meth:`loss` on ``x: (B, C, H, W)``, its penalty on the whole batch's mean activations."""
        if is_validation_enabled():
            self.check_input(x)
        return {"loss": update("model", lambda: self._loss(x, batch_mean=update.batch_mean))}


class DenoisingAE(AE):
    """Denoising autoencoder: reconstruct the clean ``x`` from a corrupted copy (in training mode)."""

    config_class = DenoisingAEConfig

    def corrupt(self, x: Tensor) -> Tensor:
        """Add ``N(0, noise_std^2)`` noise, then zero each pixel with probability ``mask_prob``."""
        noisy = x + self.config.noise_std * torch.randn_like(x) if self.config.noise_std > 0 else x
        if self.config.mask_prob > 0:
            noisy = noisy * (torch.rand_like(x) >= self.config.mask_prob)
        return noisy

    def _loss(self, x: Tensor) -> Tensor:
        source = self.corrupt(x) if self.training else x
        return self.reconstruction_loss(self.decoder(self.encode(source)), x)


class StackedAE(AE):
    """Stacked autoencoder with greedy layer-wise pretraining.

    Its phases are ``"pretrain-0"``, ``"pretrain-1"``, ... (``config.pretrain_epochs`` each, one
    per encoder layer), then ``"train"``. ``loss(x, layer=k)`` trains encoder layer ``k`` and its
    mirror decoder layer as a shallow autoencoder of the (fixed) activations of the layers below;
    ``loss(x)`` is the end-to-end loss.
    """

    config_class = StackedAEConfig

    def __init__(self, config: StackedAEConfig | None = None, **networks):
        super().__init__(config, **networks)
        if not isinstance(self.encoder, MLPEncoder) or not isinstance(self.decoder, MLPDecoder):
            raise InputError("the stacked autoencoder needs the MLP encoder and decoder")
        if len(self.encoder.layers) != len(self.decoder.layers):
            raise InputError("the encoder and decoder must have mirrored layers")

    def training_phases(self, epochs: int) -> list[Phase]:
        """``config.pretrain_epochs`` epochs for each layer, ``"pretrain-k"``, then ``epochs`` end to end."""
        pretrain = [Phase(f"pretrain-{k}", self.config.pretrain_epochs) for k in range(len(self.encoder.layers))]
        return [*(pretrain if self.config.pretrain_epochs > 0 else []), Phase("train", epochs)]

    def training_step(self, x: Tensor, update: Update, progress: Progress) -> dict[str, Tensor]:
        """One optimizer step of the current phase's loss: a layer alone, or the whole network."""
        layer = int(progress.phase.removeprefix("pretrain-")) if progress.phase.startswith("pretrain-") else None
        return {"loss": update("model", lambda: self.loss(x, layer=layer))}

    def loss(self, x: Tensor, layer: int | None = None) -> Tensor:
        """The loss on ``x: (B, C, H, W)`` of encoder layer ``layer`` pretrained alone, or end to end (``None``)."""
        if is_validation_enabled():
            self.check_input(x)
        if layer is None:
            return self._loss(x)
        last = len(self.encoder.layers) - 1
        if not _is_int(layer) or not 0 <= layer <= last:
            raise InputError(f"layer must be None or a layer index 0..{last}, got {layer!r}")
        return self._layer_loss(x, layer)

    def _layer_loss(self, x: Tensor, k: int) -> Tensor:
        last = len(self.encoder.layers) - 1
        enc, dec = self.encoder, self.decoder
        with torch.no_grad():  # the layers below are fixed: their output is the input of this one
            h = x.flatten(1)
            for layer in enc.layers[:k]:
                h = enc.activation(layer(h))
        code = enc.layers[k](h)
        if k < last:
            code = enc.activation(code)
        out = dec.layers[last - k](code)
        if k == 0:
            return self.reconstruction_loss(out, h)
        return (dec.activation(out) - h).square().sum(1).mean()
