"""The models with a discrete latent held against their papers on dynamically binarized MNIST: M2's test
accuracy with 100, 1,000 and 3,000 labels (Kingma et al. 2014), the mixture VAE's clustering accuracy, and
the test NLL of each, on :mod:`benchmarks.quality`'s footing.

The protocol is quality.py's: dynamically binarized training images, all 10,000 test images binarized
once with a fixed seed, the importance-sampled NLL with k=5000 (y or c summed out exactly inside each
weight), filled in resumable chunks (:func:`benchmarks.quality.nll`). Beside it, each row scores what
its paper reports: M2 the test accuracy of q(y|x) (the paper gives the error, 100 - accuracy), the
mixture VAE the accuracy of the best one-to-one matching of its 10 clusters to the labels (Hungarian).
M2 keeps ``labels`` training labels, balanced across the classes, drawn with the run's seed from the
60,000 training images (the draw is recorded in the run's config.json); the others are unlabelled.

The network is Kingma et al.'s M2: one hidden layer of 500 softplus units in each network
(q(y|x), q(z|x, y), p(x|y, z)), a 50-d code, alpha = 0.1. One command per row::

    python benchmarks/quality_discrete.py m2-100       # M2, 100 labels
    python benchmarks/quality_discrete.py m2-1000      # M2, 1,000 labels
    python benchmarks/quality_discrete.py m2-3000      # M2, 3,000 labels
    python benchmarks/quality_discrete.py m2-100-a30   # M2, 100 labels, alpha 30 (chosen on held-out images: benchmarks/m2_alpha.py)
    python benchmarks/quality_discrete.py m2-3000-a30  # M2, 3,000 labels, alpha 30
    python benchmarks/quality_discrete.py m2-100-a30-r50   # M2, 100 labels, alpha 30, each labelled image 50 times (Row.repeat)
    python benchmarks/quality_discrete.py gmvae        # the mixture VAE, K = 10, no labels
    python benchmarks/quality_discrete.py m2-100 --seed 1    # another seed (labels drawn, networks started, batches): m2-100-seed1-cpu
    python benchmarks/quality_discrete.py gmvae --rescore    # the committed row scored again from its weights, no training
    python benchmarks/quality_discrete.py gmvae --rescore --subset 500   # its NLL on 500 test images: about a minute

Schedules (:data:`SCHEDULES`): ``cpu`` (Adam 1e-3 with a cosine decay, batch 100; epochs per row in
:data:`SCHEDULES`, sized to a few hours of 2 CPU threads: an M2 epoch decodes every image once per
class, 10 times the VAE's work) and ``smoke`` (300 images, 2 epochs, k=50: proves the wiring). The
run folder (``--out``, default ``runs/quality/ROW[-seedN]-SCHEDULE``) is a pyrovae run folder
(``pyrovae eval`` reads it; its history has the row's accuracy on the test images at each evaluation) plus ``nll.json``, ``result.json``, ``learning_curve.png``, ``confusion.png``
(the test labels against the classes of q(y|x), or the clusters) and ``weights.pt`` (the trained model
alone, as :mod:`benchmarks.quality` keeps it; :func:`pyrovae.training.load_model` reads it); running the
same command again continues an interrupted run, training bit for bit from its checkpoint, then the NLL
from its last chunk. The :data:`TRAINED_FILES` are written as soon as training ends, before the NLL: a row whose
NLL is not needed commits those (the accuracy is in the last row of ``metrics.csv``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import MONITOR_IMAGES, code_version, nll, run_name  # noqa: E402
from benchmarks.quality import PUBLISHED_FILES as NLL_ROW_FILES  # noqa: E402
from benchmarks.quality import rescore as nll_rescore  # noqa: E402
from pyrovae import plots  # noqa: E402
from pyrovae.checkpoints import write_text_atomic  # noqa: E402
from pyrovae.data import ImageSet, load_dataset  # noqa: E402
from pyrovae.devices import resolve_device  # noqa: E402
from pyrovae.evaluation import clustering_accuracy, confusion_matrix, predict_classes  # noqa: E402
from pyrovae.models import MODELS, build_model  # noqa: E402
from pyrovae.models.semi_supervised import UNLABELLED, balanced_label_draw  # noqa: E402
from pyrovae.nets import NetworkConfig  # noqa: E402
from pyrovae.training import CHECKPOINT_FILE, CONFIG_FILE, WEIGHTS_FILE, Trainer, TrainingConfig, load_model, save_weights  # noqa: E402


@dataclass(frozen=True)
class Row:
    """A row: the pyrovae model, its config fields, the labels it keeps (None: none), the published figure
    (accuracy in %, M2's: 100 - the paper's error) and where it comes from; ``repeat``: each labelled image
    this many times in the training set (:func:`with_repeats`; 1, the paper's objective, for most rows)."""

    model: str
    options: dict
    labels: int | None
    published_accuracy: float
    source: str
    repeat: int = 1


ROWS = {
    "m2-100": Row("m2", {"alpha": 0.1}, 100, 100 - 11.97, "Kingma et al. 2014, Table 1, M2 (error 11.97 +- 1.71%)"),
    "m2-1000": Row("m2", {"alpha": 0.1}, 1000, 100 - 3.60, "Kingma et al. 2014, Table 1, M2 (error 3.60 +- 0.56%)"),
    "m2-3000": Row("m2", {"alpha": 0.1}, 3000, 100 - 3.92, "Kingma et al. 2014, Table 1, M2 (error 3.92 +- 0.63%)"),
    # alpha 30 came first of 0.1, 3, 30 and 300 on 10,000 held-out training images (benchmarks/m2_alpha.py;
    # docs/quality_discrete/m2-alpha-labels100-seed0.json); these rows then train on all 60,000
    "m2-100-a30": Row("m2", {"alpha": 30.0}, 100, 100 - 11.97, "Kingma et al. 2014, Table 1, M2 (error 11.97 +- 1.71%), with their alpha 0.1; this row's alpha 30 was chosen on held-out images"),
    "m2-3000-a30": Row("m2", {"alpha": 30.0}, 3000, 100 - 3.92, "Kingma et al. 2014, Table 1, M2 (error 3.92 +- 0.63%), with their alpha 0.1; this row's alpha 30 was chosen on held-out images"),
    # each labelled image 50 times (its ELBO weighs 50 times as much; not the paper's objective): 78.83% on the
    # held-out images after 10 epochs, against 72.93% once and 76.62% 500 times (docs/quality_discrete.md)
    "m2-100-a30-r50": Row("m2", {"alpha": 30.0}, 100, 100 - 11.97, "Kingma et al. 2014, Table 1, M2 (error 11.97 +- 1.71%), with their alpha 0.1 "
                          "and each labelled image once; this row's alpha 30 and 50 copies were chosen on held-out images", repeat=50),
    "gmvae": Row("gmvae", {"num_components": 10}, None, 94.46, "Jiang et al. 2017 (VaDE), Table 2; VaDE pretrains an autoencoder and fits a GMM to start from, this row does not"),
}
#: what a finished row commits in DOCS/NAME/ (described in docs/quality_discrete.md)
PUBLISHED_FILES = (*NLL_ROW_FILES, "confusion.png")
#: what a row commits in DOCS/NAME/ when its NLL is not run: the run folder holds these once training ends,
#: before the NLL's first chunk
TRAINED_FILES = (CONFIG_FILE, "metrics.csv", "learning_curve.png", "confusion.png", WEIGHTS_FILE)
DOCS = REPO / "docs" / "quality_discrete"
#: the history's column of the row's accuracy (:func:`accuracy`) on all the test images, at each evaluation
ACCURACY_COLUMN = "test_accuracy_percent"
NETWORK = NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(500,), activation="softplus")


@dataclass(frozen=True)
class Schedule:
    """How a row trains and is scored. ``epochs``: per row; ``subset``: images of each split (None: all);
    ``labels``: per row, the labels kept where the schedule changes the row's (a subset holds fewer)."""

    epochs: dict
    batch_size: int
    lr: float = 1e-3
    eval_every: int = 10
    nll_samples: int = 5000
    subset: int | None = None
    labels: dict = field(default_factory=dict)


SCHEDULES = {
    # measured with --threads 1 on a shared 2-core machine, this network, batch 100, 10,000 images: an M2 epoch
    # 26 s, a mixture VAE's 4.5 s, so about 160 s and 27 s per epoch of the 60,000 images (M2: 4.4 h for 100
    # epochs, gmvae: 2.3 h for 300); the NLL of the 10,000 test images with k=20 took 90 s (M2) and 12 s, so
    # about 6 h (M2; --nll-samples 1000 for 1.3 h) and 50 min with k=5000
    "cpu": Schedule(epochs={"m2-100": 100, "m2-1000": 100, "m2-3000": 100, "m2-100-a30": 100, "m2-3000-a30": 100,
                            "m2-100-a30-r50": 100, "gmvae": 300},
                    batch_size=100, eval_every=10),
    "smoke": Schedule(epochs=dict.fromkeys(ROWS, 2), batch_size=50, eval_every=1, nll_samples=50, subset=300,
                      labels={"m2-1000": 200, "m2-3000": 200, "m2-3000-a30": 200}),
}


def configs(row: str, schedule: Schedule, seed: int = 0):
    """The model and training configs of ``row`` under ``schedule``, trained from ``seed``."""
    spec = ROWS[row]
    model = MODELS[spec.model][1](network=NETWORK, likelihood="bernoulli", **spec.options)
    training = TrainingConfig(
        epochs=schedule.epochs[row], batch_size=schedule.batch_size, lr=schedule.lr, lr_schedule="cosine",
        eval_every=schedule.eval_every, seed=seed, progress=False,
    )
    return model, training


def labels_kept(row: str, schedule: Schedule) -> int | None:
    return schedule.labels.get(row, ROWS[row].labels)


def kept_labels(train_labels: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``train_labels: (N,)`` with every label but those at the indices ``kept`` set to UNLABELLED."""
    labels = torch.full_like(train_labels, UNLABELLED)
    kept = kept.to(labels.device)
    labels[kept] = train_labels[kept]
    return labels


def with_repeats(train: ImageSet, labels: torch.Tensor, repeat: int) -> tuple[ImageSet, torch.Tensor]:
    """``train: (N, C, H, W)`` and ``labels: (N,)`` (UNLABELLED where there is none) with ``repeat - 1`` copies of each
    labelled image appended: an epoch then shows each labelled image ``repeat`` times, so its ELBO weighs ``repeat``
    times as much in the objective; M2's classification term keeps its weight (alpha times the mean over the
    labelled images, copies included). A departure from Kingma et al.'s objective, stated wherever a row uses it."""
    if repeat == 1:
        return train, labels
    copies = (labels != UNLABELLED).nonzero().squeeze(1).repeat(repeat - 1)
    stored = train.stored()
    return ImageSet(torch.cat([stored, stored[copies.to(stored.device)]]), device=train.device), torch.cat([labels, labels[copies]])


def train(row: str, schedule: Schedule, folder: Path, data, device, seed: int = 0):
    """Train ``row`` from ``seed`` into ``folder`` (its labels drawn with that seed), or continue its interrupted run
    there (the label draw read back from the run)."""
    monitor = data.test[:MONITOR_IMAGES]
    if (folder / CHECKPOINT_FILE).exists():
        trainer = Trainer.resume(folder, device=device)
        draw = json.loads((folder / CONFIG_FILE).read_text())["metadata"].get("labels")
    else:
        model_config, training = configs(row, schedule, seed)
        count = labels_kept(row, schedule)
        draw = None
        if count is not None:
            indices = balanced_label_draw(data.train_labels, count, model_config.num_classes, seed=seed)
            draw = {"count": count, "seed": seed, "indices": indices.tolist()}
        torch.manual_seed(training.seed)
        model = build_model(ROWS[row].model, model_config).to(device)
        options = {"name": "mnist", "root": None, "binarize": "dynamic", "val_size": 0, "subset": schedule.subset, "seed": 0}
        metadata = {"data": options, **({"labels": draw} if draw else {})}
        trainer = Trainer(model, training, out_dir=folder, model_name=ROWS[row].model, metadata=metadata)
    images, given = data.train, {}
    if draw is not None:
        labels = kept_labels(data.train_labels, torch.tensor(draw["indices"], dtype=torch.int64))
        images, labels = with_repeats(images, labels, ROWS[row].repeat)
        given = {"train_labels": labels}
    scores = {ACCURACY_COLUMN: lambda model: accuracy(row, model, data)}  # on all the test images, at each evaluation
    try:
        history = trainer.fit(images, dynamic_binarization=True, test=monitor, scores=scores, **given)
    finally:
        if trainer.history:
            scored = [ACCURACY_COLUMN] if any(epoch.get(ACCURACY_COLUMN) is not None for epoch in trainer.history) else []
            plots.training_curves(trainer.history, path=folder / "learning_curve.png", scores=scored)
    return trainer.model.eval(), history


def accuracy(row: str, model, data, folder: Path | None = None) -> float:
    """The row's accuracy in %: M2's q(y|x) against the test labels, the mixture's clusters matched to them. With
    ``folder``, the confusion matrix of the test set (labels against classes or clusters) goes to ``confusion.png`` there."""
    predicted = predict_classes(model, data.test[:]).cpu()
    labels = data.test_labels.cpu()
    if folder is not None:
        kind = "class of q(y|x)" if ROWS[row].model == "m2" else "cluster"
        plots.confusion(confusion_matrix(predicted, labels, model.k), path=folder / "confusion.png", title=f"{row}: test images", xlabel=kind)
    if ROWS[row].model == "m2":
        return 100 * (predicted == labels).double().mean().item()
    return 100 * clustering_accuracy(predicted, labels)


def rescore(folder: Path, data_dir: str, device, nll_samples: int | None = None, images: int | None = None) -> dict:
    """The committed row in ``folder`` scored again from its weights, without training: the accuracy on the run's test
    images and the NLL as :func:`benchmarks.quality.rescore` computes it (on the first ``images`` test images with
    ``nll_samples`` samples; default: as committed), each printed beside the committed figure."""
    out = nll_rescore(folder, data_dir, device, nll_samples=nll_samples, images=images)
    result = json.loads((folder / "result.json").read_text())
    model = load_model(folder / WEIGHTS_FILE, device=device)[0].eval()
    data = load_dataset("mnist", root=data_dir, device=device, binarize="dynamic", subset=result["test_images"], seed=0)  # the run's test images
    out["accuracy_percent"] = accuracy(result["row"], model, data)
    out["committed_accuracy_percent"] = result["accuracy_percent"]
    print(f"{folder.name}: re-scored test accuracy {out['accuracy_percent']:.2f}% ({len(data.test)} test images); committed "
          f"{result['accuracy_percent']:.2f}%", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", choices=sorted(ROWS), help="the row of the table: " + ", ".join(ROWS))
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="cpu", help="cpu or smoke (default: cpu)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/quality/ROW[-seedN]-SCHEDULE)")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST (default: the repository's data/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: its labels, networks, batches and draws (default: 0); a seed "
                        "other than 0 has its own folder, ROW-seedN-SCHEDULE")
    parser.add_argument("--epochs", type=int, default=None, help="override the schedule's epochs (a shorter try)")
    parser.add_argument("--subset", type=int, default=None, help="override: images of each split (a shorter try)")
    parser.add_argument("--nll-samples", type=int, default=None, help="override: k of the NLL (a shorter try)")
    parser.add_argument("--rescore", action="store_true", help="no training: the accuracy and NLL again from the weights committed in "
                        "docs/quality_discrete/NAME (or --out), beside the committed figures (--subset, --nll-samples: a shorter check)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rescore:
        return rescore(args.out or DOCS / run_name(args.row, args.schedule, args.seed), args.data_dir, resolve_device(args.device),
                       nll_samples=args.nll_samples, images=args.subset)
    schedule = SCHEDULES[args.schedule]
    if args.epochs is not None:
        schedule = replace(schedule, epochs={**schedule.epochs, args.row: args.epochs})
    if args.subset is not None:
        schedule = replace(schedule, subset=args.subset)
    if args.nll_samples is not None:
        schedule = replace(schedule, nll_samples=args.nll_samples)
    folder = args.out or REPO / "runs" / "quality" / run_name(args.row, args.schedule, args.seed)
    device = resolve_device(args.device)
    data = load_dataset("mnist", root=args.data_dir, device=device, binarize="dynamic", subset=schedule.subset, seed=0)

    start = time.perf_counter()
    model, history = train(args.row, schedule, folder, data, device, args.seed)
    train_seconds = sum(row["seconds"] for row in history)
    print(f"{args.row}: trained {len(history)} epochs ({train_seconds / 60:.1f} min of training)", flush=True)
    score = accuracy(args.row, model, data, folder)
    save_weights(folder, model, ROWS[args.row].model)  # the TRAINED_FILES are complete from here
    value = nll(model, data.test[:], schedule.nll_samples, folder)
    spec = ROWS[args.row]
    result = {
        "row": args.row,
        "schedule": args.schedule,
        "accuracy_percent": score,
        "accuracy_kind": "classification (q(y|x))" if spec.model == "m2" else "clustering (Hungarian matching)",
        "published_accuracy_percent": spec.published_accuracy,
        "published_source": spec.source,
        "gap_points": score - spec.published_accuracy,
        "labels": labels_kept(args.row, schedule),
        "labelled_repeat": spec.repeat,
        "test_nll": value,
        "epochs": len(history),
        "training_minutes": train_seconds / 60,
        "nll_samples": schedule.nll_samples,
        "test_images": len(data.test),
        "last_test_bound": -history[-1]["test_loss"] if history and history[-1]["test_loss"] is not None else None,
        "this_call_minutes": (time.perf_counter() - start) / 60,
        "protocol": data.protocol,
        "seed": args.seed,
        "model_config": asdict(configs(args.row, schedule, args.seed)[0]),
        "training_config": asdict(configs(args.row, schedule, args.seed)[1]),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "code": code_version(),
    }
    write_text_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")
    print(f"{args.row} ({args.schedule}): test accuracy {score:.2f}% (paper {spec.published_accuracy:.2f}%), "
          f"test NLL {value:.2f} nats (k={schedule.nll_samples}, {len(data.test)} images)", flush=True)
    return result


if __name__ == "__main__":
    main()
