"""Swap priors and likelihoods: every built-in one, plus a prior and a likelihood defined right here.

    python examples/swap_prior_likelihood.py [--epochs 3] [--subset 10000]

Trains the same 784-400-20 VAE on an MNIST subset once per (prior, likelihood) pair and prints the
test ELBO of each, side by side. Read the table with care: ELBOs of the same likelihood compare
priors directly, but a discrete Bernoulli "likelihood" on grey levels and a continuous density
(continuous Bernoulli, Normal, Laplace, Student-t) are not on the same scale.

What it shows: a prior is any callable returning a Pyro distribution over z with event shape
(latent_dim,); a likelihood is any callable mapping the decoder output (B, 1, 28, 28) to a
distribution with event shape (1, 28, 28). Modules among them are trained with the VAE.
"""

import argparse

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyrovae import VAE, NetworkConfig, VAEConfig
from pyrovae.data import load_dataset
from pyrovae.evaluation import test_elbo
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.priors import PRIORS
from pyrovae.training import Trainer, TrainingConfig


class LearnedDiagonalNormal(nn.Module):
    """A prior of our own: N(mu, diag(sigma^2)) with mu and sigma learned with the VAE."""

    def __init__(self, latent_dim):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self):
        return dist.Normal(self.loc, F.softplus(self.raw_scale) + 1e-5).to_event(1)


class StudentTPixels(nn.Module):
    """A likelihood of our own: heavy-tailed Student-t pixels around the decoder output, learned scale."""

    support = torch.distributions.constraints.real

    def __init__(self, df=3.0):
        super().__init__()
        self.df = df
        self.raw_scale = nn.Parameter(torch.tensor(-2.0))

    def forward(self, out):
        return dist.StudentT(self.df, out, F.softplus(self.raw_scale) + 1e-5).to_event(3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = load_dataset("mnist", subset=args.subset, device=args.device)
    network = NetworkConfig(hidden=(400,), latent_dim=20)
    runs = [(p, "bernoulli", {}) for p in PRIORS]
    runs += [("normal", lik, {}) for lik in LIKELIHOODS if lik != "bernoulli"]
    runs += [("learned diagonal normal (ours)", "bernoulli", {"prior": LearnedDiagonalNormal(network.latent_dim)})]
    runs += [("normal", "student-t pixels (ours)", {"likelihood": StudentTPixels()})]

    print(f"{'prior':32s} {'likelihood':26s} {'test ELBO (nats)':>17s}")
    for prior, likelihood, objects in runs:
        config = VAEConfig(network=network, prior=prior if prior in PRIORS else "normal",
                           likelihood=likelihood if likelihood in LIKELIHOODS else "bernoulli")
        vae = VAE(config, **objects).to(args.device)
        Trainer(vae, TrainingConfig(epochs=args.epochs, progress=False)).fit(data.train)
        elbo = test_elbo(vae.eval(), data.test[:])["elbo"]
        print(f"{prior:32s} {likelihood:26s} {elbo:17.2f}")


if __name__ == "__main__":
    main()
