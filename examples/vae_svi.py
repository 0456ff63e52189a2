"""Train pyrovae's VAE with a plain Pyro SVI loop: the library gives the model and guide, you own the loop.

    python examples/vae_svi.py --epochs 3

784-400-50 MLP VAE, Bernoulli likelihood on MNIST grey levels in [0, 1], Adam 1e-3, batch 256.
After each epoch it prints the train and test loss per example (negative ELBO, nats).
"""

import argparse
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyrovae import VAE, NetworkConfig, VAEConfig, resolve_device
from pyrovae.data import batches, load_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: ./data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pyro.set_rng_seed(args.seed)
    device = resolve_device(args.device)
    data = load_dataset("mnist", root=args.data_dir, device=device)
    config = VAEConfig(network=NetworkConfig(input_shape=(1, 28, 28), hidden=(400,), latent_dim=args.latent_dim), likelihood="bernoulli")
    vae = VAE(config).to(device)

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    generator = torch.Generator().manual_seed(args.seed)
    n_train, n_test = len(data.train), len(data.test)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        vae.train()
        # svi.step returns the minibatch loss scaled to the whole training set (num_data);
        # averaging those and dividing by n_train gives the loss per example.
        train_losses = [svi.step(x, num_data=n_train) for x in batches(data.train, args.batch_size, generator)]
        train_loss = sum(train_losses) / len(train_losses) / n_train
        vae.eval()
        with torch.no_grad():
            test_loss = sum(svi.evaluate_loss(x) for x in batches(data.test, 1000, shuffle=False)) / n_test
        print(f"epoch {epoch:3d}  train loss {train_loss:8.2f}  test loss {test_loss:8.2f}  nats/example  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
