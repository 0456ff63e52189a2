"""The ``pyrovae`` command: train, eval, sample, interpolate, compare.

Every subcommand prints one line ``pyrovae: error: ...`` and exits with status 2 on a bad
input (unknown names, missing data, a broken checkpoint, ...), rather than a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import plots
from .checkpoints import CheckpointError, write_text_atomic
from .data import DatasetNotFoundError, load_dataset
from .devices import resolve_device
from .errors import InputError
from .evaluation import PCA, evaluate
from .models import MODELS, build_model
from .nets import NetworkConfig
from .training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    Trainer,
    TrainingConfig,
    TrainingError,
    load_model,
)

__all__ = ["main", "build_parser"]



def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 512,256, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive widths such as 512,256, got {text!r}")
    return values


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion_mnist, kmnist or cifar10 (default: mnist)")
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $PYROVAE_DATA or ./data)")
    parser.add_argument("--binarize", choices=["none", "static", "dynamic"], default="none", help="pixel binarization (default: none, grey levels in [0, 1])")
    parser.add_argument("--val-size", type=int, default=0, help="training images held out for validation and early stopping (default: 0)")
    parser.add_argument("--subset", type=int, default=None, help="use at most this many images of each split (quick runs)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=_int_list, default=(400,), help="MLP hidden widths from the image side, e.g. 512,256 (default: 400)")
    parser.add_argument("--latent-dim", type=int, default=50, help="size of the code z (default: 50)")
    parser.add_argument("--conv", action="store_true", help="convolutional encoder and decoder instead of the MLP")
    parser.add_argument("--activation", default="relu", help="hidden activation (default: relu)")


def _add_training_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default: {epochs})")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size (default: 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of Adam (default: 1e-3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrovae", description="Train, evaluate and compare VAEs (Pyro) and autoencoder baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a model and write a run folder", description="Train a model; write its config, checkpoint, metrics, figures and a summary to --out. With no options: the VAE on MNIST.")
    train.add_argument("--model", default="vae", help="vae, ae, sparse, stacked or denoising (default: vae)")
    train.add_argument("--out", default="runs/vae", help="run folder (default: runs/vae)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (its saved options are used)")
    _add_data_options(train)
    _add_model_options(train)
    train.add_argument("--prior", default="normal", help="VAE prior: normal, laplace, student_t or mixture (default: normal)")
    train.add_argument("--likelihood", default="bernoulli", help="VAE likelihood: bernoulli, continuous_bernoulli, normal or laplace (default: bernoulli)")
    train.add_argument("--elbo", default="trace", help="trace (Trace_ELBO), meanfield (TraceMeanField_ELBO) or iwae (RenyiELBO, alpha=0) (default: trace)")
    train.add_argument("--num-particles", type=int, default=1, help="samples of z per image in the ELBO (k of the IWAE bound) (default: 1)")
    train.add_argument("--beta", type=float, default=1.0, help="KL weight beta (default: 1)")
    train.add_argument("--kl-warmup", type=int, default=0, help="epochs of linear KL warm-up from 0 to beta (default: 0)")
    _add_training_options(train, epochs=10)

    ev = sub.add_parser("eval", help="evaluate a trained run", description="Test ELBO, importance-sampled NLL, reconstruction error and linear-probe accuracy of a run; printed as a table and written to DIR/eval.json.")
    ev.add_argument("run", help="run folder written by `pyrovae train`")
    ev.add_argument("--num-samples", type=int, default=1000, help="importance samples k per image for the NLL (default: 1000)")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    sample = sub.add_parser("sample", help="draw images from a trained VAE's prior", description="Decode samples from the prior of a trained VAE into a PNG grid.")
    sample.add_argument("run", help="run folder of a VAE")
    sample.add_argument("-n", type=int, default=64, help="number of images (default: 64)")
    sample.add_argument("-o", "--output", default="samples.png", help="PNG file to write (default: samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    interp = sub.add_parser("interpolate", help="interpolate between test images in latent space", description="Decode straight lines between the codes of pairs of test images into a PNG grid.")
    interp.add_argument("run", help="run folder written by `pyrovae train`")
    interp.add_argument("-o", "--output", default="interpolations.png", help="PNG file to write (default: interpolations.png)")
    interp.add_argument("--pairs", type=int, default=8, help="pairs of test images, one row each (default: 8)")
    interp.add_argument("--steps", type=int, default=10, help="images per row (default: 10)")
    interp.add_argument("--seed", type=int, default=0, help="seed for choosing the pairs (default: 0)")
    interp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")

    compare = sub.add_parser("compare", help="train and compare several models with the same networks and budget", description="Train each model with the same networks, data and epochs; write comparison.md, comparison.json and comparison.png to --out.")
    compare.add_argument("--models", default="vae,ae,sparse,stacked,denoising,pca", help="comma-separated: vae, ae, sparse, stacked, denoising, pca (default: all)")
    compare.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    compare.add_argument("--num-samples", type=int, default=1000, help="importance samples k for the VAE's NLL (default: 1000)")
    _add_data_options(compare)
    _add_model_options(compare)
    _add_training_options(compare, epochs=5)
    return parser


# --------------------------------------------------------------------------- helpers


def _data_options(args) -> dict:
    return {
        "name": args.dataset,
        "root": args.data_dir,
        "binarize": None if args.binarize == "none" else args.binarize,
        "val_size": args.val_size,
        "subset": args.subset,
        "seed": args.seed,
    }


def _load_data(options: dict, device):
    return load_dataset(device=device, **options)


def _network_config(args, image_shape):
    return NetworkConfig(input_shape=image_shape, latent_dim=args.latent_dim, hidden=args.hidden, conv=args.conv, activation=args.activation)


def _model_config(name: str, network, **vae_options):
    """The config of model ``name`` with ``network``; ``vae_options`` (prior, likelihood, beta) for the VAE."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    config_class = MODELS[name][1]
    return config_class(network=network, **(vae_options if name == "vae" else {}))


def _training_config(args, **extra):
    return TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=not args.no_progress, **extra)


def _write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def _data_options_of_run(folder: Path) -> dict:
    """How the run in ``folder`` loaded its data (kept in its config.json by ``pyrovae train``)."""
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        raise InputError(f"{folder} is not a run folder: it has no {CONFIG_FILE} (train one with `pyrovae train --out {folder}`)")
    try:
        return json.loads(config_file.read_text())["metadata"]["data"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{config_file} does not say how the run loaded its data: was it written by `pyrovae train`?") from None


def _load_run(run: str, device):
    """The model of a run folder and the data it was trained on."""
    folder = Path(run)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a run folder (train one with `pyrovae train --out {folder}`)")
    options = _data_options_of_run(folder)
    model, _ = load_model(folder)
    return model.to(device).eval(), _load_data(options, device)


def _figures(model, data, history, folder: Path) -> list[str]:
    written = []
    x = data.test
    plots.reconstructions(model, x, path=folder / "reconstructions.png")
    plots.interpolations(model, x, path=folder / "interpolations.png")
    plots.latent_scatter(model, x[:2000], data.test_labels[:2000], path=folder / "latent.png")
    written += ["reconstructions.png", "interpolations.png", "latent.png"]
    if hasattr(model, "sample"):
        plots.samples(model, path=folder / "samples.png")
        written.append("samples.png")
        if model.latent_dim == 2:
            plots.manifold(model, path=folder / "manifold.png")
            written.append("manifold.png")
    if history:
        plots.training_curves(history, path=folder / "training_curves.png")
        written.append("training_curves.png")
    return written


def _format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> None:
    device = resolve_device(args.device)
    folder = Path(args.out)
    if args.resume:
        data = _load_data(_data_options_of_run(folder), device)
        trainer = Trainer.resume(folder, device=device)
    else:
        if (folder / CHECKPOINT_FILE).exists():
            raise InputError(f"{folder} already holds a run: continue it with --resume, or choose another --out")
        options = _data_options(args)
        data = _load_data(options, device)
        network = _network_config(args, data.image_shape)
        config = _model_config(args.model, network, prior=args.prior, likelihood=args.likelihood, beta=args.beta)
        model = build_model(args.model, config).to(device)
        training = _training_config(args, elbo=args.elbo, num_particles=args.num_particles, kl_warmup_epochs=args.kl_warmup)
        trainer = Trainer(model, training, out_dir=folder, model_name=args.model, metadata={"data": options})

    start = time.perf_counter()
    history = trainer.fit(data.train, val=data.val, dynamic_binarization=data.dynamic_binarization)
    seconds = time.perf_counter() - start
    model = trainer.model.eval()
    results = evaluate(model, data, num_samples=0)
    results["training_seconds"] = round(seconds, 2)
    results["figures"] = _figures(model, data, history, folder)
    _write_json(folder / "summary.json", results)
    print(_format_table([results], [k for k in results if k != "figures"]))
    print(f"run written to {folder}")


def cmd_eval(args) -> None:
    device = resolve_device(args.device)
    if args.num_samples < 0:
        raise InputError(f"--num-samples must be non-negative, got {args.num_samples}")
    model, data = _load_run(args.run, device)
    results = evaluate(model, data, num_samples=args.num_samples)
    _write_json(Path(args.run) / "eval.json", results)
    print(_format_table([results], list(results)))
    print(json.dumps(results))


def cmd_sample(args) -> None:
    device = resolve_device(args.device)
    model, _ = _load_run(args.run, device)
    if not hasattr(model, "sample"):
        raise InputError(f"{args.run} holds a deterministic autoencoder, which has no prior to sample from; use a VAE run")
    torch.manual_seed(args.seed)
    plots.samples(model, n=args.n, path=args.output)
    print(f"wrote {args.output}")


def cmd_interpolate(args) -> None:
    device = resolve_device(args.device)
    model, data = _load_run(args.run, device)
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data.test), generator=generator)[: 2 * args.pairs]
    if len(index) < 2 * args.pairs:
        raise InputError(f"--pairs {args.pairs} needs {2 * args.pairs} test images, the run's test set has {len(data.test)}")
    plots.interpolations(model, data.test[index.to(data.test.device)], steps=args.steps, pairs=args.pairs, path=args.output)
    print(f"wrote {args.output}")


def cmd_compare(args) -> None:
    names = [n.strip() for n in args.models.split(",") if n.strip()]

    unknown = [n for n in names if n not in MODELS and n != "pca"]
    if unknown or not names:
        raise InputError(f"unknown model(s) {unknown}; choose from {sorted(MODELS) + ['pca']}")
    device = resolve_device(args.device)
    folder = Path(args.out)
    data = _load_data(_data_options(args), device)
    network = _network_config(args, data.image_shape)

    rows, trained = [], {}
    for name in names:
        start = time.perf_counter()
        if name == "pca":
            model = PCA(network.latent_dim).fit(data.train)
        else:
            model = build_model(name, _model_config(name, network)).to(device)
            Trainer(model, _training_config(args), out_dir=folder / name, model_name=name).fit(data.train, val=data.val, dynamic_binarization=data.dynamic_binarization)
            model.eval()
        seconds = time.perf_counter() - start
        row = {"model": name, **evaluate(model, data, num_samples=args.num_samples if name == "vae" else 0), "training_seconds": round(seconds, 2)}
        rows.append(row)
        trained[name] = model
        print(f"{name}: done in {seconds:.1f} s")

    columns = ["model"] + sorted({k for row in rows for k in row} - {"model", "training_seconds"}) + ["training_seconds"]
    table = _format_table(rows, columns)
    folder.mkdir(parents=True, exist_ok=True)
    header = f"# Comparison on {data.name}: {args.epochs} epochs, latent {network.latent_dim}, {'conv' if network.conv else 'MLP ' + str(list(network.hidden))}\n\n"
    (folder / "comparison.md").write_text(header + table + "\n")
    _write_json(folder / "comparison.json", rows)
    plots.comparison(trained, data.test, path=folder / "comparison.png")
    print(table)
    print(f"wrote {folder / 'comparison.md'} and {folder / 'comparison.png'}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "interpolate": cmd_interpolate, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, DatasetNotFoundError, CheckpointError, TrainingError) as error:
        print(f"pyrovae: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyrovae: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
