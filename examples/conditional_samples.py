"""Are a conditional VAE's samples the digits they were asked for? A classifier trained on MNIST says.

    pyrovae train --model cvae --epochs 10 --out runs/cvae
    python examples/conditional_samples.py runs/cvae [--per-class 100]

Draws ``--per-class`` images of each class from the CVAE of a run folder (z from the prior,
decoded given the label: the means of p(x | z, y)), and scores them with a small classifier
(784-256-10 MLP, 3 epochs of Adam) trained on the MNIST training images. Prints the classifier's
accuracy on the real test images (how far to trust it) and on the generated digits, overall and
per class: the share of generated digits that look like the class they were drawn for.
"""

import argparse

import torch
from torch import nn

from pyrovae import load_model
from pyrovae.data import batches, load_dataset


def train_classifier(data, epochs: int = 3, seed: int = 0) -> nn.Module:
    """A 784-256-10 MLP fitted to the training images: logits ``(B, 10)`` from images ``(B, 1, 28, 28)``."""
    torch.manual_seed(seed)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in batches(data.train, 128, generator, labels=data.train_labels):
            loss = nn.functional.cross_entropy(classifier(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder of a cvae trained on MNIST")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cvae, _ = load_model(args.run, device="cpu")
    cvae.eval()
    data = load_dataset("mnist")
    classifier = train_classifier(data)
    with torch.no_grad():
        test_accuracy = (classifier(data.test[:]).argmax(1) == data.test_labels).double().mean().item()
        torch.manual_seed(args.seed)
        wanted = torch.arange(cvae.num_classes).repeat_interleave(args.per_class)
        images = cvae.sample(len(wanted), wanted)  # (K * per_class, 1, 28, 28)
        correct = classifier(images).argmax(1) == wanted
    print(f"classifier accuracy on the MNIST test images: {test_accuracy:.4f}")
    print(f"classifier accuracy on {len(wanted)} generated digits: {correct.double().mean().item():.4f}")
    per_class = correct.view(cvae.num_classes, args.per_class).double().mean(1)
    print("per class: " + " ".join(f"{k}:{v:.2f}" for k, v in enumerate(per_class.tolist())))


if __name__ == "__main__":
    main()
