"""The deterministic baselines: shapes, losses checked by hand, gradients, layer-wise pretraining,
corruption, training on real MNIST, bad input and bad config."""

import json
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from conftest import cuda, tiny_network
from torch.distributions import Bernoulli, kl_divergence

from pyrovae.data import batches
from pyrovae.errors import InputError
from pyrovae.models import (
    AE,
    AEConfig,
    DenoisingAE,
    DenoisingAEConfig,
    SparseAE,
    SparseAEConfig,
    StackedAE,
    StackedAEConfig,
    VAEConfig,
    build_model,
    config_from_dict,
    config_to_dict,
)

KINDS = {"ae": (AE, AEConfig), "sparse": (SparseAE, SparseAEConfig), "denoising": (DenoisingAE, DenoisingAEConfig), "stacked": (StackedAE, StackedAEConfig)}


def make(kind, network=None, **changes):
    model_class, config_class = KINDS[kind]
    return model_class(config_class(network=network or tiny_network(), **changes))


def stacked(**changes):
    return StackedAE(StackedAEConfig(network=tiny_network(hidden=(64, 32)), **changes))


NETWORKS = [
    pytest.param(tiny_network(), id="mlp-1x28x28"),
    pytest.param(tiny_network(conv=True), id="conv-1x28x28"),
    pytest.param(tiny_network(input_shape=(3, 32, 32)), id="mlp-3x32x32"),
    pytest.param(tiny_network(input_shape=(3, 32, 32), conv=True), id="conv-3x32x32"),
]


def kinds_for(network):
    return [kind for kind in KINDS if not (kind == "stacked" and network.conv)]


# --------------------------------------------------------------------------- shapes and devices


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_shapes(network, loss):
    shape = network.input_shape
    x = torch.rand(5, *shape)
    for kind in kinds_for(network):
        model = make(kind, network, loss=loss)
        z = model.encode(x)
        assert z.shape == (5, 8), kind
        out = model.decode(z)
        assert out.shape == (5, *shape), kind
        if loss == "bce":  # probabilities, not logits
            torch.testing.assert_close(out, torch.sigmoid(model.decoder(z)))
        else:
            torch.testing.assert_close(out, model.decoder(z))
        recon = model.reconstruct(x)
        assert recon.shape == (5, *shape) and not recon.requires_grad
        value = model.loss(x)
        assert value.shape == () and torch.isfinite(value), kind
        assert model.input_shape == shape and model.latent_dim == 8


def test_sparse_codes_lie_in_the_unit_interval():
    code = make("sparse").encode(10 * torch.rand(6, 1, 28, 28))
    assert ((code > 0) & (code < 1)).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_to_moves_every_tensor(kind):
    model = make(kind).to("meta")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert model.device.type == "meta"


@cuda
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_runs_on_cuda(kind):
    model = make(kind).to("cuda")
    x = torch.rand(4, 1, 28, 28, device="cuda")
    model.loss(x).backward()
    assert all(p.grad.device.type == "cuda" for p in model.parameters())
    assert model.reconstruct(x).device.type == "cuda"


# --------------------------------------------------------------------------- losses


def test_ae_loss_is_summed_per_image_and_averaged_over_the_batch():
    x = torch.rand(4, 1, 28, 28)
    model = make("ae")
    logits = model.decoder(model.encoder(x))
    expected = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 4
    torch.testing.assert_close(model.loss(x), expected)
    model = make("ae", loss="mse")
    out = model.decoder(model.encoder(x))
    torch.testing.assert_close(model.loss(x), (out - x).square().sum() / 4)


def test_sparsity_penalty_is_the_kl_to_the_target_rate():
    model = make("sparse", sparsity_target=0.1, sparsity_weight=3.0)
    assert model.sparsity_penalty(torch.full((5, 8), 0.1)).item() == pytest.approx(0.0, abs=1e-6)
    code = torch.rand(5, 8)
    expected = kl_divergence(Bernoulli(probs=torch.full((8,), 0.1)), Bernoulli(probs=code.mean(0))).sum()
    torch.testing.assert_close(model.sparsity_penalty(code), expected)
    x = torch.rand(4, 1, 28, 28)
    code = model.encode(x)
    recon = F.binary_cross_entropy_with_logits(model.decoder(code), x, reduction="sum") / 4
    torch.testing.assert_close(model.loss(x), recon + 3.0 * model.sparsity_penalty(code))


def test_denoising_corrupts_in_training_only_and_targets_the_clean_input():
    model = make("denoising", noise_std=0.5, mask_prob=0.3)
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    clean = AE.reconstruction_loss(model, model.decoder(model.encoder(x)), x)
    torch.testing.assert_close(model.loss(x), clean)
    model.train()
    assert model.loss(x).item() != model.loss(x).item()  # a fresh corruption each call
    plain = make("denoising", noise_std=0.0, mask_prob=0.0).train()
    torch.testing.assert_close(plain.corrupt(x), x)


def test_corruption_statistics():
    x = torch.full((200, 1, 28, 28), 0.5)
    noisy = make("denoising", noise_std=0.2).corrupt(x)
    assert abs((noisy - x).std().item() - 0.2) < 0.005 and abs((noisy - x).mean().item()) < 0.005
    masked = make("denoising", noise_std=0.0, mask_prob=0.3).corrupt(x)
    assert set(masked.unique().tolist()) == {0.0, 0.5}
    assert abs((masked == 0).float().mean().item() - 0.3) < 0.01


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind, conv", [(kind, conv) for kind in sorted(KINDS) for conv in (False, True) if not (kind == "stacked" and conv)])
def test_gradients_reach_every_parameter(kind, conv):
    model = make(kind, tiny_network(conv=conv))
    model.loss(torch.rand(8, 1, 28, 28)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{kind}: {name}"


@pytest.mark.parametrize("k", [0, 1, 2])
def test_stacked_pretraining_reaches_one_layer_and_its_mirror(k):
    model = stacked()
    model.loss(torch.rand(8, 1, 28, 28), layer=k).backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    untouched = {name for name, p in model.named_parameters() if p.grad is None}
    mirror = 2 - k
    expected = {f"encoder.layers.{k}.weight", f"encoder.layers.{k}.bias", f"decoder.layers.{mirror}.weight", f"decoder.layers.{mirror}.bias"}
    assert trained == expected
    assert untouched == {name for name, _ in model.named_parameters()} - expected


def test_stacked_layer_losses_by_hand():
    model = stacked()
    enc, dec = model.encoder, model.decoder
    x = torch.rand(4, 1, 28, 28)
    logits = dec.layers[2](enc.activation(enc.layers[0](x.flatten(1))))
    torch.testing.assert_close(model.loss(x, layer=0), F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum") / 4)
    h = enc.activation(enc.layers[0](x.flatten(1)))
    out = enc.activation(dec.layers[1](enc.activation(enc.layers[1](h))))
    torch.testing.assert_close(model.loss(x, layer=1), (out - h).square().sum() / 4)


@pytest.mark.parametrize("k", [-1, 3, 1.0])
def test_stacked_layer_out_of_range(k):
    with pytest.raises(InputError, match=r"layer must be None or a layer index 0..2"):
        stacked().loss(torch.rand(2, 1, 28, 28), layer=k)


def test_phases_pretrain_each_layer_of_the_stacked_ae_only():
    assert [(p.name, p.epochs) for p in stacked(pretrain_epochs=2).training_phases(5)] == [
        ("pretrain-0", 2), ("pretrain-1", 2), ("pretrain-2", 2), ("train", 5)]
    assert [p.name for p in stacked(pretrain_epochs=0).training_phases(5)] == ["train"]
    assert [p.name for p in make("ae").training_phases(5)] == ["train"]


# --------------------------------------------------------------------------- training on real MNIST


def fit(model, data, epochs, lr=2e-3, layer=None):
    """A few epochs of Adam over ``data`` in batches of 32; returns the eval-mode loss over ``data`` after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    loss = (lambda x: model.loss(x, layer=layer)) if layer is not None else model.loss
    for _ in range(epochs):
        for x in batches(data, 32, generator):
            optimizer.zero_grad()
            loss(x).backward()
            optimizer.step()
    return evaluate(model, data, layer)


def evaluate(model, data, layer=None):
    model.eval()
    with torch.no_grad():
        return (model.loss(data, layer=layer) if layer is not None else model.loss(data)).item()


@pytest.mark.parametrize("kind", ["ae", "sparse", "denoising"])
def test_short_training_run_lowers_the_loss(kind, mnist):
    model = make(kind)
    before = evaluate(model, mnist.train[:])
    after = fit(model, mnist.train[:], epochs=3)
    assert after < 0.7 * before, (before, after)  # ~545 -> 225..280 nats per image


def test_stacked_pretrains_each_layer_then_fine_tunes(mnist):
    model = stacked()
    for k in range(len(model.encoder.layers)):
        before = evaluate(model, mnist.train[:], layer=k)
        after = fit(model, mnist.train[:], epochs=2, layer=k)
        assert after < 0.9 * before, (k, before, after)  # measured: 0.43, 0.39, 0.59 of the start
    before = evaluate(model, mnist.train[:])
    after = fit(model, mnist.train[:], epochs=2)
    assert after < 0.85 * before, (before, after)  # measured: 316 -> 222


# --------------------------------------------------------------------------- bad input and config


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(4, 784), r"expected images of shape \(B, 1, 28, 28\), got \(4, 784\)"),
        (torch.randint(0, 256, (4, 1, 28, 28)), "floating-point"),
        (torch.full((4, 1, 28, 28), math.nan), "NaN"),
        (torch.full((4, 1, 28, 28), 1.5), "outside the likelihood's support"),
    ],
)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_is_named(kind, x, message):
    with pytest.raises(ValueError, match=message):
        make(kind).loss(x)


def test_mse_accepts_any_real_values_and_checks_follow_pyro_validation():
    assert torch.isfinite(make("ae", loss="mse").loss(torch.full((2, 1, 28, 28), 1.5)))
    with pyro.validation_enabled(False):
        make("ae").loss(torch.full((2, 1, 28, 28), 1.5))  # the user turned checks off


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AEConfig(loss="l1"), r"unknown reconstruction loss 'l1'; choose from \('bce', 'mse'\)"),
        (lambda: AEConfig(network=dict(latent_dim=0)), "latent_dim must be a positive integer"),
        (lambda: SparseAEConfig(sparsity_target=0.0), r"sparsity_target must lie in \(0, 1\)"),
        (lambda: SparseAEConfig(sparsity_target=1.0), r"sparsity_target must lie in \(0, 1\)"),
        (lambda: SparseAEConfig(sparsity_target=math.nan), r"sparsity_target must lie in \(0, 1\)"),
        (lambda: SparseAEConfig(sparsity_weight=-1.0), "sparsity_weight must be non-negative"),
        (lambda: SparseAEConfig(sparsity_weight=math.nan), "sparsity_weight must be non-negative"),
        (lambda: DenoisingAEConfig(noise_std=-0.1), "noise_std must be non-negative"),
        (lambda: DenoisingAEConfig(noise_std=math.nan), "noise_std must be non-negative"),
        (lambda: DenoisingAEConfig(mask_prob=1.0), r"mask_prob must lie in \[0, 1\)"),
        (lambda: StackedAEConfig(pretrain_epochs=-1), "pretrain_epochs must be a non-negative integer"),
        (lambda: StackedAEConfig(pretrain_epochs=1.5), "pretrain_epochs must be a non-negative integer"),
        (lambda: StackedAEConfig(network=tiny_network(conv=True)), "use conv=False"),
        (lambda: SparseAE(AEConfig()), "SparseAE needs a SparseAEConfig, got AEConfig"),
        (lambda: AE(VAEConfig()), "AE needs a AEConfig, got VAEConfig"),
        (lambda: StackedAE(StackedAEConfig(), encoder=torch.nn.Identity()), "needs the MLP encoder and decoder"),
    ],
)
def test_bad_config(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", ["ae", "sparse", "stacked", "denoising"])
def test_config_round_trips_through_json(name):
    model_class, config_class = KINDS[name]
    config = config_class(network=tiny_network(hidden=(32, 16)), loss="mse")
    rebuilt = config_from_dict(name, json.loads(json.dumps(config_to_dict(config))))
    assert rebuilt == config
    model = build_model(name, rebuilt)
    assert type(model) is model_class and model.config == config
