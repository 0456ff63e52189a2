"""The models, by name: the Pyro VAE, two-layer VAEs, conditional VAE, semi-supervised VAE (M2) and mixture VAE, the adversarial autoencoder and the deterministic baselines."""

from __future__ import annotations

from ..errors import InputError
from .aae import AAE, AAEConfig
from .autoencoders import (
    AE,
    AEConfig,
    DenoisingAE,
    DenoisingAEConfig,
    SparseAE,
    SparseAEConfig,
    StackedAE,
    StackedAEConfig,
)
from .base import AutoencoderMixin, Phase, Progress, TrainableModel, Update, config_to_dict
from .cvae import CVAE, CVAEConfig
from .hierarchical import HierarchicalVAE, HierarchicalVAEConfig
from .mixture import MixtureVAE, MixtureVAEConfig
from .semi_supervised import M2Config, SemiSupervisedVAE
from .two_layer import TwoLayerVAE, TwoLayerVAEConfig
from .vae import VAE, VAEConfig

__all__ = [
    "AAE", "AAEConfig", "AE", "AEConfig", "SparseAE", "SparseAEConfig", "StackedAE", "StackedAEConfig", "DenoisingAE",
    "DenoisingAEConfig", "VAE", "VAEConfig", "TwoLayerVAE", "TwoLayerVAEConfig", "HierarchicalVAE", "HierarchicalVAEConfig", "CVAE", "CVAEConfig", "SemiSupervisedVAE", "M2Config", "MixtureVAE", "MixtureVAEConfig", "AutoencoderMixin", "TrainableModel", "Phase", "Progress", "Update", "MODELS", "build_model", "config_from_dict",
    "config_to_dict",
]

#: model name -> (class, config class)
MODELS = {
    "vae": (VAE, VAEConfig),
    "vae2": (TwoLayerVAE, TwoLayerVAEConfig),
    "hvae": (HierarchicalVAE, HierarchicalVAEConfig),
    "cvae": (CVAE, CVAEConfig),
    "m2": (SemiSupervisedVAE, M2Config),
    "gmvae": (MixtureVAE, MixtureVAEConfig),
    "aae": (AAE, AAEConfig),
    "ae": (AE, AEConfig),
    "sparse": (SparseAE, SparseAEConfig),
    "stacked": (StackedAE, StackedAEConfig),
    "denoising": (DenoisingAE, DenoisingAEConfig),
}


def _lookup(name: str):
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def config_from_dict(name: str, values: dict):
    """Rebuild the config of model ``name`` from :func:`config_to_dict` output."""
    config_class = _lookup(name)[1]
    try:
        return config_class(**values)
    except TypeError as error:
        raise InputError(f"not a {config_class.__name__}: {error}") from None


def build_model(name: str, config=None):
    """A fresh model called ``name`` (one of :data:`MODELS`), from ``config`` or the defaults."""
    model_class, config_class = _lookup(name)
    return model_class(config if config is not None else config_class())
