"""Choose M2's alpha on held-out labelled images, never on the test set.

Kingma et al. (2014) weigh the classification term with alpha = 0.1 (per image; their ``0.1 N`` multiplies
a sum over the N images). pyrovae's M2 steps draw batches of the whole training set, so with 100 labels a
labelled image reaches one step in six, where Kingma et al.'s code puts one in every batch of 500: the same
objective, a different optimizer's path (``docs/quality_discrete.md``). Which alpha works best under
pyrovae's schedule is therefore measured, on the protocol of the paper's code:

- 10,000 of the 60,000 training images (drawn with seed 0) are the validation set; their labels are used
  only to score, and the images never reach training;
- the labels are drawn, balanced across the classes, from the other 50,000 with ``--seed``;
- each alpha trains the rows' M2 (:data:`benchmarks.quality_discrete.NETWORK`, batch 100, Adam 1e-3 with a
  cosine decay over ``--epochs``) from the same start, and q(y|x) is scored on the 10,000 validation images.

One command::

    python benchmarks/m2_alpha.py --alphas 0.1 3 30 300 --epochs 10 --threads 1

``--repeat R`` adds R - 1 copies of each labelled image to the training set: each epoch then shows a labelled
image R times, and its ELBO weighs R times as much in the objective (the classification term keeps its
weight: it is alpha times the mean over the labelled images, copies included). This departs from the paper's
objective on purpose, to measure how far the labelled images' share of the ELBO moves q(y|x).

Each alpha's run lives in ``--out``/alpha-A (default ``runs/m2_alpha/labelsN-seedS-eE``) and continues
from its checkpoint when the command runs again; a finished alpha is not trained again. The table goes to
``results.json`` there (and to ``--publish``, a path, when given), the best alpha on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import code_version  # noqa: E402
from benchmarks.quality_discrete import NETWORK, SCHEDULES, configs, kept_labels, with_repeats  # noqa: E402
from pyrovae.checkpoints import write_text_atomic  # noqa: E402
from pyrovae.data import ImageSet, load_dataset  # noqa: E402
from pyrovae.devices import resolve_device  # noqa: E402
from pyrovae.evaluation import predict_classes  # noqa: E402
from pyrovae.models import build_model  # noqa: E402
from pyrovae.models.semi_supervised import balanced_label_draw  # noqa: E402
from pyrovae.training import CHECKPOINT_FILE, Trainer  # noqa: E402

VALIDATION_IMAGES = 10_000
RESULT_FILE = "result.json"


def try_alpha(alpha: float, folder: Path, train: ImageSet, data, labels: torch.Tensor, epochs: int, seed: int, device) -> dict:
    """Train M2 with ``alpha`` on ``train`` and its ``labels`` into ``folder`` (or go on from its checkpoint, or read its
    finished result) and score q(y|x) on the validation images of ``data``:
    ``{"alpha", "validation_accuracy_percent", "epochs", "training_minutes"}``."""
    if (folder / RESULT_FILE).exists():
        return json.loads((folder / RESULT_FILE).read_text())
    if (folder / CHECKPOINT_FILE).exists():
        trainer = Trainer.resume(folder, device=device)
    else:
        # the m2-100 row's network and schedule, over ``epochs``, with ``alpha``
        schedule = replace(SCHEDULES["cpu"], epochs={"m2-100": epochs}, eval_every=epochs)
        model_config, config = configs("m2-100", schedule, seed)
        torch.manual_seed(seed)
        model = build_model("m2", replace(model_config, alpha=alpha)).to(device)
        trainer = Trainer(model, config, out_dir=folder, model_name="m2")
    history = trainer.fit(train, dynamic_binarization=True, train_labels=labels)
    predicted = predict_classes(trainer.model.eval(), data.val[:]).cpu()
    result = {
        "alpha": alpha,
        "validation_accuracy_percent": 100 * (predicted == data.val_labels.cpu()).double().mean().item(),
        "epochs": len(history),
        "training_minutes": sum(row["seconds"] for row in history) / 60,
    }
    write_text_atomic(folder / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 3.0, 30.0, 300.0], help="the alphas to try (default: 0.1 3 30 300)")
    parser.add_argument("--labels", type=int, default=100, help="training labels kept, balanced (default: 100)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each try (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="the label draw, the networks and the batches (default: 0)")
    parser.add_argument("--repeat", type=int, default=1, help="each labelled image this many times in the training set (default: 1; see above)")
    parser.add_argument("--subset", type=int, default=None, help="images of each split (a shorter try; the validation set is then a sixth of them)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the tries (default: runs/m2_alpha/labelsN-seedS-eE)")
    parser.add_argument("--publish", type=Path, default=None, help="also write the table to this path")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST (default: the repository's data/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    val_size = VALIDATION_IMAGES if args.subset is None else args.subset // 6
    # the validation images leave the training set before the subset is taken: they never reach training
    data = load_dataset("mnist", root=args.data_dir, device=device, binarize="dynamic", val_size=val_size, subset=args.subset, seed=0)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    drawn = balanced_label_draw(data.train_labels, args.labels, 10, seed=args.seed)
    train, labels = with_repeats(data.train, kept_labels(data.train_labels, drawn), args.repeat)
    repeated = f"-repeat{args.repeat}" if args.repeat > 1 else ""
    out = args.out or REPO / "runs" / "m2_alpha" / f"labels{args.labels}-seed{args.seed}-e{args.epochs}{repeated}"
    tries = []
    for alpha in args.alphas:
        tried = try_alpha(alpha, out / f"alpha-{alpha:g}", train, data, labels, args.epochs, args.seed, device)
        print(f"alpha {alpha:g}: validation accuracy {tried['validation_accuracy_percent']:.2f}% after {tried['epochs']} epochs "
              f"({tried['training_minutes']:.1f} min)", flush=True)
        tries.append(tried)
    best = max(tries, key=lambda t: t["validation_accuracy_percent"])
    table = {
        "labels": args.labels,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_images": len(data.train),
        "repeat": args.repeat,
        "validation_images": len(data.val),
        "network": asdict(NETWORK),
        "tries": tries,
        "best_alpha": best["alpha"],
        "code": code_version(),
    }
    for path in filter(None, (out / "results.json", args.publish)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(table, indent=2) + "\n")
    print(f"best alpha {best['alpha']:g}: validation accuracy {best['validation_accuracy_percent']:.2f}% "
          f"({len(data.val)} validation images, {args.labels} labels of {len(data.train)} training images)", flush=True)
    return table


if __name__ == "__main__":
    main()
