"""pyrovae: autoencoder-family generative models built on Pyro, with plain-PyTorch baselines."""

from .devices import resolve_device
from .likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    LaplaceLikelihood,
    NormalLikelihood,
    make_likelihood,
)
from .models import (
    AE,
    MODELS,
    VAE,
    AEConfig,
    DenoisingAE,
    DenoisingAEConfig,
    SparseAE,
    SparseAEConfig,
    StackedAE,
    StackedAEConfig,
    VAEConfig,
    build_model,
)
from .nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, NetworkConfig
from .priors import (
    GaussianMixturePrior,
    LaplacePrior,
    StandardNormal,
    StudentTPrior,
    make_prior,
)

__version__ = "0.1.0"
