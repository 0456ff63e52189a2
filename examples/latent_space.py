"""Look inside a 2-D latent space: interpolations, the decoded manifold, and codes coloured by digit.

    python examples/latent_space.py [--epochs 5] [--out runs/latent_space]

Trains a VAE with a two-dimensional z on MNIST, then writes three figures to --out:
interpolations.png (straight lines in z between pairs of test digits, decoded),
manifold.png (the decoder over a grid of the latent plane, at Normal quantiles, so the grid
covers the prior's mass evenly) and latent.png (posterior means of test images, coloured by
label: digits form clusters although the model never saw a label).
"""

import argparse
from pathlib import Path

from pyrovae import VAE, NetworkConfig, VAEConfig, plots
from pyrovae.data import load_dataset
from pyrovae.training import Trainer, TrainingConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="runs/latent_space")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist", device=args.device)
    vae = VAE(VAEConfig(network=NetworkConfig(hidden=(512, 256), latent_dim=2))).to(args.device)
    Trainer(vae, TrainingConfig(epochs=args.epochs)).fit(data.train)
    vae.eval()
    plots.interpolations(vae, data.test[:16], path=out / "interpolations.png")
    plots.manifold(vae, n=20, path=out / "manifold.png")
    plots.latent_scatter(vae, data.test[:5000], data.test_labels[:5000], path=out / "latent.png")
    print(f"wrote {out}/interpolations.png, manifold.png, latent.png")


if __name__ == "__main__":
    main()
