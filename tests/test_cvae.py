"""The conditional VAE: its ELBO by hand, labels reaching both networks, generation per class, bad labels,
training and bit-for-bit resume through the Trainer, evaluation and figures conditional on the labels."""

from __future__ import annotations

import math
import os
import signal

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Predictive, Trace_ELBO
from torch import nn
from torch.distributions import Normal

from conftest import capturing, tiny_network
from pyrovae import plots
from pyrovae.checkpoints import load_checkpoint
from pyrovae.errors import InputError
from pyrovae.evaluation import elbo_per_example, evaluate, linear_probe, log_likelihood, prior_mmd, reconstruction_error
from pyrovae.models import CVAE, VAE, CVAEConfig, VAEConfig, build_model, config_from_dict, config_to_dict
from pyrovae.training import Trainer, TrainingConfig

L, K = 8, 10
BATCH = 32


def make(**changes) -> CVAE:
    torch.manual_seed(0)  # every model of a test starts from the same weights
    return CVAE(CVAEConfig(network=tiny_network(), **changes))


def config(**changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 3, "batch_size": BATCH, "progress": False, **changes})


def one_hot(y):
    return F.one_hot(y, K).float()


@pytest.fixture(scope="module")
def trained(mnist):
    """A CVAE trained for 8 epochs on 300 MNIST images with their labels, and its history."""
    pyro.set_rng_seed(0)
    model = make()
    history = Trainer(model, config(epochs=8, lr=3e-3)).fit(
        mnist.train, val=mnist.test[:100], train_labels=mnist.train_labels, val_labels=mnist.test_labels[:100]
    )
    return model.eval(), history


# --------------------------------------------------------------------------- the ELBO and the label path


@pytest.mark.parametrize("beta, num_data", [(1.0, None), (2.5, 1000)])
def test_elbo_of_a_fixed_noise_trace_matches_a_hand_computation(beta, num_data, images):
    """The ELBO at the z of the trace, with the label one-hot and concatenated, by hand, to the flattened
    image (encoder) and to z (decoder)."""
    model = make(beta=beta)
    x, y = images[:8], torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    draws = []
    loss = Trace_ELBO().differentiable_loss(model.model, capturing(model.guide, draws), x, y, num_data=num_data)
    z = draws[0]  # (B, L)

    loc, scale = model.encoder(torch.cat([x.flatten(1), one_hot(y)], 1))  # (B, L) each
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(torch.cat([z, one_hot(y)], 1))  # (B, 1, 28, 28)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    expected = -((num_data or len(x)) / len(x)) * (log_lik + beta * (log_p - log_q)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


def test_labels_change_the_decoder_output_and_the_code():
    model = make()
    z = torch.randn(4, L)
    outputs = [model.decode(z, k) for k in range(K)]  # (4, 1, 28, 28) each, every image of class k
    assert all(not torch.allclose(outputs[0], out) for out in outputs[1:])
    expected = torch.sigmoid(model.decoder(torch.cat([z, one_hot(torch.full((4,), 3))], 1)))
    torch.testing.assert_close(outputs[3], expected)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(model.encode(x, torch.zeros(4, dtype=torch.int64)), model.encode(x, torch.ones(4, dtype=torch.int64)))
    conv = CVAE(CVAEConfig(network=tiny_network(conv=True)))
    assert conv.encoder_input(x, torch.arange(4)).shape == (4, 1 + K, 28, 28)
    assert not torch.allclose(conv.encode(x, torch.zeros(4, dtype=torch.int64)), conv.encode(x, torch.ones(4, dtype=torch.int64)))
    assert conv.reconstruct(x, torch.arange(4)).shape == (4, 1, 28, 28)


class ClassLogits(nn.Module):
    """A decoder ``(..., L + K) -> (..., 1, 28, 28)`` whose logits depend on the class alone: ``logits[k]`` everywhere."""

    def __init__(self):
        super().__init__()
        self.register_buffer("logits", torch.linspace(-3.0, 3.0, K))

    def forward(self, h):
        return (h[..., L:] @ self.logits)[..., None, None, None].expand(*h.shape[:-1], 1, 28, 28)


class PriorEncoder(nn.Module):
    """q(z|x, y) = N(0, I), the prior: the ELBO's KL is 0."""

    def forward(self, h):
        return torch.zeros(len(h), L), torch.ones(len(h), L)


def class_only(**changes) -> CVAE:
    return CVAE(CVAEConfig(network=tiny_network(), **changes), encoder=PriorEncoder(), decoder=ClassLogits())


def test_predictive_generates_images_of_each_given_class():
    model = class_only()
    y = torch.arange(K)
    samples = Predictive(model.model, num_samples=200)(y=y)
    assert samples["z"].shape == (200, K, L)
    assert samples["x"].shape == (200, K, 1, 28, 28)
    assert set(samples["x"].unique().tolist()) <= {0.0, 1.0}
    observed = samples["x"].mean((0, 2, 3, 4))  # (K,) the mean pixel of each class
    assert (observed - torch.sigmoid(ClassLogits().logits)).abs().max() < 0.02
    assert Predictive(model.model, num_samples=3)(y=7, batch_size=2)["x"].shape == (3, 2, 1, 28, 28)  # one int class
    assert make().model(y=torch.tensor([1, 2, 3])).shape == (3, 1, 28, 28)
    assert make().sample(5, 4).shape == (5, 1, 28, 28)


# --------------------------------------------------------------------------- bad labels


def test_bad_labels_raise_input_error(mnist):
    model = make()
    x = torch.rand(4, 1, 28, 28)
    bad = {
        "pass y": None,
        r"in \[0, 10\)": torch.tensor([0, 1, 2, 10]),
        r"values from -1": torch.tensor([0, -1, 2, 3]),
        "int64": torch.tensor([0.0, 1.0, 2.0, 3.0]),
        r"shape \(4,\), got \(2,\)": torch.tensor([0, 1]),
        r"shape \(4,\), got \(4, 1\)": torch.zeros(4, 1, dtype=torch.int64),
        "a tensor": [0, 1, 2, 3],
    }
    for message, y in bad.items():
        with pytest.raises(InputError, match=message):
            model.guide(x, y)
        with pytest.raises(InputError, match=message):
            Trace_ELBO().loss(model.model, model.guide, x, y)
        with pytest.raises(InputError, match=message):
            model.encode(x, y)
    with pytest.raises(InputError, match=r"class must lie in \[0, 10\)"):
        model.sample(3, 10)
    with pytest.raises(InputError, match="num_classes must be a positive integer"):
        CVAEConfig(num_classes=0)

    train, labels = mnist.train[:64], mnist.train_labels[:64]
    with pytest.raises(InputError, match="CVAE needs the labels of its train images: pass train_labels"):
        Trainer(model, config()).fit(train)
    with pytest.raises(InputError, match="pass val_labels"):
        Trainer(model, config()).fit(train, val=train, train_labels=labels)
    with pytest.raises(InputError, match=r"train_labels: labels must be class indices in \[0, 10\)"):
        Trainer(model, config()).fit(train, train_labels=labels + 10)
    with pytest.raises(InputError, match="test_labels were given without test images"):
        Trainer(model, config()).fit(train, train_labels=labels, test_labels=labels)
    vae = VAE(VAEConfig(network=tiny_network()))
    with pytest.raises(InputError, match="train_labels: a VAE is not conditional"):
        Trainer(vae, config()).fit(train, train_labels=labels)
    with pytest.raises(InputError, match="pass labels"):
        log_likelihood(model, train, num_samples=2)
    with pytest.raises(InputError, match="VAE is not conditional"):
        elbo_per_example(vae, train, labels=labels)
    with pytest.raises(InputError, match=r"shape \(64,\), got \(63,\)"):
        reconstruction_error(model, train, labels=labels[:63])


# --------------------------------------------------------------------------- training


def test_a_short_training_run_lowers_the_loss(trained):
    model, history = trained
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]  # ~490 -> ~205 nats per image
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 100
    # the label reached both networks in training: the weights on their one-hot inputs learned from it
    # (an input held at zero would leave them where they started)
    start = make()  # the fixture's model before training (the same seed)
    for trained_layer, initial_layer, labels in (
        (model.encoder.layers[0], start.encoder.layers[0], slice(784, 784 + K)),  # inputs [x.flatten(1), onehot(y)]
        (model.decoder.layers[0], start.decoder.layers[0], slice(L, L + K)),  # inputs [z, onehot(y)]
    ):
        moved = (trained_layer.weight[:, labels] - initial_layer.weight[:, labels]).abs()  # (hidden, K)
        assert moved.amax(0).min() > 1e-3  # every class's weights moved


def test_every_step_gets_the_labels_of_its_own_images(mnist):
    train, labels = mnist.train[:100], mnist.train_labels[:100]
    label_of = {image.numpy().tobytes(): int(label) for image, label in zip(train, labels)}
    seen = []

    class Recording(CVAE):
        def training_step(self, x, update, progress, y=None):
            seen.extend(zip(x, y))
            return super().training_step(x, update, progress, y=y)

    torch.manual_seed(0)
    Trainer(Recording(CVAEConfig(network=tiny_network())), config(epochs=2)).fit(train, train_labels=labels)
    assert len(seen) == 200
    assert all(label_of[x.numpy().tobytes()] == int(y) for x, y in seen)


def test_an_interrupted_cvae_run_resumes_bit_for_bit(tmp_path, mnist, monkeypatch):
    """SIGTERM at epoch 2, step 2, with dynamic binarization and a validation set: the same bits as one run."""
    train, labels = mnist.train[:128], mnist.train_labels[:128]
    data = {"val": mnist.test[:64], "dynamic_binarization": True, "train_labels": labels, "val_labels": mnist.test_labels[:64]}
    reference = make(kl_warmup_epochs=1)
    expected = Trainer(reference, config()).fit(train, **data)

    model = make(kl_warmup_epochs=1)
    calls = []
    original = model.guide

    def guide(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:  # epoch 2 of 4 steps, step 2
                os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "guide", guide)
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 2"):
        Trainer(model, config(), out_dir=tmp_path, model_name="cvae").fit(train, **data)
    position = load_checkpoint(tmp_path / "checkpoint.pt")["position"]
    assert (position["epoch"], position["step"]) == (1, 2)

    resumed = Trainer.resume(tmp_path, device="cpu")
    assert isinstance(resumed.model, CVAE) and resumed.model.config == reference.config
    with pytest.raises(InputError, match="pass train_labels"):
        resumed.fit(train, val=data["val"], dynamic_binarization=True)
    history = resumed.fit(train, **data)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in h] for h in (history, expected)]
    assert without_seconds[0] == without_seconds[1]


# --------------------------------------------------------------------------- evaluation


def test_evaluation_is_exactly_log_p_of_x_given_y_for_a_known_model():
    """Decoder of the class alone, q = prior: log p(x|y) = log p(x|z, y) for every z, so every estimate is exact."""
    model = class_only()
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    y = torch.tensor([0, 2, 4, 6, 8, 9])

    def exact(labels):
        logits = ClassLogits().logits[labels][:, None, None, None].expand_as(x)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    for labels in (y, (y + 3) % K):
        torch.testing.assert_close(log_likelihood(model, x, num_samples=7, labels=labels), exact(labels))
        torch.testing.assert_close(elbo_per_example(model, x, labels=labels), exact(labels))
    assert not torch.allclose(exact(y), exact((y + 3) % K))


def test_a_trained_cvae_explains_images_best_with_their_own_labels(trained, mnist):
    model, _ = trained
    x, y = mnist.test[:100], mnist.test_labels[:100]
    estimates = []
    for labels in (y, (y + 1) % K):
        torch.manual_seed(1)
        estimates.append(log_likelihood(model, x, num_samples=50, labels=labels))
    own, other = estimates
    assert own.mean() > other.mean() + 3  # nats per image; ~7 measured
    assert (own > other).double().mean() > 0.8


def test_evaluate_a_cvae_with_the_test_labels(trained, mnist):
    model, _ = trained
    torch.manual_seed(5)
    results = evaluate(model, mnist, num_samples=20)
    assert -results["nll"] >= results["elbo"] - 1  # importance sampling tightens the bound
    assert results["elbo"] > -260 and 0 <= results["probe_accuracy"] <= 1 and math.isfinite(results["prior_mmd"])
    # each figure is that of every test image with its own label: the same draws, given the labels directly
    x, y = mnist.test, mnist.test_labels
    torch.manual_seed(5)  # evaluate draws the ELBO's z first, then the NLL's
    assert results["elbo"] == pytest.approx(elbo_per_example(model, x, labels=y).mean().item(), rel=1e-6)
    assert results["nll"] == pytest.approx(-log_likelihood(model, x, num_samples=20, labels=y).double().mean().item(), rel=1e-6)
    assert results["prior_mmd"] == pytest.approx(prior_mmd(model, x, labels=y), rel=1e-6)
    encode = lambda images, labels: model.encode(images, labels)  # noqa: E731
    assert results["probe_accuracy"] == linear_probe(encode, mnist.train, mnist.train_labels, x, y, encode_with_labels=True)
    # and the labels matter: with each image's label moved to the next class, its ELBO is far lower
    torch.manual_seed(5)
    assert results["elbo"] > elbo_per_example(model, x, labels=(y + 1) % K).mean().item() + 3
    recon = model.reconstruct(mnist.test, mnist.test_labels)
    assert results["mse"] == pytest.approx((recon - mnist.test).square().flatten(1).sum(1).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- names, config, registry, figures


def test_parameters_live_in_the_param_store_under_their_own_name():
    first, second = CVAE(CVAEConfig(network=tiny_network())), CVAE(CVAEConfig(network=tiny_network()))
    assert first.name != second.name and first.name.startswith("cvae") and second.name.startswith("cvae")
    first.guide(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert any(key.startswith(f"{first.name}.encoder$$$") for key in pyro.get_param_store().keys())
    vae = VAE(VAEConfig(network=tiny_network()))
    with pytest.raises(InputError, match=f"another VAE in this process is called '{vae.name}'"):
        CVAE(CVAEConfig(network=tiny_network()), name=vae.name)


def test_config_round_trips_and_the_registry_builds_it():
    config = CVAEConfig(network=tiny_network(conv=True), prior="laplace", beta=0.5, num_classes=5)
    rebuilt = config_from_dict("cvae", config_to_dict(config))
    assert rebuilt == config
    model = build_model("cvae", rebuilt)
    assert isinstance(model, CVAE) and model.conditional and not VAE.conditional and model.num_classes == 5


def test_class_samples_draw_one_row_per_class(tmp_path):
    model = make().eval()
    torch.manual_seed(3)
    figure = plots.class_samples(model, n=4, path=tmp_path / "classes.png")
    torch.manual_seed(3)
    expected = model.sample(4 * K, torch.arange(K).repeat_interleave(4))  # (40, 1, 28, 28), class after class
    grid = torch.as_tensor(figure.axes[0].images[0].get_array().data)
    cell = 28 + plots.PADDING
    assert grid.shape == (K * cell + plots.PADDING, 4 * cell + plots.PADDING)
    for k in range(K):
        for j in range(4):
            top, left = plots.PADDING + k * cell, plots.PADDING + j * cell
            torch.testing.assert_close(grid[top : top + 28, left : left + 28], expected[4 * k + j, 0])
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [str(k) for k in range(K)]
    assert (tmp_path / "classes.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="class_samples"):
        plots.samples(model)
    with pytest.raises(InputError, match="not conditional"):
        plots.class_samples(VAE(VAEConfig(network=tiny_network())))
