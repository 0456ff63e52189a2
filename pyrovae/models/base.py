"""What every model offers: ``encode``, ``decode``, ``reconstruct`` and its ``config``.

Shapes: images ``x`` are ``(B, C, H, W)`` (``C, H, W = config.network.input_shape``), codes
``z`` are ``(B, L)``. ``decode`` returns images in data space (probabilities for a Bernoulli
likelihood or BCE loss, means otherwise), never logits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import InputError
from ..likelihoods import check_observations

__all__ = ["AutoencoderMixin", "config_to_dict"]


class AutoencoderMixin:
    """Shared interface of the VAE and the deterministic autoencoders.

    Subclasses set ``config`` (a frozen dataclass with a ``network`` field) and ``support``
    (the constraint input pixels must satisfy), and define ``encode`` and ``decode``.
    """

    config: object
    support: object = None
    #: number of layers pretrained greedily before end-to-end training (the stacked AE only)
    pretrain_layers: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.config.network.input_shape

    @property
    def latent_dim(self) -> int:
        return self.config.network.latent_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`~pyrovae.errors.InputError` unless ``x`` is a finite batch ``(B, C, H, W)`` in the support, of the model's dtype."""
        check_observations(x, self.input_shape, self.support)
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise InputError(f"the images are {x.dtype} but the model computes in {dtype}: convert them with x.to({dtype})")

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(B, C, H, W) -> (B, L)``."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(B, L) -> (B, C, H, W)`` in data space."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``: decode the code of ``x``."""
        return self.decode(self.encode(x))


def config_to_dict(config) -> dict:
    """A plain, JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)
