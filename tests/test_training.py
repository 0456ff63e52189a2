"""The Trainer: every model and ELBO trains; runs resume bit for bit; failures are clear and safe."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from conftest import tiny_network
from pyrovae.checkpoints import load_checkpoint
from pyrovae.data import batches
from pyrovae.errors import InputError
from pyrovae.models import (
    AE, MODELS, VAE, AEConfig, DenoisingAE, DenoisingAEConfig, SparseAE, SparseAEConfig, StackedAE, StackedAEConfig, VAEConfig,
    build_model, config_from_dict, config_to_dict,
)
from pyrovae.training import HISTORY_COLUMNS, StagedDecay, Trainer, TrainingConfig, TrainingError, load_model

BATCH = 32  # 128 images: 4 steps per epoch


@pytest.fixture
def train(mnist):
    return mnist.train[:128]


@pytest.fixture
def val(mnist):
    return mnist.test[:64]


def config(**changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 3, "batch_size": BATCH, "progress": False, **changes})


def vae(cls=VAE, **options):
    torch.manual_seed(0)  # every run of a test starts from the same weights
    return cls(VAEConfig(network=tiny_network(), **options))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


class SignalsAt:
    """Mixin: send ``sig`` to this process during the ``at``-th training step (a call with gradients on)."""

    def arm(self, at: int, sig=signal.SIGINT):
        self.at, self.sig, self.calls = at, sig, 0
        return self

    def _count(self):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.sig)


class SignallingVAE(SignalsAt, VAE):
    def guide(self, x, num_data=None, batch_size=1):
        self._count()
        return super().guide(x, num_data, batch_size)


class SignallingStackedAE(SignalsAt, StackedAE):
    def loss(self, x, layer=None):
        self._count()
        return super().loss(x, layer)


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes",
    [
        {"batch_size": 0}, {"batch_size": -4}, {"epochs": -1}, {"epochs": 1.5}, {"lr": 0.0}, {"lr": float("nan")},
        {"optimizer": "adamm"}, {"optimizer": "lbfgs"}, {"lr_schedule": "linear"}, {"weight_decay": -1.0},
        {"lr_step_epochs": 0}, {"grad_clip": 0.0}, {"early_stopping_patience": 0}, {"seed": "zero"},
    ],
)
def test_bad_config_values_raise(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        TrainingConfig(**changes)


def test_optimizer_names_are_case_insensitive():
    assert TrainingConfig(optimizer="AdamW").optimizer == "adamw"
    assert TrainingConfig(optimizer="SGD").optimizer == "sgd"


def test_a_trainer_refuses_models_it_cannot_train_or_name():
    with pytest.raises(InputError, match="not a pyrovae.models.base.TrainableModel"):
        Trainer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="is for models with config class AEConfig"):
        Trainer(StackedAE(StackedAEConfig(network=tiny_network())), model_name="ae")
    with pytest.raises(ValueError, match="pass model_name"):
        Trainer(vae(SignallingVAE), out_dir="unused")


# ---------------------------------------------------------------------- every model and ELBO trains


@pytest.mark.parametrize("elbo, particles", [("trace", 1), ("meanfield", 1), ("iwae", 3), ("trace", 2)])
def test_every_elbo_trains_the_vae(train, val, elbo, particles):
    history = Trainer(vae(elbo=elbo, num_particles=particles), config(lr=3e-3)).fit(train, val=val)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 50  # nats per image
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 50
    assert all(row["kl_weight"] == 1.0 for row in history)

    # One plain SGD step on the whole set (SGD, unlike Adam, shows the gradient's scale): the parameters move by
    # lr times the gradient of the bound per image, computed by hand at the same draws of z.
    model, lr = vae(elbo=elbo, num_particles=particles), 1e-3
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = Trainer(model, config(epochs=1, batch_size=len(train), optimizer="sgd", lr=lr)).fit(train)
    reference = vae(elbo=elbo, num_particles=particles)
    x = next(batches(train, len(train), torch.Generator().manual_seed(0)))  # the run's batch: drawn with config.seed
    torch.manual_seed(0)  # the Trainer seeds torch with config.seed; the guide's draw is the run's first
    loss = negative_bound_by_hand(reference, x, elbo, particles)
    loss.backward()
    assert first[0]["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.state_dict()[name], before[name] - lr * p.grad, rtol=1e-4, atol=1e-6, msg=name)


def negative_bound_by_hand(model, x, elbo, particles):
    """Minus the bound per image, averaged over ``x: (B, C, H, W)``, for a Normal prior, Bernoulli pixels and
    ``particles`` draws z ~ q(z|x) (torch.distributions, no Pyro): the ELBO's (analytic KL for "meanfield"),
    or the IWAE bound's log-mean-exp of the importance weights."""
    loc, scale = model.encoder(x)
    q, prior = Normal(loc, scale), Normal(torch.zeros(()), torch.ones(()))
    z = q.rsample((particles,))  # (K, B, L)
    logits = model.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(-3).sum(-1)  # (K, B)
    if elbo == "meanfield":
        return -(log_lik - kl_divergence(q, prior).sum(-1)).mean()
    log_w = log_lik + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    if elbo == "iwae":
        return -(torch.logsumexp(log_w, 0) - math.log(particles)).mean()
    return -log_w.mean()


DETERMINISTIC = {
    "ae": lambda: AE(AEConfig(network=tiny_network())),
    "sparse": lambda: SparseAE(SparseAEConfig(network=tiny_network())),
    "denoising": lambda: DenoisingAE(DenoisingAEConfig(network=tiny_network())),
    "stacked": lambda: StackedAE(StackedAEConfig(network=tiny_network(), pretrain_epochs=1)),
}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_models_train_through_the_same_trainer(train, val, name):
    torch.manual_seed(0)
    model = DETERMINISTIC[name]()
    history = Trainer(model, config(optimizer="AdamW", lr=3e-3)).fit(train, val=val)
    end_to_end = [row for row in history if row["phase"] == "train"]
    assert len(end_to_end) == 3
    assert end_to_end[-1]["train_loss"] < end_to_end[0]["train_loss"] - 20
    assert end_to_end[-1]["val_loss"] < end_to_end[0]["val_loss"]
    assert all("kl_weight" not in row for row in history)
    with torch.no_grad():  # the validation figure is the model's own loss, by hand, on batches of 32 without noise
        model.eval()
        expected = (loss_by_hand(name, model, val[:BATCH], noise=None) + loss_by_hand(name, model, val[BATCH:], noise=None)) / 2
    assert end_to_end[-1]["val_loss"] == pytest.approx(expected.item(), rel=1e-5)

    # One plain SGD step on the whole set (end to end: the stacked AE without pretraining): the parameters
    # move by lr times the gradient of the per-image loss, by hand, at the same noise (the denoising AE's).
    def build():
        torch.manual_seed(0)
        return StackedAE(StackedAEConfig(network=tiny_network(), pretrain_epochs=0)) if name == "stacked" else DETERMINISTIC[name]()

    model, reference, lr = build(), build(), 0.1
    before = {key: p.detach().clone() for key, p in model.named_parameters()}
    first = Trainer(model, config(epochs=1, batch_size=len(train), optimizer="sgd", lr=lr)).fit(train)
    x = next(batches(train, len(train), torch.Generator().manual_seed(0)))  # the run's batch: drawn with config.seed
    torch.manual_seed(0)  # the Trainer seeds torch with config.seed: the corruption is the run's first draw
    loss = loss_by_hand(name, reference, x, noise=torch.randn_like(x))
    loss.backward()
    assert first[0]["train_loss"] == pytest.approx(loss.item(), rel=1e-5)
    for key, p in reference.named_parameters():
        torch.testing.assert_close(model.state_dict()[key], before[key] - lr * p.grad, rtol=1e-4, atol=1e-6, msg=key)


def loss_by_hand(name, model, x, noise):
    """The loss per image of the autoencoder ``name`` on ``x``, from its networks: binary cross-entropy summed
    over pixels; the sparse AE's codes are sigmoids and it adds sum_j KL(0.05 || mean code_j); the denoising AE
    encodes ``x + 0.3 * noise`` (no noise: ``None``, as in evaluation)."""
    source = x + 0.3 * noise if name == "denoising" and noise is not None else x
    code = model.encoder(source)
    if name == "sparse":
        code = torch.sigmoid(code)
    loss = F.binary_cross_entropy_with_logits(model.decoder(code), x, reduction="sum") / len(x)
    if name == "sparse":
        rho, rho_hat = 0.05, code.mean(0)
        loss = loss + (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    return loss


def test_stacked_pretraining_touches_only_the_active_layer(train):
    class Recording(StackedAE):
        def loss(self, x, layer=None):
            if torch.is_grad_enabled() and (not self.snapshots or self.snapshots[-1][0] != layer):
                self.snapshots.append((layer, {k: v.clone() for k, v in self.state_dict().items()}))
            return super().loss(x, layer)

    model = Recording(StackedAEConfig(network=tiny_network(hidden=(32,)), pretrain_epochs=2))
    model.snapshots = []
    history = Trainer(model, config(epochs=1)).fit(train)
    assert [(row["phase"], row["epoch"]) for row in history] == [("pretrain-0", 1), ("pretrain-0", 2), ("pretrain-1", 1), ("pretrain-1", 2), ("train", 1)]
    assert [layer for layer, _ in model.snapshots] == [0, 1, None]
    states = [state for _, state in model.snapshots] + [model.state_dict()]

    def changed(before, after):
        return {name.rsplit(".", 1)[0] for name in before if not torch.equal(before[name], after[name])}

    assert changed(states[0], states[1]) == {"encoder.layers.0", "decoder.layers.1"}
    assert changed(states[1], states[2]) == {"encoder.layers.1", "decoder.layers.0"}
    assert changed(states[2], states[3]) == {"encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"}


class RecordingKLWeight(VAE):
    """Records the KL weight of every training call of the guide."""

    def guide(self, x, num_data=None, batch_size=1):
        if torch.is_grad_enabled():
            self.weights.append(self.kl_weight)
        return super().guide(x, num_data, batch_size)


@pytest.mark.parametrize("with_val", [False, True])
def test_kl_warmup_rises_linearly_per_step_and_the_history_has_its_epoch_means(train, val, with_val):
    """The history's kl_weight is the epoch's mean weight, with or without validation (validation once reset it to beta)."""
    model = RecordingKLWeight(VAEConfig(network=tiny_network(), beta=0.5, kl_warmup_epochs=2))
    model.weights = []
    history = Trainer(model, config()).fit(train, val=val if with_val else None)
    assert model.weights == pytest.approx([0.5 * i / 8 for i in range(8)] + [0.5] * 4)
    means = [0.5 * sum(range(4)) / 32, 0.5 * sum(range(4, 8)) / 32, 0.5]
    assert [row["kl_weight"] for row in history] == pytest.approx(means)
    assert model.kl_weight == 0.5


# ---------------------------------------------------------------------- run folder


def test_run_folder_holds_config_metrics_and_checkpoint(tmp_path, train, val):
    model = vae()
    training = config(epochs=2, lr_schedule="step", lr_step_epochs=1)
    history = Trainer(model, training, out_dir=tmp_path / "run").fit(train, val=val)
    folder = tmp_path / "run"

    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_name"] == "vae"
    assert config_from_dict("vae", saved["model_config"]) == model.config
    assert saved["training_config"] == json.loads(json.dumps(dataclasses.asdict(training)))

    assert json.loads((folder / "metrics.json").read_text()) == history
    with open(folder / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["phase", "epoch", "train_loss", "kl_weight", *HISTORY_COLUMNS[3:]]
    assert [float(row["train_loss"]) for row in rows] == [row["train_loss"] for row in history]
    assert [row["lr"] for row in history] == [1e-3, 5e-4]

    state = load_checkpoint(folder / "checkpoint.pt")
    assert state["position"]["done"] and state["history"] == history
    assert state["model_config"] == config_to_dict(model.config)
    loaded, _ = load_model(folder)
    assert_same_weights(loaded, model)


def test_bad_data_fails_before_training_or_writing(tmp_path, train, val):
    folder = tmp_path / "run"
    with pytest.raises(ValueError, match="larger than the training set"):
        Trainer(vae(), config(batch_size=129), out_dir=folder).fit(train)
    with pytest.raises(ValueError, match="support"):
        Trainer(vae(), config(), out_dir=folder).fit(train * 2)
    with pytest.raises(ValueError, match="shape"):
        Trainer(vae(), config(), out_dir=folder).fit(train, val=val[:, :, :14])
    with pytest.raises(ValueError, match="needs|watches"):
        Trainer(vae(), config(early_stopping_patience=2), out_dir=folder).fit(train)
    with pytest.raises(ValueError, match="dynamic binarization"):
        Trainer(AE(AEConfig(network=tiny_network(), loss="mse")), config(), out_dir=folder).fit(train * 2, dynamic_binarization=True)
    assert not folder.exists()


def test_early_stopping_stops_when_validation_stops_improving(train, val):
    class Worsening(AE):  # the validation loss grows by 1000 per training step taken
        steps = 0

        def loss(self, x):
            if self.training:
                self.steps += 1
                return super().loss(x)
            return super().loss(x) + 1000.0 * self.steps

    history = Trainer(Worsening(AEConfig(network=tiny_network())), config(epochs=10, early_stopping_patience=2)).fit(train, val=val)
    assert len(history) == 3
    assert [row["stopped_early"] for row in history] == [False, False, True]
    assert history[-1]["best_epoch"] == 1 and history[-1]["best_val_loss"] == history[0]["val_loss"]


# ---------------------------------------------------------------------- non-finite losses


class NaNAt(AE):
    """An AE whose loss is NaN at the training calls in ``bad``."""

    def __init__(self, config, bad):
        super().__init__(config)
        self.bad, self.calls = set(bad), 0

    def loss(self, x):
        loss = super().loss(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                return loss * math.nan
        return loss


def test_nonfinite_loss_names_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, train):
    folder = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite \({'loss': nan}\) at epoch 2, step 2 of 4") as error:
        Trainer(NaNAt(AEConfig(network=tiny_network()), bad={6}), config(), out_dir=folder, model_name="ae").fit(train)
    assert str(folder / "checkpoint.pt") in str(error.value)
    model, state = load_model(folder)
    assert [row["epoch"] for row in state["history"]] == [1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(json.loads((folder / "metrics.json").read_text())) == 1


def test_skip_nonfinite_skips_and_counts(train):
    model = NaNAt(AEConfig(network=tiny_network()), bad={6, 7, 12})
    history = Trainer(model, config(skip_nonfinite=True)).fit(train)
    assert [row["skipped_steps"] for row in history] == [0, 2, 1]
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- resume, interrupts


def test_resume_after_an_epoch_boundary_is_bitwise(tmp_path, train, val):
    reference = vae()
    expected = Trainer(reference, config(), out_dir=tmp_path / "a").fit(train, val=val)

    before = signal.getsignal(signal.SIGINT)
    model = vae(SignallingVAE).arm(at=8)  # the last step of epoch 2
    with pytest.raises(KeyboardInterrupt, match="SIGINT before train epoch 3"):
        Trainer(model, config(), out_dir=tmp_path / "b", model_name="vae").fit(train, val=val)
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["position"]["epoch"] == 2

    resumed = Trainer.resume(tmp_path / "b", device="cpu")
    history = resumed.fit(train, val=val)
    assert_same_weights(resumed.model, reference)
    assert without_seconds(history) == without_seconds(expected)


@pytest.mark.parametrize("options", [{"num_particles": 2, "kl_warmup_epochs": 1}, {"elbo": "iwae", "num_particles": 2}])
def test_mid_epoch_interrupt_and_resume_is_bitwise(tmp_path, train, val, options):
    """Vectorized particles (ELBO with KL warm-up, IWAE), dynamic binarization, clipping, a schedule: the same bits."""
    training = config(grad_clip=50.0, lr_schedule="cosine")
    reference = vae(**options)
    expected = Trainer(reference, training).fit(train, val=val, dynamic_binarization=True)

    model = vae(SignallingVAE, **options).arm(at=6, sig=signal.SIGTERM)  # epoch 2, step 2
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at step 2 of train epoch 2"):
        Trainer(model, training, out_dir=tmp_path / "run", model_name="vae").fit(train, val=val, dynamic_binarization=True)
    assert signal.getsignal(signal.SIGTERM) is before
    position = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["position"]
    assert (position["epoch"], position["step"]) == (1, 2)

    resumed = Trainer.resume(tmp_path / "run", device="cpu")
    with pytest.raises(ValueError, match="dynamic_binarization=True"):
        resumed.fit(train, val=val)
    with pytest.raises(ValueError, match="128 images"):
        resumed.fit(train[:100], val=val, dynamic_binarization=True)
    history = resumed.fit(train, val=val, dynamic_binarization=True)
    assert_same_weights(resumed.model, reference)
    assert without_seconds(history) == without_seconds(expected)


def test_a_sigterm_while_the_first_checkpoint_is_written_stops_at_the_first_step(tmp_path, train, monkeypatch):
    """The handlers are in place before a new run writes its first files: a SIGTERM then is a request to stop
    (a checkpoint after the first step), not the end of the process."""
    write_files = Trainer._write_files

    def write_files_and_signal(self):
        write_files(self)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_write_files", write_files_and_signal)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM at step 1 of train epoch 1"):
        Trainer(vae(), config(), out_dir=tmp_path / "run", model_name="vae").fit(train)
    position = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["position"]
    assert (position["epoch"], position["step"]) == (0, 1)


def test_fit_in_another_thread_leaves_signals_alone(train):
    before = signal.getsignal(signal.SIGINT)
    seen, errors = [], []

    class Watching(AE):
        def loss(self, x):
            seen.append(signal.getsignal(signal.SIGINT))
            return super().loss(x)

    def run():
        try:
            Trainer(Watching(AEConfig(network=tiny_network())), config(epochs=1)).fit(train)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not errors and seen and all(handler is before for handler in seen)


def test_interrupted_fit_continues_in_memory(train):
    """Without a run folder, fit again continues the interrupted run (here in a pretraining phase)."""
    def stacked(cls=StackedAE):
        torch.manual_seed(0)
        return cls(StackedAEConfig(network=tiny_network(hidden=(32,)), pretrain_epochs=1))

    reference = stacked()
    expected = Trainer(reference, config(epochs=2, optimizer="rmsprop", lr=1e-3)).fit(train)
    model = stacked(SignallingStackedAE).arm(at=6)  # pretrain-1, step 2
    trainer = Trainer(model, config(epochs=2, optimizer="rmsprop", lr=1e-3))
    with pytest.raises(KeyboardInterrupt, match="step 2 of pretrain-1 epoch 1"):
        trainer.fit(train)
    torch.manual_seed(123)  # whatever happens in between does not matter
    history = trainer.fit(train)
    assert_same_weights(model, reference)
    assert without_seconds(history) == without_seconds(expected)


def test_each_fit_is_a_new_run_but_a_finished_resume_is_not(tmp_path, train):
    model = vae()
    trainer = Trainer(model, config(epochs=1), out_dir=tmp_path / "run")
    first = trainer.fit(train)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    second = trainer.fit(train)
    assert len(first) == len(second) == 1
    assert not torch.equal(weights["encoder.layers.0.weight"], model.state_dict()["encoder.layers.0.weight"])

    resumed = Trainer.resume(tmp_path / "run", device="cpu")
    assert resumed.fit(train) == second
    assert_same_weights(resumed.model, model)


def test_data_is_checked_again_only_when_it_changed(train):
    class Counting(VAE):
        checks = 0

        def check_input(self, x):
            self.checks += 1
            super().check_input(x)

    model = vae(Counting)
    trainer = Trainer(model, config(epochs=1))
    data = train.clone()
    trainer.fit(data)
    trainer.fit(data)  # the same, unchanged tensor: not checked again
    assert model.checks == 1
    data.mul_(2)  # changed in place: checked again
    with pytest.raises(ValueError, match="support"):
        trainer.fit(data)
    with pytest.raises(ValueError, match="support"):
        trainer.fit(train * 2)
    assert model.checks == 3


def test_zero_epochs_writes_a_loadable_run_of_the_untrained_model(tmp_path, train):
    model = vae()
    assert Trainer(model, config(epochs=0), out_dir=tmp_path).fit(train) == []
    loaded, state = load_model(tmp_path)
    assert_same_weights(loaded, model)
    assert state["position"]["done"] and state["optimizer_states"] == {}


# ---------------------------------------------------------------------- models with several optimizers


class TwoOptimizers(AE):
    """A toy model with two parameter groups updated in turn each step: the encoder on the
    reconstruction loss, then the decoder, at ten times the rate, on the same loss."""

    def parameter_groups(self):
        return {"encoder": list(self.encoder.parameters()), "decoder": [{"params": list(self.decoder.parameters()), "lr": 1e-2}]}

    def training_step(self, x, update, progress):
        first = update("encoder", lambda: self.loss(x))
        second = update("decoder", lambda: self.loss(x))
        return {"loss": second, "encoder_loss": first}


def test_a_model_with_two_optimizers_trains_checkpoints_and_resumes_bitwise(tmp_path, train, monkeypatch):
    def model():
        torch.manual_seed(0)
        return TwoOptimizers(AEConfig(network=tiny_network()))

    reference = model()
    expected = Trainer(reference, config()).fit(train)
    assert [row["train_loss"] < row["encoder_loss"] for row in expected] == [True] * 3  # the decoder step lowered it

    interrupted = model()
    calls = []

    def loss(x, original=interrupted.loss):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 11:  # epoch 2, step 2, the encoder's update
                os.kill(os.getpid(), signal.SIGINT)
        return original(x)

    monkeypatch.setattr(interrupted, "loss", loss)
    trainer = Trainer(interrupted, config(), out_dir=tmp_path / "run", model_name="ae")
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 2"):
        trainer.fit(train)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert set(state["optimizer_states"]) == {"encoder", "decoder"}
    assert state["optimizer_states"]["decoder"]["param_groups"][0]["lr"] == 1e-2
    history = trainer.fit(train)  # continues in memory from the saved state
    assert_same_weights(interrupted, reference)
    assert without_seconds(history) == without_seconds(expected)


def test_a_step_must_update_known_groups_and_report_its_loss_first(train):
    class WrongGroup(AE):
        def training_step(self, x, update, progress):
            return {"loss": update("generator", lambda: self.loss(x))}

    class NoLoss(AE):
        def training_step(self, x, update, progress):
            return {"reconstruction": update("model", lambda: self.loss(x))}

    with pytest.raises(InputError, match=r"group 'generator', but its groups are \['model'\]"):
        Trainer(WrongGroup(AEConfig(network=tiny_network())), config()).fit(train)
    with pytest.raises(InputError, match="'loss' first"):
        Trainer(NoLoss(AEConfig(network=tiny_network())), config()).fit(train)


# ---------------------------------------------------------------------- quality during training


def test_test_loss_is_scored_every_eval_every_epochs_and_decides_nothing(train, val):
    model = vae()
    history = Trainer(model, config(epochs=5, eval_every=2)).fit(train, val=val, test=val[:32])
    assert [row["test_loss"] is not None for row in history] == [False, True, False, True, True]  # and the last epoch
    assert [row["val_loss"] is not None for row in history] == [False, True, False, True, True]
    model.eval()
    with torch.no_grad():  # the last row's figure is the model's validation loss on the test images
        pyro.set_rng_seed(0)
        expected = model.validation_loss(val[:32]).item()
    assert history[-1]["test_loss"] == pytest.approx(expected, rel=0.05)  # one-sample estimates of the same ELBO
    scored = [row["val_loss"] for row in history if row["val_loss"] is not None]
    assert history[-1]["best_val_loss"] == min(scored)


def test_a_worse_test_loss_never_stops_training(train, val):
    class WorseOnTest(AE):
        def validation_loss(self, x):
            return super().validation_loss(x) + (1000.0 * self.calls if len(x) == 16 else 0.0)

        calls = 0

        def training_step(self, x, update, progress):
            self.calls += 1
            return super().training_step(x, update, progress)

    history = Trainer(WorseOnTest(AEConfig(network=tiny_network())), config(epochs=4, early_stopping_patience=1)).fit(
        train, val=val, test=val[:16])
    assert len(history) == 4 and history[-1]["test_loss"] > history[0]["test_loss"] + 1000


def test_scores_are_history_columns_at_each_evaluation_and_change_no_draw(tmp_path, train, val):
    """A score is called in eval mode without gradients at each evaluation; torch's RNG is forked around it, so the
    run trains to the same bits as one without it, even when the score itself draws."""
    reference = vae()
    expected = Trainer(reference, config(epochs=3, eval_every=2)).fit(train, val=val, dynamic_binarization=True)

    calls = []

    def mean_code(model):  # draws from torch's global RNG, as a sampled score would
        calls.append((model.training, torch.is_grad_enabled()))
        return float(model.encode(val[:8]).mean() + 0 * torch.rand(()))

    model = vae()
    history = Trainer(model, config(epochs=3, eval_every=2), out_dir=tmp_path / "run").fit(
        train, val=val, dynamic_binarization=True, scores={"mean_code": mean_code})
    assert_same_weights(model, reference)
    assert calls == [(False, False)] * 2 and model.training  # epochs 2 and 3 (the last), back in training mode after
    assert [row["mean_code"] is not None for row in history] == [False, True, True]
    model.eval()
    with torch.no_grad():
        assert history[-1]["mean_code"] == pytest.approx(float(model.encode(val[:8]).mean()))
    columns = list(history[0])
    assert columns[columns.index("test_loss") + 1] == "mean_code"
    assert [{k: v for k, v in row.items() if k != "mean_code"} for row in without_seconds(history)] == without_seconds(expected)
    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["mean_code"] for row in rows] == ["", repr(history[1]["mean_code"]), repr(history[2]["mean_code"])]


def test_a_score_given_only_when_a_run_is_continued_gets_its_own_csv_column(tmp_path, train, val):
    model = vae(SignallingVAE).arm(at=5)  # the first step of epoch 2
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, config(epochs=2, eval_every=1), out_dir=tmp_path / "run", model_name="vae").fit(train, val=val)
    first_epoch = json.loads((tmp_path / "run" / "metrics.json").read_text())
    resumed = Trainer.resume(tmp_path / "run", device="cpu")
    with pytest.raises(InputError, match="model's own figures"):  # known from the checkpoint: refused before a step
        resumed.fit(train, val=val, scores={"kl_weight": lambda model: 1.0})
    history = resumed.fit(train, val=val, scores={"one": lambda model: 1.0})  # the refusal lost nothing: it continues
    assert history[:1] == first_epoch and history[1]["epoch"] == 2
    assert "one" not in history[0] and history[1]["one"] == 1.0
    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["one"] for row in rows] == ["", "1.0"] and rows[0]["val_loss"] != ""


@pytest.mark.parametrize("scores, words", [
    ({"test_loss": lambda model: 0.0}, "name of its own"),
    ({"": lambda model: 0.0}, "name of its own"),
    ({"accuracy": 0.9}, "function of the model"),
    ([lambda model: 0.0], "map a column name"),
    ({"kl_weight": lambda model: 0.0}, "model's own figures"),
])
def test_bad_scores_are_refused_before_an_epoch_is_recorded(tmp_path, train, scores, words):
    """Names and types before anything is written; a clash with the model's figures, known at its first step, then."""
    with pytest.raises(InputError, match=words):
        Trainer(vae(), config(), out_dir=tmp_path / "run").fit(train, scores=scores)
    metrics = tmp_path / "run" / "metrics.json"
    assert not metrics.exists() or json.loads(metrics.read_text()) == []


def test_the_iwae_schedule_is_the_papers_at_3280_epochs_and_compresses_to_fewer():
    paper = StagedDecay(3280)
    lengths = [end - start for start, end in zip([0, *paper.stage_ends()], paper.stage_ends())]
    assert lengths == [3**i for i in range(8)]
    assert [paper(epoch) for epoch in (0, 1, 3, 4, 1092, 1093, 3279)] == pytest.approx(
        [1.0, 10 ** (-1 / 7), 10 ** (-1 / 7), 10 ** (-2 / 7), 10 ** (-6 / 7), 10 ** (-1), 10 ** (-1)])
    assert StagedDecay(328).stage_ends()[-3:] == [36, 109, 328]


class RecordingRates(AE):
    """An AE whose every step records ``(lr, eps)`` of the optimizer it is about to update (``trainer``'s)."""

    def training_step(self, x, update, progress):
        group = self.trainer.optimizers["model"].param_groups[0]
        self.rates.append((group["lr"], group["eps"]))
        return super().training_step(x, update, progress)


def staged_rates(lr, stage_epochs):
    """The IWAE paper's schedule written out: stage i lasts ``stage_epochs[i]`` epochs at ``lr * 10^(-i/7)``."""
    return [lr * 10 ** (-i / 7) for i, length in enumerate(stage_epochs) for _ in range(length)]


@pytest.mark.parametrize(
    "epochs, stage_epochs",
    [
        (3280, [3**i for i in range(8)]),  # the paper's: 1 + 3 + 9 + ... + 2187 epochs
        (16, [1, 1, 1, 1, 1, 1, 1, 9]),  # compressed: every stage at least one epoch, the rest in the last
    ],
)
def test_iwae_schedule_and_optimizer_eps_reach_the_optimizer(tmp_path, epochs, stage_epochs):
    """One image, batch 1: a step per epoch, each reading lr and eps off the optimizer it updates."""
    torch.manual_seed(0)
    model = RecordingRates(AEConfig(network=tiny_network(hidden=(), latent_dim=1)))
    model.rates = []
    folder = tmp_path if epochs < 100 else None  # a checkpoint per epoch would take minutes for 3,280 epochs
    model.trainer = Trainer(model, config(epochs=epochs, batch_size=1, lr_schedule="iwae", optimizer_eps=1e-4), out_dir=folder, model_name="ae")
    history = model.trainer.fit(torch.rand(1, 1, 28, 28))
    assert len(model.rates) == epochs
    assert [lr for lr, _ in model.rates] == pytest.approx(staged_rates(1e-3, stage_epochs), rel=1e-9)
    assert [row["lr"] for row in history] == pytest.approx(staged_rates(1e-3, stage_epochs), rel=1e-9)
    assert {eps for _, eps in model.rates} == {1e-4}
    if folder is None:
        return
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    resumed = Trainer.resume(tmp_path, device="cpu")
    assert resumed.config.optimizer_eps == 1e-4 and state["training_config"]["lr_schedule"] == "iwae"


# ---------------------------------------------------------------------- the learning rate, and longer runs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_models_optimizers_take_the_training_lr(name, mnist):
    """No model's parameter groups keep their own rate unless its config sets one (the AAE's: None by default)."""
    torch.manual_seed(0)
    model = build_model(name, MODELS[name][1](network=tiny_network()))
    seen = {}
    step = type(model).training_step

    def spy(self, x, update, progress, **given):  # the rates of the optimizers the Trainer built, at the first step
        seen.setdefault("rates", {group: [g["lr"] for g in opt.param_groups] for group, opt in update.optimizers.items()})
        return step(self, x, update, progress, **given)

    type(model).training_step = spy
    try:
        takes_labels = model.conditional or getattr(model, "classes_are_labels", False)  # the CVAE; M2 (all labelled here)
        labels = {"train_labels": mnist.train_labels[:64]} if takes_labels else {}
        Trainer(model, config(epochs=1, lr=3e-5)).fit(mnist.train[:64], **labels)
    finally:
        type(model).training_step = step
    assert seen["rates"] and all(rates == [3e-5] * len(rates) for rates in seen["rates"].values()), seen


def test_every_stage_of_the_iwae_schedule_gets_an_epoch():
    """The first epoch runs at the configured lr; with 8 epochs or more every stage runs; with fewer, the first ones, an epoch each."""
    for epochs in [*range(1, 40), 80, 110, 600, 750, 1000, 1640, 1641, 3280]:
        decay = StagedDecay(epochs)
        ends = decay.stage_ends()
        lengths = [end - start for start, end in zip([0, *ends], ends)]
        assert ends[-1] == epochs and all(length >= 0 for length in lengths), epochs
        if epochs >= StagedDecay.STAGES:
            assert all(length >= 1 for length in lengths), (epochs, ends)
        else:
            assert lengths == [1] * epochs + [0] * (StagedDecay.STAGES - epochs), (epochs, ends)
        assert decay(0) == 1.0, epochs
    assert [StagedDecay(10)(epoch) for epoch in range(10)] == pytest.approx([10 ** (-s / 7) for s in (0, 1, 2, 3, 4, 5, 6, 7, 7, 7)])


def test_resume_with_more_epochs_continues_as_the_longer_run(tmp_path, train, val):
    """A finished run of 2 epochs, resumed with epochs=3, ends where a run of 3 epochs ends, bit for bit."""
    reference = vae()
    longer = Trainer(reference, config(epochs=3, lr_schedule="step", lr_step_epochs=2)).fit(train, val=val)
    Trainer(vae(), config(epochs=2, lr_schedule="step", lr_step_epochs=2), out_dir=tmp_path).fit(train, val=val)
    resumed = Trainer.resume(tmp_path, device="cpu", epochs=3)
    history = resumed.fit(train, val=val)
    assert_same_weights(resumed.model, reference)
    assert without_seconds(history) == without_seconds(longer)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["training_config"]["epochs"] == 3
    assert json.loads((tmp_path / "config.json").read_text())["training_config"]["epochs"] == 3
    assert Trainer.resume(tmp_path, device="cpu", epochs=3).fit(train, val=val) == history  # finished: nothing more


@pytest.mark.parametrize(
    "options, epochs, words",
    [
        (dict(lr_schedule="cosine"), 3, "cosine"),
        (dict(lr_schedule="iwae"), 3, "iwae"),
        ({}, 1, "only extend"),
    ],
)
def test_resume_refuses_epochs_it_cannot_honour(tmp_path, train, options, epochs, words):
    Trainer(vae(), config(epochs=2, **options), out_dir=tmp_path).fit(train)
    with pytest.raises(InputError, match=words):
        Trainer.resume(tmp_path, device="cpu", epochs=epochs)


def test_resume_refuses_to_extend_a_run_that_stopped_early(tmp_path, train, val):
    class NeverBetter(AE):
        def validation_loss(self, x):
            return torch.tensor(1.0)

    Trainer(NeverBetter(AEConfig(network=tiny_network())), config(epochs=5, early_stopping_patience=1), out_dir=tmp_path, model_name="ae").fit(train, val=val)
    with pytest.raises(InputError, match="stopped early"):
        Trainer.resume(tmp_path, device="cpu", epochs=8)
    # patience ran out at the last epoch: a longer run would have stopped there
    Trainer(NeverBetter(AEConfig(network=tiny_network())), config(epochs=2, early_stopping_patience=1), out_dir=tmp_path / "b", model_name="ae").fit(train, val=val)
    with pytest.raises(InputError, match="would have stopped there"):
        Trainer.resume(tmp_path / "b", device="cpu", epochs=4)


@pytest.mark.parametrize("make, epochs", [(vae, 0), (lambda: StackedAE(StackedAEConfig(network=tiny_network(hidden=(32, 16)), pretrain_epochs=1)), 0),
                                          (lambda: StackedAE(StackedAEConfig(network=tiny_network(hidden=(32, 16)), pretrain_epochs=1)), 1)])
def test_resume_with_more_epochs_starts_the_phases_a_shorter_run_had_not_reached(tmp_path, train, make, epochs):
    """A run that ended before its end-to-end phase (0 epochs of it), extended, starts that phase as the longer run did."""
    torch.manual_seed(0)
    reference = make()
    longer = Trainer(reference, config(epochs=2)).fit(train)
    torch.manual_seed(0)
    Trainer(make(), config(epochs=epochs), out_dir=tmp_path).fit(train)
    resumed = Trainer.resume(tmp_path, device="cpu", epochs=2)
    assert without_seconds(resumed.fit(train)) == without_seconds(longer)
    assert_same_weights(resumed.model, reference)
