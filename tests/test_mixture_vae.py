"""The mixture VAE: its enumerated ELBO by hand, the NLL with c summed out against brute force, clusters by
infer_discrete, Hungarian clustering accuracy, SVI, bit-for-bit resume, evaluation and the command line."""

from __future__ import annotations

import json
import math
import os
import signal

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate, infer_discrete
from scipy.cluster.vq import kmeans2
from torch.distributions import Bernoulli, Normal

from conftest import tiny_network
from pyrovae.cli import main
from pyrovae.errors import InputError
from pyrovae.evaluation import class_accuracy, clustering_accuracy, confusion_matrix, elbo_per_example, evaluate, log_likelihood, predict_classes
from pyrovae.models import VAE, MixtureVAE, MixtureVAEConfig, VAEConfig
from pyrovae.models.base import evaluating
from pyrovae.models.mixture import KMEANS_SEED, MIN_START_SCALE
from pyrovae.nets import NetworkConfig
from pyrovae.training import Trainer, TrainingConfig

K = 10


def make(network=None, **changes) -> MixtureVAE:
    torch.manual_seed(0)
    return MixtureVAE(MixtureVAEConfig(network=network or tiny_network(), **changes))


def config(**changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 3, "batch_size": 32, "progress": False, **changes})


def log_mixture(model, z):
    """log sum_c p(c) p(z | c) by hand, ``(B,)`` for ``z: (B, L)``."""
    loc, scale = model.prior.loc, torch.nn.functional.softplus(model.prior.raw_scale) + 1e-5
    return (Normal(loc, scale).log_prob(z[:, None]).sum(-1) - math.log(model.k)).logsumexp(-1)


# --------------------------------------------------------------------------- the ELBO and the NLL


def test_the_elbo_sums_the_component_out_of_the_model(images):
    """TraceEnum_ELBO = E_q(z|x)[log p(x|z) + log sum_c p(c) p(z|c) - log q(z|x)], for the guide's own draw of z."""
    model = make()
    x = images[:6].bernoulli()
    pyro.set_rng_seed(2)
    z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]
    pyro.set_rng_seed(2)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x)
    with torch.no_grad():
        loc, scale = model.encoder(x)
        hand = (Bernoulli(logits=model.decoder(z)).log_prob(x).flatten(1).sum(-1) + log_mixture(model, z) - Normal(loc, scale).log_prob(z).sum(-1)).sum()
    assert loss.item() == pytest.approx(-hand.item(), rel=1e-5)
    pyro.set_rng_seed(2)
    assert elbo_per_example(model, x).sum().item() == pytest.approx(hand.item(), rel=1e-5)


def test_the_nll_with_c_summed_out_matches_brute_force_on_a_toy_model():
    """Images of 2x2 pixels, a 1-d code, 3 components: log p(x) = log int sum_c p(c) p(z|c) p(x|z) dz by quadrature."""
    model = make(NetworkConfig(input_shape=(1, 2, 2), latent_dim=1, hidden=(8,)), num_components=3).double()
    with torch.no_grad():
        model.prior.loc.copy_(torch.tensor([[-1.5], [0.0], [2.0]]))
        last = model.encoder.layers[-1]  # outputs (loc, raw scale): q(z|x) with scale softplus(3) = 3.05, covering every component
        last.weight[1].zero_()
        last.bias[1] = 3.0
    x = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float64).reshape(3, 1, 2, 2)
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    with torch.no_grad():
        log_px = Bernoulli(logits=model.decoder(grid[:, None]).flatten(1)[:, None]).log_prob(x.flatten(1)[None]).sum(-1)  # (G, 3)
        log_joint = log_px + log_mixture(model, grid[:, None])[:, None]
        exact = log_joint.logsumexp(0) + math.log(grid[1] - grid[0])
        estimate = log_likelihood(model, x, num_samples=20000)
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)


# --------------------------------------------------------------------------- clusters


def test_clustering_accuracy_finds_the_best_one_to_one_matching():
    labels = torch.arange(10).repeat_interleave(10)  # 100 images, 10 of each label
    permutation = torch.tensor([3, 7, 0, 9, 1, 8, 2, 6, 4, 5])
    clusters = permutation[labels]
    assert clustering_accuracy(clusters, labels) == 1.0
    clusters[:7] = permutation[5]  # seven images of label 0 moved to label 5's cluster
    assert clustering_accuracy(clusters, labels) == pytest.approx(0.93)
    # more clusters than labels: cluster 10 matches nothing, its images count as wrong; one-to-one, not many-to-one
    assert clustering_accuracy(torch.tensor([0, 0, 10, 10, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1])) == pytest.approx(4 / 6)
    assert clustering_accuracy(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 2, 3])) == pytest.approx(1 / 4)
    counts = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 2)
    assert counts.tolist() == [[0, 1], [1, 1]]
    with pytest.raises(InputError, match="alike"):
        clustering_accuracy(torch.tensor([0, 1]), torch.tensor([0]))


def test_infer_discrete_gives_the_clusters_of_classify(images):
    model = make()
    with torch.no_grad():
        model.prior.loc.mul_(20)  # components far apart: every code has a clear nearest one
    x = images[:8]
    z = model.encode(x).detach()
    conditioned = poutine.condition(config_enumerate(model.model), data={"z": z})
    trace = poutine.trace(infer_discrete(conditioned, first_available_dim=-2, temperature=0)).get_trace(x)
    assert torch.equal(trace.nodes["c"]["value"], model.classify(x))
    hand = (Normal(model.prior.loc, torch.nn.functional.softplus(model.prior.raw_scale) + 1e-5).log_prob(z[:, None]).sum(-1)).argmax(-1)
    assert torch.equal(model.classify(x), hand)


def test_k_below_two_and_other_priors_are_refused():
    with pytest.raises(InputError, match="num_components must be an integer K >= 2"):
        MixtureVAEConfig(num_components=1)
    with pytest.raises(InputError, match="takes no prior='laplace'"):
        MixtureVAEConfig(prior="laplace")
    with pytest.raises(InputError, match="TraceEnum_ELBO"):
        MixtureVAEConfig(elbo="meanfield")
    with pytest.raises(InputError, match="pretrain_epochs must be a non-negative integer"):
        MixtureVAEConfig(pretrain_epochs=-1)


# --------------------------------------------------------------------------- training


def test_svi_with_trace_enum_elbo_trains_it(mnist):
    model = make()
    x = mnist.train[:64].bernoulli()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 3e-3}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]
    assert f"{model.name}.prior$$$loc" in pyro.get_param_store().keys()


def test_short_training_clusters_above_chance(mnist):
    model = make(network=tiny_network(latent_dim=10))
    Trainer(model, config(epochs=20, lr=3e-3)).fit(mnist.train[:].bernoulli())
    clusters = predict_classes(model.eval(), mnist.test[:])
    assert clustering_accuracy(clusters, mnist.test_labels) > 0.25  # one cluster for all: 0.12 (the largest class)
    assert len(clusters.unique()) >= 5


def test_an_interrupted_mixture_run_resumes_bit_for_bit(tmp_path, mnist, monkeypatch):
    train = mnist.train[:128]
    data = {"val": mnist.test[:64], "dynamic_binarization": True}
    reference = make(kl_warmup_epochs=1)
    expected = Trainer(reference, config()).fit(train, **data)

    model = make(kl_warmup_epochs=1)
    calls = []
    original = model.guide

    def guide(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:  # epoch 2 of 4 steps, step 2
                os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "guide", guide)
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 2"):
        Trainer(model, config(), out_dir=tmp_path, model_name="gmvae").fit(train, **data)
    resumed = Trainer.resume(tmp_path, device="cpu")
    assert isinstance(resumed.model, MixtureVAE) and resumed.model.config == reference.config
    history = resumed.fit(train, **data)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in h] for h in (history, expected)]
    assert without_seconds[0] == without_seconds[1]


def test_pretraining_trains_an_autoencoder_then_places_the_components_by_kmeans(mnist, monkeypatch):
    train = mnist.train[:128]
    model = make(pretrain_epochs=2)
    start = {name: t.clone() for name, t in model.prior.state_dict().items()}
    decoder_start = [t.clone() for t in model.decoder.parameters()]
    seen = []
    original = MixtureVAE.end_phase

    def end_phase(self, phase, images):
        # pretraining left p(z|c) as it started, and trained the encoder and the decoder
        assert all(torch.equal(t, start[name]) for name, t in self.prior.state_dict().items())
        assert not any(torch.equal(a, b) for a, b in zip(decoder_start, self.decoder.parameters()))
        with torch.no_grad(), evaluating(self):
            codes = self.encode(images[:]).double()
        original(self, phase, images)
        scale = torch.nn.functional.softplus(self.prior.raw_scale) + 1e-5
        seen.append((phase, len(images), codes, self.prior.loc.detach().clone(), scale.detach().clone()))

    monkeypatch.setattr(MixtureVAE, "end_phase", end_phase)
    history = Trainer(model, config(epochs=1)).fit(train, dynamic_binarization=True)
    assert [row["phase"] for row in history] == ["pretrain", "pretrain", "train"]
    assert [row["kl_weight"] for row in history] == [0.0, 0.0, 1.0]
    (phase, n, codes, loc, scale), = seen  # once, after the pretraining, with every training image
    assert (phase, n) == ("pretrain", 128)
    # each component starts at a centroid of scipy's k-means of the codes, its scale the spread of its cluster
    centroids, cluster = kmeans2(codes.numpy(), K, iter=50, minit="++", seed=KMEANS_SEED)
    torch.testing.assert_close(loc, torch.from_numpy(centroids).float())
    for c in range(K):
        members = codes[torch.from_numpy(cluster) == c]
        if len(members) > 1:
            torch.testing.assert_close(scale[c], members.std(0, unbiased=False).clamp_min(MIN_START_SCALE).float(), rtol=1e-4, atol=1e-5)
    assert len(set(cluster.tolist())) > 1


def test_a_run_interrupted_after_pretraining_resumes_bit_for_bit(tmp_path, mnist, monkeypatch):
    train = mnist.train[:128]
    expected = Trainer(reference := make(pretrain_epochs=1), config(epochs=2)).fit(train, dynamic_binarization=True)

    model = make(pretrain_epochs=1)
    calls = []
    original = model.guide

    def guide(*args, **kwargs):  # the guide runs in the ELBO's phase only
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2:  # step 2 of the first epoch after the pretraining
                os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "guide", guide)
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 1"):
        Trainer(model, config(epochs=2), out_dir=tmp_path, model_name="gmvae").fit(train, dynamic_binarization=True)
    fitted = []
    monkeypatch.setattr(MixtureVAE, "end_phase", lambda self, phase, images: fitted.append(phase))
    resumed = Trainer.resume(tmp_path, device="cpu")
    history = resumed.fit(train, dynamic_binarization=True)
    assert not fitted  # the checkpoint holds the placed components: they are not placed again
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in h] for h in (history, expected)]
    assert without_seconds[0] == without_seconds[1]


# --------------------------------------------------------------------------- evaluation and command line


def test_evaluate_reports_the_clustering_accuracy(mnist):
    model = make().eval()
    results = evaluate(model, mnist, num_samples=3)
    assert results["cluster_accuracy"] == pytest.approx(clustering_accuracy(predict_classes(model, mnist.test[:]), mnist.test_labels))
    assert "accuracy" not in results
    assert class_accuracy(model, mnist.test[:], mnist.test_labels) == {"cluster_accuracy": results["cluster_accuracy"]}
    with pytest.raises(InputError, match="VAE has no discrete latent"):
        class_accuracy(VAE(VAEConfig(network=tiny_network())), mnist.test[:], mnist.test_labels)


def test_the_command_line_trains_a_mixture_and_refuses_one_component(tmp_path, mnist_dir, capsys):
    small = ["--data-dir", str(mnist_dir), "--subset", "300", "--hidden", "32", "--latent-dim", "4", "--epochs", "1", "--batch-size", "100",
             "--no-progress", "--eval-images", "0"]
    folder = tmp_path / "bad"
    assert main(["train", "--model", "gmvae", "--num-components", "1", "--out", str(folder), *small]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_components must be an integer K >= 2" in err and not folder.exists()
    assert main(["train", "--model", "vae", "--num-components", "3", "--out", str(folder), *small]) == 2
    assert "--model vae takes no --num-components" in capsys.readouterr().err and not folder.exists()

    assert main(["train", "--model", "vae", "--pretrain-epochs", "2", "--out", str(folder), *small]) == 2
    assert "--model vae takes no --pretrain-epochs" in capsys.readouterr().err and not folder.exists()

    folder = tmp_path / "gmvae"
    assert main(["train", "--model", "gmvae", "--num-components", "3", "--pretrain-epochs", "2", "--out", str(folder), *small,
                 "--eval-images", "1000"]) == 0
    assert {"confusion.png", "interpolations.png", "samples.png"} <= {p.name for p in folder.iterdir()}
    history = json.loads((folder / "metrics.json").read_text())
    assert [row["phase"] for row in history] == ["pretrain", "pretrain", "train"]
    assert history[-1]["test_cluster_accuracy"] == json.loads((folder / "summary.json").read_text())["cluster_accuracy"]
    capsys.readouterr()
    assert main(["eval", str(folder), "--num-samples", "5"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| elbo"))
    assert "| nll | cluster_accuracy |" in header
