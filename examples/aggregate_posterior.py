"""How closely do the codes follow the prior? The AE, the VAE and the adversarial autoencoder side by side.

    python examples/aggregate_posterior.py [--epochs 10] [--subset 60000] [--latent-dim 2]

An autoencoder's codes go wherever reconstruction puts them; a VAE pulls each q(z|x) towards the
prior through the KL term; an adversarial autoencoder (Makhzani et al. 2015) trains a
discriminator to tell codes from prior samples and the encoder to fool it, so the codes as a
whole (the aggregated posterior q(z) = E_x q(z|x)) should match the prior. Here the prior is a
mixture of 10 Gaussians (as in the AAE paper), drawn with the same seed for the VAE and the AAE
(the AAE keeps it fixed, the VAE learns its own along with the networks), and all three models
share the same encoder and decoder shapes and training budget.

The measure is the MMD between the codes of 2,000 test images and as many prior samples
(``pyrovae.evaluation.prior_mmd``; kernel: a sum of inverse multiquadrics, stated in
``pyrovae.evaluation.mmd``): about 0 when the codes follow the prior, larger when they do not.
Each model is measured against its own prior, the AE against the AAE's mixture. Writes ``latent_<model>.png`` (the codes over prior
samples) and ``samples_<model>.png`` (decoded prior samples) to ``--out``.
"""

import argparse
import time
from pathlib import Path

import torch

from pyrovae import AAE, AE, VAE, AAEConfig, AEConfig, NetworkConfig, VAEConfig
from pyrovae.data import load_dataset
from pyrovae.evaluation import MMD_IMAGES, prior_mmd
from pyrovae.plots import latent_scatter, samples
from pyrovae.training import Trainer, TrainingConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, default=None, help="training and test images (default: all)")
    parser.add_argument("--latent-dim", type=int, default=2)
    parser.add_argument("--out", default="runs/aggregate_posterior")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = load_dataset("mnist", subset=args.subset, device=args.device)
    network = NetworkConfig(hidden=(512, 256), latent_dim=args.latent_dim)
    torch.manual_seed(0)
    aae = AAE(AAEConfig(network=network, prior="mixture"))
    models = {
        "ae": AE(AEConfig(network=network)),
        "vae": VAE(VAEConfig(network=network, prior="mixture")),
        "aae": aae,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, labels = data.test[:MMD_IMAGES], data.test_labels[:MMD_IMAGES]
    print(f"{'model':6s} {'MMD to its mixture prior':>24s} {'seconds':>8s}")
    for name, model in models.items():
        start = time.perf_counter()
        Trainer(model.to(args.device), TrainingConfig(epochs=args.epochs, progress=False)).fit(data.train)
        seconds = time.perf_counter() - start
        prior = aae.prior if name == "ae" else model.prior
        with torch.no_grad():
            prior_samples = prior().sample((len(x),))
        latent_scatter(model, x, labels, path=out / f"latent_{name}.png", prior_samples=prior_samples)
        if name != "ae":
            samples(model, n=64, path=out / f"samples_{name}.png")
        print(f"{name:6s} {prior_mmd(model, x, prior=prior):24.4f} {seconds:8.1f}")
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
