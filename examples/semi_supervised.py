"""Discrete latents summed out exactly: M2 with a few labels, and your own Pyro program with an enumerated site.

    python examples/semi_supervised.py --labels 100 --epochs 3 --subset 10000

Part 1, pyrovae's semi-supervised VAE (M2, Kingma et al. 2014): keep ``--labels`` training labels,
balanced across the classes with a seeded draw, mark the others ``-1``, and train through the Trainer;
the label of an unlabelled image is summed out by ``TraceEnum_ELBO``. It prints the test accuracy of
q(y|x), the test ELBO and the importance-sampled NLL (y summed out inside each weight).

Part 2, a model of your own: a mixture of K Bernoulli images, ``c ~ Cat(pi)``, ``x ~ Bernoulli(mu_c)``,
written here as a plain Pyro program with ``config_enumerate``; its guide is empty, so
``TraceEnum_ELBO`` computes log p(x) exactly. It trains through the same Trainer by offering the
Trainer's interface (:class:`pyrovae.models.base.TrainableModel`: a training step, a validation loss),
and ``infer_discrete`` gives each test image's cluster, scored by the Hungarian matching.
"""

import argparse
import dataclasses

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate, infer_discrete
from torch import nn

from pyrovae import M2Config, NetworkConfig, SemiSupervisedVAE, Trainer, TrainingConfig, load_dataset, resolve_device
from pyrovae.evaluation import clustering_accuracy, evaluate
from pyrovae.models.base import TrainableModel
from pyrovae.models.semi_supervised import UNLABELLED, balanced_label_draw


class BernoulliMixture(TrainableModel, nn.Module):
    """p(x) = sum_c pi_c prod_pixels Bernoulli(x | mu_c): c is enumerated in the model, the guide is empty."""

    def __init__(self, k: int, pixels: int):
        super().__init__()
        self.logits_pi = nn.Parameter(torch.zeros(k))
        self.logits_mu = nn.Parameter(0.1 * torch.randn(k, pixels))
        self.elbo = TraceEnum_ELBO(max_plate_nesting=1)

    def check_input(self, x):
        """The Trainer checks the data once with this: binary images (B, 1, 28, 28)."""
        if x.shape[1:] != (1, 28, 28) or not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("a Bernoulli mixture takes binary images (B, 1, 28, 28)")

    @config_enumerate
    def model(self, x, num_data=None):
        pyro.module("mixture", self)
        flat = x.flatten(1)  # (B, D)
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            c = pyro.sample("c", dist.Categorical(logits=self.logits_pi))  # (B,), or (K, 1) enumerated
            pyro.sample("x", dist.Bernoulli(logits=self.logits_mu[c]).to_event(1), obs=flat)

    def guide(self, x, num_data=None):
        pass  # nothing to infer by sampling: c is summed out of the model

    def training_step(self, x, update, progress):
        loss = update("model", lambda: self.elbo.differentiable_loss(self.model, self.guide, x, num_data=progress.num_data) / progress.num_data)
        return {"loss": loss}

    def validation_loss(self, x):
        return torch.tensor(self.elbo.loss(self.model, self.guide, x) / len(x))

    @torch.no_grad()
    def clusters(self, x):
        """The most probable component of each image, by Pyro's infer_discrete (temperature 0: the MAP)."""
        trace = poutine.trace(infer_discrete(self.model, first_available_dim=-2, temperature=0)).get_trace(x)
        return trace.nodes["c"]["value"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=100, help="training labels M2 keeps, a multiple of 10")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=10000, help="images of each split (None: all)")
    parser.add_argument("--num-samples", type=int, default=100, help="importance samples of M2's NLL")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: ./data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_dataset("mnist", root=args.data_dir, binarize="dynamic", subset=args.subset, seed=args.seed, device=device)
    training = TrainingConfig(epochs=args.epochs, batch_size=256, seed=args.seed, progress=False)

    # ---- part 1: M2 with a few labels
    kept = balanced_label_draw(data.train_labels, args.labels, 10, seed=args.seed).to(device)
    labels = torch.full_like(data.train_labels, UNLABELLED)
    labels[kept] = data.train_labels[kept]
    torch.manual_seed(args.seed)
    m2 = SemiSupervisedVAE(M2Config(network=NetworkConfig(hidden=(500,), latent_dim=50))).to(device)
    Trainer(m2, training).fit(data.train, train_labels=labels, dynamic_binarization=True)
    results = evaluate(m2.eval(), data, num_samples=args.num_samples)
    print(f"M2, {args.labels} labels of {len(data.train)} images, {args.epochs} epochs: test accuracy {results['accuracy']:.3f}, "
          f"ELBO {results['elbo']:.2f}, NLL {results['nll']:.2f} nats (k={args.num_samples})")

    # ---- part 2: your own Pyro program with an enumerated site, through the same Trainer
    torch.manual_seed(args.seed)
    mixture = BernoulliMixture(10, 28 * 28).to(device)
    history = Trainer(mixture, dataclasses.replace(training, lr=0.03)).fit(data.train, val=data.test, dynamic_binarization=True)
    clusters = mixture.clusters(data.test[:])
    print(f"Bernoulli mixture, 10 components: test log p(x) {-history[-1]['val_loss']:.2f} nats (exact), "
          f"clustering accuracy {clustering_accuracy(clusters.cpu(), data.test_labels.cpu()):.3f}")


if __name__ == "__main__":
    main()
