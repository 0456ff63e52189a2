"""pyrovae: autoencoder-family generative models built on Pyro, with plain-PyTorch baselines."""

from .data import ImageData, ImageSet, load_dataset, load_images
from .devices import resolve_device
from .errors import InputError
from .likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogisticLikelihood,
    LaplaceLikelihood,
    NormalLikelihood,
    make_likelihood,
)
from .models import (
    AAE,
    AE,
    CVAE,
    MODELS,
    VAE,
    AAEConfig,
    AEConfig,
    CVAEConfig,
    DenoisingAE,
    DenoisingAEConfig,
    HierarchicalVAE,
    HierarchicalVAEConfig,
    M2Config,
    MixtureVAE,
    MixtureVAEConfig,
    SemiSupervisedVAE,
    SparseAE,
    SparseAEConfig,
    StackedAE,
    StackedAEConfig,
    TwoLayerVAE,
    TwoLayerVAEConfig,
    VAEConfig,
    build_model,
)
from .nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, NetworkConfig
from .posteriors import DiagonalGaussian, FlowPosterior, iaf_posterior, make_posterior, planar_posterior
from .priors import (
    GaussianMixturePrior,
    LaplacePrior,
    StandardNormal,
    StudentTPrior,
    VampPrior,
    make_prior,
)
from .training import Trainer, TrainingConfig, load_model

__version__ = "0.1.0"

__all__ = [
    "ImageData", "ImageSet", "load_dataset", "load_images", "resolve_device", "InputError",
    "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "DiscretizedLogisticLikelihood", "LaplaceLikelihood", "NormalLikelihood", "make_likelihood",
    "AAE", "AE", "CVAE", "MODELS", "VAE", "AAEConfig", "AEConfig", "CVAEConfig", "DenoisingAE", "DenoisingAEConfig", "HierarchicalVAE", "HierarchicalVAEConfig", "SparseAE",
    "SemiSupervisedVAE", "M2Config", "MixtureVAE", "MixtureVAEConfig",
    "SparseAEConfig", "StackedAE", "StackedAEConfig", "TwoLayerVAE", "TwoLayerVAEConfig", "VAEConfig", "build_model",
    "ConvDecoder", "ConvEncoder", "MLPDecoder", "MLPEncoder", "NetworkConfig",
    "DiagonalGaussian", "FlowPosterior", "iaf_posterior", "planar_posterior", "make_posterior",
    "GaussianMixturePrior", "LaplacePrior", "StandardNormal", "StudentTPrior", "VampPrior", "make_prior",
    "Trainer", "TrainingConfig", "load_model",
]
