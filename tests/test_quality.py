"""The reproduction script ``benchmarks/quality.py``: its rows and schedules are wired, it writes its
results and figures, and running it again continues instead of starting over (smoke sizes only)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402
from pyrovae.nets import NetworkConfig  # noqa: E402
from pyrovae.training import StagedDecay, load_model  # noqa: E402


def test_rows_follow_the_paper():
    for row, objective in (("vae", ("trace", 1)), ("iwae5", ("iwae", 5)), ("iwae50", ("iwae", 50)), ("iaf", ("trace", 1)), ("vamp", ("trace", 1))):
        model, training = quality.configs(row, quality.SCHEDULES["paper"])
        assert (model.elbo, model.num_particles) == objective
        assert model.network.hidden == (200, 200) and model.network.latent_dim == 50 and model.network.activation == "tanh"
        assert (training.epochs, training.batch_size, training.lr, training.optimizer_eps) == (3280, 20, 1e-3, 1e-4)
        assert training.lr_schedule == "iwae" and model.kl_warmup_epochs == 0
    assert StagedDecay(3280).stage_ends() == [1, 4, 13, 40, 121, 364, 1093, 3280]
    two_layer, _ = quality.configs("vae2", quality.SCHEDULES["paper"])
    assert (two_layer.network.hidden, two_layer.network.latent_dim, two_layer.top_hidden, two_layer.top_latent_dim) == ((200, 200), 100, (100, 100), 50)
    for schedule in quality.SCHEDULES.values():  # the free-bits rows change nothing else of the row they add them to
        for row, base, free_bits in (("vae2-fb2", "vae2", 2.0), ("vae2-fb6", "vae2", 6.0), ("vae-fb2", "vae", 2.0)):
            model, training = quality.configs(base, schedule)
            assert quality.configs(row, schedule) == (replace(model, free_bits=free_bits), training)
    assert quality.configs("iaf", quality.SCHEDULES["paper"])[0].posterior == "iaf"
    assert quality.configs("vamp", quality.SCHEDULES["paper"])[0].num_pseudo_inputs == 500
    assert quality.configs("vamp", quality.SCHEDULES["cpu"])[0].num_pseudo_inputs == 100  # the CPU budget's choice
    vae, _ = quality.configs("vae", quality.SCHEDULES["cpu"])
    iwae, _ = quality.configs("iwae5", quality.SCHEDULES["cpu"])
    assert vae.kl_warmup_epochs == 50 and iwae.kl_warmup_epochs == 0  # no warm-up inside the IWAE bound


def test_smoke_run_writes_results_and_resumes(tmp_path, mnist_dir):
    args = ["vae", "--schedule", "smoke", "--out", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu"]
    first = quality.main(args)
    assert first["epochs"] == 2 and first["test_images"] == 300 and first["nll_samples"] == 50
    assert 80 < first["test_nll"] < 560 and "dynamic binarization" in first["protocol"]
    for name in ("result.json", "nll.json", "learning_curve.png", "metrics.csv", "checkpoint.pt"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "result.json").read_text())["test_nll"] == first["test_nll"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=quality.REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: no commit to name
        head = None
    assert (first["code"] or "").split("+")[0] == (head or "")  # the commit that ran
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert all(row["test_loss"] is not None for row in history)  # the learning curve's points
    model, state = load_model(tmp_path)
    assert state["position"]["done"]

    again = quality.main(args)  # finished: nothing is trained or sampled again
    assert again["test_nll"] == first["test_nll"] and again["epochs"] == 2


@pytest.mark.parametrize("row, schedule", [("iwae50", "smoke"), ("iwae5", "paper"), ("vae2", "smoke"), ("vae2-fb6", "smoke"), ("iaf", "smoke"), ("vamp", "smoke")])
def test_every_row_and_the_paper_schedule_are_runnable(tmp_path, mnist_dir, row, schedule):
    args = [row, "--schedule", schedule, "--out", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu",
            "--epochs", "1", "--subset", "100", "--nll-samples", "20"]
    result = quality.main(args)
    assert result["training_config"]["batch_size"] == quality.SCHEDULES[schedule].batch_size
    for option, value in quality.ROWS[row].options.items():
        assert result["model_config"][option] == value
    assert result["epochs"] == 1 and result["test_images"] == 100 and 50 < result["test_nll"] < 1000  # two steps from the start: several hundred nats
    # on the same 100 images, the NLL with k=20 is tighter than a training bound of fewer particles (seen: 1.2 to 17 nats)
    if result["model_config"]["num_particles"] < 20:
        assert result["test_nll"] <= -result["last_test_bound"] + 1.0


def _plain(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # tuples as lists, as in result.json


def test_the_committed_rows_were_trained_from_what_their_commands_build_today():
    """Each ``docs/quality/ROW-SCHEDULE/result.json`` holds the configs its run was trained with; the row's
    command must still build those, or the table's figures no longer come from its commands. Fields added
    since a run must sit at their defaults (the behaviour before them); results that name no ``tanh_init``
    predate Glorot's initialization in pyrovae, so they ran from PyTorch's."""
    checked = 0
    for row in quality.ROWS:
        for schedule in quality.SCHEDULES:
            path = REPO / "docs" / "quality" / f"{row}-{schedule}" / "result.json"
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            result["model_config"]["network"].setdefault("tanh_init", "pytorch")
            for name, default in _plain(NetworkConfig()).items():  # network fields added since: at their defaults
                result["model_config"]["network"].setdefault(name, default)
            for built, recorded in zip(quality.configs(row, quality.SCHEDULES[schedule]), (result["model_config"], result["training_config"])):
                defaults = _plain(type(built)())
                for name, value in _plain(built).items():
                    assert value == recorded.get(name, defaults[name]), (row, name)
            checked += 1
    assert checked >= 3  # vae, iwae5 and iaf at least
