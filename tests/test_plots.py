"""Each figure is a matplotlib Figure, is written as a non-empty PNG, and refuses what it cannot draw."""

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from conftest import tiny_network
from pyrovae import AE, CVAE, VAE, AEConfig, CVAEConfig, VAEConfig, plots
from pyrovae.errors import InputError
from pyrovae.evaluation import PCA

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(figure, path):
    assert isinstance(figure, Figure)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert plt.get_fignums() == []  # nothing registered with pyplot, nothing left to close


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "vae": VAE(VAEConfig(network=tiny_network())).eval(),
        "ae": AE(AEConfig(network=tiny_network())).eval(),
    }


def test_reconstructions(models, images, tmp_path):
    figure = plots.reconstructions(models["vae"], images, n=6, path=tmp_path / "recon.png")
    assert_png(figure, tmp_path / "recon.png")
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["input", "reconstruction"]


def test_samples_need_a_model_that_samples(models, tmp_path):
    assert_png(plots.samples(models["vae"], n=10, path=tmp_path / "samples.png"), tmp_path / "samples.png")
    with pytest.raises(ValueError, match="sample"):
        plots.samples(models["ae"])


def test_interpolations_from_a_batch_or_from_pairs(models, images, tmp_path):
    figure = plots.interpolations(models["ae"], images, steps=5, pairs=3, path=tmp_path / "a.png")
    assert_png(figure, tmp_path / "a.png")
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert labels[0] == "A" and labels[-1] == "B" and len(labels) == 7
    assert figure.axes[0].get_images()[0].get_array().shape[0] == 3 * (28 + 2) + 2  # three rows of images
    figure = plots.interpolations(models["vae"], (images[:2], images[2:4]), steps=4, path=tmp_path / "b.png")
    assert_png(figure, tmp_path / "b.png")
    with pytest.raises(ValueError, match="steps"):
        plots.interpolations(models["vae"], images, steps=1)


def test_latent_scatter_projects_long_codes(models, mnist, tmp_path):
    x, labels = mnist.test[:200], mnist.test_labels[:200]
    figure = plots.latent_scatter(models["vae"], x, labels, path=tmp_path / "latent.png")
    assert_png(figure, tmp_path / "latent.png")
    assert "principal component" in figure.axes[0].get_xlabel()
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(v) for v in sorted(set(labels.tolist()))]
    with pytest.raises(ValueError, match="labels"):
        plots.latent_scatter(models["vae"], x, labels[:10])


def test_latent_scatter_draws_codes_over_prior_samples_in_the_priors_projection(models, mnist, tmp_path):
    x, labels = mnist.test[:100], mnist.test_labels[:100]
    prior = torch.randn(500, 8) * torch.tensor([5.0, 3.0, 1, 1, 1, 1, 1, 1])  # two long axes
    figure = plots.latent_scatter(models["vae"], x, labels, path=tmp_path / "over.png", prior_samples=prior)
    ax = figure.axes[0]
    grey, codes = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
    assert len(grey) == 500 and len(codes) == 100 and "over 500 prior samples" in ax.get_title()
    assert "of the prior" in ax.get_xlabel()
    spread = torch.as_tensor(grey).std(0)
    assert spread[0] == pytest.approx(5.0, rel=0.15) and spread[1] == pytest.approx(3.0, rel=0.15)  # the prior's own axes
    with pytest.raises(ValueError, match=r"prior_samples must be \(M, 8\)"):
        plots.latent_scatter(models["vae"], x, labels, prior_samples=torch.randn(10, 3))


def test_manifold_only_for_two_latent_dimensions(images, models, tmp_path):
    vae2 = VAE(VAEConfig(network=tiny_network(latent_dim=2))).eval()
    assert_png(plots.manifold(vae2, n=5, path=tmp_path / "manifold.png"), tmp_path / "manifold.png")
    figure = plots.latent_scatter(vae2, images, torch.arange(16) % 3, path=tmp_path / "latent2.png")
    assert figure.axes[0].get_xlabel() == "z₁"
    with pytest.raises(ValueError, match="two-dimensional"):
        plots.manifold(models["vae"])


def test_training_curves(tmp_path):
    history = [
        {"phase": "pretrain-0", "epoch": 1, "train_loss": 90.0, "val_loss": None},
        {"phase": "train", "epoch": 1, "train_loss": 200.0, "val_loss": 190.0, "best_val_loss": 190.0},
        {"phase": "train", "epoch": 2, "train_loss": 150.0, "val_loss": None, "best_val_loss": 190.0},
    ]
    figure = plots.training_curves(history, path=tmp_path / "curves" / "loss.png")
    assert_png(figure, tmp_path / "curves" / "loss.png")
    ax = figure.axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "val loss"]
    assert list(lines[0].get_xdata()) == [1, 2] and list(lines[0].get_ydata()) == [200.0, 150.0]
    assert "1 epoch of layer-wise pretraining" in ax.get_title()
    assert len(plots.training_curves([{"train_loss": 3.0}, {"train_loss": 2.0}]).axes[0].get_lines()) == 1
    with pytest.raises(ValueError, match="train_loss"):
        plots.training_curves([{"epoch": 1, "seconds": 3.0}])


def test_training_curves_draw_scores_in_a_second_panel():
    history = [
        {"phase": "train", "epoch": 1, "train_loss": 200.0, "test_loss": None, "test_accuracy": None},
        {"phase": "train", "epoch": 2, "train_loss": 150.0, "test_loss": 160.0, "test_accuracy": 0.8},
        {"phase": "train", "epoch": 3, "train_loss": 140.0, "test_loss": 150.0, "test_accuracy": 0.9},
    ]
    losses, scores = plots.training_curves(history, scores=["test_accuracy"]).axes
    assert [line.get_label() for line in losses.get_lines()] == ["train loss", "test loss"]
    (line,) = scores.get_lines()
    assert line.get_label() == "test accuracy" and list(line.get_xdata()) == [2, 3] and list(line.get_ydata()) == [0.8, 0.9]
    assert len(plots.training_curves(history).axes) == 1
    with pytest.raises(ValueError, match="no values of the scores"):
        plots.training_curves(history, scores=["accuracy"])


def test_comparison_with_and_without_samples(models, mnist, tmp_path):
    pca = PCA(8).fit(mnist.train)
    figure = plots.comparison({**models, "pca": pca}, mnist.test[:], n=5, path=tmp_path / "compare.png")
    assert_png(figure, tmp_path / "compare.png")
    top, bottom = figure.axes
    assert [t.get_text() for t in top.get_yticklabels()] == ["input", "vae", "ae", "pca"]
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["vae"]  # only the VAE samples
    assert len(plots.comparison({"pca": pca}, mnist.test[:], n=3).axes) == 1


def grid_cell(figure, row: int, col: int, height: int, width: int, axes: int = 0) -> torch.Tensor:
    """The image in row ``row``, column ``col`` of a figure's grid, as drawn: ``(height, width, 3)`` for colour."""
    grid = torch.as_tensor(figure.axes[axes].images[0].get_array().data)
    top, left = plots.PADDING + row * (height + plots.PADDING), plots.PADDING + col * (width + plots.PADDING)
    return grid[top : top + height, left : left + width]


def test_colour_images_are_drawn_in_colour(tmp_path):
    """A red, a green and a blue image keep their colours in the reconstructions; and the model's own colour
    reconstructions, samples and interpolations are drawn channel by channel as the model gives them."""
    colours = torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 8, 12).clone()  # red, green, blue, 8x12 (not square)
    vae = VAE(VAEConfig(network=tiny_network(input_shape=(3, 8, 12), conv=True), likelihood="discretized_logistic")).eval()
    figure = plots.reconstructions(vae, colours, path=tmp_path / "rgb.png")
    assert_png(figure, tmp_path / "rgb.png")
    for k in range(3):
        cell = grid_cell(figure, 0, k, 8, 12)
        assert cell.shape == (8, 12, 3)  # drawn in colour, not through a colormap
        torch.testing.assert_close(cell, colours[k].permute(1, 2, 0))  # red stays red: (1, 0, 0) at every pixel
        torch.testing.assert_close(grid_cell(figure, 1, k, 8, 12), vae.reconstruct(colours)[k].permute(1, 2, 0))
    torch.manual_seed(0)
    figure = plots.samples(vae, n=4, path=tmp_path / "s.png")
    torch.manual_seed(0)
    drawn = vae.sample(4)
    assert not torch.allclose(drawn[:, 0], drawn[:, 1])  # the channels differ: a grey picture would not show it
    torch.testing.assert_close(grid_cell(figure, 0, 1, 8, 12), drawn[1].permute(1, 2, 0))
    figure = plots.interpolations(vae, (colours[:1], colours[2:]), steps=3, path=tmp_path / "i.png")
    torch.testing.assert_close(grid_cell(figure, 0, 0, 8, 12), colours[0].permute(1, 2, 0))  # A: red
    torch.testing.assert_close(grid_cell(figure, 0, 4, 8, 12), colours[2].permute(1, 2, 0))  # B: blue
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        plots.reconstructions(vae, torch.rand(4, 2, 8, 12))


def test_grey_images_are_drawn_through_a_grey_colormap(models, images):
    image = plots.reconstructions(models["vae"], images[:2]).axes[0].images[0]
    assert image.get_array().ndim == 2 and image.get_cmap().name == "gray"


def test_class_names_label_the_latent_scatter_and_the_cvae_rows(models, mnist, tmp_path):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    x, labels = mnist.test[:200], mnist.test_labels[:200]
    figure = plots.latent_scatter(models["vae"], x, labels, class_names=names, path=tmp_path / "latent.png")
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [names[k] for k in sorted(set(labels.tolist()))]
    assert legend.get_title().get_text() == "class"
    cvae = CVAE(CVAEConfig(network=tiny_network(), num_classes=3)).eval()
    figure = plots.class_samples(cvae, n=2, class_names=["T-shirt/top", "Trouser", "Pullover"], path=tmp_path / "rows.png")
    assert_png(figure, tmp_path / "rows.png")
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["T-shirt/top", "Trouser", "Pullover"]
    assert [t.get_text() for t in plots.class_samples(cvae, n=2).axes[0].get_yticklabels()] == ["0", "1", "2"]  # no names: indices
    with pytest.raises(ValueError, match="class_names has 2 names, not one for each class index 0..2"):
        plots.class_samples(cvae, n=2, class_names=["a", "b"])
    with pytest.raises(ValueError, match="class_names has 3 names"):
        plots.latent_scatter(models["vae"], x, labels, class_names=names[:3])


def test_figures_draw_in_eval_mode_and_leave_the_mode_alone(mnist, tmp_path):
    """With dropout, a figure drawn twice is the same picture, and a training model stays in training."""
    vae = VAE(VAEConfig(network=tiny_network(dropout=0.5))).train()
    x = mnist.test[:8]
    first = plots.reconstructions(vae, x).axes[0].images[0].get_array()
    second = plots.reconstructions(vae, x).axes[0].images[0].get_array()
    assert vae.training and (first == second).all()
    torch.manual_seed(0)
    a = plots.samples(vae, n=4).axes[0].images[0].get_array()
    torch.manual_seed(0)
    b = plots.samples(vae, n=4).axes[0].images[0].get_array()
    assert (a == b).all() and vae.training


def test_a_conditional_model_is_given_the_labels(models, mnist, tmp_path):
    """Reconstructions, codes and the comparison of a CVAE use each image's label; without labels, a clear error."""
    torch.manual_seed(0)
    cvae = CVAE(CVAEConfig(network=tiny_network())).eval()
    x, labels = mnist.test[:6], mnist.test_labels[:6]
    figure = plots.reconstructions(cvae, x, labels=labels, path=tmp_path / "recon.png")
    assert_png(figure, tmp_path / "recon.png")
    grid = torch.as_tensor(figure.axes[0].images[0].get_array().data)
    cell = 28 + plots.PADDING
    bottom_left = grid[plots.PADDING + cell : plots.PADDING + cell + 28, plots.PADDING : plots.PADDING + 28]
    torch.testing.assert_close(bottom_left, cvae.reconstruct(x, labels)[0, 0])
    assert not torch.allclose(bottom_left, cvae.reconstruct(x, (labels + 1) % 10)[0, 0])
    with pytest.raises(ValueError, match="pass labels"):
        plots.reconstructions(cvae, x)
    assert_png(plots.latent_scatter(cvae, mnist.test[:50], mnist.test_labels[:50], path=tmp_path / "l.png"), tmp_path / "l.png")
    figure = plots.comparison({"cvae": cvae, **models}, mnist.test[:], n=4, labels=mnist.test_labels, path=tmp_path / "c.png")
    assert_png(figure, tmp_path / "c.png")
    assert [t.get_text() for t in figure.axes[1].get_yticklabels()] == ["cvae", "vae"]


def test_class_samples_draw_a_row_per_class_of_m2_and_per_component_of_the_mixture_vae(tmp_path):
    """M2's rows are its classes (sample(n, y)), the mixture VAE's its components (sample(n, c)): row k holds the
    decoded draws of class or component k, and the axis says which."""
    from pyrovae.models import M2Config, MixtureVAE, MixtureVAEConfig, SemiSupervisedVAE

    for model, kind in ((SemiSupervisedVAE(M2Config(network=tiny_network(), num_classes=3)), "class"),
                        (MixtureVAE(MixtureVAEConfig(network=tiny_network(), num_components=3)), "component")):
        model.eval()
        assert plots.sample_rows(model) == (3, kind)
        torch.manual_seed(1)
        figure = plots.class_samples(model, n=2, path=tmp_path / f"{kind}.png")
        torch.manual_seed(1)
        expected = model.sample(6, torch.arange(3).repeat_interleave(2))  # class (component) after class
        grid = torch.as_tensor(figure.axes[0].images[0].get_array().data)
        cell = 28 + plots.PADDING
        for k in range(3):
            for j in range(2):
                top, left = plots.PADDING + k * cell, plots.PADDING + j * cell
                torch.testing.assert_close(grid[top : top + 28, left : left + 28], expected[2 * k + j, 0])
        assert figure.axes[0].get_ylabel() == kind
    with pytest.raises(InputError, match="mixture components, which have no class names"):
        plots.class_samples(model, n=2, class_names=["a", "b", "c"])
