"""``benchmarks/m2_alpha.py`` chooses M2's alpha on validation images that never reach training, picks the
best of its tries, and does not train a finished try again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import m2_alpha  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.evaluation import predict_classes  # noqa: E402
from pyrovae.models.semi_supervised import UNLABELLED  # noqa: E402
from pyrovae.training import Trainer, load_model  # noqa: E402


def test_a_smoke_sweep_scores_on_held_out_images_and_keeps_its_tries(tmp_path, mnist_dir, monkeypatch):
    trained = []
    original = Trainer.fit

    def recording(self, train, **kwargs):
        trained.append((train.stored().clone(), kwargs["train_labels"].clone()))
        return original(self, train, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording)
    args = ["--subset", "300", "--alphas", "0.1", "30", "--epochs", "1", "--labels", "20", "--out", str(tmp_path / "tries"),
            "--publish", str(tmp_path / "table.json"), "--data-dir", str(mnist_dir), "--device", "cpu"]
    table = m2_alpha.main(args)

    assert [t["alpha"] for t in table["tries"]] == [0.1, 30.0] and table["train_images"] == 300 and table["validation_images"] == 50
    assert table["best_alpha"] == max(table["tries"], key=lambda t: t["validation_accuracy_percent"])["alpha"]
    assert json.loads((tmp_path / "table.json").read_text())["tries"] == table["tries"]
    # both tries trained on the same images and labels: 20 kept, 2 of each class; no validation image among them
    assert len(trained) == 2 and torch.equal(trained[0][0], trained[1][0]) and torch.equal(trained[0][1], trained[1][1])
    labels = trained[0][1]
    assert int((labels != UNLABELLED).sum()) == 20 and torch.bincount(labels[labels != UNLABELLED], minlength=10).tolist() == [2] * 10
    data = load_dataset("mnist", root=mnist_dir, val_size=50, seed=0)
    val = data.val.stored().flatten(1)
    train = load_dataset("mnist", root=mnist_dir, val_size=50, subset=300, seed=0).train.stored().flatten(1)
    assert torch.equal(train, trained[0][0].flatten(1))
    assert not (train[:, None, :] == val[None, :, :]).all(-1).any()  # no training image is a validation image
    # each try's figure is its q(y|x) on the validation images (binarized as every evaluation set is)
    scored = load_dataset("mnist", root=mnist_dir, binarize="dynamic", val_size=50, subset=300, seed=0)
    for tried in table["tries"]:
        model = load_model(tmp_path / "tries" / f"alpha-{tried['alpha']:g}", device="cpu")[0]
        predicted = predict_classes(model, scored.val[:])
        assert 100 * (predicted == scored.val_labels).double().mean().item() == tried["validation_accuracy_percent"]

    trained.clear()
    again = m2_alpha.main(args)
    assert not trained and again["tries"] == table["tries"]  # finished tries are read back, not trained again


def test_repeat_appends_copies_of_the_labelled_images_only(tmp_path, mnist_dir, monkeypatch):
    trained = []
    monkeypatch.setattr(Trainer, "fit", lambda self, train, **kwargs: trained.append((train.stored(), kwargs["train_labels"])) or [])
    monkeypatch.setattr(m2_alpha, "predict_classes", lambda model, x: torch.zeros(len(x), dtype=torch.int64))
    m2_alpha.main(["--subset", "300", "--alphas", "1", "--epochs", "1", "--labels", "20", "--repeat", "3", "--out", str(tmp_path),
                   "--data-dir", str(mnist_dir), "--device", "cpu"])
    (images, labels), = trained
    assert len(images) == len(labels) == 300 + 2 * 20
    kept = (labels[:300] != UNLABELLED).nonzero().squeeze(1)
    assert torch.equal(images[300:], images[kept.repeat(2)]) and torch.equal(labels[300:], labels[kept.repeat(2)])
    assert int((labels != UNLABELLED).sum()) == 60
