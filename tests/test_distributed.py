"""Data-parallel training: two gloo processes on the CPU train as one process does at the same global batch.

Workers run under ``torch.multiprocessing.spawn`` (one thread each, a ``file://`` rendezvous in the
test's temporary folder) or under torchrun through the command line, on 300 MNIST images and tiny
networks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyro.distributions as pyro_dist
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from conftest import tiny_network
from pyrovae.checkpoints import load_checkpoint
from pyrovae.cli import main
from pyrovae.devices import resolve_device
from pyrovae.errors import InputError
from pyrovae.evaluation import log_likelihood, test_elbo
from pyrovae.models import (
    AAE, AE, CVAE, VAE, AAEConfig, AEConfig, CVAEConfig, HierarchicalVAE, HierarchicalVAEConfig, M2Config, SemiSupervisedVAE, SparseAE,
    SparseAEConfig, StackedAE, StackedAEConfig, TwoLayerVAE, TwoLayerVAEConfig, VAEConfig,
)
from pyrovae.models.base import Progress
from pyrovae.training import Trainer, TrainingConfig, TrainingError, distributed
from pyrovae.training.trainer import _Updater

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
#: (model, global batch size): 300 images in batches of 64 leave a last batch of 44; of 75, four even ones.
#: The stacked AE's pretraining phases leave parameters without gradients.
#: The sparse AE's penalty is a non-linear function of the batch's mean code, in training and validation.
CASES = [("ae", 64), ("ae", 75), ("vae", 64), ("cvae", 64), ("stacked", 64), ("sparse", 75)]
#: the models whose training loss is a non-linear function of a mean over the batch (free bits, the sparse penalty)
BATCH_STATISTIC_MODELS = ("vae", "vae2", "hierarchical", "cvae", "m2", "sparse")


def make(name: str, free_bits: float = 0.0, latent_dim: int = 4):
    torch.manual_seed(0)  # every model starts from the same weights (rank 0's are broadcast anyway)
    network = tiny_network(hidden=(32,), latent_dim=latent_dim)
    if name == "ae":
        return AE(AEConfig(network=network))
    if name == "vae":
        return VAE(VAEConfig(network=network, free_bits=free_bits))
    if name == "vae2":
        return TwoLayerVAE(TwoLayerVAEConfig(network=network, top_latent_dim=2, top_hidden=(8,), free_bits=free_bits))
    if name == "hierarchical":
        return HierarchicalVAE(HierarchicalVAEConfig(network=network, prior="normal", top_latent_dim=2, free_bits=free_bits))
    if name == "stacked":
        return StackedAE(StackedAEConfig(network=network))
    if name == "sparse":
        return SparseAE(SparseAEConfig(network=network, sparsity_weight=10.0))
    if name == "m2":
        return SemiSupervisedVAE(M2Config(network=network, alpha=1.0))
    if name == "aae":
        return AAE(AAEConfig(network=network))
    return CVAE(CVAEConfig(network=network, free_bits=free_bits))


def config(batch_size: int, **changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 2, "batch_size": batch_size, "progress": False, **changes})


def rsample_without_rng(self, sample_shape=()):
    """A Normal's reparameterized draw whose noise is a fixed function of each location, not of the RNG.

    The draws inside a step come from each rank's own RNG, so a VAE trained on two shards does
    not see the noise one process sees; with this noise it does, and the comparison is of
    everything else: sharding, the ELBO's scale, gradient and figure averaging.
    """
    shape = self._extended_shape(sample_shape)
    eps = torch.sin(5.0 * self.loc.detach() + 1.0)
    return self.loc.expand(shape) + eps.expand(shape) * self.scale.expand(shape)


def scores(weights: dict, x) -> dict:
    """The test ELBO and the importance-sampled log-likelihoods (K = 50) of a VAE with ``weights`` on ``x``."""
    model = make("vae")
    model.load_state_dict(weights)
    return {"elbo": test_elbo(model, x)["elbo"], "log_likelihood": log_likelihood(model, x, num_samples=50, batch_size=20)}


def train_cases(train, labels, cases) -> dict:
    """Train each case from the same start; the weights and history of each, on the CPU."""
    results = {}
    for name, batch_size in cases:
        model = make(name)
        given = {"train_labels": labels} if model.conditional else {}
        history = Trainer(model, config(batch_size)).fit(train, val=train[:50], **given, **({"val_labels": labels[:50]} if given else {}))
        results[f"{name}/{batch_size}"] = ({k: v.clone() for k, v in model.state_dict().items()}, history)
    return results


def first_site_kls(model, x, labels) -> Tensor:
    """The KL term ``log q(z|.) - log p(z|.)`` of each image of ``x: (B, C, H, W)`` at the first latent site: ``(B,)``."""
    given = {"y": labels} if model.conditional else {}
    guide = prune_subsample_sites(poutine.trace(model.guide).get_trace(x, **given))
    trace = prune_subsample_sites(poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x, **given))
    name = next(name for name, site in guide.nodes.items() if site["type"] == "sample" and name in trace.nodes and not site["is_observed"])
    value = guide.nodes[name]["value"]
    return (guide.nodes[name]["fn"].log_prob(value) - trace.nodes[name]["fn"].log_prob(value)).detach()


def contested_batch(name: str, pool, labels) -> dict:
    """A 9-image batch of ``pool`` and the model's settings that make its two shards (of 5 and 4 images: uneven, so
    that each rank's share of the batch matters) disagree with the whole batch about a batch statistic (the
    weights are ``make``'s):

    free bits: the 5 images of lowest KL at the first latent site (shard 0) and the 4 of highest (shard 1), and a
    floor between the two shards' mean KL, below the whole batch's: the floor binds on shard 0 alone.
    M2: 1 labelled image in shard 0, 3 in shard 1: the mean of the labelled images' -log q(y|x) is not the shards' mean.
    the sparse AE: the 5 images of lowest mean code and the 4 of highest, the penalty being convex in the batch's mean.
    """
    latent_dim = 16
    if name == "m2":
        labels = labels[:9].clone()
        labels[[1, 2, 3, 4, 8]] = -1
        return {"name": name, "latent_dim": latent_dim, "x": pool[:9], "labels": labels, "free_bits": 0.0}
    model = make(name, latent_dim=latent_dim)
    with torch.no_grad():
        if name == "sparse":
            order = model.encode(pool).mean(1).argsort()
        else:
            order = first_site_kls(model, pool, labels).argsort()
    chosen = torch.cat([order[:5], order[-4:]])
    batch = {"name": name, "latent_dim": latent_dim, "x": pool[chosen], "labels": labels[chosen], "free_bits": 0.0}
    if name != "sparse":
        with torch.no_grad():
            kls = first_site_kls(model, batch["x"], batch["labels"])
        low, high = kls[:5].mean().item(), kls[5:].mean().item()
        batch["free_bits"] = low + 0.25 * (high - low)
    return batch


def one_step(batch: dict) -> tuple[float, dict]:
    """The whole batch's loss and every parameter's gradient in one training step of ``batch``'s model, as the
    optimizers see them: on this process's shard of the batch, averaged by the Trainer's update across processes."""
    model = make(batch["name"], batch["free_bits"], batch["latent_dim"])
    x, labels = batch["x"], batch["labels"]
    lo, hi = distributed.shard_bounds(len(x))
    optimizers = {group: torch.optim.SGD(params, lr=0.0) for group, params in model.parameter_groups().items()}
    update = _Updater(optimizers, grad_clip=None, skip_nonfinite=False, parallel=distributed.is_distributed())
    update.share = (hi - lo) / len(x)
    given = {"y": labels[lo:hi]} if model.requires_labels("train") else {}
    loss = model.training_step(x[lo:hi], update, Progress(num_data=300, num_labelled=100), **given)["loss"]
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return distributed.all_sum(float(loss) * update.share), grads


def validation_loss(batch: dict) -> float:
    """The Trainer's validation loss of ``batch``'s model on its images, one batch of them (split across the processes)."""
    trainer = Trainer(make(batch["name"], batch["free_bits"], batch["latent_dim"]), config(len(batch["x"])))
    trainer._ranks = (distributed.rank(), distributed.world_size())  # as fit sets them
    return trainer._validate(batch["x"], None)


# --------------------------------------------------------------------------- workers (run in spawned processes)


def _join(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting fails within a minute instead of hanging the test
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))


def _equality_worker(rank, init_file, train, labels, out):
    _join(rank, init_file)
    try:
        pyro_dist.Normal.rsample = rsample_without_rng
        results = train_cases(train, labels, CASES)
        results["eval"] = scores(results["vae/64"][0], train[:101])
        aae = make("aae")  # three updates a step, prior draws of each rank's own: the ranks must still agree
        results["aae"] = (Trainer(aae, config(64)).fit(train), aae.state_dict())
        weight = rank + 1  # ranks 0 and 1 weigh 1 and 2
        results["helpers"] = {
            "sum": distributed.all_sum(float(weight)), "sums": distributed.all_sum([1.0, float(rank)]),
            "mean": distributed.all_mean(float(rank), weight=weight), "tensor_mean": distributed.all_mean(torch.full((2,), float(rank)), weight=weight),
            "any": distributed.any_rank(rank == 1), "none": distributed.any_rank(False), "objects": distributed.all_gather_objects({"rank": rank}),
            "who": (distributed.rank(), distributed.world_size(), distributed.is_main()),
        }
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _batch_statistics_worker(rank, init_file, contested, out):
    _join(rank, init_file)
    try:
        pyro_dist.Normal.rsample = rsample_without_rng
        results = {batch["name"]: one_step(batch) for batch in contested}
        results["validation"] = validation_loss(contested[-1])  # the sparse AE's penalty in validation
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _sigterm_worker(rank, init_file, train, folder, out):
    """A 2-process AE run whose loss becomes NaN on rank 1 alone; an uninterrupted 2-process VAE run; the same run
    stopped by a SIGTERM to rank 1 in epoch 2, then resumed from its run folder."""
    _join(rank, init_file)
    try:
        failing = make("ae")
        if rank == 1:
            real_step, steps = failing.training_step, []

            def nan_in_step_3(*args, **kwargs):
                figures = real_step(*args, **kwargs)
                steps.append(1)
                return {**figures, "loss": torch.tensor(float("nan"))} if len(steps) == 3 else figures

            failing.training_step = nan_in_step_3
        try:
            Trainer(failing, config(64)).fit(train)
            failure = ""
        except TrainingError as error:
            failure = str(error)

        whole = make("vae")
        Trainer(whole, config(64, epochs=3), out_dir=Path(folder) / "whole", model_name="vae").fit(train)

        cut = Trainer(make("vae"), config(64, epochs=3), out_dir=Path(folder) / "cut", model_name="vae")
        if rank == 1:
            # SIGTERM lands just after the ranks agreed that nobody had one (at the end of epoch 2's first step):
            # the worst moment, as a rank that stopped on its own there would leave the other waiting
            agree, calls = cut._agree, []

            def terminate_after_the_7th_agreement(*args, **kwargs):
                read = agree(*args, **kwargs)
                calls.append(1)
                if len(calls) == 7:  # 5 steps and the epoch's end, then epoch 2, step 1
                    os.kill(os.getpid(), signal.SIGTERM)
                return read

            cut._agree = terminate_after_the_7th_agreement
        stopped = ""
        try:
            cut.fit(train)
        except KeyboardInterrupt as interrupt:
            stopped = str(interrupt)
        dist.barrier()  # rank 0 has written the checkpoint
        position = load_checkpoint(Path(folder) / "cut" / "checkpoint.pt")["position"]
        resumed = Trainer.resume(Path(folder) / "cut", device="cpu")
        history = resumed.fit(train)
        # rank 1's cut is in a reference cycle (its patched _agree): a process group it held would outlive
        # destroy_process_group until the interpreter exits, and such a group aborted rank 1 at exit (SIGABRT)
        groups = [name for trainer in (cut, resumed) for name, value in vars(trainer).items() if isinstance(value, dist.ProcessGroup)]
        torch.save({"failure": failure, "stopped": stopped, "position": position, "whole": whole.state_dict(), "resumed": resumed.model.state_dict(),
                    "history": history, "groups": groups}, f"{out}.{rank}")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path, *args):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), *args), nprocs=WORLD, join=True)


# --------------------------------------------------------------------------- tests


def test_shards_cover_every_image_once_and_differ_by_at_most_one():
    for n in (0, 1, 7, 44, 64):
        for world in (1, 2, 3, 8):
            bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_is_rank_0_of_1_and_the_helpers_return_their_input():
    assert not dist.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_sum(2.5) == 2.5 and distributed.all_mean([1.0, 3.0], weight=7) == [1.0, 3.0]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.rank_seed(123, 0) == 123 and distributed.rank_seed(123, 1) != 123
    assert not distributed.init_from_env(torch.device("cpu"))  # WORLD_SIZE unset: nothing to start


def test_two_processes_train_to_one_process_parameters(tmp_path, mnist, monkeypatch):
    """AE, VAE and CVAE (labels sharded too), an uneven last batch: the same weights and history as one process;
    the test ELBO and NLL of the trained VAE, shared between the processes, agree with one process's (up to their
    random draws) and are the same on both ranks."""
    train, labels = mnist.train[:], mnist.train_labels
    _spawn(_equality_worker, tmp_path, train, labels, str(tmp_path / "two.pt"))
    two, other_rank = (torch.load(f"{tmp_path / 'two.pt'}.{rank}", weights_only=False) for rank in range(WORLD))
    monkeypatch.setattr(pyro_dist.Normal, "rsample", rsample_without_rng)
    one = train_cases(train, labels, CASES)
    mine = scores(two["vae/64"][0], train[:101])
    assert two["eval"]["elbo"] == other_rank["eval"]["elbo"] == pytest.approx(mine["elbo"], rel=1e-2)
    assert torch.equal(two["eval"]["log_likelihood"], other_rank["eval"]["log_likelihood"])
    assert two["eval"]["log_likelihood"].shape == (101,)
    (aae_history, aae), (_, other_aae) = two["aae"], other_rank["aae"]
    assert all(torch.equal(aae[name], other_aae[name]) for name in aae) and all(math.isfinite(row["train_loss"]) for row in aae_history)
    helpers, other_helpers = two["helpers"], other_rank["helpers"]
    assert (helpers["sum"], helpers["sums"], helpers["mean"], helpers["any"], helpers["none"]) == (3.0, [2.0, 1.0], 2 / 3, True, False)
    assert torch.equal(helpers["tensor_mean"], torch.full((2,), 2 / 3)) and helpers["objects"] == [{"rank": 0}, {"rank": 1}]
    assert helpers["who"] == (0, 2, True) and other_helpers["who"] == (1, 2, False) and other_helpers["sum"] == 3.0
    assert two["eval"]["log_likelihood"].mean().item() == pytest.approx(mine["log_likelihood"].mean().item(), rel=1e-2)
    for case, (weights, history) in one.items():
        other_weights, other_history = two[case]
        for name in weights:
            torch.testing.assert_close(other_weights[name], weights[name], rtol=1e-4, atol=1e-5, msg=f"{case} {name}")
        for row, other in zip(history, other_history):
            assert other["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5), case
            assert other["val_loss"] == pytest.approx(row["val_loss"], rel=1e-5), case


def test_two_shards_compute_free_bits_and_the_sparse_penalty_on_the_whole_batch(tmp_path, mnist, monkeypatch):
    """Free bits (VAE, two-layer VAE, hierarchical VAE, CVAE), M2's classification term and the sparse AE's penalty are non-linear functions of a mean over the
    batch: on two shards (5 and 4 images) of a 9-image batch chosen so that the shards' means fall on either side of
    the floor (or far apart), the whole batch's loss and the gradients the optimizers step on are one process's."""
    monkeypatch.setattr(pyro_dist.Normal, "rsample", rsample_without_rng)
    contested = [contested_batch(name, mnist.train[:100], mnist.train_labels[:100]) for name in BATCH_STATISTIC_MODELS]
    _spawn(_batch_statistics_worker, tmp_path, contested, str(tmp_path / "two.pt"))
    ranks = [torch.load(f"{tmp_path / 'two.pt'}.{rank}", weights_only=False) for rank in range(WORLD)]
    assert contested[-1]["name"] == "sparse"
    for rank in ranks:  # validation scores the batches one process scores, not each rank's half of them
        assert rank["validation"] == pytest.approx(validation_loss(contested[-1]), abs=1e-3)
    for batch in contested:
        name = batch["name"]
        loss, grads = one_step(batch)
        for two_loss, two_grads in (rank[name] for rank in ranks):
            assert two_loss == pytest.approx(loss, abs=1e-3), name
            assert sorted(two_grads) == sorted(grads), name
            for parameter, grad in grads.items():
                torch.testing.assert_close(two_grads[parameter], grad, rtol=1e-4, atol=1e-5, msg=f"{name} {parameter}")


def test_sigterm_on_one_rank_stops_both_with_a_checkpoint_and_resume_is_bitwise(tmp_path, mnist):
    """And a NaN loss on one rank raises the same TrainingError on both."""
    _spawn(_sigterm_worker, tmp_path, mnist.train[:], str(tmp_path), str(tmp_path / "out"))
    ranks = [torch.load(f"{tmp_path / 'out'}.{rank}", weights_only=False) for rank in range(WORLD)]
    assert ranks[0]["failure"] == ranks[1]["failure"] and "step 3 of 5" in ranks[0]["failure"]
    for result in ranks:
        assert result["groups"] == []  # a trainer holds no process group object (it names the default group None)
        assert "SIGTERM" in result["stopped"] and "at step 2 of train epoch 2" in result["stopped"]
        assert (result["position"]["epoch"], result["position"]["step"]) == (1, 2)
        assert [row["epoch"] for row in result["history"]] == [1, 2, 3]
        for name, value in result["whole"].items():
            assert torch.equal(result["resumed"][name], value), name
    for name, value in ranks[0]["resumed"].items():
        assert torch.equal(ranks[1]["resumed"][name], value), name  # every rank holds the same weights
    whole, cut = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "cut"))
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in cut] == [{k: v for k, v in row.items() if k != "seconds"} for row in whole]


def test_torchrun_trains_one_run_folder_and_resumes(tmp_path, mnist_dir):
    """``torchrun --nproc_per_node=2 -m pyrovae train``: one run folder, written by rank 0; then --resume."""
    folder = tmp_path / "runs" / "ae"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "pyrovae", "train"]
    options = ["--model", "ae", "--subset", "300", "--epochs", "2", "--batch-size", "64", "--hidden", "32", "--latent-dim", "4",
               "--eval-images", "100", "--no-progress", "--device", "cpu", "--data-dir", str(mnist_dir), "--out", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*torchrun, *options], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ae"]
    assert first.stdout.count("run written to") == 1  # rank 0 alone prints the table
    for name in ["config.json", "checkpoint.pt", "metrics.json", "summary.json", "reconstructions.png", "training_curves.png"]:
        assert (folder / name).stat().st_size > 0, name
    history = json.loads((folder / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and all(row["test_loss"] > 0 for row in history)
    state = load_checkpoint(folder / "checkpoint.pt")
    assert len(state["rng"]["ranks"]) == WORLD

    again = subprocess.run([*torchrun, "--resume", "--out", str(folder), "--no-progress", "--device", "cpu"], check=False, cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((folder / "metrics.json").read_text()) == history  # a finished run trains no more
    assert again.stdout.count("run written to") == 1


def test_a_global_batch_smaller_than_the_processes_is_refused(mnist):
    trainer = Trainer(make("ae"), config(100))
    trainer._ranks = (0, 3)  # as fit sets it under 3 processes: 300 images make 3 batches of 100, 301 leave 1 for the last
    trainer._check_data({"train": (mnist.train, None), "val": (None, None), "test": (None, None)}, False)
    with pytest.raises(InputError, match="each needs at least 3 images"):
        trainer._check_data({"train": (torch.cat([mnist.train[:], mnist.train[:1]]), None), "val": (None, None), "test": (None, None)}, False)


@pytest.mark.parametrize("name", ["auto", "cuda", None])
def test_under_torchrun_auto_and_cuda_name_the_process_gpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(name) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(InputError, match="LOCAL_RANK=2 of a machine with 2 CUDA device"):
        resolve_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if name != "cuda":
        assert resolve_device(name) == torch.device("cpu")  # processes on the CPU


def test_commands_other_than_train_and_eval_refuse_several_processes(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", str(tmp_path), "-o", str(tmp_path / "s.png")]) == 2
    assert "runs in one process" in capsys.readouterr().err
    assert not dist.is_initialized()
