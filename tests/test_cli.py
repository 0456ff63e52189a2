"""The ``pyrovae`` command end to end, on a small MNIST slice and a small network."""

import json

import pytest
import torch

from pyrovae.cli import build_parser, main

SMALL = ["--subset", "300", "--hidden", "64", "--latent-dim", "4", "--epochs", "1", "--batch-size", "100", "--no-progress"]


@pytest.fixture
def data_dir(mnist_dir):
    return ["--data-dir", str(mnist_dir)]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("runs") / "vae"
    assert main(["train", "--out", str(folder), "--data-dir", str(mnist_dir), *SMALL]) == 0
    return folder


def test_every_subcommand_has_complete_help(capsys):
    parser = build_parser()
    for command in ["train", "eval", "sample", "interpolate", "compare"]:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: pyrovae " + command in text
        # every option documents itself
        assert all("--" not in line or len(line.split()) > 1 for line in text.splitlines())


def test_train_writes_a_complete_run_folder(vae_run):
    for name in ["config.json", "checkpoint.pt", "metrics.csv", "metrics.json", "summary.json",
                 "reconstructions.png", "samples.png", "interpolations.png", "latent.png", "training_curves.png"]:
        assert (vae_run / name).stat().st_size > 0, name
    summary = json.loads((vae_run / "summary.json").read_text())
    assert summary["elbo"] < 0 and summary["mse"] > 0


def test_eval_reports_an_nll_tighter_than_the_elbo(vae_run, capsys):
    assert main(["eval", str(vae_run), "--num-samples", "50", "--device", "cpu"]) == 0
    results = json.loads((vae_run / "eval.json").read_text())
    assert results["nll"] < -results["elbo"]  # importance sampling tightens the bound
    assert 0 <= results["probe_accuracy"] <= 1
    assert "nll" in capsys.readouterr().out


def test_sample_and_interpolate_write_pngs(vae_run, tmp_path):
    assert main(["sample", str(vae_run), "-n", "16", "-o", str(tmp_path / "s.png")]) == 0
    assert main(["interpolate", str(vae_run), "--pairs", "3", "--steps", "5", "-o", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_an_interrupted_run_to_its_epochs(tmp_path, data_dir):
    folder = tmp_path / "run"
    assert main(["train", "--model", "ae", "--out", str(folder), *data_dir, *SMALL]) == 0
    finished = torch.load(folder / "checkpoint.pt", weights_only=True)["model_state"]
    assert main(["train", "--model", "ae", "--out", str(folder), *data_dir, *SMALL]) == 2  # never overwrites a run
    assert main(["train", "--resume", "--out", str(folder), "--no-progress"]) == 0
    resumed = torch.load(folder / "checkpoint.pt", weights_only=True)["model_state"]
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)  # nothing left to train


def test_compare_writes_a_table_with_every_model(tmp_path, data_dir):
    folder = tmp_path / "compare"
    assert main(["compare", "--models", "vae,ae,sparse,stacked,denoising,pca", "--out", str(folder),
                 "--num-samples", "10", *data_dir, *SMALL]) == 0
    table = (folder / "comparison.md").read_text()
    for name in ["vae", "ae", "sparse", "stacked", "denoising", "pca"]:
        assert f"| {name} |" in table
    assert (folder / "comparison.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--model", "nope"], "unknown model"),
        (["train", "--prior", "nope"], "unknown prior"),
        (["train", "--likelihood", "nope"], "unknown likelihood"),
        (["train", "--dataset", "nope"], "unknown dataset"),
        (["train", "--device", "cuda:7"], "cuda"),
        (["train", "--latent-dim", "0"], "latent_dim"),
        (["train", "--batch-size", "1000"], "batch"),
        (["train", "--elbo", "nope"], "elbo"),
        (["compare", "--models", "vae,nope"], "unknown model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(argv, words, tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "out"
    code = main([*argv, "--out", str(folder), *data_dir, "--subset", "300", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("pyrovae: error:") and len(err.splitlines()) == 1
    assert words in err.lower()
    assert not folder.exists()


def test_eval_of_a_missing_or_broken_run_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "broken")]) == 2
    assert capsys.readouterr().err.startswith("pyrovae: error:")


def test_sample_refuses_a_deterministic_model(tmp_path, data_dir, capsys):
    folder = tmp_path / "ae"
    assert main(["train", "--model", "ae", "--out", str(folder), *data_dir, *SMALL]) == 0
    capsys.readouterr()
    assert main(["sample", str(folder), "-o", str(tmp_path / "s.png")]) == 2
    assert "no prior" in capsys.readouterr().err
