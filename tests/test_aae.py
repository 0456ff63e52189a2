"""The adversarial autoencoder: its three updates per step, its losses, any prior, bit-for-bit resume."""

from __future__ import annotations

import math
import os
import signal

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_network
from pyrovae.checkpoints import load_checkpoint
from pyrovae.errors import InputError
from pyrovae.evaluation import prior_mmd
from pyrovae.models import AAE, AAEConfig, build_model
from pyrovae.training import Trainer, TrainingConfig

BATCH = 32


def make(**changes) -> AAE:
    torch.manual_seed(0)
    return AAE(AAEConfig(network=tiny_network(), **changes))


def config(**changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 2, "batch_size": BATCH, "progress": False, **changes})


def test_each_update_moves_only_its_own_parameters_with_its_own_rate():
    model = make(reconstruction_lr=1e-3, discriminator_lr=2e-3, generator_lr=3e-3)
    groups = model.parameter_groups()
    assert [group[0]["lr"] for group in groups.values()] == [1e-3, 2e-3, 3e-3]
    x = torch.rand(BATCH, 1, 28, 28)
    snapshots = []

    def update(group, compute_loss):  # a stand-in for the Trainer's: record which parameters each update changes
        optimizer = torch.optim.SGD(groups[group], lr=groups[group][0]["lr"])
        optimizer.zero_grad()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        snapshots.append((group, {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}))
        return loss.detach()

    figures = model.training_step(x, update, progress=None)
    assert snapshots == [("reconstruction", {"encoder", "decoder"}), ("discriminator", {"discriminator"}), ("generator", {"encoder"})]
    assert list(figures) == ["loss", "discriminator_loss", "generator_loss"]


def test_losses_by_hand():
    model = make()
    x = torch.rand(6, 1, 28, 28)
    code = model.encoder(x)
    recon = F.binary_cross_entropy_with_logits(model.decoder(code), x, reduction="sum") / 6
    torch.testing.assert_close(model.loss(x), recon)
    torch.manual_seed(1)
    real = model.prior().sample((6,))
    expected = -(F.logsigmoid(model.discriminator(real)).mean() + F.logsigmoid(-model.discriminator(code)).mean())
    torch.manual_seed(1)
    torch.testing.assert_close(model.discriminator_loss(x), expected)
    torch.testing.assert_close(model.generator_loss(x), -F.logsigmoid(model.discriminator(code)).mean())


class WithoutGenerator(AAE):
    """The control: an AAE whose steps leave out the generator's update (reconstruction and discriminator only)."""

    def training_step(self, x, update, progress):
        reconstruction = update("reconstruction", lambda: self._loss(x))
        discriminator = update("discriminator", lambda: self.discriminator_loss(x))
        return {"loss": reconstruction, "discriminator_loss": discriminator}


@pytest.mark.parametrize("prior", ["normal", "laplace", "student_t", "mixture"])
def test_trains_with_every_builtin_prior(mnist, prior):
    """The generator's updates keep the codes near the prior: after 50 steps (2-D codes, the adversarial phases
    at 3e-3), their MMD to the prior is well below that of the same run without the generator's updates, whose
    codes the reconstruction alone spreads out (measured: 0.26 to 0.51 times as large, by prior)."""
    rates = {"discriminator_lr": 3e-3, "generator_lr": 3e-3}
    network = tiny_network(latent_dim=2)
    runs = {}
    for cls in (AAE, WithoutGenerator):
        torch.manual_seed(0)
        model = cls(AAEConfig(network=network, prior=prior, **rates))
        history = Trainer(model, config(epochs=5)).fit(mnist.train, val=mnist.test[:64])
        runs[cls] = model, history, prior_mmd(model, mnist.test[:200])
    model, history, distance = runs[AAE]
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_loss"] < 540
    assert distance < 0.7 * runs[WithoutGenerator][2]
    assert model.sample(5).shape == (5, 1, 28, 28)


def test_a_users_prior_plugs_in_and_a_wrong_event_shape_is_refused():
    class Gumbel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("loc", torch.zeros(8))

        def forward(self):
            return dist.Gumbel(self.loc, 1.0).to_event(1)

    model = AAE(AAEConfig(network=tiny_network()), prior=Gumbel())
    assert model.discriminator_loss(torch.rand(4, 1, 28, 28)).isfinite()
    with torch.no_grad():  # move the Gumbel to 5, where no code is: the discriminator's real half must be its draws
        model.prior.loc.fill_(5.0)
    seen = []
    model.discriminator.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    model.discriminator_loss(torch.rand(4000, 1, 28, 28))
    real, fake = seen[0][:4000], seen[0][4000:]  # (4000, 8) each
    euler_gamma, gumbel_std = 0.5772, math.pi / math.sqrt(6)  # Gumbel(5, 1): mean 5 + gamma, standard deviation pi / sqrt(6)
    assert (real.mean(0) - (5 + euler_gamma)).abs().max() < 0.1 and (real.std(0) - gumbel_std).abs().max() < 0.1
    assert fake.abs().max() < 2  # the codes, nowhere near the Gumbel's draws
    torch.manual_seed(1)
    samples = model.sample(3)
    torch.manual_seed(1)
    torch.testing.assert_close(samples, model.decode(dist.Gumbel(torch.full((8,), 5.0), 1.0).sample((3,))))
    with pytest.raises(InputError, match=r"event_shape \(8,\)"):
        AAE(AAEConfig(network=tiny_network()), prior=lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1))
    for bad in ({"discriminator_hidden": ()}, {"generator_lr": 0.0}, {"prior": "cauchy"}, {"loss": "l1"}):
        with pytest.raises(InputError):
            AAEConfig(**bad)


def test_gaussian_posterior_samples_in_training_and_is_deterministic_in_eval():
    model = make(gaussian_posterior=True)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.equal(model.code(x), model.code(x))
    with torch.no_grad():  # 4,000 draws of each image's code follow Normal(loc, scale) of its encoder output
        loc, scale = model.encoder(x)  # (4, L) each, scales about 0.7
        codes = model.code(x.repeat(4000, 1, 1, 1)).reshape(4000, 4, -1)
    assert ((codes.mean(0) - loc).abs() < 5 * scale / math.sqrt(4000)).all()
    assert ((codes.std(0) / scale - 1).abs() < 0.1).all()
    model.eval()
    assert torch.equal(model.code(x), model.encode(x)) and torch.equal(model.loss(x), model.loss(x))


def test_an_interrupted_aae_run_resumes_bit_for_bit(tmp_path, mnist, monkeypatch):
    train = mnist.train[:128]
    reference = make()
    expected = Trainer(reference, config()).fit(train)

    model = make()
    calls = []
    original = model.generator_loss

    def generator_loss(x):
        calls.append(1)
        if len(calls) == 6:  # epoch 2, step 2, after its reconstruction and discriminator updates
            os.kill(os.getpid(), signal.SIGTERM)
        return original(x)

    monkeypatch.setattr(model, "generator_loss", generator_loss)
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 2"):
        Trainer(model, config(), out_dir=tmp_path, model_name="aae").fit(train)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state["optimizer_states"]) == {"reconstruction", "discriminator", "generator"}

    resumed = Trainer.resume(tmp_path, device="cpu")
    history = resumed.fit(train)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [row["train_loss"] for row in history] == [row["train_loss"] for row in expected]
    assert isinstance(build_model("aae"), AAE)


def test_the_training_lr_reaches_every_phase_unless_the_config_sets_the_phases_own(mnist):
    rates = []
    step = AAE.training_step

    def spy(self, x, update, progress):  # the rate of each optimizer the Trainer built, at each step
        rates.append({group: opt.param_groups[0]["lr"] for group, opt in update.optimizers.items()})
        return step(self, x, update, progress)

    AAE.training_step = spy
    try:
        Trainer(make(), config(epochs=1, lr=1e-6)).fit(mnist.train[:64])
        assert rates[-1] == {"reconstruction": 1e-6, "discriminator": 1e-6, "generator": 1e-6}
        Trainer(make(discriminator_lr=5e-4), config(epochs=1, lr=1e-6)).fit(mnist.train[:64])
        assert rates[-1] == {"reconstruction": 1e-6, "discriminator": 5e-4, "generator": 1e-6}
    finally:
        AAE.training_step = step
