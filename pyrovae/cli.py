"""The ``pyrovae`` command: train, eval, sample, interpolate, compare.

Options shared by subcommands are defined once, in parent parsers (data, network, training,
device, ...), and every name an option takes (models, priors, likelihoods, ELBOs, activations,
datasets, optimizers) is offered from the library's registries, so ``--help`` lists them all.

Errors: argparse refuses a malformed option or an unknown name (usage and message, status 2).
Bad input found later (an :class:`~pyrovae.errors.InputError`, such as a broken checkpoint or an
option the model does not take; a dataset that is not there; a training loss that became NaN)
prints one line ``pyrovae: error: ...`` and exits with status 2; any other exception is a bug and
keeps its traceback. A training run interrupted by Ctrl-C or SIGTERM keeps its checkpoint and
exits with status 130.

Several processes (data parallel, :mod:`torch.distributed`): ``train`` and ``eval`` run under
torchrun, e.g. ``torchrun --nproc_per_node=2 -m pyrovae train --batch-size 256 ...``. With
``WORLD_SIZE > 1`` in the environment each process joins the process group (NCCL on GPUs, gloo on
CPUs) and ``--device auto`` takes the process's own GPU, ``cuda:LOCAL_RANK``; ``--batch-size`` is
the global batch, shared by the processes, so a run trains on the same batches whatever their
number. Rank 0 alone writes the run folder, the figures and the summary and prints the table; a
signal to any process stops them all with one checkpoint, and ``--resume`` continues it with any
number of processes (bit for bit with the same number). On CPUs, give each process its share of
the cores: torchrun sets ``OMP_NUM_THREADS=1`` unless it is set, so on 8 cores say
``OMP_NUM_THREADS=4 torchrun --nproc_per_node=2 -m pyrovae train ...``. The other commands run in
one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import plots
from .checkpoints import write_text_atomic
from .data import BINARIZATION, DATASETS, STORAGES, TEST_FRACTION, TEST_SPLIT_SEED, DatasetNotFoundError, load_dataset, load_images
from .devices import resolve_device
from .errors import InputError
from .evaluation import PCA, class_accuracy, evaluate
from .likelihoods import LIKELIHOODS
from .models import AAE, MODELS, SemiSupervisedVAE, build_model
from .models.semi_supervised import UNLABELLED, balanced_label_draw
from .models.vae import ELBOS
from .nets import ACTIVATIONS, NetworkConfig
from .posteriors import POSTERIORS
from .priors import PRIORS
from .training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LR_SCHEDULES,
    OPTIMIZERS,
    Trainer,
    TrainingConfig,
    TrainingError,
    distributed,
    load_model,
)

__all__ = ["main", "build_parser"]

#: train's options for fields of a model's own config: flag -> field (only the models with the field take it)
MODEL_OPTIONS = {
    "--prior": "prior",
    "--likelihood": "likelihood",
    "--beta": "beta",
    "--elbo": "elbo",
    "--num-particles": "num_particles",
    "--kl-warmup": "kl_warmup_epochs",
    "--free-bits": "free_bits",
    "--posterior": "posterior",
    "--flow-layers": "flow_layers",
    "--num-pseudo-inputs": "num_pseudo_inputs",
    "--top-latent-dim": "top_latent_dim",
    "--top-hidden": "top_hidden",
    "--reconstruction-lr": "reconstruction_lr",
    "--discriminator-lr": "discriminator_lr",
    "--generator-lr": "generator_lr",
    "--alpha": "alpha",
    "--num-components": "num_components",
    "--pretrain-epochs": "pretrain_epochs",
}
#: the file of a run folder that lists the image files left out by --skip-unreadable
SKIPPED_FILE = "skipped_images.txt"
#: what `pyrovae compare` can train: the models, and PCA as a linear baseline
COMPARABLE = (*sorted(MODELS), "pca")
COMPARE_DEFAULT = "vae,cvae,ae,sparse,stacked,denoising,aae,pca"


# --------------------------------------------------------------------------- option types


def _int_list(text: str) -> tuple[int, ...]:
    """``"512,256"`` -> ``(512, 256)``: positive layer widths."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 512,256, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive widths such as 512,256, got {text!r}")
    return values


def _model_list(text: str) -> list[str]:
    """``"vae,ae,pca"`` -> ``["vae", "ae", "pca"]``: names from :data:`COMPARABLE`, each once."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in COMPARABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {', '.join(COMPARABLE)}")
    return names


def _dataset_name(text: str) -> str:
    """A dataset name as :func:`pyrovae.data.load_dataset` reads it: ``Fashion-MNIST`` is ``fashion_mnist``."""
    return text.lower().replace("-", "_")


def _or_none(names) -> list[str]:
    """The choices of an option whose ``None`` is spelled ``none``: ``"none"``, then the sorted names."""
    return ["none", *sorted(n for n in names if n is not None)]


def _none(value: str):
    """``None`` for ``"none"``, else ``value``."""
    return None if value == "none" else value


# --------------------------------------------------------------------------- parser


def _new_parent(title: str) -> tuple:
    """A parent parser (no ``-h``) and its argument group ``title``, which ``--help`` shows as a section."""
    parent = argparse.ArgumentParser(add_help=False)
    return parent, parent.add_argument_group(title)


def _image_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels, got {text!r}")
    return value


def _data_parent() -> argparse.ArgumentParser:
    parent, group = _new_parent("data (one of three sources: --dataset NAME, --data FOLDER, or --data ARRAY_FILE)")
    group.add_argument("--dataset", type=_dataset_name, choices=sorted(DATASETS), default=None, help="a dataset by name, read with torchvision (celeba: from its files in DATA_DIR/celeba, centre-cropped; default: mnist)")
    group.add_argument("--data", metavar="PATH", default=None, help="your own images instead of --dataset: a folder of images (class subfolders give labels, as torchvision's ImageFolder; a flat folder none) or an array file (.npy; .npz with x and optional y; .pt), uint8 0-255 or float in [0, 1], (N, H, W), (N, H, W, C) or (N, C, H, W)")
    group.add_argument("--test-data", metavar="PATH", default=None, help="the test images for --data (the same kinds; the same class folders); default: hold out --test-fraction of --data")
    group.add_argument("--test-fraction", type=float, default=None, help=f"share of --data held out for testing without --test-data, drawn with the fixed seed {TEST_SPLIT_SEED} (default: {TEST_FRACTION})")
    group.add_argument("--image-size", type=_image_size, default=None, help="resize every image: the shorter side to S pixels, then the centre S x S crop (needed when the images differ in size; celeba: default 64)")
    group.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert the images to 1 (grey) or 3 (colour) channels (default: 3 if any image has colour, else 1)")
    group.add_argument("--skip-unreadable", action="store_true", help="leave out image files that cannot be read, listed in RUN/skipped_images.txt (default: stop at the first, naming it)")
    group.add_argument("--cache-dir", default=None, help="folder of the prepared images (decoded and resized once, as uint8) (default: $PYROVAE_CACHE or DATA_DIR/cache)")
    group.add_argument("--storage", choices=STORAGES, default="auto", help="where the uint8 images live: on the training device, in host memory, or read batch by batch from a memory map of the prepared file (default: auto, the first that fits)")
    group.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $PYROVAE_DATA or ./data)")
    group.add_argument("--binarize", choices=_or_none(BINARIZATION), default="none", help="pixel binarization (default: none, grey levels in [0, 1])")
    group.add_argument("--val-size", type=int, default=0, help="training images held out for validation, which --patience needs for early stopping (default: 0)")
    group.add_argument("--subset", type=int, default=None, help="use at most this many images of each split (quick runs)")
    return parent


def _network_parent() -> argparse.ArgumentParser:
    parent, group = _new_parent("network")
    group.add_argument("--hidden", type=_int_list, default=(400,), help="MLP hidden widths from the image side, e.g. 512,256 (default: 400)")
    group.add_argument("--latent-dim", type=int, default=None, help=f"size of the code z (default: {_latent_defaults()})")
    group.add_argument("--conv", action="store_true", help="convolutional encoder and decoder instead of the MLP, for images whose sides are multiples of 4")
    group.add_argument("--conv-depth", type=int, default=None, help="stride-2 layers of the conv networks (default: from the image size, 2 for 28x28 and 32x32, 3 for 64x64)")
    group.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu", help="hidden activation (default: %(default)s)")
    group.add_argument("--dropout", type=float, default=0.0, help="probability of dropping each hidden unit in training; off for evaluation, sampling and figures (default: %(default)s)")
    return parent


def _training_parent(epochs: int, resume: bool = False) -> argparse.ArgumentParser:
    """The training options, ``--epochs`` defaulting to ``epochs``; its help speaks of ``--resume`` where the command has it."""
    parent, group = _new_parent("training")
    extend = "; with --resume, more epochs than the run's extend it (see --resume)" if resume else ""
    group.add_argument("--epochs", type=int, default=epochs, help=f"training epochs{extend} (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=256, help="minibatch size (default: %(default)s)")
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate of every optimizer (the aae's three phases too, unless --reconstruction-lr, --discriminator-lr or --generator-lr sets a phase's own) (default: %(default)s)")
    group.add_argument("--optimizer", type=str.lower, choices=sorted(OPTIMIZERS), default="adam", help="torch.optim optimizer (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="the optimizer's weight decay (default: %(default)s)")
    group.add_argument("--lr-schedule", choices=_or_none(LR_SCHEDULES), default="none", help="cosine decay to 0, halving every --lr-step-epochs (step), or the IWAE paper's stages (default: none)")
    group.add_argument("--lr-step-epochs", type=int, default=10, help="epochs between halvings of the step schedule (default: %(default)s)")
    group.add_argument("--grad-clip", type=float, default=None, help="largest gradient norm of each step (default: no clipping)")
    group.add_argument("--patience", type=int, default=None, help="stop early after this many epochs without a better validation loss; needs --val-size (default: never)")
    group.add_argument("--eval-every", type=int, default=1, help="epochs between validation and test-monitor scores (default: %(default)s)")
    group.add_argument("--eval-images", type=int, default=1000, help="test images whose loss the history records every --eval-every epochs, to watch over- or under-fitting; 0 for none (default: %(default)s)")
    group.add_argument("--skip-nonfinite", action="store_true", help="skip steps whose loss is NaN or infinite instead of stopping with an error")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parent


def _model_options_group(parser: argparse.ArgumentParser) -> None:
    """train's options for a model's own config; each is left out of ``args`` unless given (see :func:`_model_config`)."""
    group = parser.add_argument_group("model (each option applies to the models whose config has it)")
    group.add_argument("--prior", choices=sorted(PRIORS), default=argparse.SUPPRESS, help=_model_help("prior p(z)", "prior"))
    group.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default=argparse.SUPPRESS, help=_model_help("likelihood p(x|z)", "likelihood"))
    group.add_argument("--beta", type=float, default=argparse.SUPPRESS, help=_model_help("KL weight beta", "beta"))
    group.add_argument("--elbo", choices=sorted(ELBOS), default=argparse.SUPPRESS, help=_model_help("objective: Trace_ELBO, TraceMeanField_ELBO (not for vae2, whose guide is not mean-field) or the IWAE bound (RenyiELBO, alpha=0)", "elbo"))
    group.add_argument("--num-particles", type=int, default=argparse.SUPPRESS, help=_model_help("samples of z per image in the objective (k of the IWAE bound)", "num_particles"))
    group.add_argument("--kl-warmup", dest="kl_warmup_epochs", metavar="EPOCHS", type=int, default=argparse.SUPPRESS, help=_model_help("epochs of linear KL warm-up from 0 to beta", "kl_warmup_epochs"))
    group.add_argument("--free-bits", type=float, default=argparse.SUPPRESS, help=_model_help("nats per latent site below which training does not push its KL lower (Kingma et al. 2016)", "free_bits"))
    group.add_argument("--posterior", choices=sorted(POSTERIORS), default=argparse.SUPPRESS, help=_model_help("q(z|x): diagonal Gaussian, or that Gaussian through inverse autoregressive or planar flows", "posterior"))
    group.add_argument("--flow-layers", type=int, default=argparse.SUPPRESS, help=_model_help("steps of a flow posterior", "flow_layers"))
    group.add_argument("--num-pseudo-inputs", type=int, default=argparse.SUPPRESS, help=_model_help("pseudo-inputs K of the VampPrior (--prior vamp)", "num_pseudo_inputs"))
    group.add_argument("--top-latent-dim", type=int, default=argparse.SUPPRESS, help=_model_help("size of z2, the top latent layer", "top_latent_dim"))
    group.add_argument("--top-hidden", type=_int_list, default=argparse.SUPPRESS, help=_model_help("hidden widths between z1 and z2", "top_hidden"))
    for phase in ("reconstruction", "discriminator", "generator"):
        group.add_argument(f"--{phase}-lr", type=float, default=argparse.SUPPRESS, help=_model_help(f"learning rate of the {phase} phase", f"{phase}_lr"))
    group.add_argument("--alpha", type=float, default=argparse.SUPPRESS, help=_model_help("weight of the classification loss alpha * N * E[-log q(y|x)] on labelled images", "alpha"))
    group.add_argument("--num-components", type=int, default=argparse.SUPPRESS, help=_model_help("components K of the mixture prior, the clusters", "num_components"))
    group.add_argument("--pretrain-epochs", type=int, default=argparse.SUPPRESS, help=_model_help(
        "epochs of pretraining: stacked, greedy per layer; gmvae, an autoencoder whose codes k-means places the components on", "pretrain_epochs"))


def _model_help(text: str, field: str) -> str:
    """``text``, the models whose config has ``field``, and its default there."""
    defaults = {name: _fields(config_class)[field].default for name, (_, config_class) in MODELS.items() if field in _fields(config_class)}
    if len(set(map(repr, defaults.values()))) > 1:
        return f"{text} (default: {', '.join(f'{name} {default}' for name, default in defaults.items())})"
    default = next(iter(defaults.values()))
    return f"{text} ({', '.join(defaults)}; default: {'--lr' if default is None and field.endswith('_lr') else default})"


def _default_latent_dim(name: str | None) -> int:
    """The code size of model ``name``'s default network (``NetworkConfig``'s for none)."""
    network = _fields(MODELS[name][1])["network"] if name in MODELS else None
    return (network.default_factory() if network is not None else NetworkConfig()).latent_dim


def _latent_defaults() -> str:
    """'50; cvae 2, vae2 100': the default code sizes of the models (the vae2's is z1's)."""
    usual = NetworkConfig().latent_dim
    others = [f"{name} {_default_latent_dim(name)}" for name in sorted(MODELS) if _default_latent_dim(name) != usual]
    return "; ".join([str(usual), ", ".join(others)] if others else [str(usual)])


def _fields(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class)}


def _single_option_parent(*flags: str, **options) -> argparse.ArgumentParser:
    """A parent parser holding one option."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **options)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``pyrovae`` parser: one subcommand per entry of :data:`COMMANDS`."""
    return _build_parser()[0]


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``pyrovae`` parser and the parser of each subcommand, by name."""
    parser = argparse.ArgumentParser(prog="pyrovae", description="Train, evaluate and compare VAEs (Pyro) and autoencoder baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    data, network = _data_parent(), _network_parent()
    device = _single_option_parent("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    seed = _single_option_parent("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    run = _single_option_parent("run", help="run folder written by `pyrovae train`")
    labels = _single_option_parent("--labels", type=int, default=None, help="m2 (semi-supervised): keep N training labels, N/K of each class drawn with --seed, and treat the other images as unlabelled (the draw is recorded in the run)")
    num_samples = _single_option_parent("--num-samples", type=int, default=1000, help="importance samples k per image for a VAE's NLL (default: %(default)s)")

    train = sub.add_parser("train", parents=[data, network, _training_parent(epochs=10, resume=True), seed, labels, device], help="train a model and write a run folder", description="Train a model; write its config, checkpoint, metrics, figures and a summary to --out. With no options: the VAE on MNIST.")
    train.add_argument("--model", choices=sorted(MODELS), default="vae", help="model to train (default: %(default)s)")
    train.add_argument("--out", default="runs/vae", help="run folder (default: %(default)s)")
    train.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last checkpoint, with the options it was trained with. --epochs N, more than "
             "the run's, extends it, finished or not, as a run of N epochs would have gone on (refused for a run with a cosine or "
             "iwae --lr-schedule, which is fitted to the total epochs, and for one that stopped early); --device, --data-dir and "
             "--no-progress apply; any other option must match the saved run, or it is refused",
    )
    _model_options_group(train)

    sub.add_parser("eval", parents=[run, num_samples, device], help="evaluate a trained run", description="Test ELBO, importance-sampled NLL, reconstruction error and linear-probe accuracy of a run; printed as a table and written to RUN/eval.json.")

    sample = sub.add_parser("sample", parents=[run, seed, device], help="draw images from a trained VAE's prior", description="Decode samples from the prior of a trained VAE into a PNG grid; of a cvae or m2 run, one row per class; of a gmvae run, one row per mixture component.")
    sample.add_argument("-n", type=int, default=None, help="number of images (default: 64); of a cvae, m2 or gmvae run, images per row (default: 10)")
    sample.add_argument("-o", "--output", default="samples.png", help="PNG file to write (default: %(default)s)")

    interp = sub.add_parser("interpolate", parents=[run, seed, device], help="interpolate between test images in latent space", description="Decode straight lines between the codes of pairs of test images into a PNG grid.")
    interp.add_argument("-o", "--output", default="interpolations.png", help="PNG file to write (default: %(default)s)")
    interp.add_argument("--pairs", type=int, default=8, help="pairs of test images, one row each (default: %(default)s)")
    interp.add_argument("--steps", type=int, default=10, help="images per row (default: %(default)s)")

    compare = sub.add_parser("compare", parents=[data, network, _training_parent(epochs=5), seed, labels, num_samples, device], help="train and compare several models with the same networks and budget", description="Train each model with the same networks, data and epochs into OUT/MODEL (a run folder, like `pyrovae train`'s); write comparison.md, comparison.json and comparison.png to --out.")
    compare.add_argument("--models", type=_model_list, default=COMPARE_DEFAULT, help=f"comma-separated, from {', '.join(COMPARABLE)} (default: %(default)s)")
    compare.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    return parser, dict(sub.choices)


def _given_options(argv: list[str]) -> set[str]:
    """The options (by ``dest``) that the command line ``argv`` sets, rather than leaving at their defaults."""
    parser, commands = _build_parser()
    args = parser.parse_args(argv)
    unset = object()
    commands[args.command].set_defaults(**dict.fromkeys(vars(args), unset))
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not unset and dest != "command"}


# --------------------------------------------------------------------------- helpers


def _data_options(args) -> dict:
    """The options of :func:`pyrovae.data.load_dataset` (``"name"``) or :func:`pyrovae.data.load_images`
    (``"source"``, with ``"test"`` or the held-out ``"test_fraction"`` and its seed); a run folder keeps them
    to load its data again."""
    if args.data is not None and args.dataset is not None:
        raise InputError(f"--data {args.data} and --dataset {args.dataset} name two sources: give one")
    if args.data is None and (args.test_data is not None or args.test_fraction is not None or args.skip_unreadable):
        given = [flag for flag, value in (("--test-data", args.test_data), ("--test-fraction", args.test_fraction), ("--skip-unreadable", args.skip_unreadable)) if value]
        raise InputError(f"{' and '.join(given)} apply to your own images (--data PATH); a named --dataset has its own test split")
    if args.test_data is not None and args.test_fraction is not None:
        raise InputError("--test-data gives the test images; --test-fraction holds some out of --data instead: give one")
    common = {
        "binarize": _none(args.binarize),
        "val_size": args.val_size,
        "subset": args.subset,
        "seed": args.seed,
        "image_size": args.image_size,
        "channels": args.channels,
        "storage": args.storage,
        "cache_dir": str(Path(args.cache_dir).resolve()) if args.cache_dir is not None else str(Path(args.data_dir).resolve() / "cache") if args.data_dir is not None else None,
    }
    if args.data is None:
        return {"name": args.dataset or "mnist", "root": args.data_dir, **common}
    test = {"test": str(Path(args.test_data).resolve())} if args.test_data is not None else {
        "test_fraction": args.test_fraction if args.test_fraction is not None else TEST_FRACTION, "test_split_seed": TEST_SPLIT_SEED}
    return {"source": str(Path(args.data).resolve()), **test, "skip_unreadable": args.skip_unreadable, **common}


def _load_data(options: dict, device, progress: bool = True):
    """The data of ``options`` (from :func:`_data_options`, or a run folder's config)."""
    options = dict(options)
    if "source" in options:
        if options.pop("test_split_seed", TEST_SPLIT_SEED) != TEST_SPLIT_SEED:
            raise InputError(f"the run held out its test images with another seed than this pyrovae's ({TEST_SPLIT_SEED})")
        return load_images(options.pop("source"), options.pop("test", None), device=device, progress=progress, **options)
    return load_dataset(device=device, progress=progress, **options)


def _network_config(args, image_shape, model: str | None = None) -> NetworkConfig:
    """The network of the options; without ``--latent-dim``, the code size of ``model``'s default config
    (``NetworkConfig``'s for none: `compare` gives every model the same network)."""
    latent_dim = args.latent_dim if args.latent_dim is not None else _default_latent_dim(model)
    return NetworkConfig(
        input_shape=image_shape, latent_dim=latent_dim, hidden=args.hidden, conv=args.conv, activation=args.activation, dropout=args.dropout,
        conv_depth=args.conv_depth,
    )


def _num_classes(data) -> int:
    """The classes of ``data``'s labels: one per class name (a folder's subfolders, torchvision's ``classes``), else
    up to the largest label."""
    if data.class_names is not None:
        return len(data.class_names)
    return int(data.train_labels.max()) + 1


def _model_config(name: str, network: NetworkConfig, options: dict, data):
    """The config of model ``name`` with ``network`` and ``options`` (fields of it); an option it lacks is an error.
    A model of classes (cvae, m2) has as many as ``data``'s labels."""
    config_class = MODELS[name][1]
    unused = [flag for flag, field in MODEL_OPTIONS.items() if field in options and field not in _fields(config_class)]
    if unused:
        raise InputError(f"--model {name} takes no {' or '.join(unused)}")
    if "num_classes" in _fields(config_class) and data.train_labels is not None:
        options = {**options, "num_classes": _num_classes(data)}
    return config_class(network=network, **options)


def _training_config(args) -> TrainingConfig:
    if args.eval_images < 0:
        raise InputError(f"--eval-images must be 0 or more, got {args.eval_images}")
    if args.patience is not None and args.val_size <= 0:
        raise InputError("--patience stops early on the validation loss: hold out validation images with --val-size N (N > 0)")
    return TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        lr_schedule=_none(args.lr_schedule),
        lr_step_epochs=args.lr_step_epochs,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        early_stopping_patience=args.patience,
        skip_nonfinite=args.skip_nonfinite,
        seed=args.seed,
        progress=not args.no_progress,
    )


#: train's options that a resumed run takes from the command line (--epochs only to extend it): where the run is,
#: where it runs, where its data is, and whether a progress bar shows
RESUME_OPTIONS = ("out", "resume", "epochs", "device", "data_dir", "no_progress")


def _saved_options(saved: dict) -> dict:
    """The value of each option of ``pyrovae train`` (by ``dest``, as ``args`` holds it) that made the run whose
    config.json is ``saved``; a model option only where the model's config has its field."""
    model, training, metadata = saved["model_config"], saved["training_config"], saved["metadata"]
    network, data = model["network"], metadata["data"]
    options = {
        "model": saved["model_name"],
        "dataset": data.get("name"), "binarize": data["binarize"] or "none", "val_size": data["val_size"], "subset": data["subset"],
        "data": data.get("source"), "test_data": data.get("test"), "test_fraction": data.get("test_fraction"),
        "image_size": data.get("image_size"), "channels": data.get("channels"), "skip_unreadable": data.get("skip_unreadable", False),
        "cache_dir": data.get("cache_dir"), "storage": data.get("storage", "auto"),
        "hidden": tuple(network["hidden"]), "latent_dim": network["latent_dim"], "conv": network["conv"], "conv_depth": network.get("conv_depth"),
        "activation": network["activation"], "dropout": network["dropout"],
        "batch_size": training["batch_size"], "lr": training["lr"], "optimizer": training["optimizer"],
        "weight_decay": training["weight_decay"], "lr_schedule": training["lr_schedule"] or "none",
        "lr_step_epochs": training["lr_step_epochs"], "grad_clip": training["grad_clip"],
        "patience": training["early_stopping_patience"], "eval_every": training["eval_every"],
        "eval_images": metadata.get("eval_images", 0), "skip_nonfinite": training["skip_nonfinite"], "seed": training["seed"],
        "labels": metadata["labels"]["count"] if "labels" in metadata else None,  # m2's kept labels
    }
    for field in MODEL_OPTIONS.values():
        if field in model:
            options[field] = tuple(model[field]) if isinstance(model[field], list) else model[field]
    return options


def _flag(dest: str) -> str:
    """The option of ``pyrovae train`` whose ``dest`` is ``dest``: ``"kl_warmup_epochs"`` -> ``"--kl-warmup"``."""
    return {field: flag for flag, field in MODEL_OPTIONS.items()}.get(dest, "--" + dest.replace("_", "-"))


def _shown(value) -> str:
    """An option's value as it is written on the command line."""
    if value is None:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _check_resume_options(args, folder: Path) -> None:
    """Raise :class:`InputError` naming every option given with ``--resume`` that contradicts the run in ``folder``."""
    saved = _saved_options(json.loads((folder / CONFIG_FILE).read_text()))
    wrong = []
    for dest in sorted(args.given - set(RESUME_OPTIONS)):
        value = getattr(args, dest)
        if dest in ("data", "test_data", "cache_dir") and value is not None:  # the run keeps absolute paths
            value = str(Path(value).resolve())
        if dest not in saved:
            wrong.append(f"{_flag(dest)} {_shown(value)} (the run has no {_flag(dest)})")
        elif value != saved[dest]:
            wrong.append(f"{_flag(dest)} {_shown(value)} (the run's: {_shown(saved[dest])})")
    if wrong:
        raise InputError(
            f"{folder} goes on with the options it was trained with: {'; '.join(wrong)} would change it. With --resume only "
            "--epochs (to extend the run), --device, --data-dir and --no-progress apply; train a new run in another --out to change more"
        )


def _write_json(path: Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def _run_metadata(folder: Path) -> dict:
    """What ``pyrovae train`` or ``compare`` kept in the run's config.json: ``"data"`` (the options
    of :func:`pyrovae.data.load_dataset`) and ``"eval_images"`` (the test images it monitors)."""
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        raise InputError(f"{folder} is not a run folder: it has no {CONFIG_FILE} (train one with `pyrovae train --out {folder}`)")
    try:
        metadata = json.loads(config_file.read_text())["metadata"]
        metadata["data"]["name" if "name" in metadata["data"] else "source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{config_file} does not say how the run loaded its data: was it written by `pyrovae train`?") from None
    return metadata


def _load_run(run: str, device):
    """The model of a run folder and the data it was trained on."""
    folder = Path(run)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a run folder (train one with `pyrovae train --out {folder}`)")
    options = _run_metadata(folder)["data"]
    model, _ = load_model(folder)
    return model.to(device).eval(), _load_data(options, device)


def _check_labelled(names, data) -> None:
    """Refuse models that need labels (a conditional model) for unlabelled images, before anything is trained."""
    conditional = [name for name in names if name in MODELS and MODELS[name][0].conditional]
    if conditional and not data.labelled:
        raise InputError(f"--model {' and '.join(conditional)} models images given their labels, and {data.name} has none: "
                         "give class subfolders (or y in the .npz), or another model")


def _label_draw(name: str, num_labels: int | None, data, seed: int) -> dict | None:
    """The labels a semi-supervised model (m2) keeps, as the run records them: ``{"count", "seed", "indices"}``
    (indices into the training split; see :func:`balanced_label_draw`); ``None`` for another model.
    Raises :class:`InputError` for ``--labels`` with a model that takes none, or m2 without it."""
    if MODELS[name][0] is not SemiSupervisedVAE:
        if num_labels is not None:
            raise InputError(f"--labels is for the semi-supervised model (m2); --model {name} takes no labels")
        return None
    if num_labels is None:
        raise InputError("m2 learns from labelled and unlabelled images: say how many training labels to keep with --labels N")
    if data.train_labels is None:
        raise InputError(f"{data.name} has no labels to keep")
    indices = balanced_label_draw(data.train_labels, num_labels, _num_classes(data), seed)
    return {"count": num_labels, "seed": seed, "indices": indices.tolist()}


def _fit_labels(model, data, test_images: int = 0, draw: dict | None = None) -> dict:
    """The labels that ``Trainer.fit`` takes for a conditional model: of the training and validation images
    and of the first ``test_images`` test images (the monitor); for m2, the training labels of ``draw``
    (:func:`_label_draw`), ``-1`` for the other images; none for another model."""
    if draw is not None:
        labels = torch.full_like(data.train_labels, UNLABELLED)
        kept = torch.tensor(draw["indices"], dtype=torch.int64, device=labels.device)
        labels[kept] = data.train_labels[kept]
        return {"train_labels": labels}
    if not model.conditional:
        return {}
    return {
        "train_labels": data.train_labels,
        "val_labels": data.val_labels,
        "test_labels": data.test_labels[:test_images] if test_images else None,
    }


#: the history's columns of :func:`_class_scores`, drawn beside the losses in training_curves.png
SCORE_COLUMNS = ("test_accuracy", "test_cluster_accuracy")


def _class_scores(model, monitor, labels) -> dict:
    """The scores ``Trainer.fit`` takes for a model with a discrete latent trained beside labelled ``monitor`` test
    images: at each evaluation, M2's accuracy on them (``test_accuracy``) or the mixture VAE's clustering accuracy
    (``test_cluster_accuracy``), in [0, 1]; none for another model, or without monitor images or labels."""
    if not len(monitor) or labels is None or not callable(getattr(model, "classify", None)):
        return {}
    name = "accuracy" if getattr(model, "classes_are_labels", False) else "cluster_accuracy"
    labels = labels[: len(monitor)]
    return {f"test_{name}": lambda trained: class_accuracy(trained, monitor, labels)[name]}


def _figures(model, data, history, folder: Path) -> list[str]:
    """Write the run's figures into ``folder``; their file names."""
    written = []
    x = data.test[:2000]  # floats on the device
    labels = data.test_labels
    plots.reconstructions(model, x, path=folder / "reconstructions.png", labels=data.test_labels)
    written.append("reconstructions.png")
    decodes_codes_alone = not model.conditional and not isinstance(model, SemiSupervisedVAE)
    if decodes_codes_alone:  # a conditional model's (and m2's) codes decode given a label: no line between images of two classes
        plots.interpolations(model, x, path=folder / "interpolations.png")
        written.append("interpolations.png")
    if callable(getattr(model, "classify", None)) and labels is not None:  # m2's classes, the mixture VAE's clusters, against the labels
        from .evaluation import confusion_matrix, predict_classes

        predicted = predict_classes(model, x).cpu()
        shown = labels[: len(x)].cpu()  # the labels of the images x holds
        counts = confusion_matrix(predicted, shown, max(model.k, int(shown.max()) + 1))
        clusters = not getattr(model, "classes_are_labels", False)
        plots.confusion(counts, path=folder / "confusion.png", title=f"{type(model).__name__}: test {'clusters' if clusters else 'classes'} against labels",
                        xlabel="cluster" if clusters else "predicted class")
        written.append("confusion.png")
    if isinstance(model, SemiSupervisedVAE):
        plots.analogies(model, x, path=folder / "analogies.png")
        written.append("analogies.png")
    # the AAE's codes over its prior's samples (projected on the prior's axes); the others' codes on their own
    # principal axes, which show their structure (an isotropic prior's axes are arbitrary)
    with torch.no_grad():
        prior_samples = model.prior().sample((2000,)) if isinstance(model, AAE) else None
    class_names = getattr(data, "class_names", None)  # an image folder's sub-folders, torchvision's classes
    if labels is not None:  # the codes coloured by class
        plots.latent_scatter(model, x, labels[:2000], path=folder / "latent.png", prior_samples=prior_samples, class_names=class_names)
        written.append("latent.png")
    rows = plots.sample_rows(model)
    if rows is not None:  # a row per class (or per mixture component)
        plots.class_samples(model, path=folder / "samples.png", class_names=class_names if rows[1] == "class" else None)
        written.append("samples.png")
    elif hasattr(model, "sample"):
        plots.samples(model, path=folder / "samples.png")
        written.append("samples.png")
        if model.latent_dim == 2 and decodes_codes_alone:
            plots.manifold(model, path=folder / "manifold.png")
            written.append("manifold.png")
    if history:
        scored = [name for name in SCORE_COLUMNS if any(row.get(name) is not None for row in history)]
        plots.training_curves(history, path=folder / "training_curves.png", scores=scored)
        written.append("training_curves.png")
    return written


#: decimals of each figure in a printed table: nats (ELBO, NLL, BCE) and the squared error per image to
#: hundredths, bits/dim and accuracy to thousandths (the JSON files keep full precision)
DECIMALS = {"elbo": 2, "nll": 2, "bce": 2, "mse": 2, "bits_per_dim": 3, "probe_accuracy": 3, "prior_mmd": 4, "training_seconds": 2}


def _format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows``; floats to fixed :data:`DECIMALS` (4 for another figure), ``-`` for missing values."""
    def cell(column, value):
        if value is None:
            return "-"
        return f"{value:.{DECIMALS.get(column, 4)}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _table_columns(results: dict, *leave_out: str) -> list[str]:
    """The keys of ``results`` with one value each (not ``leave_out``, not the per-class dict): a table's columns."""
    return [k for k, v in results.items() if k not in leave_out and not isinstance(v, dict)]


def _per_class_line(results: dict) -> str:
    """The linear probe's accuracy on each class, by name, on one line."""
    per_class = results["probe_accuracy_per_class"]
    return "probe accuracy per class: " + ", ".join(f"{name} {value:.3f}" for name, value in per_class.items())  # as the table's accuracies


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> None:
    """Train a new run into ``--out`` (never over one), or continue it with ``--resume``; evaluate and plot it."""
    device = resolve_device(args.device)
    distributed.init_from_env(device)  # under torchrun: join the other processes (main ends the group)
    folder = Path(args.out)
    if args.resume:
        metadata = _run_metadata(folder)
        _check_resume_options(args, folder)
        trainer = Trainer.resume(
            folder, device=device, epochs=args.epochs if "epochs" in args.given else None, progress=False if args.no_progress else None
        )
        moved = "data_dir" in args.given and "name" in metadata["data"]  # a named dataset's folder (your own images keep their paths)
        data = _load_data({**metadata["data"], **({"root": args.data_dir} if moved else {})}, device)
        draw = metadata.get("labels")
    else:
        if distributed.any_rank((folder / CHECKPOINT_FILE).exists()):  # every rank decides before rank 0 writes
            raise InputError(f"{folder} already holds a run: continue it with --resume, or choose another --out")
        training = _training_config(args)
        options = _data_options(args)
        data = _load_data(options, device, progress=not args.no_progress)
        _check_labelled([args.model], data)
        model_options = {field: getattr(args, field) for field in MODEL_OPTIONS.values() if hasattr(args, field)}
        config = _model_config(args.model, _network_config(args, data.image_shape, args.model), model_options, data)
        draw = _label_draw(args.model, args.labels, data, args.seed)
        torch.manual_seed(args.seed)  # the initial weights follow --seed too
        model = build_model(args.model, config).to(device)
        metadata = {"data": options, "eval_images": args.eval_images}
        if draw is not None:
            metadata["labels"] = draw
        trainer = Trainer(model, training, out_dir=folder, model_name=args.model, metadata=metadata)

    start = time.perf_counter()
    monitor = data.test[: metadata.get("eval_images", 0)]
    try:
        history = trainer.fit(
            data.train, val=data.val, dynamic_binarization=data.dynamic_binarization, test=monitor if len(monitor) else None,
            **_fit_labels(trainer.model, data, len(monitor), draw), scores=_class_scores(trainer.model, monitor, data.test_labels),
        )
    except KeyboardInterrupt as interrupt:
        raise KeyboardInterrupt(f"{interrupt}; from the command line: pyrovae train --out {folder} --resume") from None
    seconds = time.perf_counter() - start
    model = trainer.model.eval()
    results = evaluate(model, data, num_samples=0)  # on every rank: the test ELBO is shared between them
    if not distributed.is_main():
        return
    results["training_seconds"] = round(seconds, 2)
    results["figures"] = _figures(model, data, history, folder)
    if data.skipped:
        write_text_atomic(folder / SKIPPED_FILE, "".join(f"{path}\n" for path in data.skipped))
        results["skipped_images"] = len(data.skipped)
    _write_json(folder / "summary.json", results)
    if "probe_accuracy_per_class" in results:  # labelled images
        print(_per_class_line(results))
    print(_format_table([results], _table_columns(results, "figures")))
    print(f"run written to {folder}")


def cmd_eval(args) -> None:
    """Evaluate a run; print the results and write them to RUN/eval.json."""
    device = resolve_device(args.device)
    if args.num_samples < 0:
        raise InputError(f"--num-samples must be non-negative, got {args.num_samples}")
    distributed.init_from_env(device)  # under torchrun the processes share the test set's ELBO and NLL
    model, data = _load_run(args.run, device)
    results = evaluate(model, data, num_samples=args.num_samples)
    if not distributed.is_main():
        return
    results["test_images"] = len(data.test)
    results["protocol"] = data.protocol
    if "nll" in results:
        results["nll_samples"] = args.num_samples
    _write_json(Path(args.run) / "eval.json", results)
    print(f"test set: {len(data.test)} images of {data.name}, {data.protocol}"
          + (f"; NLL by importance sampling with k={args.num_samples}" if "nll" in results else "")
          + ("; ELBO and NLL of log p(x|y), given each test image's label" if model.conditional else ""))
    if "probe_accuracy_per_class" in results:  # labelled images
        print(_per_class_line(results))
    print(_format_table([results], _table_columns(results, "protocol")))


def cmd_sample(args) -> None:
    """Decode draws from a VAE run's prior into a PNG grid."""
    device = resolve_device(args.device)
    model, _ = _load_run(args.run, device)
    if not hasattr(model, "sample"):
        raise InputError(f"{args.run} holds a deterministic autoencoder, which has no prior to sample from; use a VAE run")
    torch.manual_seed(args.seed)
    if plots.sample_rows(model) is not None:  # a row per class (or per mixture component)
        plots.class_samples(model, n=args.n if args.n is not None else 10, path=args.output)
    else:
        plots.samples(model, n=args.n if args.n is not None else 64, path=args.output)
    print(f"wrote {args.output}")


def cmd_interpolate(args) -> None:
    """Decode latent interpolations between random pairs of test images into a PNG grid."""
    device = resolve_device(args.device)
    model, data = _load_run(args.run, device)
    if model.conditional or isinstance(model, SemiSupervisedVAE):
        raise InputError(f"{args.run} holds a {'conditional' if model.conditional else 'semi-supervised'} model, whose codes decode given a label: it draws no interpolations between test images")
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data.test), generator=generator)[: 2 * args.pairs]
    if len(index) < 2 * args.pairs:
        raise InputError(f"--pairs {args.pairs} needs {2 * args.pairs} test images, the run's test set has {len(data.test)}")
    plots.interpolations(model, data.test[index], steps=args.steps, pairs=args.pairs, path=args.output)
    print(f"wrote {args.output}")


def cmd_compare(args) -> None:
    """Train each of ``--models`` into OUT/MODEL (never over a run), evaluate them and write the comparison."""
    folder = Path(args.out)
    existing = [str(folder / name) for name in args.models if (folder / name / CHECKPOINT_FILE).exists()]
    if existing:
        raise InputError(f"{' and '.join(existing)} already hold a run: compare never overwrites one; choose another --out")
    device = resolve_device(args.device)
    training = _training_config(args)
    options = _data_options(args)
    data = _load_data(options, device, progress=not args.no_progress)
    _check_labelled(args.models, data)
    network = _network_config(args, data.image_shape)
    if args.labels is not None and "m2" not in args.models:
        raise InputError("--labels is for the semi-supervised model (m2), which --models does not name")
    draws = {name: _label_draw(name, args.labels, data, args.seed) for name in args.models if name in MODELS and MODELS[name][0] is SemiSupervisedVAE}

    rows, trained = [], {}
    for name in args.models:
        start = time.perf_counter()
        if name == "pca":
            model = PCA(network.latent_dim).fit(data.train)
        else:
            torch.manual_seed(args.seed)  # every model starts from weights drawn with --seed
            model = build_model(name, _model_config(name, network, {}, data)).to(device)
            metadata = {"data": options, "eval_images": 0, **({"labels": draws[name]} if draws.get(name) else {})}
            trainer = Trainer(model, training, out_dir=folder / name, model_name=name, metadata=metadata)
            trainer.fit(data.train, val=data.val, dynamic_binarization=data.dynamic_binarization, **_fit_labels(model, data, draw=draws.get(name)))
            model.eval()
        seconds = time.perf_counter() - start
        row = {"model": name, **evaluate(model, data, num_samples=args.num_samples), "training_seconds": round(seconds, 2)}
        rows.append(row)
        trained[name] = model
        print(f"{name}: done in {seconds:.1f} s")

    columns = ["model"] + sorted({k for row in rows for k in _table_columns(row)} - {"model", "training_seconds"}) + ["training_seconds"]
    table = _format_table(rows, columns)
    folder.mkdir(parents=True, exist_ok=True)
    header = f"# Comparison on {data.name}: {args.epochs} epochs, latent {network.latent_dim}, {'conv' if network.conv else 'MLP ' + str(list(network.hidden))}\n\n"
    (folder / "comparison.md").write_text(header + table + "\n")
    _write_json(folder / "comparison.json", rows)
    plots.comparison(trained, data.test[:8], path=folder / "comparison.png", labels=None if data.test_labels is None else data.test_labels[:8])
    print(table)
    print(f"wrote {folder / 'comparison.md'} and {folder / 'comparison.png'}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "interpolate": cmd_interpolate, "compare": cmd_compare}
#: the commands that run in several processes under torchrun; the others refuse to
DISTRIBUTED_COMMANDS = ("train", "eval")
#: the user's bad input, reported in one line; any other exception is a bug and keeps its traceback
USER_ERRORS = (InputError, DatasetNotFoundError, TrainingError)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = _given_options(argv)  # what the command line set, as opposed to defaults (a resumed run checks it)
    owned = not distributed.is_initialized()  # a process group started by a command (under torchrun) ends here
    try:
        if args.command not in DISTRIBUTED_COMMANDS and distributed.env_world_size() > 1:
            raise InputError(f"pyrovae {args.command} runs in one process: start it without torchrun (only {' and '.join(DISTRIBUTED_COMMANDS)} run in several)")
        COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"pyrovae: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # the Trainer's says where it stopped and how to resume
        message = " ".join(str(interrupt).split()) or "interrupted"
        print(f"pyrovae: {message}", file=sys.stderr)
        return 130
    finally:
        if owned:
            distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
