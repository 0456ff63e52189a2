"""Beyond the diagonal Gaussian: flow posteriors (built in, and one of your own), the VampPrior, two layers.

    python examples/richer_posteriors.py [--epochs 5] [--subset 10000] [--nll-samples 500]

Trains the same 784-200-200-50 tanh VAE on dynamically binarized MNIST (a subset) once per variant
and prints the test ELBO and the importance-sampled NLL of each, on the binarized test set:

* ``gaussian``: the diagonal Gaussian q(z|x);
* ``iaf`` and ``planar``: that Gaussian through 2 inverse autoregressive or planar flows (built in);
* ``radial (yours)``: a posterior defined right here from Pyro's conditional radial flows, passed as
  ``VAE(config, posterior=..., encoder=...)``: nothing in the library names it;
* ``vamp``: the VampPrior with 100 pseudo-inputs;
* ``vae2``: two stochastic layers (784-200-200-50(z1)-100-50(z2) here, to stay quick);
* ``hvae``: Tomczak and Welling's two layers, the decoder reading both and the VampPrior on z2
  (200-unit layers, 30 + 20 latents and 100 pseudo-inputs here, to stay quick).

Every NLL is computed by the same ``pyrovae.evaluation.log_likelihood``, which reads the densities
off the model's own Pyro traces: a flow is scored by its own density, two layers by the joint one.
"""

import argparse
from dataclasses import replace

import torch
from pyro.distributions.transforms import conditional_radial

from pyrovae import VAE, HierarchicalVAE, HierarchicalVAEConfig, NetworkConfig, TwoLayerVAE, TwoLayerVAEConfig, VAEConfig
from pyrovae.data import load_dataset
from pyrovae.evaluation import log_likelihood, test_elbo
from pyrovae.nets import build_encoder
from pyrovae.posteriors import FlowPosterior
from pyrovae.training import Trainer, TrainingConfig


def radial_posterior(latent_dim: int, context_dim: int, steps: int = 4) -> FlowPosterior:
    """A posterior of our own: ``steps`` radial flows whose parameters a network computes from the context h(x)."""
    return FlowPosterior([conditional_radial(latent_dim, context_dim, [64]) for _ in range(steps)], context_dim)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, default=10000, help="training and test images (default: %(default)s)")
    parser.add_argument("--nll-samples", type=int, default=500)
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: ./data)")
    args = parser.parse_args()

    data = load_dataset("mnist", root=args.data_dir, binarize="dynamic", subset=args.subset, seed=0)
    network = NetworkConfig(hidden=(200, 200), latent_dim=50, activation="tanh")
    context = 20
    variants = {
        "gaussian": lambda: VAE(VAEConfig(network=network)),
        "iaf": lambda: VAE(VAEConfig(network=network, posterior="iaf", flow_layers=2)),
        "planar": lambda: VAE(VAEConfig(network=network, posterior="planar", flow_layers=2)),
        "radial (yours)": lambda: VAE(
            VAEConfig(network=network), posterior=radial_posterior(50, context), encoder=build_encoder(network, gaussian=True, context_dim=context)
        ),
        "vamp": lambda: VAE(VAEConfig(network=network, prior="vamp", num_pseudo_inputs=100)),
        "vae2": lambda: TwoLayerVAE(TwoLayerVAEConfig(network=network, top_latent_dim=50, top_hidden=(100,))),
        "hvae": lambda: HierarchicalVAE(HierarchicalVAEConfig(network=replace(network, latent_dim=30), top_latent_dim=20, num_pseudo_inputs=100)),
    }
    print(f"{'variant':<16}{'test ELBO':>11}{'NLL':>9}   (nats; {args.subset} images, {args.epochs} epochs, k={args.nll_samples})")
    for name, build in variants.items():
        torch.manual_seed(0)
        model = build()
        Trainer(model, TrainingConfig(epochs=args.epochs, batch_size=100, progress=False)).fit(data.train, dynamic_binarization=True)
        model.eval()
        torch.manual_seed(0)
        elbo = test_elbo(model, data.test)["elbo"]
        nll = -log_likelihood(model, data.test, num_samples=args.nll_samples).mean().item()
        print(f"{name:<16}{elbo:>11.2f}{nll:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
