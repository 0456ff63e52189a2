"""The semi-supervised VAE (M2): its enumerated ELBO by hand, the NLL with y summed out against brute force,
the balanced label draw, the step's mix of labelled and unlabelled images, Pyro's own tools on it
(TraceEnum_ELBO in SVI, Predictive, infer_discrete), bit-for-bit resume, evaluation and the command line."""

from __future__ import annotations

import json
import math
import os
import signal

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Predictive, TraceEnum_ELBO, config_enumerate, infer_discrete
from torch.distributions import Bernoulli, Normal

from conftest import tiny_network
from pyrovae import plots
from pyrovae.checkpoints import load_checkpoint
from pyrovae.cli import main
from pyrovae.errors import InputError
from pyrovae.evaluation import active_units, elbo_per_example, evaluate, log_likelihood, log_weights
from pyrovae.models import M2Config, SemiSupervisedVAE, build_model
from pyrovae.models.base import Progress
from pyrovae.models.semi_supervised import UNLABELLED, balanced_label_draw
from pyrovae.nets import NetworkConfig
from pyrovae.training import Trainer, TrainingConfig

K = 10
BATCH = 32


def make(network=None, **changes) -> SemiSupervisedVAE:
    torch.manual_seed(0)
    return SemiSupervisedVAE(M2Config(network=network or tiny_network(), **changes))


def config(**changes) -> TrainingConfig:
    return TrainingConfig(**{"epochs": 3, "batch_size": BATCH, "progress": False, **changes})


def hand_terms(model, x, y: int, z):
    """``log p(x, y, z) - log q(z | x, y)`` for every image of ``x: (B, ...)`` with class ``y`` and codes ``z: (B, L)``,
    from the networks and torch's distributions, by hand: ``(B,)``."""
    b = len(x)
    labels = torch.full((b,), y, dtype=torch.int64)
    loc, scale = model.encoder(torch.cat([x.flatten(1), F.one_hot(labels, model.k).float()], 1))
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    logits = model.decoder(torch.cat([z, F.one_hot(labels, model.k).float()], -1))
    log_px = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(-1)
    return log_px + log_pz - math.log(model.k) - log_q


def enumerated_draws(model, x):
    """The z of each class and image, ``(K, B, L)``, that the guide draws under enumeration (the next draw of torch's RNG)."""
    with poutine.trace() as tracer, poutine.enum(first_available_dim=-2):
        config_enumerate(model.guide)(x)
    return tracer.trace.nodes["z"]["value"]


# --------------------------------------------------------------------------- the enumerated ELBO


def test_the_enumerated_elbo_is_the_hand_sum_over_classes_weighted_by_q(images):
    """TraceEnum_ELBO with y summed out: sum_y q(y|x) [log p(x, y, z_y) - log q(z_y|x, y)] + H[q(y|x)], fixed noise."""
    model = make()
    x = images[:6].bernoulli()
    pyro.set_rng_seed(3)
    z = enumerated_draws(model, x)  # (K, 6, L)
    pyro.set_rng_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model.model, model.guide, x)
    with torch.no_grad():
        q = F.softmax(model.classifier(x), -1)  # (6, K)
        per_class = torch.stack([hand_terms(model, x, k, z[k]) for k in range(K)], 1)  # (6, K)
        hand = (q * (per_class - q.log())).sum()
    assert z.shape == (K, 6, 8)
    assert loss.item() == pytest.approx(-hand.item(), rel=1e-5)
    pyro.set_rng_seed(3)
    assert elbo_per_example(model, x).sum().item() == pytest.approx(hand.item(), rel=1e-5)  # evaluation enumerates alike

    pyro.set_rng_seed(4)  # a labelled batch: y observed, no y site in the guide and no entropy
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    z_observed = poutine.trace(model.guide).get_trace(x, y).nodes["z"]["value"]
    pyro.set_rng_seed(4)
    loss = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False).differentiable_loss(model.model, model.guide, x, y=y)
    with torch.no_grad():
        hand = sum(hand_terms(model, x[i : i + 1], int(y[i]), z_observed[i : i + 1]).sum() for i in range(6))
    assert loss.item() == pytest.approx(-hand.item(), rel=1e-5)


class RecordingUpdate:
    """The update of one process that keeps each loss it computes and steps nothing (``batch_mean`` is the identity)."""

    def __init__(self):
        self.losses = []

    def __call__(self, group, compute):
        self.losses.append(compute())
        return self.losses[-1].detach()

    def batch_mean(self, local):
        return local


def test_a_step_mixes_the_batch_as_the_docs_say(images):
    """loss = (sum of the labelled images' -ELBO(x, y) + sum of the others' -ELBO(x)) / B + alpha * (N / N_l) * (sum of
    the labelled images' CE) / B."""
    model = make(alpha=0.7)
    x = images[:8].bernoulli()
    y = torch.tensor([2, UNLABELLED, UNLABELLED, 7, UNLABELLED, UNLABELLED, UNLABELLED, 0])
    got = RecordingUpdate()
    pyro.set_rng_seed(5)
    model.training_step(x, got, Progress(num_data=1000, num_labelled=40), y=y)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    labelled = y >= 0
    pyro.set_rng_seed(5)
    expected = elbo.differentiable_loss(model.model, model.guide, x[labelled], y=y[labelled], num_data=1000) / 1000 * 3 / 8
    expected = expected + elbo.differentiable_loss(model.model, model.guide, x[~labelled], num_data=1000) / 1000 * 5 / 8
    expected = expected + 0.7 * (1000 / 40) * F.cross_entropy(model.classifier(x[labelled]), y[labelled], reduction="sum") / 8
    assert got.losses[0].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(InputError, match="pass train_labels, -1 for each image without a label"):
        model.training_step(x, got, Progress(num_data=1000, num_labelled=40))
    with pytest.raises(InputError, match="Progress.num_labelled is 0"):
        model.training_step(x, got, Progress(num_data=1000), y=y)


def test_the_classification_term_is_unbiased_over_the_batches_of_an_epoch(mnist):
    """Averaged over every batch of an epoch, the step's classification term is alpha times the mean CE of the training
    set's labelled images, however few batches hold one (the paper's objective); the Trainer counts them."""
    model = make(alpha=0.5)
    x = mnist.train[:40].bernoulli()
    y = torch.full((40,), UNLABELLED)
    y[[3, 17, 18, 33]] = torch.tensor([1, 4, 4, 9])
    with torch.no_grad():
        mean_ce = F.cross_entropy(model.classifier(x[y >= 0]), y[y >= 0]).item()
        terms = [0.5 * (40 / 4) * model._split_losses(x[i : i + 5], y[i : i + 5], 40)[1].item() for i in range(0, 40, 5)]
    assert sum(terms) / len(terms) == pytest.approx(0.5 * mean_ce, rel=1e-5)
    assert sum(t > 0 for t in terms) == 3  # batches 0, 3 and 6 hold the labels

    seen = []
    original = model.training_step
    model.training_step = lambda x, update, progress, y=None: (seen.append(progress.num_labelled), original(x, update, progress, y=y))[1]
    trainer = Trainer(model, TrainingConfig(epochs=1, batch_size=20, progress=False))
    trainer.fit(x, train_labels=y)
    assert seen == [4, 4]


# --------------------------------------------------------------------------- the NLL with y summed out


def test_log_weights_sum_the_class_inside_each_weight(images):
    """log w_s = log sum_y p(x, y, z_{s,y}) / q(z_{s,y} | x, y): q(y|x) does not enter, each class its own draw."""
    model = make()
    x = images[:4].bernoulli()
    pyro.set_rng_seed(6)
    with torch.no_grad():
        log_w = log_weights(model, x, num_samples=3)  # (3, 4)
    pyro.set_rng_seed(6)
    with poutine.trace() as tracer, poutine.enum(first_available_dim=-3), pyro.plate("particles", 3, dim=-2):
        config_enumerate(model.guide)(x)
    z = tracer.trace.nodes["z"]["value"]  # (K, 3, 4, L)
    with torch.no_grad():
        hand = torch.stack([torch.stack([hand_terms(model, x, k, z[k, s]) for k in range(K)]).logsumexp(0) for s in range(3)])
    assert z.shape == (K, 3, 4, 8)
    torch.testing.assert_close(log_w, hand, rtol=1e-5, atol=1e-4)


def test_the_nll_with_y_summed_out_matches_brute_force_on_a_toy_model():
    """Images of 2x2 pixels, a 1-d code, 3 classes: log p(x) = log sum_y p(y) int p(z) p(x|y, z) dz by quadrature."""
    network = NetworkConfig(input_shape=(1, 2, 2), latent_dim=1, hidden=(8,))
    model = make(network, num_classes=3)
    x = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]).reshape(3, 1, 2, 2)
    grid = torch.linspace(-9, 9, 20001, dtype=torch.float64)
    with torch.no_grad():
        model.double()
        xd = x.double()
        log_joint = []
        for k in range(3):
            one_hot = F.one_hot(torch.full((len(grid),), k), 3).double()
            logits = model.decoder(torch.cat([grid[:, None], one_hot], 1)).flatten(1)  # (G, 4)
            log_px = Bernoulli(logits=logits[:, None]).log_prob(xd.flatten(1)[None]).sum(-1)  # (G, 3)
            log_joint.append(log_px + Normal(0.0, 1.0).log_prob(grid)[:, None] - math.log(3))
        log_joint = torch.stack(log_joint)  # (3, G, 3 images)
        exact = (log_joint.logsumexp(1) + math.log(grid[1] - grid[0])).logsumexp(0)  # (3,)
        estimate = log_likelihood(model, xd, num_samples=20000)
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)


# --------------------------------------------------------------------------- labels


def test_active_units_count_z_and_skip_the_class(images):
    """Active units are of the continuous layer z alone (y is a class, not a layer of units): every unit passes a
    threshold of 0, none passes a huge one."""
    model = make()
    x = images.bernoulli()
    assert active_units(model, x, threshold=0.0, num_samples=3) == {"z": model.config.network.latent_dim}
    assert active_units(model, x, threshold=1e9, num_samples=3) == {"z": 0}


def test_the_balanced_label_draw_is_exactly_balanced_and_seeded(mnist):
    labels = mnist.train_labels
    drawn = balanced_label_draw(labels, 20, K, seed=1)
    assert torch.equal(torch.bincount(labels[drawn], minlength=K), torch.full((K,), 2))
    assert len(set(drawn.tolist())) == 20 and torch.equal(drawn, drawn.sort().values)
    assert torch.equal(drawn, balanced_label_draw(labels, 20, K, seed=1))
    assert not torch.equal(drawn, balanced_label_draw(labels, 20, K, seed=2))
    with pytest.raises(InputError, match="25 labels do not divide across 10 classes"):
        balanced_label_draw(labels, 25, K, seed=1)
    with pytest.raises(InputError, match="cannot keep 400 labels of a training set of 300 images"):
        balanced_label_draw(labels, 400, K, seed=1)
    with pytest.raises(InputError, match="fewer than the 29 labels per class"):
        balanced_label_draw(labels, 290, K, seed=1)


def test_labels_take_minus_one_for_unlabelled_and_nothing_else(mnist):
    model = make()
    model.check_labels(torch.tensor([0, -1, 9]), 3)
    for bad, message in ((torch.tensor([0, -2, 9]), r"in \[0, 10\) or -1"), (torch.tensor([10]), r"in \[0, 10\) or -1"),
                         (torch.tensor([0.0]), "int64"), (torch.tensor([1, 2]), r"shape \(3,\)")):
        with pytest.raises(InputError, match=message):
            model.check_labels(bad, 3 if "shape" in message else len(bad))
    with pytest.raises(InputError, match="observed classes must lie in"):
        model.guide(mnist.train[:3], torch.tensor([0, -1, 2]))
    with pytest.raises(InputError, match="integer K >= 2"):
        M2Config(num_classes=1)
    with pytest.raises(InputError, match="TraceEnum_ELBO"):
        M2Config(elbo="iwae")
    with pytest.raises(InputError, match="VampPrior"):
        M2Config(prior="vamp")


# --------------------------------------------------------------------------- Pyro's tools


def test_svi_with_trace_enum_elbo_trains_it_and_predictive_and_infer_discrete_give_classes(mnist):
    model = make()
    x = mnist.train[:64].bernoulli()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 3e-3}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]
    assert any(name.startswith(f"{model.name}.classifier$$$") for name in pyro.get_param_store().keys())

    with torch.no_grad():
        model.classifier.layers[-1].bias[3] += 4.0  # q(y|x) leans to class 3, far from uniform
    draws = Predictive(model.guide, num_samples=400, return_sites=["y"])(x[:4])["y"]  # (400, 4), from q(y|x)
    frequencies = F.one_hot(draws, K).float().mean(0)
    q = F.softmax(model.classifier(x[:4]), -1).detach()
    assert bool((q[:, 3] > 0.5).all())
    torch.testing.assert_close(frequencies, q, atol=0.08, rtol=0)

    # infer_discrete: the MAP class under the model given x and a code z is argmax_y p(y) p(x | y, z)
    z = model.encode(x[:4]).detach()
    conditioned = poutine.condition(config_enumerate(model.model), data={"z": z})
    trace = poutine.trace(infer_discrete(conditioned, first_available_dim=-2, temperature=0)).get_trace(x[:4])
    with torch.no_grad():
        per_class = torch.stack([
            Bernoulli(logits=model.decoder(torch.cat([z, F.one_hot(torch.full((4,), k), K).float()], -1))).log_prob(x[:4]).flatten(1).sum(-1)
            for k in range(K)
        ])
    assert torch.equal(trace.nodes["y"]["value"], per_class.argmax(0))


# --------------------------------------------------------------------------- the Trainer


def _masked(labels, kept):
    out = torch.full_like(labels, UNLABELLED)
    out[kept] = labels[kept]
    return out


def test_short_training_with_few_labels_classifies_above_chance(mnist):
    """300 images, 100 of them labelled, 15 epochs: q(y|x) well above chance on 300 held-out images (33% measured)."""
    labels = _masked(mnist.train_labels, balanced_label_draw(mnist.train_labels, 100, K, seed=0))
    model = make()
    before = (model.classify(mnist.test[:]) == mnist.test_labels).float().mean().item()
    history = Trainer(model, config(epochs=15, lr=3e-3)).fit(mnist.train[:].bernoulli(), train_labels=labels)
    accuracy = (model.classify(mnist.test[:]) == mnist.test_labels).float().mean().item()
    assert accuracy > 0.25 and accuracy > before + 0.1  # chance: 0.1; the largest class: 0.12
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_trainer_refuses_m2_without_training_labels_before_writing_anything(tmp_path, mnist):
    """The training split needs labels (-1 for each unlabelled image); validation and test images do not."""
    out = tmp_path / "run"
    with pytest.raises(InputError, match="train_labels"):
        Trainer(make(), config(epochs=1), out_dir=out).fit(mnist.train[:].bernoulli())
    assert not out.exists() or not any(out.iterdir())
    labels = _masked(mnist.train_labels, balanced_label_draw(mnist.train_labels, 100, K, seed=0))
    history = Trainer(make(), config(epochs=1)).fit(mnist.train[:].bernoulli(), val=mnist.test[:50].bernoulli(), train_labels=labels)
    assert history[-1]["val_loss"] is not None


def test_an_interrupted_m2_run_resumes_bit_for_bit(tmp_path, mnist, monkeypatch):
    train = mnist.train[:128]
    labels = _masked(mnist.train_labels[:128], torch.arange(0, 128, 4))
    data = {"val": mnist.test[:64], "dynamic_binarization": True, "train_labels": labels}
    reference = make(kl_warmup_epochs=1)
    expected = Trainer(reference, config()).fit(train, **data)

    model = make(kl_warmup_epochs=1)
    calls = []
    original = model.guide

    def guide(*args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 11:  # two guide calls a step (labelled, unlabelled): epoch 2 of 4 steps, step 2
                os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "guide", guide)
    with pytest.raises(KeyboardInterrupt, match="step 2 of train epoch 2"):
        Trainer(model, config(), out_dir=tmp_path, model_name="m2").fit(train, **data)
    resumed = Trainer.resume(tmp_path, device="cpu")
    assert isinstance(resumed.model, SemiSupervisedVAE) and resumed.model.config == reference.config
    history = resumed.fit(train, **data)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    without_seconds = [[{k: v for k, v in row.items() if k != "seconds"} for row in h] for h in (history, expected)]
    assert without_seconds[0] == without_seconds[1]


# --------------------------------------------------------------------------- evaluation, figures, command line


def test_evaluate_reports_accuracy_and_figures_draw(mnist, tmp_path):
    model = make().eval()
    results = evaluate(model, mnist, num_samples=3)
    predicted = model.classify(mnist.test[:])
    assert results["accuracy"] == pytest.approx((predicted == mnist.test_labels).double().mean().item())
    assert results["nll"] < -results["elbo"]  # y summed inside each weight: tighter than the enumerated ELBO
    figure = plots.analogies(model, mnist.test[:], n=5, path=tmp_path / "a.png")
    assert (tmp_path / "a.png").exists() and figure.axes
    assert model.analogies(mnist.test[:5]).shape == (K, 5, 1, 28, 28)


def test_the_command_line_trains_evaluates_and_refuses_bad_labels(tmp_path, mnist_dir, capsys):
    small = ["--data-dir", str(mnist_dir), "--subset", "300", "--hidden", "32", "--latent-dim", "4", "--epochs", "1", "--batch-size", "100",
             "--no-progress", "--eval-images", "0"]
    for args, message in (
        (["--labels", "105"], "105 labels do not divide across 10 classes"),
        (["--labels", "1000"], "cannot keep 1000 labels of a training set of 300 images"),
        ([], "say how many training labels to keep with --labels N"),
        (["--labels", "20", "--alpha", "-1"], "alpha must be a non-negative number"),
    ):
        folder = tmp_path / "bad"
        assert main(["train", "--model", "m2", "--out", str(folder), *small, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not folder.exists()
    assert main(["train", "--model", "vae", "--labels", "20", "--out", str(tmp_path / "v"), *small]) == 2
    assert "--model vae takes no labels" in capsys.readouterr().err and not (tmp_path / "v").exists()

    folder = tmp_path / "m2"
    assert main(["train", "--model", "m2", "--labels", "20", "--out", str(folder), *small, "--eval-images", "1000"]) == 0
    history = json.loads((folder / "metrics.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert history[-1]["test_accuracy"] == summary["accuracy"]  # the last epoch scored every test image, as eval does
    draw = json.loads((folder / "config.json").read_text())["metadata"]["labels"]
    assert draw["count"] == 20 and draw["seed"] == 0 and len(draw["indices"]) == 20
    assert {"analogies.png", "confusion.png"} <= {p.name for p in folder.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(folder), "--num-samples", "5"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| elbo"))
    assert "| nll | accuracy |" in header


def test_m2_builds_its_networks_as_the_network_config_and_likelihood_say():
    """The conv depth reaches the classifier, q(z|x, y) and p(x|y, z) alike, and a likelihood with two parameters per
    value (the discretized logistic) gets a decoder that outputs them."""
    network = NetworkConfig(input_shape=(3, 32, 32), conv=True, conv_depth=3, latent_dim=4)
    model = make(network=network, likelihood="discretized_logistic")
    strided = [sum(1 for m in part.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and m.stride == (2, 2))
               for part in (model.classifier, model.encoder, model.decoder)]
    assert strided == [3, 3, 3]
    x = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    with torch.no_grad():
        assert model.decoder(model.decoder_input(torch.zeros(2, 4), torch.tensor([0, 1]))).shape == (2, 6, 32, 32)
    assert math.isfinite(model.elbo.loss(model.model, model.guide, x, y=torch.tensor([0, 1])))
