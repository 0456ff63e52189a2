"""The reproduction script ``benchmarks/quality.py``: its rows, variants (seeds, epochs) and schedules are wired,
it writes its results, figures and weights, running it again continues instead of starting over, and
committed weights are re-scored without training (smoke sizes and a tiny committed model only)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import quality  # noqa: E402
from pyrovae.nets import NetworkConfig  # noqa: E402
from pyrovae.training import StagedDecay, load_model  # noqa: E402

#: a finished run of a tiny VAE with the files of a committed row (written by tests/fixtures/make_quality_tiny.py)
TINY = REPO / "tests" / "fixtures" / "quality-tiny"


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


def test_the_two_layer_vampprior_row_is_tomczak_and_wellings_model():
    model, training = quality.configs("vamp2", quality.SCHEDULES["paper"])
    assert quality.ROWS["vamp2"].model == "hvae" and (model.prior, model.num_pseudo_inputs, model.elbo) == ("vamp", 500, "trace")
    assert (model.network.hidden, model.network.latent_dim, model.top_latent_dim) == ((300, 300), 40, 40)
    assert (model.network.activation, model.network.tanh_init) == ("tanh", "glorot")  # the VampPrior's start (docs/quality.md)
    cpu, cpu_training = quality.configs("vamp2", quality.SCHEDULES["cpu"])
    assert cpu.num_pseudo_inputs == 100 and cpu.kl_warmup_epochs == round(0.05 * cpu_training.epochs)


def test_seeds_and_epochs_are_variants_of_a_row_with_their_own_folders():
    cpu = quality.SCHEDULES["cpu"]
    model, training = quality.configs("vae", cpu)
    assert quality.configs("vae", cpu, seed=2) == (model, replace(training, seed=2))  # the seed alone changes
    assert quality.run_name("vae", "cpu") == quality.run_name("vae", "cpu", 0, 1000) == "vae-cpu"  # the committed rows' names
    assert quality.run_name("vae", "cpu", seed=2) == "vae-seed2-cpu"
    assert quality.run_name("iwae5", "cpu", epochs=1500) == "iwae5-e1500-cpu"
    assert quality.run_name("vamp", "cpu", seed=1, epochs=900) == "vamp-e900-seed1-cpu"


def test_smoke_run_writes_results_and_resumes(tmp_path, mnist_dir, monkeypatch):
    args = ["vae", "--schedule", "smoke", "--out", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu"]
    with monkeypatch.context() as stopped:  # stopped in its NLL: the trained weights are already kept
        stopped.setattr(quality, "nll", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            quality.main(args)
    assert (tmp_path / quality.WEIGHTS_FILE).exists() and not (tmp_path / "result.json").exists()
    trained = torch.load(tmp_path / quality.WEIGHTS_FILE, weights_only=True)["model_state"]
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
    assert set(first["active_units"]) == {"z"} and 0 <= first["active_units"]["z"] <= 50

    # the weights alone, float32, about 2 MB for the 784-200-200-50 networks; torch reads them with weights_only=True
    weights = tmp_path / quality.WEIGHTS_FILE
    saved = torch.load(weights, weights_only=True)
    assert set(saved) == {"model_name", "model_config", "model_state", "format_version"}  # no optimizer, no position
    assert all(value.dtype == torch.float32 for value in saved["model_state"].values())
    torch.testing.assert_close(saved["model_state"], model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(saved["model_state"], trained, rtol=0, atol=0)  # the weights kept before the NLL are the run's
    assert 1.5e6 < weights.stat().st_size < 2.5e6

    again = quality.main(args)  # finished: nothing is trained or sampled again
    assert again["test_nll"] == first["test_nll"] and again["epochs"] == 2

    rescored = quality.main(["vae", "--rescore", "--out", str(tmp_path), "--data-dir", str(mnist_dir), "--device", "cpu"])
    assert rescored["test_nll"] == pytest.approx(first["test_nll"], abs=1e-4)  # the same weights, images and draws
    assert rescored["committed_nll"] == first["test_nll"] and rescored["active_units"] == first["active_units"]


def test_a_seed_is_a_training_seed(tmp_path, mnist_dir):
    common = ["--schedule", "smoke", "--data-dir", str(mnist_dir), "--device", "cpu", "--epochs", "1", "--subset", "100", "--nll-samples", "10"]
    zero = quality.main(["vae", "--out", str(tmp_path / "zero"), *common])
    one = quality.main(["vae", "--seed", "1", "--out", str(tmp_path / "one"), *common])
    assert (zero["seed"], one["seed"], one["training_config"]["seed"]) == (0, 1, 1)
    first, second = (torch.load(tmp_path / name / quality.WEIGHTS_FILE, weights_only=True)["model_state"] for name in ("zero", "one"))
    assert not torch.equal(first["encoder.layers.0.weight"], second["encoder.layers.0.weight"])  # another start
    assert one["test_nll"] != zero["test_nll"]


def test_committed_weights_are_rescored_without_training(mnist_dir, capsys):
    """The tiny committed run: its weights, scored again with the run's images, k and seeds, give its figure."""
    result = json.loads((TINY / "result.json").read_text())
    out = quality.main(["vae", "--rescore", "--out", str(TINY), "--data-dir", str(mnist_dir), "--device", "cpu"])
    assert (out["nll_samples"], out["test_images"]) == (result["nll_samples"], result["test_images"]) == (200, 300)
    assert out["committed_nll"] == result["test_nll"]
    # the same draws give the same number (to float rounding); other draws of log_likelihood, if its chunking
    # changes, differ by its Monte Carlo noise: 0.05 nats standard deviation over 8 seeds for this model
    assert out["test_nll"] == pytest.approx(result["test_nll"], abs=0.15)
    assert out["active_units"] == result["active_units"] == {"z": 2}
    printed = capsys.readouterr().out
    assert f"re-scored test NLL {out['test_nll']:.4f}" in printed and f"committed {result['test_nll']:.4f}" in printed
    shorter = quality.main(["vae", "--rescore", "--out", str(TINY), "--data-dir", str(mnist_dir), "--device", "cpu", "--nll-samples", "20"])
    assert shorter["nll_samples"] == 20 and shorter["committed_nll_samples"] == 200
    assert shorter["test_nll"] > out["test_nll"]  # fewer samples: a looser bound, on the same images


def test_rescore_refuses_what_it_cannot_score(tmp_path, mnist_dir):
    copy = tmp_path / "tiny"
    shutil.copytree(TINY, copy)
    (copy / quality.WEIGHTS_FILE).rename(tmp_path / "elsewhere.pt")  # as in the rows that finished before weights were kept
    with pytest.raises(SystemExit, match="finished before its weights were kept"):
        quality.main(["vae", "--rescore", "--out", str(copy), "--data-dir", str(mnist_dir), "--device", "cpu"])
    (tmp_path / "elsewhere.pt").rename(copy / quality.WEIGHTS_FILE)
    result = json.loads((copy / "result.json").read_text())
    result["model_config"]["network"]["hidden"] = [8]
    (copy / "result.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit, match="another config"):
        quality.main(["vae", "--rescore", "--out", str(copy), "--data-dir", str(mnist_dir), "--device", "cpu"])


def test_the_table_gives_mean_and_sd_over_seeds_and_names_missing_weights(tmp_path):
    for seed, value in ((0, 87.0), (1, 87.2), (2, 87.4)):
        folder = tmp_path / quality.run_name("vae", "cpu", seed)
        folder.mkdir()
        training = asdict(quality.configs("vae", quality.SCHEDULES["cpu"], seed)[1])
        (folder / "result.json").write_text(json.dumps({"row": "vae", "schedule": "cpu", "test_nll": value, "training_config": training}))
        if seed:
            (folder / quality.WEIGHTS_FILE).write_bytes(b"0" * 2**20)
    (entry,) = quality.committed_rows(tmp_path)
    assert (entry["row"], entry["epochs"], [run["seed"] for run in entry["runs"]]) == ("vae", 1000, [0, 1, 2])
    assert entry["mean"] == pytest.approx(87.2) and entry["sd"] == pytest.approx(0.2)
    text = quality.table(tmp_path)
    assert "| vae | cpu | 1000 | 87.20 | 0.20 |" in text and "seed 0: missing" in text
    assert "`python benchmarks/quality.py vae --seed 2 --rescore` (1.0 MB)" in text


@pytest.mark.parametrize("row, schedule", [("iwae50", "smoke"), ("iwae5", "paper"), ("vae2", "smoke"), ("vae2-fb6", "smoke"), ("iaf", "smoke"), ("vamp", "smoke"), ("vamp2", "smoke")])
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
    assert set(result["active_units"]) == ({"z1", "z2"} if quality.ROWS[row].model in ("vae2", "hvae") else {"z"})
    assert (tmp_path / quality.WEIGHTS_FILE).exists()


def _plain(config) -> dict:
    return json.loads(json.dumps(asdict(config)))  # tuples as lists, as in result.json


def test_the_committed_rows_were_trained_from_what_their_commands_build_today():
    """Each ``docs/quality/NAME/result.json`` holds the configs its run was trained with; the command of its row,
    seed and epochs must still build those, and name that folder, or the table's figures no longer come from
    its commands. Fields added since a run must sit at their defaults (the behaviour before them); results that
    name no ``tanh_init`` predate Glorot's initialization in pyrovae, so they ran from PyTorch's. A committed
    ``weights.pt`` holds the model of that config."""
    checked = 0
    for path in sorted((REPO / "docs" / "quality").glob("*/result.json")):
        result = json.loads(path.read_text())
        row, schedule_name = result["row"], result["schedule"]
        seed, epochs = result["training_config"]["seed"], result["training_config"]["epochs"]
        assert path.parent.name == quality.run_name(row, schedule_name, seed, epochs), path
        schedule = quality.SCHEDULES[schedule_name]
        schedule = replace(schedule, epochs={**schedule.epochs, row: epochs})
        result["model_config"]["network"].setdefault("tanh_init", "pytorch")
        for name, default in _plain(NetworkConfig()).items():  # network fields added since: at their defaults
            result["model_config"]["network"].setdefault(name, default)
        for built, recorded in zip(quality.configs(row, schedule, seed), (result["model_config"], result["training_config"])):
            defaults = _plain(type(built)())
            for name, value in _plain(built).items():
                assert value == recorded.get(name, defaults[name]), (path, name)
        weights = path.parent / quality.WEIGHTS_FILE
        if weights.exists():
            model, state = load_model(weights)
            assert state["model_name"] == quality.ROWS[row].model and _plain(model.config) == result["model_config"]
        checked += 1
    assert checked >= 8  # the rows of docs/quality.md


def _stage_ends_before_the_one_epoch_floor(epochs: int) -> list[int]:
    """StagedDecay's stage ends as the committed rows ran them: each stage's rounded share, none if it rounded to 0."""
    return [round(epochs * ((3 ** (i + 1) - 1) // 2) / 3280) for i in range(StagedDecay.STAGES)]


def _rates(ends: list[int], lr: float) -> list[float]:
    return [lr * 10 ** (-next(i for i, end in enumerate(ends) if epoch < end) / 7) for epoch in range(ends[-1])]


def test_the_committed_rows_ran_the_schedule_docs_quality_describes():
    """docs/quality.md: the committed rows dropped the first stage (they started at 1.44e-3, never 2e-3), and their
    command today differs from them in the first two epochs (three for iwae5) only. A result that records its
    ``lr_stage_ends`` ran those."""
    checked = 0
    for path in sorted((REPO / "docs" / "quality").glob("*/result.json")):
        result = json.loads(path.read_text())
        training = result["training_config"]
        with open(path.parent / "metrics.csv") as file:
            recorded = [float(row["lr"]) for row in csv.DictReader(file)]
        ends = result.get("lr_stage_ends") or _stage_ends_before_the_one_epoch_floor(training["epochs"])
        assert recorded == pytest.approx(_rates(ends, training["lr"]), rel=1e-6), path
        if "lr_stage_ends" in result:
            continue
        assert recorded[0] == pytest.approx(2e-3 * 10 ** (-1 / 7)) and max(recorded) < 2e-3, path
        today = _rates(StagedDecay(training["epochs"]).stage_ends(), training["lr"])
        differ = [epoch for epoch, (a, b) in enumerate(zip(today, recorded)) if a != pytest.approx(b, rel=1e-6)]
        assert differ == ([0, 1, 2] if result["row"] == "iwae5" else [0, 1]), path
        assert today[0] == training["lr"] == 2e-3
        checked += 1
    assert checked >= 8
