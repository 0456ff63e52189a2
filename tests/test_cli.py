"""The ``pyrovae`` command end to end, on a small MNIST slice and a small network."""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyrovae import cli
from pyrovae.cli import build_parser, main
from pyrovae.errors import InputError
from pyrovae.likelihoods import LIKELIHOODS
from pyrovae.models import MODELS
from pyrovae.models.autoencoders import AE
from pyrovae.models.vae import ELBOS
from pyrovae.nets import ACTIVATIONS
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS

SMALL = ["--subset", "300", "--hidden", "64", "--latent-dim", "4", "--epochs", "1", "--batch-size", "100", "--no-progress"]
COMMANDS = ["train", "eval", "sample", "interpolate", "compare"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(mnist_dir):
    return ["--data-dir", str(mnist_dir)]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train", "--out", str(folder), "--data-dir", str(mnist_dir), "--eval-images", "100", *SMALL]) == 0
    return folder


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_subcommand_has_help():
    commands = _subparsers(build_parser())
    assert sorted(commands) == sorted(COMMANDS)
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"pyrovae {name} {action.option_strings or action.dest}"


def test_names_are_offered_from_the_registries():
    train = _subparsers(build_parser())["train"]
    choices = {opt: action.choices for action in train._actions for opt in action.option_strings}
    assert list(choices["--model"]) == sorted(MODELS)
    assert list(choices["--prior"]) == sorted(PRIORS)
    assert list(choices["--likelihood"]) == sorted(LIKELIHOODS)
    assert list(choices["--elbo"]) == sorted(ELBOS)
    assert list(choices["--activation"]) == sorted(ACTIVATIONS)
    assert list(choices["--posterior"]) == sorted(POSTERIORS)


def test_each_model_gets_its_own_default_code_size():
    for model, size in (("vae", 50), ("cvae", 2), ("vae2", 100), ("ae", 50)):
        args = build_parser().parse_args(["train", "--model", model])
        assert cli._network_config(args, (1, 28, 28), model).latent_dim == size, model
        args = build_parser().parse_args(["train", "--model", model, "--latent-dim", "7"])
        assert cli._network_config(args, (1, 28, 28), model).latent_dim == 7, model
    args = build_parser().parse_args(["compare"])
    assert cli._network_config(args, (1, 28, 28)).latent_dim == 50  # compare: one network for every model


def test_conv_networks_take_the_images_size_and_an_optional_depth():
    args = build_parser().parse_args(["train", "--conv"])
    assert cli._network_config(args, (3, 64, 48)).conv_depth is None  # follows from the size
    args = build_parser().parse_args(["train", "--conv", "--conv-depth", "3"])
    assert cli._network_config(args, (3, 64, 64)).conv_depth == 3
    with pytest.raises(InputError, match="multiples of 4, got 30x30"):
        cli._network_config(build_parser().parse_args(["train", "--conv"]), (1, 30, 30))


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: pyrovae train" in text
    for name in [*MODELS, *PRIORS, *ELBOS]:
        assert name in text


def test_train_writes_a_complete_run_folder(vae_run):
    for name in ["config.json", "checkpoint.pt", "metrics.csv", "metrics.json", "summary.json",
                 "reconstructions.png", "samples.png", "interpolations.png", "latent.png", "training_curves.png"]:
        assert (vae_run / name).stat().st_size > 0, name
    summary = json.loads((vae_run / "summary.json").read_text())
    assert summary["elbo"] < 0 and summary["mse"] > 0
    history = json.loads((vae_run / "metrics.json").read_text())
    assert history[-1]["test_loss"] > 0  # --eval-images monitors the test loss


def test_eval_reports_an_nll_tighter_than_the_elbo_and_its_protocol(vae_run, capsys):
    assert main(["eval", str(vae_run), "--num-samples", "50", "--device", "cpu"]) == 0
    results = json.loads((vae_run / "eval.json").read_text())
    assert results["nll"] < -results["elbo"]  # importance sampling tightens the bound
    assert 0 <= results["probe_accuracy"] <= 1
    assert results["nll_samples"] == 50 and results["test_images"] == 300
    assert len(results["probe_accuracy_per_class"]) == 10 and all(0 <= v <= 1 for v in results["probe_accuracy_per_class"].values())
    out = capsys.readouterr().out
    assert "pixel values in [0, 1] (not binarized)" in out and "k=50" in out
    assert "probe accuracy per class: " in out and "{" not in out  # a line of its own, not a dict in the table


def test_eval_of_a_binarized_run_says_so(tmp_path, data_dir, capsys):
    folder = tmp_path / "binary"
    assert main(["train", "--out", str(folder), "--binarize", "dynamic", *data_dir, *SMALL]) == 0
    capsys.readouterr()
    assert main(["eval", str(folder), "--num-samples", "5"]) == 0
    assert "dynamic binarization; test and validation images binarized once with seed 0" in capsys.readouterr().out


def test_sample_and_interpolate_write_pngs(vae_run, tmp_path):
    assert main(["sample", str(vae_run), "-n", "16", "-o", str(tmp_path / "s.png")]) == 0
    assert main(["interpolate", str(vae_run), "--pairs", "3", "--steps", "5", "-o", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"


def test_an_interrupted_run_resumes_to_the_same_parameters(tmp_path, data_dir, monkeypatch, capsys):
    """SIGTERM in the middle of epoch 2 of 3; --resume ends where an uninterrupted run ends, bit for bit."""
    argv = ["train", "--model", "ae", *data_dir, *SMALL, "--epochs", "3", "--batch-size", "50", "--eval-images", "0"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model_state"]

    step = AE.training_step
    calls = []

    def terminate_at_step_9(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # epoch 2 of 6 steps each
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(AE, "training_step", terminate_at_step_9)
    folder = tmp_path / "cut"
    assert main([*argv, "--out", str(folder)]) == 130
    assert "--resume" in capsys.readouterr().err
    cut = json.loads((folder / "metrics.json").read_text())
    assert [row["epoch"] for row in cut] == [1]  # stopped in epoch 2
    monkeypatch.setattr(AE, "training_step", step)

    assert main([*argv, "--out", str(folder)]) == 2  # never trains over a run
    assert main(["train", "--resume", "--out", str(folder), "--no-progress"]) == 0
    resumed = torch.load(folder / "checkpoint.pt", weights_only=True)["model_state"]
    assert [row["epoch"] for row in json.loads((folder / "metrics.json").read_text())] == [1, 2, 3]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_python_m_pyrovae_stops_on_sigterm_with_a_checkpoint(tmp_path, mnist_dir):
    """The module entry point, as torchrun would start it; SIGTERM keeps the checkpoint and exits 130."""
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "pyrovae", "train", "--model", "ae", "--out", str(folder), "--data-dir", str(mnist_dir),
               *SMALL, "--epochs", "100000", "--eval-images", "0", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300  # on a loaded machine the first epoch can take minutes; SIGTERM inside it is fine too
    while not (folder / "checkpoint.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "SIGTERM" in err and "--resume" in err
    state = torch.load(folder / "checkpoint.pt", weights_only=True)  # the position it stopped at
    epochs = json.loads((folder / "metrics.json").read_text())
    assert len(epochs) < 100000 and not state["position"]["done"]


def test_compare_writes_runs_that_eval_reads_and_never_overwrites(tmp_path, data_dir, capsys):
    folder = tmp_path / "compare"
    models = ["vae", "ae", "sparse", "stacked", "denoising", "aae", "pca"]
    assert main(["compare", "--models", ",".join(models), "--out", str(folder), "--num-samples", "10", *data_dir, *SMALL]) == 0
    table = (folder / "comparison.md").read_text()
    for name in models:
        assert f"| {name} |" in table
    assert (folder / "comparison.png").stat().st_size > 0
    assert main(["eval", str(folder / "aae"), "--num-samples", "0"]) == 0
    assert json.loads((folder / "aae" / "eval.json").read_text())["mse"] > 0
    capsys.readouterr()
    assert main(["compare", "--models", "ae", "--out", str(folder), *data_dir, *SMALL]) == 2
    assert "never overwrites" in capsys.readouterr().err


def test_a_cvae_run_is_conditional_from_training_to_eval_and_samples_one_row_per_class(tmp_path, data_dir, capsys, monkeypatch):
    folder = tmp_path / "cvae"
    argv = ["train", "--model", "cvae", "--out", str(folder), *data_dir, *SMALL, "--val-size", "100", "--eval-images", "100"]
    assert main(argv) == 0
    assert json.loads((folder / "config.json").read_text())["model_name"] == "cvae"
    history = json.loads((folder / "metrics.json").read_text())
    assert history[-1]["val_loss"] > 0 and history[-1]["test_loss"] > 0  # validation and monitor got their labels
    for name in ["reconstructions.png", "latent.png", "samples.png", "training_curves.png"]:
        assert (folder / name).stat().st_size > 0, name
    capsys.readouterr()

    assert main(["eval", str(folder), "--num-samples", "20"]) == 0
    assert "log p(x|y), given each test image's label" in capsys.readouterr().out
    results = json.loads((folder / "eval.json").read_text())
    assert results["nll"] < -results["elbo"] and 0 <= results["probe_accuracy"] <= 1

    drawn = []
    class_samples = cli.plots.class_samples

    def recording(*args, **kwargs):
        drawn.append(class_samples(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(cli.plots, "class_samples", recording)
    assert main(["sample", str(folder), "-n", "3", "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    grid = drawn[0].axes[0].images[0].get_array()
    assert grid.shape[:2] == (10 * 30 + 2, 3 * 30 + 2)  # one row of three 28x28 images per class
    assert [t.get_text() for t in drawn[0].axes[0].get_yticklabels()] == [str(k) for k in range(10)]
    capsys.readouterr()
    assert main(["interpolate", str(folder), "-o", str(tmp_path / "i.png")]) == 2
    assert "conditional" in capsys.readouterr().err


def test_compare_accepts_a_cvae(tmp_path, data_dir):
    folder = tmp_path / "compare"
    assert main(["compare", "--models", "vae,cvae", "--out", str(folder), "--num-samples", "10", *data_dir, *SMALL]) == 0
    rows = {row["model"]: row for row in json.loads((folder / "comparison.json").read_text())}
    assert rows["cvae"]["nll"] < -rows["cvae"]["elbo"] and rows["vae"]["nll"] < -rows["vae"]["elbo"]
    assert (folder / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--model", "nope"], "invalid choice"),
        (["train", "--prior", "nope"], "invalid choice"),
        (["train", "--likelihood", "nope"], "invalid choice"),
        (["train", "--elbo", "nope"], "invalid choice"),
        (["train", "--activation", "nope"], "invalid choice"),
        (["train", "--dataset", "nope"], "invalid choice"),
        (["train", "--optimizer", "nope"], "invalid choice"),
        (["train", "--hidden", "64,x"], "comma-separated"),
        (["train", "--posterior", "nope"], "invalid choice"),
        (["compare", "--models", "vae,nope"], "unknown model"),
    ],
)
def test_argparse_refuses_unknown_names(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--device", "cuda:7"], "cuda"),
        (["train", "--latent-dim", "0"], "latent_dim"),
        (["train", "--batch-size", "1000"], "batch"),
        (["train", "--dropout", "1.5"], "dropout"),
        (["train", "--patience", "3"], "--val-size"),
        (["train", "--eval-images", "-1"], "--eval-images"),
        (["train", "--model", "ae", "--beta", "2"], "takes no --beta"),
        (["train", "--model", "vae", "--top-latent-dim", "2"], "takes no --top-latent-dim"),
        (["train", "--posterior", "iaf", "--prior", "vamp"], "VampPrior"),
        (["train", "--model", "cvae", "--prior", "vamp"], "VampPrior"),
        (["train", "--model", "aae", "--prior", "vamp"], "VampPrior"),
        (["train", "--flow-layers", "0", "--posterior", "iaf"], "flow_layers"),
        (["train", "--elbo", "iwae", "--num-particles", "5", "--beta", "2"], "beta"),
        (["train", "--model", "vae2", "--elbo", "meanfield"], "meanfield"),
        (["train", "--model", "ae", "--kl-warmup", "2"], "takes no --kl-warmup"),
        (["train", "--model", "vae", "--discriminator-lr", "1e-4"], "takes no --discriminator-lr"),
        (["compare", "--patience", "2"], "--val-size"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, words, tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "out"
    code = main([*argv, "--out", str(folder), *data_dir, "--subset", "300", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("pyrovae: error:") and len(err.splitlines()) == 1
    assert words in err
    assert not folder.exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setitem(cli.COMMANDS, "eval", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["eval", "somewhere"])


def test_eval_of_a_missing_or_broken_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "broken")]) == 2
    assert capsys.readouterr().err.startswith("pyrovae: error:")


def test_dropout_trains_and_evaluation_is_deterministic(tmp_path, data_dir, capsys):
    folder = tmp_path / "dropout"
    assert main(["train", "--dropout", "0.2", "--out", str(folder), *data_dir, *SMALL]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"]["network"]["dropout"] == 0.2
    results = []
    for _ in range(2):
        assert main(["eval", str(folder), "--num-samples", "0"]) == 0
        results.append(json.loads((folder / "eval.json").read_text()))
    assert results[0]["mse"] == results[1]["mse"]


def test_sample_refuses_a_deterministic_model(tmp_path, data_dir, capsys):
    folder = tmp_path / "ae"
    assert main(["train", "--model", "ae", "--out", str(folder), *data_dir, *SMALL]) == 0
    capsys.readouterr()
    assert main(["sample", str(folder), "-o", str(tmp_path / "s.png")]) == 2
    assert "no prior" in capsys.readouterr().err


def test_the_seed_fixes_the_initial_weights_too(tmp_path, data_dir):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        assert main(["train", "--model", "ae", "--out", str(folder), *data_dir, *SMALL, "--epochs", "0", "--seed", "3", "--eval-images", "0"]) == 0
    first, second = (torch.load(f / "checkpoint.pt", weights_only=True)["model_state"] for f in folders)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("options", [["--posterior", "iaf", "--flow-layers", "1"], ["--prior", "vamp", "--num-pseudo-inputs", "5"], ["--model", "vae2", "--top-latent-dim", "3", "--free-bits", "2.0"]])
def test_flows_the_vamp_prior_and_two_layers_train_and_evaluate(options, tmp_path, data_dir):
    folder = tmp_path / "run"
    assert main(["train", *options, "--out", str(folder), *data_dir, *SMALL, "--binarize", "dynamic"]) == 0
    config = json.loads((folder / "config.json").read_text())["model_config"]
    given = dict(zip(options[::2], options[1::2]))
    for flag, value in given.items():
        if flag != "--model":
            assert str(config[flag.removeprefix("--").replace("-", "_")]) == value, flag
    assert main(["eval", str(folder), "--num-samples", "10"]) == 0
    results = json.loads((folder / "eval.json").read_text())
    assert 0 < results["nll"] < -results["elbo"] + 5


# --------------------------------------------------------------------------- your own images

TINY = ["--hidden", "32", "--latent-dim", "3", "--epochs", "1", "--batch-size", "8", "--eval-images", "4", "--no-progress"]


def test_train_help_lists_the_three_sources(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--dataset", "--data PATH", "a folder of images", "an array file (.npy; .npz with x and optional y; .pt)",
                   "--test-data PATH", "the shorter side to S pixels, then the centre S x S crop", "--channels {1,3}", "--storage"):
        assert phrase in text, phrase


def test_train_and_eval_on_a_folder_of_photographs(photo_folder, tmp_path, capsys):
    folder = tmp_path / "run"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", str(photo_folder), "--image-size", "16", "--likelihood", "normal", "--out", str(folder), *cache, *TINY]) == 0
    data = json.loads((folder / "config.json").read_text())["metadata"]["data"]
    assert data["source"] == str(photo_folder.resolve()) and data["test_fraction"] == 0.1 and data["test_split_seed"] == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert 0 <= summary["probe_accuracy"] <= 1 and "latent.png" in summary["figures"]
    capsys.readouterr()
    assert main(["eval", str(folder), "--num-samples", "5"]) == 0  # loads the same images again, from the cache
    assert "test set: 2 images of photos" in capsys.readouterr().out  # 10% of 24, held out


def test_train_on_an_array_file_without_labels(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    images = np.random.default_rng(0).integers(0, 256, size=(40, 12, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    (tmp_path / "test.npy").write_bytes((tmp_path / "x.npy").read_bytes())
    folder = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "x.npy"), "--test-data", str(tmp_path / "test.npy"), "--cache-dir", str(tmp_path / "c"), *TINY]
    assert main([*argv, "--out", str(folder)]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert "probe_accuracy" not in summary and "latent.png" not in summary["figures"]  # no labels: no probe, no classes to colour
    assert json.loads((folder / "config.json").read_text())["metadata"]["data"]["test"] == str((tmp_path / "test.npy").resolve())
    capsys.readouterr()
    assert main([*argv, "--model", "cvae", "--out", str(tmp_path / "cvae")]) == 2
    assert "--model cvae models images given their labels, and x.npy has none" in capsys.readouterr().err
    assert not (tmp_path / "cvae").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "mnist"], "--data .* and --dataset mnist name two sources: give one"),
        (["--test-fraction", "0.2", "--test-data", "elsewhere"], "--test-data gives the test images; --test-fraction holds some out"),
    ],
)
def test_conflicting_sources_are_refused_before_anything_is_written(photo_folder, tmp_path, capsys, extra, message):
    assert main(["train", "--data", str(photo_folder), *extra, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), *TINY]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_skipped_files_are_listed_in_the_run_folder(photo_folder, tmp_path, capsys):
    bad = photo_folder / "pack" / "broken.png"
    bad.write_bytes(b"not an image")
    argv = ["train", "--data", str(photo_folder), "--image-size", "8", "--cache-dir", str(tmp_path / "c"), *TINY]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert f"pyrovae: error: {bad} cannot be read as an image" in capsys.readouterr().err
    assert main([*argv, "--skip-unreadable", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "skipped_images.txt").read_text() == f"{bad}\n"


def test_compare_trains_every_model_on_an_array_file(tmp_path):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, size=(48, 3, 8, 8), dtype=np.uint8), y=np.arange(48) % 10)
    folder = tmp_path / "compare"
    models = ",".join(name for name in cli.COMPARABLE)
    assert main(["compare", "--data", str(tmp_path / "d.npz"), "--models", models, "--labels", "20", "--num-samples", "3", "--out", str(folder), *TINY]) == 0
    rows = json.loads((folder / "comparison.json").read_text())
    assert [row["model"] for row in rows] == list(cli.COMPARABLE) and all(math.isfinite(row["mse"]) for row in rows)


def test_model_options_reach_the_models_config(tmp_path, data_dir):
    folder = tmp_path / "run"
    assert main(["train", "--kl-warmup", "3", "--beta", "0.5", "--out", str(folder), *data_dir, *SMALL, "--eval-images", "0"]) == 0
    config = json.loads((folder / "config.json").read_text())["model_config"]
    assert (config["kl_warmup_epochs"], config["beta"]) == (3, 0.5)


def test_lr_reaches_the_aae_and_its_phases_can_take_their_own(tmp_path, data_dir):
    folder = tmp_path / "aae"
    assert main(["train", "--model", "aae", "--lr", "1e-4", "--out", str(folder), *data_dir, *SMALL, "--eval-images", "0"]) == 0
    assert [row["lr"] for row in json.loads((folder / "metrics.json").read_text())] == [1e-4]
    folder = tmp_path / "aae-own"
    assert main(["train", "--model", "aae", "--lr", "1e-4", "--discriminator-lr", "5e-4", "--out", str(folder), *data_dir, *SMALL,
                 "--eval-images", "0"]) == 0
    config = json.loads((folder / "config.json").read_text())["model_config"]
    assert (config["reconstruction_lr"], config["discriminator_lr"], config["generator_lr"]) == (None, 5e-4, None)


def test_resume_with_more_epochs_extends_the_run_bit_for_bit(tmp_path, data_dir, capsys):
    argv = ["train", "--model", "ae", *data_dir, *SMALL, "--batch-size", "50", "--eval-images", "0"]
    assert main([*argv, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main([*argv, "--epochs", "2", "--out", str(tmp_path / "short")]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path / "short"), "--epochs", "3", "--no-progress"]) == 0
    history = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    whole, longer = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model_state"] for name in ("whole", "short"))
    assert all(torch.equal(whole[k], longer[k]) for k in whole)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["training_config"]["epochs"] == 3


@pytest.mark.parametrize(
    "options, words",
    [
        (["--lr", "0.5"], "--lr 0.5"),
        (["--model", "vae"], "--model vae"),
        (["--subset", "200"], "--subset 200"),
        (["--hidden", "32"], "--hidden"),
        (["--binarize", "dynamic"], "--binarize dynamic"),
        (["--eval-images", "10"], "--eval-images 10"),
        (["--epochs", "3"], "cosine"),
        (["--epochs", "0"], "only extend"),
    ],
)
def test_resume_refuses_options_that_contradict_the_run(options, words, tmp_path, data_dir, capsys):
    folder = tmp_path / "run"
    assert main(["train", "--model", "ae", "--lr-schedule", "cosine", "--out", str(folder), *data_dir, *SMALL, "--epochs", "2",
                 "--eval-images", "0"]) == 0
    capsys.readouterr()
    before = (folder / "metrics.json").read_text()
    assert main(["train", "--resume", "--out", str(folder), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyrovae: error:") and len(err.splitlines()) == 1 and words in err, err
    assert (folder / "metrics.json").read_text() == before
    # the run's own values are no contradiction
    assert main(["train", "--resume", "--out", str(folder), "--model", "ae", "--lr", "0.001", "--subset", "300", "--epochs", "2",
                 "--no-progress", "--device", "cpu"]) == 0


def test_help_says_what_resume_does_with_epochs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with --resume, more epochs than the run's extend it" in text
    assert "cosine or iwae" in text and "any other option must match the saved run" in text


def test_tables_print_fixed_decimals(vae_run, capsys):
    row = {"model": "vae", "nll": 122.0, "elbo": -107.004, "bits_per_dim": 0.2, "probe_accuracy": 0.9, "training_seconds": 3.14159, "test_images": 300}
    assert cli._format_table([row], list(row)).splitlines()[-1] == "| vae | 122.00 | -107.00 | 0.200 | 0.900 | 3.14 | 300 |"
    assert main(["eval", str(vae_run), "--num-samples", "20", "--device", "cpu"]) == 0
    header, _, values = capsys.readouterr().out.splitlines()[-3:]
    cells = dict(zip(header.strip("| ").split(" | "), values.strip("| ").split(" | ")))
    results = json.loads((vae_run / "eval.json").read_text())
    for name, decimals in (("nll", 2), ("elbo", 2), ("probe_accuracy", 3), ("mse", 2)):
        assert cells[name] == f"{results[name]:.{decimals}f}", name
    assert results["nll"] != round(results["nll"], 2)  # eval.json keeps full precision


def test_a_run_on_your_own_images_resumes_and_extends(photo_folder, tmp_path, capsys):
    folder = tmp_path / "run"
    argv = ["train", "--data", str(photo_folder), "--image-size", "8", "--cache-dir", str(tmp_path / "c"), "--out", str(folder), *TINY]
    assert main(argv) == 0
    assert main(["train", "--resume", "--out", str(folder), "--epochs", "2", "--data", str(photo_folder), "--no-progress"]) == 0
    assert len(json.loads((folder / "metrics.json").read_text())) == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(folder), "--epochs", "3", "--image-size", "16", "--no-progress"]) == 2
    assert "--image-size 16 (the run's: 8)" in capsys.readouterr().err


@pytest.mark.parametrize("model, extra", [("m2", ["--labels", "4"]), ("cvae", [])])
def test_models_of_classes_take_as_many_as_the_folders(photo_folder, tmp_path, model, extra):
    """Two class folders: the CVAE and M2 have two classes (not MNIST's 10), and M2 keeps 2 labels of each."""
    folder = tmp_path / "run"
    argv = ["train", "--model", model, *extra, "--data", str(photo_folder), "--image-size", "8", "--cache-dir", str(tmp_path / "c"),
            "--out", str(folder), *TINY]
    assert main(argv) == 0
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_config"]["num_classes"] == 2
    if model == "m2":
        assert len(saved["metadata"]["labels"]["indices"]) == 4


def test_resume_takes_a_conv_depth_that_matches_the_run(photo_folder, tmp_path, capsys):
    folder = tmp_path / "run"
    argv = ["train", "--data", str(photo_folder), "--image-size", "16", "--conv", "--conv-depth", "1", "--cache-dir", str(tmp_path / "c"),
            "--out", str(folder), *TINY]
    assert main(argv) == 0
    assert main(["train", "--resume", "--out", str(folder), "--epochs", "2", "--conv-depth", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(folder), "--epochs", "3", "--conv-depth", "2", "--no-progress"]) == 2
    assert "--conv-depth 2 (the run's: 1)" in capsys.readouterr().err
