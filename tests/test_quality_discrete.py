"""The reproduction script ``benchmarks/quality_discrete.py``: its rows follow the papers, a smoke run writes
its results with the label draw recorded, and running it again continues instead of starting over."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality_discrete  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.evaluation import class_accuracy  # noqa: E402
from pyrovae.models import SemiSupervisedVAE  # noqa: E402
from pyrovae.models.semi_supervised import balanced_label_draw  # noqa: E402
from pyrovae.training import load_model  # noqa: E402


def test_rows_follow_the_papers():
    for row, labels in (("m2-100", 100), ("m2-1000", 1000), ("m2-3000", 3000), ("gmvae", None)):
        model, training = quality_discrete.configs(row, quality_discrete.SCHEDULES["cpu"])
        assert model.network.hidden == (500,) and model.network.latent_dim == 50 and model.network.activation == "softplus"
        assert quality_discrete.labels_kept(row, quality_discrete.SCHEDULES["cpu"]) == labels
        assert training.batch_size == 100 and training.lr_schedule == "cosine"
    assert quality_discrete.configs("m2-100", quality_discrete.SCHEDULES["cpu"])[0].alpha == 0.1
    for row, labels in (("m2-100-a30", 100), ("m2-3000-a30", 3000)):  # the alpha chosen on held-out images
        model, training = quality_discrete.configs(row, quality_discrete.SCHEDULES["cpu"])
        assert model.alpha == 30 and model.network == quality_discrete.NETWORK and training.epochs == 100
        assert quality_discrete.labels_kept(row, quality_discrete.SCHEDULES["cpu"]) == labels
    chosen = json.loads((quality_discrete.DOCS / "m2-alpha-labels100-seed0.json").read_text())
    assert chosen["best_alpha"] == 30 and chosen["validation_images"] == 10_000
    assert quality_discrete.configs("gmvae", quality_discrete.SCHEDULES["cpu"])[0].num_components == 10


@pytest.mark.parametrize("row", ["m2-100", "gmvae"])
def test_smoke_run_writes_results_and_resumes(tmp_path, mnist_dir, row, monkeypatch):
    args = [row, "--schedule", "smoke", "--out", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu"]
    seed = 1 if row == "m2-100" else 0  # M2 from another seed: its labels are drawn with it
    args += ["--seed", str(seed)]
    seen = []
    original = SemiSupervisedVAE.training_step

    def recording(self, x, update, progress, y=None):
        seen.append(int((y >= 0).sum()))
        return original(self, x, update, progress, y=y)

    monkeypatch.setattr(SemiSupervisedVAE, "training_step", recording)
    with monkeypatch.context() as stopped:  # stopped at the NLL: the files a row commits without its NLL are all there
        stopped.setattr(quality_discrete, "nll", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            quality_discrete.main(args)
    assert all((tmp_path / name).exists() for name in quality_discrete.TRAINED_FILES) and not (tmp_path / "result.json").exists()
    trained = load_model(tmp_path / "weights.pt")[0].state_dict()
    first = quality_discrete.main(args)
    if row == "m2-100":
        assert sum(seen) == 2 * 100  # every kept label reaches the steps, once an epoch
    assert first["epochs"] == 2 and first["test_images"] == 300 and first["nll_samples"] == 50
    assert 0 <= first["accuracy_percent"] <= 100 and 80 < first["test_nll"] < 560
    for name in ("result.json", "nll.json", "learning_curve.png", "checkpoint.pt", "weights.pt", "confusion.png"):
        assert (tmp_path / name).exists(), name
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [epoch[quality_discrete.ACCURACY_COLUMN] is not None for epoch in history] == [True, True]  # smoke: eval_every 1
    assert history[-1][quality_discrete.ACCURACY_COLUMN] == first["accuracy_percent"]  # the trained model, every test image
    metadata = json.loads((tmp_path / "config.json").read_text())["metadata"]
    assert json.loads((tmp_path / "config.json").read_text())["training_config"]["seed"] == seed and first["seed"] == seed
    if row == "m2-100":
        assert metadata["labels"]["count"] == 100 and metadata["labels"]["seed"] == 1
        train_labels = load_dataset("mnist", root=mnist_dir, subset=300, seed=0).train_labels
        assert metadata["labels"]["indices"] == balanced_label_draw(train_labels, 100, 10, seed=1).tolist()
        assert metadata["labels"]["indices"] != balanced_label_draw(train_labels, 100, 10, seed=0).tolist()
    else:
        assert "labels" not in metadata
    model, state = load_model(tmp_path)
    assert state["position"]["done"]
    kept = load_model(tmp_path / "weights.pt")[0].state_dict()
    assert kept.keys() == model.state_dict().keys() and all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(trained[k], v) for k, v in kept.items())  # written before the NLL, the same weights
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    again = quality_discrete.main(args)  # finished: nothing is trained or sampled again
    assert again["test_nll"] == first["test_nll"] and again["accuracy_percent"] == first["accuracy_percent"]
    rescored = quality_discrete.main([*args, "--rescore"])  # from weights.pt alone
    assert rescored["test_nll"] == pytest.approx(first["test_nll"], abs=1e-9) and rescored["accuracy_percent"] == first["accuracy_percent"]
    assert all(torch.equal(before[name], tensor) for name, tensor in load_model(tmp_path)[0].state_dict().items())


@pytest.mark.parametrize("folder", sorted(path.parent.name for path in quality_discrete.DOCS.glob("*/weights.pt")))
def test_the_committed_weights_give_the_committed_accuracy(mnist_dir, folder):
    """Each committed row's weights.pt classifies (or clusters) the 10,000 test images with the accuracy
    docs/quality_discrete.md quotes: a finished row's result.json figure (its files are PUBLISHED_FILES), or, for a
    row published before its NLL (TRAINED_FILES), the last evaluation's in its metrics.csv."""
    path = quality_discrete.DOCS / folder
    if (path / "result.json").exists():
        assert sorted(p.name for p in path.iterdir()) == sorted(quality_discrete.PUBLISHED_FILES)
        expected = json.loads((path / "result.json").read_text())["accuracy_percent"]
    else:
        assert sorted(p.name for p in path.iterdir()) == sorted(quality_discrete.TRAINED_FILES)
        column = quality_discrete.ACCURACY_COLUMN
        expected = float([row for row in csv.DictReader((path / "metrics.csv").open()) if row[column]][-1][column])
    model, _ = load_model(path / "weights.pt")
    data = load_dataset("mnist", root=mnist_dir, binarize="dynamic", seed=0)
    (accuracy,) = class_accuracy(model.eval(), data.test[:], data.test_labels).values()  # M2's accuracy or the clusters'
    assert 100 * accuracy == pytest.approx(expected, abs=1e-9)
    assert f"{expected:.2f}%" in (quality_discrete.REPO / "docs" / "quality_discrete.md").read_text()


def test_a_repeat_row_trains_on_copies_of_its_labelled_images(tmp_path, mnist_dir, monkeypatch):
    from pyrovae.training import Trainer

    seen = []
    monkeypatch.setattr(Trainer, "fit", lambda self, train, **kwargs: seen.append((train.stored(), kwargs["train_labels"])) or [])
    result = quality_discrete.main(["m2-100-a30-r50", "--schedule", "smoke", "--out", str(tmp_path), "--data-dir", str(mnist_dir),
                                    "--device", "cpu", "--nll-samples", "2"])
    (images, labels), = seen
    assert result["labelled_repeat"] == 50 and len(images) == len(labels) == 300 + 49 * 100
    kept = (labels[:300] >= 0).nonzero().squeeze(1)
    train_labels = load_dataset("mnist", root=mnist_dir, subset=300, seed=0).train_labels
    assert torch.equal(kept, balanced_label_draw(train_labels, 100, 10, seed=0))
    assert torch.equal(images[300:], images[kept.repeat(49)]) and torch.equal(labels[300:], labels[kept.repeat(49)])
    assert torch.bincount(labels[labels >= 0], minlength=10).tolist() == [500] * 10
