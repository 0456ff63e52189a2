"""Encoders and decoders shared by every model, so that comparisons are fair.

Images are batches of shape ``(B, C, H, W)``; latent codes are ``(B, L)``.

* An encoder maps ``x: (B, C, H, W)`` to a code ``(B, L)``, or, built with
  ``gaussian=True`` (the VAE guide), to the ``loc`` and ``scale`` of a diagonal
  Gaussian, each ``(B, L)``; with ``context_dim=C`` as well, to ``(loc, scale, h)`` with a
  context vector ``h: (B, C)`` for a flow posterior (see :mod:`pyrovae.posteriors`).
* A decoder maps ``z: (B, L)`` to one unconstrained value per pixel and channel,
  ``(B, C, H, W)``: logits for a Bernoulli, the mean for a Normal, ... The
  likelihood (see :mod:`pyrovae.likelihoods`) decides what it means. A likelihood that
  needs ``P`` values for each observed one (a location and a scale, say) gets a decoder
  built with ``outputs_per_value=P``: ``(B, P * C, H, W)``. Extra leading
  dimensions pass through: ``(K, B, L) -> (K, B, C, H, W)``.

The conv networks take any image whose sides are multiples of ``2 ** depth`` (see
:func:`conv_depth`: by default the sides must be multiples of 4), with any number of channels;
each stride-2 layer halves the sides and doubles the channels (32, 64, 128, then 256 at most),
so the decoder gives back exactly ``(C, H, W)``.

Scales are ``softplus(raw) + 1e-5``: positive for every finite input, smooth, and
free of the overflow that ``exp`` brings for large ``raw``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

__all__ = [
    "NetworkConfig",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "GaussianMLP",
    "JointMLP",
    "build_encoder",
    "build_decoder",
    "conv_depth",
    "ACTIVATIONS",
]

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU}
MIN_SCALE = 1e-5
#: how fully connected tanh layers may start (see :func:`_linear_layers`)
TANH_INITS = ("glorot", "pytorch")
#: channels after the first stride-2 convolution; each further one doubles them, up to MAX_CONV_CHANNELS
CONV_CHANNELS = 32
MAX_CONV_CHANNELS = 256
#: the default depth halves the sides while the last feature map keeps at least this many pixels on its shorter side
MIN_FEATURE_SIDE = 8
#: the default depth is never below this: sides that are multiples of 4 are what conv networks need by default
MIN_CONV_DEPTH = 2


@dataclass(frozen=True)
class NetworkConfig:
    """The architecture shared by every model.

    input_shape: ``(C, H, W)`` of one image.
    latent_dim:  size ``L`` of the code.
    hidden:      widths of the MLP's hidden layers from the image side, mirrored in the decoder;
                 ``(400,)`` gives 784-400-L-400-784 on MNIST. Ignored when ``conv``.
    conv:        convolutional networks instead, for images whose sides are multiples of ``2 ** conv_depth``
                 (multiples of 4 by default), square or not, with any number of channels.
    conv_depth:  stride-2 layers of the conv networks; ``None`` follows from the size (:func:`conv_depth`:
                 2 for 28x28 and 32x32, 3 for 64x64, 4 for 128x128). Only with ``conv``.
    activation:  one of :data:`ACTIVATIONS`.
    tanh_init:   how fully connected tanh layers start, one of :data:`TANH_INITS`: ``"glorot"``, Glorot and
                 Bengio's uniform initialization (see :func:`_linear_layers`), or ``"pytorch"``, PyTorch's
                 default. Other activations and convolutions always start from PyTorch's default.
    dropout:     probability in ``[0, 1)`` of zeroing each hidden unit, after every hidden activation of
                 encoder and decoder; active in training mode only (``model.eval()`` turns it off).
    """

    input_shape: tuple[int, ...] = (1, 28, 28)
    latent_dim: int = 50
    hidden: tuple[int, ...] = (400,)
    conv: bool = False
    activation: str = "relu"
    dropout: float = 0.0
    tanh_init: str = "glorot"
    conv_depth: int | None = None

    def __post_init__(self):
        shape, hidden = tuple(self.input_shape), tuple(self.hidden)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "hidden", hidden)
        if len(shape) != 3 or any(not isinstance(s, int) or s <= 0 for s in shape):
            raise InputError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        if not isinstance(self.latent_dim, int) or self.latent_dim <= 0:
            raise InputError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if any(not isinstance(h, int) or h <= 0 for h in hidden):
            raise InputError(f"hidden widths must be positive integers, got {hidden}")
        if self.activation not in ACTIVATIONS:
            raise InputError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")
        _check_tanh_init(self.tanh_init)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.conv_depth is not None:
            if not self.conv:
                raise InputError(f"conv_depth={self.conv_depth!r} sets the depth of conv networks; set conv=True or leave conv_depth unset")
            if isinstance(self.conv_depth, bool) or not isinstance(self.conv_depth, int) or self.conv_depth <= 0:
                raise InputError(f"conv_depth must be a positive integer or None, got {self.conv_depth!r}")
        if self.conv:
            conv_depth(shape, self.conv_depth)  # refuses sizes the conv networks cannot halve


def conv_depth(input_shape, depth: int | None = None) -> int:
    """The number of stride-2 layers of the conv networks for images ``input_shape = (C, H, W)``.

    ``depth`` given: that depth, if ``H`` and ``W`` are multiples of ``2 ** depth``. ``None``: the deepest
    stack of at least :data:`MIN_CONV_DEPTH` layers whose last feature map keeps at least
    :data:`MIN_FEATURE_SIDE` pixels on its shorter side (or the minimum, for small images), with
    sides that halve exactly: 2 for 28x28 (to 7x7) and 32x32 (to 8x8), 3 for 64x64, 4 for
    128x128, 3 for 64x96. Raises :class:`~pyrovae.errors.InputError` for sides that are not multiples of 4
    (of ``2 ** depth`` when given).
    """
    _, h, w = input_shape
    if depth is not None:
        if h % 2**depth or w % 2**depth:
            raise InputError(f"conv networks of depth {depth} need image sides that are multiples of {2**depth}, got {h}x{w}; use the MLP or another conv_depth")
        return depth
    if h % 2**MIN_CONV_DEPTH or w % 2**MIN_CONV_DEPTH:
        raise InputError(f"conv networks need image sides that are multiples of 4, got {h}x{w}; use the MLP (conv=False)")
    depth = MIN_CONV_DEPTH
    while h % 2 ** (depth + 1) == 0 and w % 2 ** (depth + 1) == 0 and min(h, w) // 2 ** (depth + 1) >= MIN_FEATURE_SIDE:
        depth += 1
    return depth


def _conv_widths(depth: int, channels: int) -> list[int]:
    """Channels after each of ``depth`` stride-2 layers from the image side: ``channels`` (32), doubling with each
    layer, at most :data:`MAX_CONV_CHANNELS` (or ``channels`` if that is more)."""
    return [min(channels * 2**i, max(channels, MAX_CONV_CHANNELS)) for i in range(depth)]


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or nothing at all for ``p = 0``."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _check_tanh_init(tanh_init: str) -> None:
    if tanh_init not in TANH_INITS:
        raise InputError(f"unknown tanh_init {tanh_init!r}; choose from {list(TANH_INITS)}")


def _linear_layers(widths: list[int], activation: str, tanh_init: str = "glorot", output: bool = True) -> nn.ModuleList:
    """Fully connected layers ``widths[0] -> widths[1] -> ... -> widths[-1]``; with ``output=False`` an
    activation follows the last one too (a hidden layer's start).

    Under ``tanh`` with ``tanh_init="glorot"``, weights follow the uniform heuristic Glorot and Bengio
    (2010) derived for tanh networks (gain 5/3 where a tanh follows, 1 for the output layer) and biases
    start at 0.
    PyTorch's default (uniform in +-1/sqrt(fan_in)) starts a tanh network so close to constant
    that, on binarized MNIST, a VAE spends its first several hundred steps on the plateau where it
    ignores z, and a VampPrior VAE had not left it after 4,200. The plain one-layer VAE, though, trained
    no faster from Glorot's start (docs/quality.md), and its published rows came from PyTorch's, hence
    ``tanh_init="pytorch"``. Other activations keep PyTorch's default.
    """
    _check_tanh_init(tanh_init)
    layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    if activation == "tanh" and tanh_init == "glorot":
        for i, layer in enumerate(layers):
            hidden = i < len(layers) - 1 or not output
            nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain("tanh") if hidden else 1.0)
            nn.init.zeros_(layer.bias)
    return layers


def _run_layers(layers: nn.ModuleList, activation: nn.Module, dropout: nn.Module, h: Tensor) -> Tensor:
    """``layers`` in order with ``activation`` and ``dropout`` after each but the last (unpacked, not
    sliced: slicing a ModuleList builds a new module on every call)."""
    *inner, last = layers
    for layer in inner:
        h = dropout(activation(layer(h)))
    return last(h)


def _split_gaussian(h: Tensor, latent_dim: int) -> tuple[Tensor, ...]:
    """``(B, 2L + C)`` -> loc ``(B, L)``, scale ``(B, L)`` with scale > 0, and the context ``(B, C)`` if ``C > 0``."""
    loc, raw, context = h.split([latent_dim, latent_dim, h.shape[-1] - 2 * latent_dim], dim=-1)
    scale = F.softplus(raw) + MIN_SCALE
    return (loc, scale, context) if context.shape[-1] else (loc, scale)


def _head_size(latent_dim: int, gaussian: bool, context_dim: int) -> int:
    if context_dim and not gaussian:
        raise InputError("a context vector (context_dim > 0) comes with a Gaussian encoder (gaussian=True)")
    if not isinstance(context_dim, int) or context_dim < 0:
        raise InputError(f"context_dim must be a non-negative integer, got {context_dim!r}")
    return 2 * latent_dim + context_dim if gaussian else latent_dim


class MLPEncoder(nn.Module):
    """Fully connected encoder ``(B, C, H, W) -> (B, L)``, or ``(loc, scale)`` (``gaussian``), or
    ``(loc, scale, h)`` (``gaussian`` and ``context_dim > 0``).

    ``layers`` holds the :class:`~torch.nn.Linear` layers in order (the stacked
    autoencoder pretrains them one at a time); the activation follows every layer but the last.
    """

    def __init__(
        self, input_shape, latent_dim: int, hidden=(400,), activation: str = "relu", gaussian: bool = False, dropout: float = 0.0, context_dim: int = 0,
        tanh_init: str = "glorot",
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.gaussian = gaussian
        widths = [math.prod(self.input_shape), *hidden]
        out = _head_size(latent_dim, gaussian, context_dim)
        self.layers = _linear_layers([*widths, out], activation, tanh_init)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout)

    def forward(self, x: Tensor):
        h = _run_layers(self.layers, self.activation, self.dropout, x.flatten(1))
        return _split_gaussian(h, self.latent_dim) if self.gaussian else h


class MLPDecoder(nn.Module):
    """Fully connected decoder ``(..., L) -> (..., C, H, W)`` of unconstrained outputs.

    ``hidden`` lists widths from the latent side outwards.
    """

    def __init__(self, latent_dim: int, output_shape, hidden=(400,), activation: str = "relu", dropout: float = 0.0, tanh_init: str = "glorot"):
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.latent_dim = latent_dim
        widths = [latent_dim, *hidden, math.prod(self.output_shape)]
        self.layers = _linear_layers(widths, activation, tanh_init)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout)

    def forward(self, z: Tensor) -> Tensor:
        return _run_layers(self.layers, self.activation, self.dropout, z).unflatten(-1, self.output_shape)


class GaussianMLP(nn.Module):
    """The network of a stochastic layer between two codes: ``(..., D_in) -> (loc, scale)``, each ``(..., D_out)``,
    through fully connected ``hidden`` layers (the two-layer VAE's p(z1|z2) and q(z2|z1)). Leading dimensions pass through."""

    def __init__(self, in_dim: int, out_dim: int, hidden=(100, 100), activation: str = "tanh", dropout: float = 0.0, tanh_init: str = "glorot"):
        super().__init__()
        self.out_dim = out_dim
        widths = [in_dim, *hidden, 2 * out_dim]
        self.layers = _linear_layers(widths, activation, tanh_init)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return _split_gaussian(_run_layers(self.layers, self.activation, self.dropout, h), self.out_dim)


class JointMLP(nn.Module):
    """A fully connected network of several inputs, ``(..., D_1), ..., (..., D_n) -> (..., *output_shape)``, or the
    ``(loc, scale)`` of a Gaussian over ``(..., out_dim)`` (``gaussian``): each input has its own first hidden layer
    of ``hidden[0]`` units; their activations, concatenated (``n * hidden[0]``), go through the other ``hidden``
    layers to a linear output (Tomczak and Welling 2018's networks of p(x|z1, z2) and q(z1|x, z2)).

    ``forward(*inputs)`` takes one tensor per input, whose leading dimensions broadcast (an image ``(B, D)`` meets
    draws ``(K, B, L)``, and its layer runs once per image, not once per draw), or a single tensor of them
    concatenated, ``(..., D_1 + ... + D_n)``. ``output_shape`` is a tuple (``(C, H, W)`` for a decoder); a
    Gaussian's is ``(out_dim,)``.
    """

    def __init__(self, in_dims, output_shape, hidden=(300, 300), activation: str = "tanh", gaussian: bool = False, dropout: float = 0.0,
                 tanh_init: str = "glorot"):
        super().__init__()
        self.in_dims, self.output_shape, self.gaussian = tuple(in_dims), tuple(output_shape), gaussian
        if not self.in_dims or not hidden:
            raise InputError(f"a JointMLP needs inputs and at least one hidden layer, got in_dims={in_dims}, hidden={hidden}")
        if gaussian and len(self.output_shape) != 1:
            raise InputError(f"a Gaussian JointMLP is over a vector, output_shape (out_dim,), got {output_shape}")
        out = math.prod(self.output_shape) * (2 if gaussian else 1)
        self.branches = nn.ModuleList(_linear_layers([d, hidden[0]], activation, tanh_init, output=False)[0] for d in self.in_dims)
        self.layers = _linear_layers([len(self.in_dims) * hidden[0], *hidden[1:], out], activation, tanh_init)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = _dropout(dropout)

    def forward(self, *inputs: Tensor):
        if len(inputs) == 1 and len(self.in_dims) > 1:
            inputs = inputs[0].split(self.in_dims, dim=-1)
        if len(inputs) != len(self.in_dims):
            raise InputError(f"this JointMLP takes {len(self.in_dims)} inputs (or their concatenation), got {len(inputs)}")
        parts = [self.dropout(self.activation(branch(h))) for branch, h in zip(self.branches, inputs)]
        h = torch.cat(torch.broadcast_tensors(*parts) if len(parts) > 1 else parts, dim=-1)
        h = _run_layers(self.layers, self.activation, self.dropout, h)
        return _split_gaussian(h, self.output_shape[0]) if self.gaussian else h.unflatten(-1, self.output_shape)


class ConvEncoder(nn.Module):
    """``depth`` stride-2 convolutions (kernel 4, padding 1: each halves the sides) and a linear head:
    ``(B, C, H, W) -> (B, L)`` (or loc, scale[, h] as :class:`MLPEncoder`), for sides that are multiples of
    ``2 ** depth``; ``depth=None`` follows from the size (:func:`conv_depth`).

    ``dropout`` follows each convolution's activation."""

    def __init__(
        self, input_shape, latent_dim: int, activation: str = "relu", gaussian: bool = False, channels: int = CONV_CHANNELS,
        dropout: float = 0.0, context_dim: int = 0, depth: int | None = None,
    ):
        super().__init__()
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.gaussian = gaussian
        depth = conv_depth(self.input_shape, depth)
        widths = _conv_widths(depth, channels)
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        for before, after in zip([c, *widths], widths):
            layers += [nn.Conv2d(before, after, 4, stride=2, padding=1), act(), _dropout(dropout)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = widths[-1] * (h // 2**depth) * (w // 2**depth)
        self.head = nn.Linear(flat, _head_size(latent_dim, gaussian, context_dim))

    def forward(self, x: Tensor):
        h = self.head(self.features(x))
        return _split_gaussian(h, self.latent_dim) if self.gaussian else h


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: ``(..., L) -> (..., C, H, W)`` of unconstrained outputs, exactly the
    ``output_shape`` asked for (a linear layer to the smallest feature map, then ``depth`` transposed
    convolutions, each doubling the sides)."""

    def __init__(
        self, latent_dim: int, output_shape, activation: str = "relu", channels: int = CONV_CHANNELS, dropout: float = 0.0, depth: int | None = None
    ):
        super().__init__()
        c, h, w = output_shape
        self.output_shape = tuple(output_shape)
        self.latent_dim = latent_dim
        depth = conv_depth(self.output_shape, depth)
        widths = _conv_widths(depth, channels)[::-1]  # from the code's side
        h0, w0 = h // 2**depth, w // 2**depth
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = [nn.Linear(latent_dim, widths[0] * h0 * w0), act(), _dropout(dropout), nn.Unflatten(-1, (widths[0], h0, w0))]
        for before, after in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(before, after, 4, stride=2, padding=1), act(), _dropout(dropout)]
        layers.append(nn.ConvTranspose2d(widths[-1], c, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        out = self.net(z.reshape(-1, self.latent_dim))  # convolutions take one batch dimension
        return out.reshape(*z.shape[:-1], *self.output_shape)


def build_encoder(config: NetworkConfig, gaussian: bool = False, context_dim: int = 0) -> nn.Module:
    """The encoder that ``config`` describes; ``gaussian=True`` for a VAE guide, with ``context_dim``
    further outputs, the context ``h``, for a flow posterior."""
    if config.conv:
        return ConvEncoder(
            config.input_shape, config.latent_dim, config.activation, gaussian=gaussian, dropout=config.dropout, context_dim=context_dim,
            depth=config.conv_depth,
        )
    return MLPEncoder(
        config.input_shape, config.latent_dim, config.hidden, config.activation, gaussian=gaussian, dropout=config.dropout, context_dim=context_dim,
        tanh_init=config.tanh_init,
    )


def build_decoder(config: NetworkConfig, outputs_per_value: int = 1) -> nn.Module:
    """The decoder that ``config`` describes, mirroring :func:`build_encoder`: ``(..., L) -> (..., C, H, W)``, or
    ``(..., P * C, H, W)`` with ``outputs_per_value=P`` (for a likelihood with ``P`` parameters per observed value,
    see :mod:`pyrovae.likelihoods`)."""
    if isinstance(outputs_per_value, bool) or not isinstance(outputs_per_value, int) or outputs_per_value <= 0:
        raise InputError(f"outputs_per_value must be a positive integer, got {outputs_per_value!r}")
    c, h, w = config.input_shape
    output_shape = (outputs_per_value * c, h, w)
    if config.conv:
        return ConvDecoder(config.latent_dim, output_shape, config.activation, dropout=config.dropout, depth=config.conv_depth)
    return MLPDecoder(
        config.latent_dim, output_shape, tuple(reversed(config.hidden)), config.activation, dropout=config.dropout, tanh_init=config.tanh_init
    )
