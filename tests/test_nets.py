"""Encoders and decoders: shapes for every network and image size, positive scales, config errors."""

import pytest
import torch

from pyrovae.errors import InputError
from pyrovae.nets import (
    ACTIVATIONS,
    ConvDecoder,
    ConvEncoder,
    GaussianMLP,
    JointMLP,
    MLPDecoder,
    MLPEncoder,
    NetworkConfig,
    build_decoder,
    build_encoder,
    conv_depth,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]
KINDS = [False, True]  # conv?


def config(shape, conv, **changes):
    return NetworkConfig(**{"input_shape": shape, "latent_dim": 5, "hidden": (32, 16), "conv": conv, **changes})


@pytest.mark.parametrize("conv", KINDS, ids=["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_encoder_and_decoder_shapes(shape, conv):
    cfg = config(shape, conv)
    encoder, decoder = build_encoder(cfg), build_decoder(cfg)
    assert isinstance(encoder, ConvEncoder if conv else MLPEncoder)
    assert isinstance(decoder, ConvDecoder if conv else MLPDecoder)
    x = torch.rand(4, *shape)
    z = encoder(x)
    assert z.shape == (4, 5)
    assert decoder(z).shape == (4, *shape)


@pytest.mark.parametrize("conv", KINDS, ids=["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
def test_decoders_pass_extra_leading_dimensions_through(shape, conv):
    decoder = build_decoder(config(shape, conv))
    z = torch.randn(3, 4, 5)  # (K, B, L), e.g. importance samples
    out = decoder(z)
    assert out.shape == (3, 4, *shape)
    # each code is decoded on its own: the same as decoding the flat batch
    torch.testing.assert_close(out.flatten(0, 1), decoder(z.flatten(0, 1)))


@pytest.mark.parametrize("conv", KINDS, ids=["mlp", "conv"])
@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("magnitude", [1.0, 1e4, -1e4])
def test_gaussian_encoder_gives_loc_and_positive_finite_scale(shape, conv, magnitude):
    encoder = build_encoder(config(shape, conv), gaussian=True)
    x = magnitude * torch.rand(6, *shape)
    loc, scale = encoder(x)
    assert loc.shape == scale.shape == (6, 5)
    assert torch.isfinite(loc).all() and torch.isfinite(scale).all()
    assert (scale > 0).all()


def test_gaussian_scale_stays_positive_for_extreme_raw_outputs():
    encoder = MLPEncoder((1, 2, 2), latent_dim=2, hidden=(), gaussian=True)
    with torch.no_grad():
        encoder.layers[0].weight.zero_()
        encoder.layers[0].bias.copy_(torch.tensor([0.0, 0.0, -1e4, 1e4]))  # raw scales far out both ways
    loc, scale = encoder(torch.rand(3, 1, 2, 2))
    assert (scale[:, 0] > 0).all() and torch.isfinite(scale).all()
    torch.testing.assert_close(scale[:, 1], torch.full((3,), 1e4))


def test_mlp_layers_mirror_each_other():
    cfg = NetworkConfig(input_shape=(1, 28, 28), latent_dim=7, hidden=(100, 30))
    encoder, decoder = build_encoder(cfg), build_decoder(cfg)
    assert [(layer.in_features, layer.out_features) for layer in encoder.layers] == [(784, 100), (100, 30), (30, 7)]
    assert [(layer.in_features, layer.out_features) for layer in decoder.layers] == [(7, 30), (30, 100), (100, 784)]
    gaussian = build_encoder(cfg, gaussian=True)
    assert gaussian.layers[-1].out_features == 14


def test_tanh_networks_start_from_glorots_initialization_and_others_from_pytorchs():
    torch.manual_seed(0)
    cfg = NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), activation="tanh")
    for net in (build_encoder(cfg, gaussian=True), build_decoder(cfg), GaussianMLP(100, 50, (100, 100), "tanh")):
        for i, layer in enumerate(net.layers):
            gain = 5 / 3 if i < len(net.layers) - 1 else 1.0  # 5/3 where a tanh follows
            limit = gain * (6 / (layer.in_features + layer.out_features)) ** 0.5
            w = layer.weight.abs()
            assert w.max() <= limit and w.max() > 0.99 * limit  # uniform on (-limit, limit)
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    relu = build_encoder(NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200)), gaussian=True)
    first = relu.layers[0]
    assert first.weight.abs().max() <= 784**-0.5 and first.bias.abs().max() > 0  # PyTorch's Linear default


def test_joint_mlp_computes_its_layers_by_hand_and_broadcasts_its_inputs():
    torch.manual_seed(0)
    net = JointMLP((5, 3), (2, 4), hidden=(6, 7), activation="tanh")
    assert [(b.in_features, b.out_features) for b in net.branches] == [(5, 6), (3, 6)]
    assert [(layer.in_features, layer.out_features) for layer in net.layers] == [(12, 7), (7, 8)]
    a, b = torch.randn(4, 5), torch.randn(10, 4, 3)  # an image (B, D) and draws (K, B, L)
    h = torch.cat([torch.tanh(net.branches[0](a)).expand(10, 4, 6), torch.tanh(net.branches[1](b))], dim=-1)
    by_hand = net.layers[1](torch.tanh(net.layers[0](h))).unflatten(-1, (2, 4))
    out = net(a, b)
    assert out.shape == (10, 4, 2, 4)
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(net(torch.cat([a.expand(10, 4, 5), b], dim=-1)), by_hand)  # or one concatenated input
    gaussian = JointMLP((5, 3), (2,), hidden=(6,), gaussian=True)
    loc, scale = gaussian(a, b[0])
    assert loc.shape == scale.shape == (4, 2) and bool((scale > 0).all())
    for i, layer in enumerate([*net.branches, *net.layers]):  # Glorot's start; gain 5/3 where a tanh follows
        gain = 1.0 if i == 3 else 5 / 3
        assert layer.weight.abs().max() <= gain * (6 / (layer.in_features + layer.out_features)) ** 0.5
        assert layer.weight.abs().max() > 0.95 * gain * (6 / (layer.in_features + layer.out_features)) ** 0.5
    with pytest.raises(InputError, match="takes 2 inputs"):
        net(a, b, b)
    with pytest.raises(InputError, match="hidden layer"):
        JointMLP((5, 3), (2,), hidden=())


def test_tanh_init_pytorch_keeps_pytorchs_default_everywhere_and_a_wrong_name_is_refused():
    torch.manual_seed(0)
    cfg = NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), activation="tanh", tanh_init="pytorch")
    for net in (build_encoder(cfg, gaussian=True), build_decoder(cfg), GaussianMLP(100, 50, (100, 100), "tanh", tanh_init="pytorch")):
        for layer in net.layers:
            assert layer.weight.abs().max() <= layer.in_features**-0.5  # uniform in +-1/sqrt(fan_in)
            assert layer.bias.abs().max() > 0
    with pytest.raises(InputError, match="tanh_init"):
        NetworkConfig(activation="tanh", tanh_init="xavier")
    with pytest.raises(InputError, match="tanh_init"):
        GaussianMLP(10, 5, tanh_init="he")


def test_a_tanh_encoder_tells_images_apart_from_the_start():
    """Under PyTorch's default initialization the tanh encoder's codes barely differ between images (the
    plateau a VampPrior VAE had not left after 4,200 steps); under Glorot's they differ by about the posterior's width."""
    torch.manual_seed(0)
    cfg = NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), activation="tanh")
    encoder = build_encoder(cfg, gaussian=True)
    images = torch.bernoulli(torch.full((256, 1, 28, 28), 0.13))
    loc, scale = encoder(images)
    assert loc.std(0).mean() > 0.5 * scale.mean()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_builds_and_runs(activation):
    cfg = config((1, 28, 28), False, activation=activation)
    out = build_decoder(cfg)(build_encoder(cfg)(torch.rand(2, 1, 28, 28)))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_config_normalises_lists_to_tuples():
    cfg = NetworkConfig(input_shape=[1, 28, 28], hidden=[20])
    assert cfg.input_shape == (1, 28, 28) and cfg.hidden == (20,)
    assert cfg == NetworkConfig(input_shape=(1, 28, 28), hidden=(20,))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(latent_dim=0), "latent_dim must be a positive integer"),
        (dict(latent_dim=-3), "latent_dim must be a positive integer"),
        (dict(latent_dim=2.5), "latent_dim must be a positive integer"),
        (dict(input_shape=(28, 28)), r"input_shape must be \(C, H, W\)"),
        (dict(input_shape=(1, 0, 28)), r"input_shape must be \(C, H, W\)"),
        (dict(hidden=(64, 0)), "hidden widths must be positive integers"),
        (dict(activation="swish"), "unknown activation 'swish'"),
        (dict(conv=True, input_shape=(1, 30, 30)), r"conv networks need image sides that are multiples of 4, got 30x30"),
        (dict(conv=True, input_shape=(3, 64, 50)), r"multiples of 4, got 64x50"),
        (dict(conv=True, input_shape=(3, 64, 64), conv_depth=7), r"of depth 7 need image sides that are multiples of 128, got 64x64"),
        (dict(conv=True, conv_depth=0), "conv_depth must be a positive integer"),
        (dict(conv=True, conv_depth=2.0), "conv_depth must be a positive integer"),
        (dict(conv_depth=2), "set conv=True"),
    ],
)
def test_bad_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**changes)


# --------------------------------------------------------------------------- conv networks at any size

#: (C, H, W), the depth that follows from the size
SIZES = [
    ((1, 28, 28), 2),
    ((3, 32, 32), 2),
    ((4, 32, 32), 2),
    ((3, 64, 64), 3),
    ((1, 128, 128), 4),
    ((3, 48, 64), 2),  # 48 / 8 = 6 would be narrower than 8 pixels
    ((3, 64, 96), 3),
    ((4, 128, 64), 3),
    ((1, 4, 4), 2),
    ((3, 12, 20), 2),
]


@pytest.mark.parametrize("shape, depth", SIZES, ids=["x".join(map(str, s)) for s, _ in SIZES])
def test_conv_networks_build_for_any_size_and_the_decoder_gives_back_exactly_the_input_shape(shape, depth):
    cfg = NetworkConfig(input_shape=shape, latent_dim=5, conv=True)
    assert conv_depth(shape) == depth
    encoder, decoder = build_encoder(cfg, gaussian=True, context_dim=2), build_decoder(cfg)
    strided = [m for m in encoder.features if isinstance(m, torch.nn.Conv2d)]
    assert len(strided) == depth and strided[0].in_channels == shape[0]
    x = torch.rand(3, *shape)
    loc, scale, context = encoder(x)
    assert loc.shape == scale.shape == (3, 5) and context.shape == (3, 2)
    out = decoder(loc)
    assert out.shape == x.shape
    assert decoder(torch.randn(2, 3, 5)).shape == (2, 3, *shape)  # leading dimensions pass through
    assert build_decoder(cfg, outputs_per_value=3)(loc).shape == (3, 3 * shape[0], *shape[1:])  # P values per observed one


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_conv_depth_given_in_the_config_overrides_the_size(depth):
    cfg = NetworkConfig(input_shape=(3, 32, 32), latent_dim=4, conv=True, conv_depth=depth)
    encoder, decoder = build_encoder(cfg), build_decoder(cfg)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in encoder.features) == depth
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in decoder.net) == depth
    assert decoder(encoder(torch.rand(2, 3, 32, 32))).shape == (2, 3, 32, 32)


def test_the_28_and_32_pixel_conv_networks_are_the_two_layer_networks_they_always_were():
    """Committed checkpoints and results rely on them: 32 and 64 channels, kernel 4, stride 2, the same parameter names."""
    for shape, flat in [((1, 28, 28), 64 * 7 * 7), ((3, 32, 32), 64 * 8 * 8)]:
        cfg = NetworkConfig(input_shape=shape, latent_dim=6, conv=True)
        encoder, decoder = build_encoder(cfg, gaussian=True), build_decoder(cfg)
        assert {k: tuple(v.shape) for k, v in encoder.state_dict().items()} == {
            "features.0.weight": (32, shape[0], 4, 4), "features.0.bias": (32,),
            "features.3.weight": (64, 32, 4, 4), "features.3.bias": (64,),
            "head.weight": (12, flat), "head.bias": (12,),
        }
        assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == {
            "net.0.weight": (flat, 6), "net.0.bias": (flat,),
            "net.4.weight": (64, 32, 4, 4), "net.4.bias": (32,),
            "net.7.weight": (32, shape[0], 4, 4), "net.7.bias": (shape[0],),
        }


def test_deeper_conv_networks_double_the_channels_up_to_256():
    encoder = build_encoder(NetworkConfig(input_shape=(3, 256, 256), latent_dim=4, conv=True))
    assert [m.out_channels for m in encoder.features if isinstance(m, torch.nn.Conv2d)] == [32, 64, 128, 256, 256]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (4, 30, 50), (2, 7, 9)])
def test_the_mlp_works_on_any_size(shape):
    cfg = NetworkConfig(input_shape=shape, latent_dim=3, hidden=(16,))
    out = build_decoder(cfg)(build_encoder(cfg)(torch.rand(2, *shape)))
    assert out.shape == (2, *shape)


def test_outputs_per_value_must_be_a_positive_integer():
    with pytest.raises(InputError, match="outputs_per_value must be a positive integer"):
        build_decoder(NetworkConfig(), outputs_per_value=0)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("conv", [False, True])
def test_dropout_acts_in_training_only(conv):
    config = NetworkConfig(input_shape=(1, 28, 28), latent_dim=4, hidden=(64,), conv=conv, dropout=0.5)
    encoder, decoder = build_encoder(config, gaussian=True), build_decoder(config)
    x, z = torch.rand(8, 1, 28, 28), torch.randn(8, 4)
    assert not torch.equal(encoder(x)[0], encoder(x)[0]) and not torch.equal(decoder(z), decoder(z))
    encoder.eval(), decoder.eval()
    assert torch.equal(encoder(x)[0], encoder(x)[0]) and torch.equal(decoder(z), decoder(z))
    plain = NetworkConfig(input_shape=(1, 28, 28), latent_dim=4, hidden=(64,), conv=conv)
    assert not any(isinstance(m, torch.nn.Dropout) for m in build_encoder(plain).modules())  # p=0 adds nothing


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, True, "0.2"])
def test_dropout_outside_zero_one_is_refused(p):
    with pytest.raises(InputError, match=r"dropout must be a probability in \[0, 1\)"):
        NetworkConfig(dropout=p)
