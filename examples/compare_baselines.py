"""Compare the VAE with the deterministic baselines and PCA, all with the same networks and budget.

    python examples/compare_baselines.py [--epochs 3] [--subset 10000]

Every model is built from the same 784-400-20 encoder and decoder (PCA keeps 20 components),
trained for the same number of epochs on the same MNIST subset, and measured the same way:
reconstruction error (MSE and BCE per image), linear-probe accuracy of a logistic regression on
the codes, the MMD between the codes and the prior, and, for the VAE and the conditional VAE,
the test ELBO and importance-sampled NLL (of log p(x|y) for the CVAE). The command
`pyrovae compare` does the same and also writes a figure.
"""

import argparse
import time

from pyrovae import NetworkConfig
from pyrovae.data import load_dataset
from pyrovae.evaluation import PCA, evaluate
from pyrovae.models import MODELS, build_model
from pyrovae.training import Trainer, TrainingConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--num-samples", type=int, default=200, help="importance samples for the VAE's NLL")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = load_dataset("mnist", subset=args.subset, device=args.device)
    network = NetworkConfig(hidden=(400,), latent_dim=20)
    rows = []
    for name in [*MODELS, "pca"]:
        start = time.perf_counter()
        if name == "pca":
            model = PCA(network.latent_dim).fit(data.train)
        else:
            model = build_model(name, MODELS[name][1](network=network)).to(args.device)
            labels = {"train_labels": data.train_labels} if model.conditional else {}  # the CVAE models x given y
            Trainer(model, TrainingConfig(epochs=args.epochs, progress=False)).fit(data.train, **labels)
            model.eval()
        seconds = time.perf_counter() - start
        rows.append((name, evaluate(model, data, num_samples=args.num_samples if name == "vae" else 0), seconds))

    keys = sorted({k for _, results, _ in rows for k in results})
    print(f"{'model':10s} " + " ".join(f"{k:>14s}" for k in keys) + f" {'seconds':>8s}")
    for name, results, seconds in rows:
        cells = " ".join(f"{results[k]:14.4g}" if isinstance(results.get(k), float) else f"{'-':>14s}" for k in keys)
        print(f"{name:10s} {cells} {seconds:8.1f}")


if __name__ == "__main__":
    main()
