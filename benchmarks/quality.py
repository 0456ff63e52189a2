"""Reproduce published test log-likelihoods on dynamically binarized MNIST: the IWAE paper's rows, and the
richer posteriors and priors held against theirs.

Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016), Table 1: a
784-200-200-50 network with tanh units (encoder to the loc and scale of q(z|x); decoder
50-200-200-784 to Bernoulli logits), a standard normal prior, Adam (beta1 0.9, beta2 0.999, eps
1e-4), trained on dynamically binarized MNIST and scored by the importance-sampled NLL with k=5000
on all 10,000 test images, binarized once with a fixed seed (see :mod:`pyrovae.data`). The other
rows (:data:`ROWS`) change one thing each on that footing: the objective (IWAE k=5, k=50), two
stochastic layers (784-200-200-100(z1)-100-100-50(z2), the paper's; also trained with free bits,
Kingma et al. 2016, which keep its top layer in use), an IAF posterior (two steps, MADEs of 320-320),
the VampPrior (500 pseudo-inputs), or Tomczak and Welling's two-layer VAE with the VampPrior on its top
layer (:class:`pyrovae.models.HierarchicalVAE`: p(x|z1,z2) p(z1|z2) p(z2), 300-unit layers, 40 + 40
latents). One command per row::

    python benchmarks/quality.py vae                        # VAE, trained with k=1 (CPU budget)
    python benchmarks/quality.py iwae5                      # IWAE, trained with k=5
    python benchmarks/quality.py vae2                       # two stochastic layers, k=1
    python benchmarks/quality.py vae2-fb2                   # the same with 2 free nats per latent layer (vae2-fb6: 6)
    python benchmarks/quality.py iaf                        # the VAE with an IAF posterior
    python benchmarks/quality.py vamp                       # the VAE with the VampPrior
    python benchmarks/quality.py vamp2                      # the two-layer VAE with the VampPrior on z2
    python benchmarks/quality.py vae --seed 1               # another training seed: its own folder, vae-seed1-cpu
    python benchmarks/quality.py iwae5 --epochs 1500        # more epochs: its own folder, iwae5-e1500-cpu
    python benchmarks/quality.py vamp --rescore             # the NLL again from the committed weights, no training
    python benchmarks/quality.py --table                    # the committed rows: mean +- sd over seeds, weights
    python benchmarks/quality.py iwae50 --schedule paper    # IWAE k=50, the paper's 3,280 epochs (a GPU's job)

Schedules (:data:`SCHEDULES`):

* ``paper``: 3^i epochs at lr 1e-3 * 10^(-i/7), i = 0..7 (3,280 epochs), batch 20, no warm-up.
* ``cpu``: the same eight stages compressed (:class:`pyrovae.training.StagedDecay`, at least one epoch
  each) into the epochs that fit about 80 minutes of training on 2 CPU threads (then 10-20 minutes
  of NLL): 1000 for the VAE, 750 for the rows whose epoch costs a third more; batch 100 (a step costs
  less than 5 steps of batch 20), so twice the paper's learning rate, 2e-3 falling to 2e-4, to make
  up for 5 times fewer updates per epoch (the committed results in docs/quality/ ran before the
  one-epoch floor: their first stage was dropped, so they started at 1.44e-3 and their first two or
  three epochs differ from a run of their command today; docs/quality.md has the account); for the rows trained on the ELBO, a KL warm-up over the first 5% of the
  epochs (the IWAE bound is defined without one); the VampPrior with 100 pseudo-inputs, not 500
  (whose encoder pass on every step would cost 3.5 times the VAE's epoch).
* ``smoke``: 300 images, 2 epochs, k=50 for the NLL on 300 test images: proves the wiring (CI).

Variants of a row: ``--seed N`` trains it from another seed (the start of its networks, the order of its
batches, its draws), ``--epochs N`` for another number of epochs (the schedule's stages compressed into
them, :class:`pyrovae.training.StagedDecay`, so a longer run is a new run from the start, not the end of
a finished one continued: a finished run's learning rate has already fallen through every stage). Each
variant has its own folder, ``ROW[-eEPOCHS][-seedN]-SCHEDULE`` (:func:`run_name`).

The run folder (``--out``, default ``runs/quality/NAME``) is a pyrovae run folder
(``pyrovae eval`` reads it) plus ``nll.json`` (the NLL, filled in chunks of test images),
``result.json`` (with the active units of each latent layer, and ``lr_stage_ends``, the epochs where
the schedule's stages end), ``learning_curve.png`` (training loss and
the bound on 1,000 test images against the epoch) and ``weights.pt``, the trained model alone (a pyrovae
checkpoint of its name, config and ``state_dict``, float32, read with ``torch.load(weights_only=True)``;
:func:`pyrovae.training.load_model` rebuilds the model from it; written as soon as training ends, before
the NLL). Running the same command again
continues an interrupted run: training from its last checkpoint (bit for bit), then the NLL from its
last finished chunk. A finished row's :data:`PUBLISHED_FILES` are committed in ``docs/quality/NAME/``;
``--rescore`` scores the weights there again, without training, and prints the NLL beside the committed
figure (on the first ``--subset`` test images and with ``--nll-samples`` samples, for a shorter check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pyrovae import plots  # noqa: E402
from pyrovae.checkpoints import CheckpointError, write_text_atomic  # noqa: E402
from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.devices import resolve_device  # noqa: E402
from pyrovae.evaluation import active_units, log_likelihood  # noqa: E402
from pyrovae.models import MODELS, VAEConfig, build_model  # noqa: E402
from pyrovae.nets import NetworkConfig  # noqa: E402
from pyrovae.training import CHECKPOINT_FILE, WEIGHTS_FILE, StagedDecay, Trainer, TrainingConfig, load_model, save_weights  # noqa: E402



@dataclass(frozen=True)
class Row:
    """A row of the table: the pyrovae model, the fields of its config that differ from the VAE's, the
    published test NLL (nats) with where it comes from, and how its tanh layers start
    (:data:`pyrovae.nets.TANH_INITS`: the row's result was trained from that start)."""

    model: str
    options: dict
    published_nll: float
    source: str
    tanh_init: str


_IWAE_TABLE = "Burda et al. 2016, Table 1"
# PyTorch's start for the rows that ran before Glorot's existed in pyrovae (their results came from it);
# Glorot's for the VampPrior, which stayed on the plateau where z is ignored from PyTorch's (docs/quality.md)
ROWS = {
    "vae": Row("vae", {"elbo": "trace", "num_particles": 1}, 86.76, _IWAE_TABLE, "pytorch"),
    "iwae5": Row("vae", {"elbo": "iwae", "num_particles": 5}, 85.54, _IWAE_TABLE, "pytorch"),
    "iwae50": Row("vae", {"elbo": "iwae", "num_particles": 50}, 84.78, _IWAE_TABLE, "pytorch"),
    "vae2": Row("vae2", {"elbo": "trace", "num_particles": 1}, 85.33, _IWAE_TABLE + ", two stochastic layers", "pytorch"),
    # the control: the one-layer VAE with the same free bits (does the gain come from them, or from z2?)
    "vae-fb2": Row("vae", {"elbo": "trace", "num_particles": 1, "free_bits": 2.0}, 86.76, _IWAE_TABLE + " (trained without free bits)", "pytorch"),
    # the two-layer VAE with free bits (Kingma et al. 2016) on each latent site: the plain ELBO leaves z2 unused
    "vae2-fb2": Row("vae2", {"elbo": "trace", "num_particles": 1, "free_bits": 2.0}, 85.33, _IWAE_TABLE + ", two stochastic layers (trained without free bits)", "pytorch"),
    "vae2-fb6": Row("vae2", {"elbo": "trace", "num_particles": 1, "free_bits": 6.0}, 85.33, _IWAE_TABLE + ", two stochastic layers (trained without free bits)", "pytorch"),
    "iwae50-2": Row("vae2", {"elbo": "iwae", "num_particles": 50}, 82.90, _IWAE_TABLE + ", two stochastic layers", "pytorch"),
    "iaf": Row("vae", {"posterior": "iaf", "flow_layers": 2}, 79.10, "Kingma et al. 2016 as cited by NVAE (a ResNet VAE, not this MLP)", "pytorch"),
    "vamp": Row(
        "vae", {"prior": "vamp", "num_pseudo_inputs": 500}, 85.6, "Tomczak and Welling 2018, static binarization (Pythae: 85.79)", "glorot"
    ),
    # Tomczak and Welling's HVAE: p(x|z1,z2) p(z1|z2) and the VampPrior on z2; guide q(z2|x) q(z1|x,z2)
    "vamp2": Row(
        "hvae", {"prior": "vamp", "num_pseudo_inputs": 500}, 83.19, "Tomczak and Welling 2018, HVAE (L=2) + VampPrior (gated layers)", "glorot"
    ),
}
#: the published test NLL of each row (nats, k=5000)
PUBLISHED_NLL = {name: row.published_nll for name, row in ROWS.items()}
NETWORK = NetworkConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200), activation="tanh")
#: the two-layer rows: 784-200-200-100(z1), then 100-100-50(z2)
NETWORK_2 = NetworkConfig(input_shape=(1, 28, 28), latent_dim=100, hidden=(200, 200), activation="tanh")
TOP_LAYER = {"top_latent_dim": 50, "top_hidden": (100, 100)}
#: Tomczak and Welling's two-layer VAE: 300-unit layers everywhere, z1 and z2 of 40 units (plain tanh layers, not gated)
NETWORK_H = NetworkConfig(input_shape=(1, 28, 28), latent_dim=40, hidden=(300, 300), activation="tanh")
#: each model's networks and latent layers in the rows
LAYERS = {"vae": {"network": NETWORK}, "vae2": {"network": NETWORK_2, **TOP_LAYER}, "hvae": {"network": NETWORK_H, "top_latent_dim": 40}}
ADAM_EPS = 1e-4
#: test images whose bound is tracked during training (the learning curve), and images per NLL chunk
MONITOR_IMAGES, NLL_CHUNK = 1000, 500
#: test images on which the active units of each latent layer are counted (Burda et al. 2016), and the seed of their draws
ACTIVE_UNITS_IMAGES, ACTIVE_UNITS_SEED = 2000, 0
#: what a finished row commits in docs/quality/NAME/
PUBLISHED_FILES = ("config.json", "result.json", "nll.json", "metrics.csv", "learning_curve.png", WEIGHTS_FILE)
DOCS = REPO / "docs" / "quality"


@dataclass(frozen=True)
class Schedule:
    """How a row trains and is scored. ``epochs``: per row; ``subset``: images of each split (None: all)."""

    epochs: dict
    batch_size: int
    lr: float = 1e-3
    warmup_fraction: float = 0.0  # of the epochs, KL warm-up (the rows trained on the ELBO only)
    eval_every: int = 10
    nll_samples: int = 5000
    subset: int | None = None
    row_options: dict = field(default_factory=dict)  # row -> config fields this schedule changes


SCHEDULES = {
    "paper": Schedule(epochs=dict.fromkeys(ROWS, 3280), batch_size=20, eval_every=40),
    # measured on 2 CPU threads, batch 100: 4.5 s/epoch (vae), 7.7 (iwae5), 42 (iwae50)
    # vae2, iaf and vamp (with 100 pseudo-inputs) cost about 1.35 times the VAE's epoch (1 thread, same sitting)
    "cpu": Schedule(
        epochs={
            "vae": 1000, "vae-fb2": 1000, "iwae5": 600, "iwae50": 110, "vae2": 750, "vae2-fb2": 750, "vae2-fb6": 750, "iwae50-2": 80, "iaf": 750,
            "vamp": 750, "vamp2": 750,
        },
        batch_size=100, lr=2e-3, warmup_fraction=0.05, eval_every=10,
        # 500 would cost 3.5 times the VAE's epoch (vamp2: 10 times, against 4 with 100)
        row_options={"vamp": {"num_pseudo_inputs": 100}, "vamp2": {"num_pseudo_inputs": 100}},
    ),
    "smoke": Schedule(epochs=dict.fromkeys(ROWS, 2), batch_size=50, eval_every=1, nll_samples=50, subset=300),
}


def configs(row: str, schedule: Schedule, seed: int = 0) -> tuple[VAEConfig, TrainingConfig]:
    """The model and training configs of ``row`` under ``schedule``, trained from ``seed``."""
    epochs, spec = schedule.epochs[row], ROWS[row]
    warmup = round(schedule.warmup_fraction * epochs) if spec.options.get("elbo") != "iwae" else 0
    config_class = MODELS[spec.model][1]
    layers = LAYERS[spec.model]
    layers = {**layers, "network": replace(layers["network"], tanh_init=spec.tanh_init)}
    options = {**spec.options, **schedule.row_options.get(row, {})}
    model = config_class(likelihood="bernoulli", kl_warmup_epochs=warmup, **layers, **options)
    training = TrainingConfig(
        epochs=epochs, batch_size=schedule.batch_size, lr=schedule.lr, optimizer="adam", optimizer_eps=ADAM_EPS,
        lr_schedule="iwae", eval_every=schedule.eval_every, seed=seed, progress=False,
    )
    return model, training


def run_name(row: str, schedule: str, seed: int = 0, epochs: int | None = None) -> str:
    """The folder name of ``row`` under the schedule called ``schedule``: ``ROW-SCHEDULE``, with ``-eEPOCHS`` when
    ``epochs`` differs from the schedule's and ``-seedN`` for a seed other than 0 (``iwae5-e1500-seed1-cpu``)."""
    parts = [row]
    if epochs is not None and epochs != SCHEDULES[schedule].epochs[row]:
        parts.append(f"e{epochs}")
    if seed:
        parts.append(f"seed{seed}")
    return "-".join([*parts, schedule])


def train(row: str, schedule: Schedule, folder: Path, data, device, seed: int = 0):
    """Train ``row`` from ``seed`` into ``folder``, or continue its interrupted run there."""
    monitor = data.test[:MONITOR_IMAGES]
    if (folder / CHECKPOINT_FILE).exists():  # --epochs other than the run's is refused there (the iwae schedule is fitted to them)
        trainer = Trainer.resume(folder, device=device, epochs=schedule.epochs[row])
    else:
        model_config, training = configs(row, schedule, seed)
        torch.manual_seed(training.seed)
        model = build_model(ROWS[row].model, model_config).to(device)
        options = {"name": "mnist", "root": None, "binarize": "dynamic", "val_size": 0, "subset": schedule.subset, "seed": 0}
        trainer = Trainer(model, training, out_dir=folder, model_name=ROWS[row].model, metadata={"data": options})
    try:
        history = trainer.fit(data.train, dynamic_binarization=True, test=monitor)
    finally:
        if trainer.history:
            plots.training_curves(trainer.history, path=folder / "learning_curve.png")
    return trainer.model.eval(), history


def nll(model, test: torch.Tensor, samples: int, folder: Path) -> float:
    """The mean importance-sampled NLL of ``test`` with ``samples`` samples, resumable by chunks of images."""
    path = folder / "nll.json"
    done = json.loads(path.read_text()) if path.exists() else {"samples": samples, "chunks": []}
    if done["samples"] != samples:
        raise SystemExit(f"{path} holds an NLL with k={done['samples']}, not {samples}: move it away to start again")
    for start in range(NLL_CHUNK * len(done["chunks"]), len(test), NLL_CHUNK):
        done["chunks"].append(nll_chunk(model, test, start, samples))
        write_text_atomic(path, json.dumps(done, indent=1) + "\n")
        print(f"  NLL: {start + done['chunks'][-1]['images']}/{len(test)} test images", flush=True)
    return _mean_nll(done["chunks"])


def nll_chunk(model, test: torch.Tensor, start: int, samples: int) -> dict:
    """The summed log-likelihood of the :data:`NLL_CHUNK` test images from ``start``, with draws seeded by ``start``
    (each chunk's draws are its own: a resumed or re-scored NLL is the same number)."""
    torch.manual_seed(start)
    log_p = log_likelihood(model, test[start : start + NLL_CHUNK], num_samples=samples)
    return {"start": start, "images": len(log_p), "sum_log_p": log_p.double().sum().item()}


def _mean_nll(chunks: list[dict]) -> float:
    return -sum(chunk["sum_log_p"] for chunk in chunks) / sum(chunk["images"] for chunk in chunks)


def count_active_units(model, test: torch.Tensor) -> dict[str, int]:
    """Active units of each latent layer on the first :data:`ACTIVE_UNITS_IMAGES` test images (seeded draws)."""
    torch.manual_seed(ACTIVE_UNITS_SEED)
    return active_units(model, test[:ACTIVE_UNITS_IMAGES])


def rescore(folder: Path, data_dir: str, device, nll_samples: int | None = None, images: int | None = None) -> dict:
    """Score the weights committed in ``folder`` again, without training: the NLL on the first ``images`` test images
    (default: as many as its result) with ``nll_samples`` samples (default: its result's), chunk by chunk with the
    same seeds as the run. Returns the new figure beside the committed one (on the same images where the committed
    chunks cover them), and prints both."""
    result_path, weights_path = folder / "result.json", folder / WEIGHTS_FILE
    if not result_path.exists():
        raise SystemExit(f"{folder} holds no result.json: not a finished quality run")
    if not weights_path.exists():
        raise SystemExit(f"{folder} holds no {WEIGHTS_FILE}: this row finished before its weights were kept; retrain it to re-score it")
    result, committed = json.loads(result_path.read_text()), json.loads((folder / "nll.json").read_text())
    try:
        model, state = load_model(weights_path, device=device)
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    if json.loads(json.dumps(state["model_config"])) != result["model_config"]:
        raise SystemExit(f"{weights_path} holds a model of another config than {result_path}: they are not of one run")
    samples = nll_samples or result["nll_samples"]
    images = images or result["test_images"]
    data = load_dataset("mnist", root=data_dir, device=device, binarize="dynamic", subset=images, seed=0)
    model.eval()
    chunks = []
    for start in range(0, len(data.test), NLL_CHUNK):
        chunks.append(nll_chunk(model, data.test, start, samples))
        print(f"  NLL: {start + chunks[-1]['images']}/{len(data.test)} test images", flush=True)
    same_images = [chunk for chunk in committed["chunks"] if chunk["start"] + chunk["images"] <= len(data.test)]
    covered = sum(chunk["images"] for chunk in same_images) == len(data.test)
    out = {
        "folder": str(folder), "test_nll": _mean_nll(chunks), "nll_samples": samples, "test_images": len(data.test),
        "committed_nll": _mean_nll(same_images) if covered else result["test_nll"],
        "committed_nll_samples": committed["samples"],
        "committed_test_images": len(data.test) if covered else result["test_images"],
        "active_units": count_active_units(model, data.test), "committed_active_units": result.get("active_units"),
    }
    print(f"{folder.name}: re-scored test NLL {out['test_nll']:.4f} nats (k={samples}, {out['test_images']} images) from {WEIGHTS_FILE}; "
          f"committed {out['committed_nll']:.4f} (k={out['committed_nll_samples']}, {out['committed_test_images']} images); "
          f"active units {out['active_units']}", flush=True)
    return out


def code_version() -> str | None:
    """The commit of the code that ran (with "+changes" when the tree differs from it), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed.strip() else "")


def committed_rows(docs: Path = DOCS) -> list[dict]:
    """The finished rows committed in ``docs`` (``docs/quality/``), one entry per row, schedule and epochs, with the
    mean and standard deviation of the test NLL over its seeds (``sd`` None for one seed), and each seed's figure
    and weights file (None where the run finished before weights were kept)."""
    groups: dict[tuple, list] = {}
    for path in sorted(docs.glob("*/result.json")):
        result = json.loads(path.read_text())
        training = result["training_config"]
        key = (result["row"], result["schedule"], training["epochs"])
        weights = path.parent / WEIGHTS_FILE
        groups.setdefault(key, []).append({"seed": training["seed"], "test_nll": result["test_nll"], "folder": path.parent.name,
                                          "weights": weights if weights.exists() else None})
    rows = []
    for (row, schedule, epochs), runs in groups.items():
        runs.sort(key=lambda run: run["seed"])
        values = [run["test_nll"] for run in runs]
        rows.append({"row": row, "schedule": schedule, "epochs": epochs, "runs": runs, "mean": statistics.fmean(values),
                     "sd": statistics.stdev(values) if len(values) > 1 else None})
    return rows


def rescore_command(row: str, schedule: str, epochs: int, seed: int) -> str:
    """The command that re-scores a committed run from its weights."""
    options = [] if schedule == "cpu" else [f"--schedule {schedule}"]
    if epochs != SCHEDULES[schedule].epochs.get(row):
        options.append(f"--epochs {epochs}")
    if seed:
        options.append(f"--seed {seed}")
    return " ".join(["python benchmarks/quality.py", row, *options, "--rescore"])


def table(docs: Path = DOCS) -> str:
    """The committed rows as a markdown table: NLL (mean +- sd over seeds), seeds, weights and the re-score command."""
    lines = ["| row | schedule | epochs | test NLL (nats) | +- sd over seeds | seeds | weights (re-score command) |", "|---|---|---:|---:|---:|---|---|"]
    for entry in committed_rows(docs):
        spread = f"{entry['sd']:.2f}" if entry["sd"] is not None else "one seed"
        seeds = ", ".join(f"{run['seed']}: {run['test_nll']:.2f}" for run in entry["runs"])
        weights = "; ".join(
            f"`{rescore_command(entry['row'], entry['schedule'], entry['epochs'], run['seed'])}` ({run['weights'].stat().st_size / 2**20:.1f} MB)"
            if run["weights"] else f"seed {run['seed']}: missing (finished before weights were kept)"
            for run in entry["runs"]
        )
        lines.append(f"| {entry['row']} | {entry['schedule']} | {entry['epochs']} | {entry['mean']:.2f} | {spread} | {seeds} | {weights} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", nargs="?", choices=sorted(ROWS), help="the row of the table: " + ", ".join(ROWS))
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="cpu", help="paper, cpu or smoke (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed, a variant of the row with its own folder (default: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs, a variant of the row with its own folder (default: the schedule's)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/quality/NAME; with --rescore, docs/quality/NAME)")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="folder holding MNIST (default: the repository's data/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--subset", type=int, default=None, help="override: images of each split (a shorter try; with --rescore, the first test images)")
    parser.add_argument("--nll-samples", type=int, default=None, help="override: k of the NLL (a shorter try or re-score)")
    parser.add_argument("--rescore", action="store_true", help="score the row's committed weights again, without training, beside its committed figure")
    parser.add_argument("--table", action="store_true", help="print the committed rows (docs/quality/) as a table: mean +- sd over seeds, weights")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return {"table": committed_rows()}
    if args.row is None:
        parser.error("name a row (or --table)")
    if args.seed < 0 or (args.epochs is not None and args.epochs <= 0):
        parser.error("--seed must be 0 or more and --epochs positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = run_name(args.row, args.schedule, args.seed, args.epochs)
    device = resolve_device(args.device)
    if args.rescore:
        return rescore(args.out or DOCS / name, args.data_dir, device, nll_samples=args.nll_samples, images=args.subset)
    schedule = SCHEDULES[args.schedule]
    if args.epochs is not None:
        schedule = replace(schedule, epochs={**schedule.epochs, args.row: args.epochs})
    if args.subset is not None:
        schedule = replace(schedule, subset=args.subset)
    if args.nll_samples is not None:
        schedule = replace(schedule, nll_samples=args.nll_samples)
    folder = args.out or REPO / "runs" / "quality" / name
    data = load_dataset("mnist", root=args.data_dir, device=device, binarize="dynamic", subset=schedule.subset, seed=0)

    start = time.perf_counter()
    model, history = train(args.row, schedule, folder, data, device, args.seed)
    train_seconds = sum(row["seconds"] for row in history)
    print(f"{name}: trained {len(history)} epochs ({train_seconds / 60:.1f} min of training)", flush=True)
    save_weights(folder, model, ROWS[args.row].model)  # before the NLL: a run stopped in its NLL has lost nothing trained
    value = nll(model, data.test[:], schedule.nll_samples, folder)
    model_config, training_config = configs(args.row, schedule, args.seed)
    result = {
        "row": args.row,
        "schedule": args.schedule,
        "seed": args.seed,
        "test_nll": value,
        "published_nll": PUBLISHED_NLL[args.row],
        "published_source": ROWS[args.row].source,
        "gap_nats": value - PUBLISHED_NLL[args.row],
        "epochs": len(history),
        "training_minutes": train_seconds / 60,
        "nll_samples": schedule.nll_samples,
        "test_images": len(data.test),
        "last_test_bound": -history[-1]["test_loss"] if history and history[-1]["test_loss"] is not None else None,
        "active_units": count_active_units(model, data.test),
        "this_call_minutes": (time.perf_counter() - start) / 60,
        "protocol": data.protocol,
        "model_config": asdict(model_config),
        "training_config": asdict(training_config),
        "lr_stage_ends": StagedDecay(training_config.epochs).stage_ends(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "code": code_version(),  # the code of this call: a resumed run was trained by earlier calls' too
    }
    write_text_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")
    print(f"{name}: test NLL {value:.2f} nats (k={schedule.nll_samples}, {len(data.test)} images); "
          f"paper {PUBLISHED_NLL[args.row]:.2f}; gap {value - PUBLISHED_NLL[args.row]:+.2f}; active units {result['active_units']}", flush=True)
    return result


if __name__ == "__main__":
    main()
