"""Checkpoint files: atomic writes that survive kill -9, safe reads, clear errors; load_model's checks."""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_network
from pyrovae.checkpoints import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint, write_text_atomic
from pyrovae.models import AE, VAE, AEConfig, VAEConfig, config_to_dict
from pyrovae.cli import main
from pyrovae.training import WEIGHTS_FILE, Trainer, TrainingConfig, load_model, save_weights


def test_round_trip_adds_the_format_version_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "c.pt"
    state = {"weights": torch.randn(3, 4), "nested": {"step": 7, "history": [{"loss": 1.5, "val": None}], "shape": (1, 28, 28)}}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert torch.equal(loaded["weights"], state["weights"])
    assert loaded["nested"] == state["nested"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_failed_save_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"version": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(path, {"version": 2, "unpicklable": lambda: None})
    assert load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_write_text_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "a.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two ü")
    assert path.read_text(encoding="utf-8") == "two ü"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from pyrovae import checkpoints
    start = int(sys.argv[3])
    for i in range(start, start + 100000):
        checkpoints.save_checkpoint(sys.argv[2], {"i": i, "blob": torch.full((1_000_000,), float(i))})
        if i == start:
            print("ready", flush=True)
    """
)


def test_kill_9_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A process saving 4 MB checkpoints in a loop is killed at random moments; the file always loads whole."""
    path = tmp_path / "checkpoint.pt"
    rng = random.Random(0)
    start = 1
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, "unused", str(path), str(start)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        state = load_checkpoint(path)
        assert state["i"] >= start
        assert bool((state["blob"] == float(state["i"])).all())  # one whole save, not a mix
        start = state["i"] + 1


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path, zipfile):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "payload": _RunsCode(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the refusal prevents
    assert marker.exists()


def test_truncated_random_and_empty_files_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(1000)})
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(random.Random(1).randbytes(5000))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="not a pyrovae checkpoint"):
        load_checkpoint(tmp_path / "random.pt")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_foreign_files_and_other_versions_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "plain.pt")
    torch.save({"w": torch.zeros(3), "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="no format_version"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="a checkpoint is a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])


# ---------------------------------------------------------------------- load_model


@pytest.fixture
def vae_run(tmp_path, mnist):
    folder = tmp_path / "run"
    vae = VAE(VAEConfig(network=tiny_network()))
    Trainer(vae, TrainingConfig(epochs=1, batch_size=50, progress=False), out_dir=folder).fit(mnist.train[:100])
    return folder, vae


def test_load_model_rebuilds_the_model_from_a_folder_or_a_file(vae_run):
    folder, vae = vae_run
    for path in (folder, folder / "checkpoint.pt"):
        model, state = load_model(path)
        assert isinstance(model, VAE) and model.config == vae.config
        assert state["model_name"] == "vae"
        for name, value in vae.state_dict().items():
            assert torch.equal(model.state_dict()[name], value)
    same = VAE(VAEConfig(network=tiny_network()))
    assert load_model(folder, model=same)[0] is same
    assert torch.equal(same.encoder.layers[0].weight, vae.encoder.layers[0].weight)


def test_a_published_run_keeps_weights_alone_and_loads_as_a_run_folder(vae_run, tmp_path, mnist_dir, capsys):
    """save_weights writes the model alone (readable with weights_only=True); a folder with config.json and weights.pt
    in place of the checkpoint (a published quality row) loads like a run folder, in the library and the command
    line; a run folder holding both reads its checkpoint."""
    folder, vae = vae_run
    published = tmp_path / "published"
    published.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["metadata"] = {"data": {"name": "mnist", "root": str(mnist_dir), "subset": 300, "seed": 0}}  # as `pyrovae train` keeps it
    (published / "config.json").write_text(json.dumps(config))
    assert save_weights(published, vae, "vae") == published / WEIGHTS_FILE
    state = torch.load(published / WEIGHTS_FILE, weights_only=True)
    assert set(state) >= {"model_name", "model_config", "model_state"} and "optimizer_states" not in state
    model, _ = load_model(published)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in vae.state_dict().items())
    assert main(["sample", str(published), "-n", "4", "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"

    other = VAE(VAEConfig(network=tiny_network()))  # weights of another model beside the run's checkpoint: the checkpoint wins
    save_weights(folder, other, "vae")
    assert all(torch.equal(load_model(folder)[0].state_dict()[name], value) for name, value in vae.state_dict().items())


def test_load_model_refuses_a_checkpoint_of_another_model_or_config(vae_run):
    folder, _ = vae_run
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(folder, model=VAE(VAEConfig(network=tiny_network(latent_dim=4))))
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(folder, model=AE(AEConfig(network=tiny_network())))


def test_load_model_refuses_weights_that_do_not_fit_their_config(tmp_path):
    small, big = VAEConfig(network=tiny_network(latent_dim=4)), VAEConfig(network=tiny_network(latent_dim=8))
    path = tmp_path / "mixed.pt"
    save_checkpoint(path, {"model_name": "vae", "model_config": config_to_dict(small), "model_state": VAE(big).state_dict()})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)
    save_checkpoint(path, {"model_name": "gan", "model_config": {}, "model_state": {}})
    with pytest.raises(CheckpointError, match="cannot be rebuilt"):
        load_model(path)
    save_checkpoint(path, {"weights": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="holds no model"):
        load_model(path)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint.pt \(nor weights.pt\)"):
        load_model(tmp_path)


def test_load_model_of_a_damaged_run_folder_says_so(vae_run):
    folder, _ = vae_run
    file = folder / "checkpoint.pt"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer.resume(folder)
