"""Figures from a model and data: reconstructions, samples, interpolations, latent codes,
the decoded latent plane, training curves, a side-by-side comparison of models, and for the
models with a discrete latent the analogies grid and a confusion matrix.

Every function returns a :class:`matplotlib.figure.Figure` drawn on an Agg canvas and, given
``path``, also writes it there as a PNG (creating the folder). The figures are not registered
with ``pyplot``, so nothing global changes and nothing needs closing: a figure is freed when the
caller drops it (in a notebook, display it by leaving it as a cell's value).

Images are ``(B, C, H, W)`` with values in ``[0, 1]`` and 1 (grey levels), 3 (RGB, drawn in colour) or 4 (RGBA)
channels, at any size;
a model is anything with ``encode: (B, C, H, W) -> (B, L)``, ``decode: (B, L) -> (B, C, H, W)``
and ``reconstruct`` (the VAE, the autoencoders, :class:`~pyrovae.evaluation.PCA`), and
``sample(n)`` where it can sample. A conditional model (the CVAE: ``encode(x, y)``,
``decode(z, y)``, ``reconstruct(x, y)``, ``sample(n, y)``) is given the images' ``labels: (N,)``
wherever it encodes or reconstructs, and draws one row per class in :func:`class_samples`.
Models draw in eval mode (dropout off) and are left in the mode they were in. Grids come from
:func:`torchvision.utils.make_grid`. Figures that label classes (:func:`latent_scatter`,
:func:`class_samples`) take ``class_names``, the name of class ``k`` at index ``k`` (an image
folder's sub-folders, torchvision's ``classes``), and show the index without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchvision.utils import make_grid

from .errors import InputError
from .evaluation import PCA
from .models.base import evaluating

__all__ = ["reconstructions", "samples", "class_samples", "interpolations", "latent_scatter", "manifold", "training_curves", "comparison", "analogies", "confusion"]

PADDING = 2  # pixels between the images of a grid
PAD_VALUE = 0.5  # grey lines between images
CELL_INCHES = 0.55  # size of one image of a grid on the figure
DPI = 120


# --------------------------------------------------------------------------- helpers


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(figure: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png", bbox_inches="tight")  # long row labels stay whole
    return figure


def _name(model) -> str:
    return type(model).__name__


def _device(model, fallback: torch.device) -> torch.device:
    return getattr(model, "device", fallback)


def _check_images(x: Tensor, what: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3, 4):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{what} must be images (B, C, H, W) with 1, 3 or 4 channels, got {shape}")
    if len(x) == 0:
        raise InputError(f"{what} holds no images")


def _show_grid(ax, images: Tensor, ncol: int, row_labels=None, col_labels=None) -> None:
    """Draw ``images: (B, C, H, W)`` as a grid of ``ncol`` columns on ``ax``, labelling rows and columns."""
    images = images.detach().float().cpu().clamp(0, 1)
    grid = make_grid(images, nrow=ncol, padding=PADDING, pad_value=PAD_VALUE)  # (3 or 4, H', W'), grey repeated
    if images.shape[1] == 1:
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    height, width = images.shape[2] + PADDING, images.shape[3] + PADDING
    ax.set_yticks([PADDING + r * height + (height - PADDING) / 2 for r in range(len(row_labels or []))], row_labels or [])
    ax.set_xticks([PADDING + c * width + (width - PADDING) / 2 for c in range(len(col_labels or []))], col_labels or [])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _class_names(class_names, classes) -> list[str]:
    """The names of the class indices ``classes``: ``class_names[k]`` for class ``k``, or ``str(k)`` without names."""
    classes = [int(k) for k in classes]
    if class_names is None:
        return [str(k) for k in classes]
    class_names = list(class_names)
    if classes and (min(classes) < 0 or max(classes) >= len(class_names)):
        raise InputError(f"class_names has {len(class_names)} names, not one for each class index {min(classes)}..{max(classes)}")
    return [str(class_names[k]) for k in classes]


def _given(model, labels, n: int) -> tuple:
    """What a conditional model takes beside the images: ``(y,)``, the first ``n`` of ``labels`` on its device;
    ``()`` for a model of images alone."""
    if not getattr(model, "conditional", False):
        return ()
    if labels is None:
        raise InputError(f"a {_name(model)} models images given their labels: pass labels, one per image")
    labels = torch.as_tensor(labels)
    return (labels[:n].to(_device(model, labels.device)),)


def _encode(model, x: Tensor, batch_size: int = 1000, labels=None) -> Tensor:
    """Codes ``(N, L)`` of ``x`` (given ``labels: (N,)`` for a conditional model), computed in batches on the
    model's device, returned on the CPU."""
    device = _device(model, x.device)
    given = _given(model, labels, len(x))
    with torch.no_grad(), evaluating(model):
        codes = [
            model.encode(x[i : i + batch_size].to(device), *(y[i : i + batch_size] for y in given)).cpu()
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(codes).flatten(1)


# --------------------------------------------------------------------------- figures


def reconstructions(model, x: Tensor, n: int = 8, path=None, labels=None) -> Figure:
    """The first ``n`` images of ``x: (N, C, H, W)`` (top row) above their reconstructions (bottom row);
    a conditional model reconstructs each given its label in ``labels: (N,)``."""
    _check_images(x)
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    x = x[:n].to(_device(model, x.device))
    with torch.no_grad(), evaluating(model):
        recon = model.reconstruct(x, *_given(model, labels, len(x)))
    figure = _figure(CELL_INCHES * len(x) + 1.4, CELL_INCHES * 2 + 0.6)
    ax = figure.add_subplot()
    _show_grid(ax, torch.cat([x, recon]), ncol=len(x), row_labels=["input", "reconstruction"])
    ax.set_title(f"{_name(model)}: reconstructions")
    return _finish(figure, path)


def samples(vae, n: int = 64, path=None) -> Figure:
    """``n`` images ``vae.sample(n)`` (decoded draws from the prior) in a square-ish grid."""
    if not hasattr(vae, "sample"):
        raise InputError(f"a {_name(vae)} has no prior to sample from; use a VAE")
    if getattr(vae, "conditional", False):
        raise InputError(f"a {_name(vae)} samples images of given classes: draw one row per class with class_samples")
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    with evaluating(vae):
        images = vae.sample(n)
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    figure = _figure(CELL_INCHES * ncol + 0.4, CELL_INCHES * nrow + 0.6)
    ax = figure.add_subplot()
    _show_grid(ax, images, ncol=ncol)
    ax.set_title(f"{_name(vae)}: samples from the prior")
    return _finish(figure, path)


def sample_rows(model) -> tuple[int, str] | None:
    """What :func:`class_samples` draws a row of for ``model``: ``(K, "class")`` for a model whose ``sample(n, y)``
    takes a class (a conditional model, M2), ``(K, "component")`` for one whose ``sample(n, c)`` takes a mixture
    component (the mixture VAE), None for a model with neither."""
    if getattr(model, "conditional", False) or getattr(model, "classes_are_labels", False):
        return model.num_classes, "class"
    if hasattr(model, "num_components"):
        return model.num_components, "component"
    return None


def class_samples(model, n: int = 10, path=None, class_names=None) -> Figure:
    """Samples of each class, one row per class: ``n`` images ``model.sample(n, k)`` (decoded draws from the prior,
    given the class) in row ``k`` for ``k = 0, ..., K - 1``, labelled ``class_names[k]`` (or ``k``). For a conditional
    model and M2 the rows are its classes; for the mixture VAE, its components (``class_names`` does not apply:
    a component is not a label). See :func:`sample_rows`."""
    rows = sample_rows(model)
    if rows is None:
        raise InputError(f"a {_name(model)} is not conditional and has no discrete latent: it has no classes to sample from; use samples")
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    classes, kind = rows
    if kind == "component" and class_names is not None:
        raise InputError(f"a {_name(model)}'s rows are its mixture components, which have no class names")
    labels = torch.arange(classes, device=_device(model, torch.device("cpu"))).repeat_interleave(n)  # (K * n,)
    with evaluating(model):
        images = model.sample(len(labels), labels)  # (K * n, C, H, W), row after row
    figure = _figure(CELL_INCHES * n + 0.8, CELL_INCHES * classes + 0.6)
    ax = figure.add_subplot()
    _show_grid(ax, images, ncol=n, row_labels=_class_names(class_names, range(classes)))
    ax.set_ylabel(kind)
    ax.set_title(f"{_name(model)}: samples of each {kind}")
    return _finish(figure, path)


def interpolations(model, x, steps: int = 10, pairs: int = 8, path=None) -> Figure:
    """Decoded straight lines in latent space between pairs of images, one pair per row.

    ``x`` is either a tuple ``(starts, ends)`` of images ``(P, C, H, W)`` each, or images
    ``(N, C, H, W)`` paired in order (``x[0]`` with ``x[1]``, ``x[2]`` with ``x[3]``, ...); at most
    ``pairs`` rows are drawn. A row shows the start image, ``decode((1 - t) z_A + t z_B)`` for
    ``steps`` values of ``t`` from 0 to 1 (``z = encode(image)``), then the end image.
    """
    if steps < 2:
        raise InputError(f"steps must be at least 2, got {steps}")
    if pairs <= 0:
        raise InputError(f"pairs must be positive, got {pairs}")
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise InputError(f"give the pairs as a tuple (starts, ends), got {len(x)} tensors")
        starts, ends = x
        _check_images(starts, "starts")
        _check_images(ends, "ends")
        if starts.shape != ends.shape:
            raise InputError(f"starts and ends must have the same shape, got {tuple(starts.shape)} and {tuple(ends.shape)}")
        starts, ends = starts[:pairs], ends[:pairs]
    else:
        _check_images(x)
        if len(x) < 2:
            raise InputError("interpolations need at least two images, one pair")
        x = x[: 2 * min(pairs, len(x) // 2)]
        starts, ends = x[0::2], x[1::2]
    device = _device(model, starts.device)
    starts, ends = starts.to(device), ends.to(device)
    with torch.no_grad(), evaluating(model):
        z_a, z_b = model.encode(starts), model.encode(ends)  # (P, L)
        t = torch.linspace(0, 1, steps, device=z_a.device).view(1, steps, 1)
        z = (1 - t) * z_a.unsqueeze(1) + t * z_b.unsqueeze(1)  # (P, steps, L)
        decoded = model.decode(z.reshape(-1, z.shape[-1])).unflatten(0, (len(starts), steps))
    rows = torch.cat([starts.unsqueeze(1), decoded, ends.unsqueeze(1)], dim=1)  # (P, steps + 2, C, H, W)
    columns = ["A", *(f"{v:.2g}" for v in t.flatten().tolist()), "B"]
    figure = _figure(CELL_INCHES * (steps + 2) + 0.6, CELL_INCHES * len(starts) + 1.0)
    ax = figure.add_subplot()
    _show_grid(ax, rows.flatten(0, 1), ncol=steps + 2, col_labels=columns)
    ax.set_xlabel("t: decode((1 - t) z_A + t z_B) between images A and B")
    ax.set_title(f"{_name(model)}: interpolations in latent space")
    return _finish(figure, path)


def latent_scatter(model, x: Tensor, labels: Tensor, path=None, prior_samples: Tensor | None = None, class_names=None) -> Figure:
    """The codes of ``x: (N, C, H, W)`` as a 2-D scatter coloured by ``labels: (N,)``, the legend naming class ``k``
    ``class_names[k]`` (or ``k``).

    Two-dimensional codes are drawn as they are; longer codes are projected on their first two
    principal components (the axes say how much of the codes' variance each keeps); a conditional
    model encodes each image given its label (the codes of q(z|x, y)). Up to 20 classes get a
    legend of their names, more a colour bar of their indices. ``prior_samples: (M, L)``, draws from the prior, are drawn underneath in grey (and then the projection is the prior samples' principal components),
    to show how closely the codes follow the prior.
    """
    _check_images(x)
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (len(x),):
        raise InputError(f"labels must be one per image, shape ({len(x)},), got {tuple(labels.shape)}")
    names = _class_names(class_names, labels.unique().tolist())  # the classes in order, as np.unique gives them below
    codes = _encode(model, x, labels=labels)
    latent_dim = codes.shape[1]
    if latent_dim < 2:
        raise InputError(f"a scatter needs codes of at least two dimensions, this model's have {latent_dim}")
    if prior_samples is not None:
        prior_samples = torch.as_tensor(prior_samples).detach().cpu().to(codes.dtype)
        if prior_samples.dim() != 2 or prior_samples.shape[1] != latent_dim:
            raise InputError(f"prior_samples must be (M, {latent_dim}), got {tuple(prior_samples.shape)}")
    if latent_dim == 2:
        points, axis_names, background = codes, ["z₁", "z₂"], prior_samples
    else:
        basis = codes if prior_samples is None else prior_samples
        pca = PCA(2).fit(basis)
        points = pca.encode(codes)
        background = None if prior_samples is None else pca.encode(prior_samples)
        share = (pca.explained_variance / basis.var(0).sum()).tolist()
        of = "z" if prior_samples is None else "the prior"
        axis_names = [f"principal component {i + 1} of {of} ({100 * s:.0f}% of variance)" for i, s in enumerate(share)]
    points, values = points.numpy(), labels.numpy()
    classes = np.unique(values)

    figure = _figure(6.4, 5.4)
    ax = figure.add_subplot()
    if background is not None:
        ax.scatter(background[:, 0].numpy(), background[:, 1].numpy(), c="0.75", s=4, alpha=0.5, linewidths=0, label="prior samples")
    if len(classes) <= 20:
        palette = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"].colors
        cmap = ListedColormap(palette[: len(classes)])
        index = np.searchsorted(classes, values)  # 0..K-1: one colour per class
        scatter = ax.scatter(points[:, 0], points[:, 1], c=index, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, s=6, alpha=0.7, linewidths=0)
        handles, _ = scatter.legend_elements(num=list(range(len(classes))), alpha=1.0)
        ax.legend(handles, names, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=values, cmap="viridis", s=6, alpha=0.7, linewidths=0)
        figure.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    over = "" if background is None else f" over {len(background)} prior samples (grey)"
    ax.set_title(f"{_name(model)}: codes of {len(x)} images{over}")
    return _finish(figure, path)


def manifold(vae, n: int = 20, path=None) -> Figure:
    """The decoder over an ``n x n`` grid of a two-dimensional latent plane.

    The grid sits at the quantiles ``(i + 0.5) / n`` of a standard Normal in each coordinate, so
    that it covers the prior's mass evenly; ``z₁`` grows to the right and ``z₂`` upwards. Only
    for models with ``L == 2`` (:class:`~pyrovae.errors.InputError` otherwise).
    """
    if vae.latent_dim != 2:
        raise InputError(f"the manifold is drawn for a two-dimensional latent space, this model has L = {vae.latent_dim}; use latent_scatter")
    if n < 2:
        raise InputError(f"n must be at least 2, got {n}")
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    z1 = quantiles.repeat(n)  # columns: left to right
    z2 = quantiles.flip(0).repeat_interleave(n)  # rows: top to bottom, so z₂ grows upwards
    z = torch.stack([z1, z2], dim=1).to(_device(vae, torch.device("cpu")))
    with torch.no_grad(), evaluating(vae):
        images = vae.decode(z)
    ticks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    figure = _figure(CELL_INCHES * n * 0.75 + 1.0, CELL_INCHES * n * 0.75 + 0.9)
    ax = figure.add_subplot()
    rows = [f"{quantiles[n - 1 - r]:.2f}" if r in ticks else "" for r in range(n)]
    cols = [f"{quantiles[c]:.2f}" if c in ticks else "" for c in range(n)]
    _show_grid(ax, images, ncol=n, row_labels=rows, col_labels=cols)
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_title(f"{_name(vae)}: decoded latent plane (Normal quantiles)")
    return _finish(figure, path)


def training_curves(history: list[dict], path=None, scores: Sequence[str] = ()) -> Figure:
    """The training, validation and test losses against the epoch; beside them, the ``scores`` named.

    ``history`` holds one dict per epoch, as :meth:`pyrovae.training.Trainer.fit` returns it:
    ``"train_loss"`` and, if any, ``"val_loss"`` and ``"test_loss"`` become lines against
    ``"epoch"`` (else 1, 2, ...), each through the epochs where it was measured (``None``
    elsewhere). Rows of greedy pretraining (``"phase"`` other than ``"train"``, the stacked
    autoencoder) measure other losses and are left out; the title says how many.
    scores: columns of the history (the ``scores`` given to ``fit``, a test accuracy, say) drawn the same
        way in a second panel.
    """
    if not history or not all(isinstance(row, dict) for row in history):
        raise InputError("history must be a non-empty list of dicts, one per epoch")
    rows = [row for row in history if row.get("phase", "train") == "train"]
    keys = [key for key in ("train_loss", "val_loss", "test_loss") if any(row.get(key) is not None for row in rows)]
    if not keys:
        found = sorted({key for row in history for key in row})
        raise InputError(f"the history has no end-to-end 'train_loss', 'val_loss' or 'test_loss' to plot (keys: {found})")
    scores = [scores] if isinstance(scores, str) else list(scores)
    missing = [name for name in scores if not any(row.get(name) is not None for row in rows)]
    if missing:
        found = sorted({key for row in history for key in row})
        raise InputError(f"the history has no values of the scores {missing} (keys: {found})")
    figure = _figure(6.4 + 4.8 * bool(scores), 4.2)
    panels = figure.subplots(1, 1 + bool(scores), squeeze=False)[0]
    for ax, names, ylabel in zip(panels, (keys, scores), ("loss per example", "score")):
        for key in names:
            points = [(row.get("epoch", i + 1), float(row[key])) for i, row in enumerate(rows) if row.get(key) is not None]
            epochs, values = zip(*points)
            ax.plot(epochs, values, marker="o" if len(points) <= 30 else None, markersize=4, label=key.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    skipped = len(history) - len(rows)
    panels[0].set_title("training curves" + (f" (after {skipped} epoch{'s' * (skipped != 1)} of layer-wise pretraining, not shown)" if skipped else ""))
    return _finish(figure, path)


def comparison(models: dict, x: Tensor, n: int = 8, path=None, labels=None) -> Figure:
    """Models side by side: the first ``n`` images of ``x`` and each model's reconstructions (top),
    and ``n`` samples from each model that can sample (bottom). ``models`` maps a name to a model.
    A conditional model is given the images' ``labels: (N,)``, and samples the classes of the images shown.
    """
    if not models:
        raise InputError("give at least one model to compare, as {name: model}")
    _check_images(x)
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    x = x[:n]
    recon_rows, recon_names = [x.cpu()], ["input"]
    sample_rows, sample_names = [], []
    with torch.no_grad(), evaluating(*models.values()):
        for name, model in models.items():
            given = _given(model, labels, len(x))
            recon_rows.append(model.reconstruct(x.to(_device(model, x.device)), *given).cpu())
            recon_names.append(name)
            if hasattr(model, "sample"):
                sample_rows.append(model.sample(len(x), *given).cpu())
                sample_names.append(name)
    heights = [len(recon_rows)] + ([len(sample_rows)] if sample_rows else [])
    figure = _figure(CELL_INCHES * len(x) + 1.6, CELL_INCHES * sum(heights) + 0.7 * len(heights))
    axes = figure.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    _show_grid(axes[0], torch.cat(recon_rows), ncol=len(x), row_labels=recon_names)
    axes[0].set_title("reconstructions")
    if sample_rows:
        _show_grid(axes[1], torch.cat(sample_rows), ncol=len(x), row_labels=sample_names)
        axes[1].set_title("samples from the prior")
    return _finish(figure, path)


# --------------------------------------------------------------------------- discrete latents


def analogies(model, x: Tensor, n: int = 8, path=None) -> Figure:
    """Kingma et al.'s analogies of a semi-supervised VAE (M2): the first ``n`` test images of ``x: (N, C, H, W)``
    (top row) and, below, each one's style z (``model.analogies``: the mean of q(z | x, y) at its most
    probable class) decoded with every class, one row per class."""
    if not callable(getattr(model, "analogies", None)):
        raise InputError(f"a {_name(model)} has no classes to decode a style with; analogies need a semi-supervised VAE (m2)")
    _check_images(x)
    if n <= 0:
        raise InputError(f"n must be positive, got {n}")
    x = x[:n].to(_device(model, x.device))
    with torch.no_grad(), evaluating(model):
        grid = model.analogies(x)  # (K, n, C, H, W)
    classes = grid.shape[0]
    figure = _figure(CELL_INCHES * len(x) + 1.0, CELL_INCHES * (classes + 1) + 0.6)
    ax = figure.add_subplot()
    _show_grid(ax, torch.cat([x, grid.flatten(0, 1)]), ncol=len(x), row_labels=["input", *(str(k) for k in range(classes))])
    ax.set_ylabel("class")
    ax.set_title(f"{_name(model)}: each test image's style, decoded with every class")
    return _finish(figure, path)


def confusion(counts: Tensor, path=None, title: str = "confusion matrix", xlabel: str = "predicted class") -> Figure:
    """A confusion matrix ``counts: (K, J)`` (rows: true labels; columns: predicted classes or clusters, see
    :func:`pyrovae.evaluation.confusion_matrix`) as an image, each row normalised to fractions, the counts written in."""
    counts = torch.as_tensor(counts)
    if counts.dim() != 2:
        raise InputError(f"counts must be a matrix (K, J), got shape {tuple(counts.shape)}")
    rows = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
    figure = _figure(0.45 * counts.shape[1] + 1.8, 0.45 * counts.shape[0] + 1.0)
    ax = figure.add_subplot()
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6, color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("label")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="fraction of the label's images")
    return _finish(figure, path)
