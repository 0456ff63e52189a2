"""Smoke tests of ``benchmarks/``: every benchmark function runs at toy sizes, and its figures are
finite and consistent with each other (a ratio is the quotient of the timings it names, a rate
is images over seconds, the profile's parts add up to its whole).

No speed is asserted: the point is that ``python benchmarks/run.py`` keeps working, and keeps
reporting what it says, as the library changes. Also checked: the reference loop computes exactly
Trace_ELBO's estimator, and the per-image NLL loop the same estimate as the vectorized one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from pyro import poutine

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import Settings, peak_rss_of  # noqa: E402
from benchmarks.references import ReferenceVAE, per_image_log_likelihood, trace_elbo_loss  # noqa: E402

pytest.importorskip("pyrovae.training", reason="the benchmarks time pyrovae's Trainer")


def _numbers(value, path="result"):
    """Every number inside a nest of dicts and lists, with where it sits."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def assert_finite(result: dict) -> None:
    numbers = list(_numbers(result))
    assert numbers, "no figures at all"
    bad = [(where, v) for where, v in numbers if not math.isfinite(v)]
    assert not bad, f"non-finite figures: {bad}"


def assert_timed(entry: dict, images: int) -> None:
    """A timing entry: positive epoch times, their median, and images per second from it."""
    assert all(t > 0 for t in entry["epoch_s"])
    assert entry["median_s"] == pytest.approx(sorted(entry["epoch_s"])[len(entry["epoch_s"]) // 2], abs=1e-4)
    assert entry["images_per_s"] == pytest.approx(images / entry["median_s"], rel=1e-6)


@pytest.fixture
def settings(tmp_path, mnist_dir):
    return Settings(device=torch.device("cpu"), data_dir=mnist_dir, quick=True, out_dir=tmp_path, rate_seconds=0.01)


def test_reference_estimator_is_trace_elbo(images):
    """With the same weights and the same z, the reference loss is minus Pyro's Trace_ELBO estimate."""
    from pyrovae import VAE, NetworkConfig, VAEConfig

    vae = VAE(VAEConfig(network=NetworkConfig(hidden=(64,), latent_dim=8)))
    reference = ReferenceVAE(hidden=(64,), latent=8)
    for ours, theirs in ((reference.encoder.net, vae.encoder.layers), (reference.decoder, vae.decoder.layers)):
        ours[0].load_state_dict(theirs[0].state_dict())
        ours[2].load_state_dict(theirs[1].state_dict())
    guide = poutine.trace(vae.guide).get_trace(images)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(images)
    pyro_elbo = model.log_prob_sum() - guide.log_prob_sum()
    z = guide.nodes["z"]["value"]
    loc, scale = reference.encoder(images)
    ours = -trace_elbo_loss(reference, images, eps=(z - loc) / scale) * len(images)
    assert torch.allclose(ours, pyro_elbo, rtol=1e-5)


def test_per_image_loop_agrees_with_log_likelihood(images):
    from pyrovae import VAE, NetworkConfig, VAEConfig
    from pyrovae.evaluation import log_likelihood

    vae = VAE(VAEConfig(network=NetworkConfig(hidden=(32,), latent_dim=4))).eval()
    ours = log_likelihood(vae, images[:4], num_samples=2000)
    loop = per_image_log_likelihood(vae.encoder, vae.decoder, images[:4], 2000)
    assert torch.allclose(ours, loop, atol=1.0)  # two Monte Carlo estimates of the same log p(x)


def test_svi(settings, mnist):
    from benchmarks.bench_svi import bench_svi

    result = bench_svi(settings, epochs=1, data=mnist)
    assert set(result) >= {"trace", "meanfield", "iwae"}
    assert "ratio_conventional" in result["trace"]
    for name in ("trace", "meanfield", "iwae"):
        row = result[name]
        assert_timed(row["pyrovae"], len(mnist.train))
        assert_timed(row["reference"], len(mnist.train))
        assert row["ratio_reference"] == pytest.approx(row["pyrovae"]["median_s"] / row["reference"]["median_s"], rel=1e-6)
    assert result["iwae"]["num_particles"] == 5
    assert result["iwae"]["matmul_flops"] > 2 * result["trace"]["matmul_flops"]  # five decoder passes per image
    assert_finite(result)


def test_ae(settings, mnist):
    from benchmarks.bench_ae import bench_ae

    result = bench_ae(settings, epochs=1, data=mnist)
    assert_timed(result["pyrovae"], len(mnist.train))
    assert_timed(result["reference"], len(mnist.train))
    assert result["ratio_reference"] == pytest.approx(result["pyrovae"]["median_s"] / result["reference"]["median_s"], rel=1e-6)
    assert_finite(result)


def test_nll(settings, mnist):
    from benchmarks.bench_nll import bench_nll

    result = bench_nll(settings, num_images=10, num_samples=20, loop_images=2, rounds=3, memory_samples=None, data=mnist)
    assert result["finite"]
    # the figures are the medians of the rounds, both contenders timed in each
    assert len(result["seconds_runs"]) == len(result["loop_seconds_runs"]) == 3
    assert result["seconds"] == pytest.approx(sorted(result["seconds_runs"])[1], abs=1e-6)
    assert result["loop_seconds"] == pytest.approx(sorted(result["loop_seconds_runs"])[1], abs=1e-6)
    # the loop and the vectorized estimator: two 20-sample estimates of the same NLL
    assert result["loop_mean_nll"] == pytest.approx(result["mean_nll_first_loop_images"], rel=0.02)
    assert result["speedup_vs_loop"] == pytest.approx(result["loop_extrapolated_s"] / result["seconds"], rel=1e-6)
    assert result["loop_extrapolated_s"] == pytest.approx(result["loop_seconds"] * 10 / 2, rel=1e-6)
    assert_finite(result)


def test_scaling_writes_a_plot(settings, mnist):
    from benchmarks.bench_scaling import bench_scaling, format_scaling_table

    result = bench_scaling(settings, batch_sizes=(64, 128), widths=(32,), epochs=1, data=mnist)
    assert len(result["rows"]) == 3
    assert Path(result["plot"]).is_file()
    assert format_scaling_table(result["rows"]).count("\n") == 4
    assert_finite(result)


def test_profile(settings, mnist):
    from benchmarks.bench_profile import bench_profile, format_profile

    result = bench_profile(settings, steps=2, batch_size=64, top=5, data=mnist)
    assert "Pyro tracing overhead" in format_profile(result)
    for phases in result["phases_s"].values():
        assert phases["total"] == pytest.approx(phases["forward"] + phases["backward"] + phases["optimizer"], rel=1e-6)
    fixed = result["fixed_per_step_ms"]
    steps = fixed["step_ms"]
    assert sum(fixed["split_ms"].values()) == pytest.approx(steps["pyrovae"] - steps["reference"], rel=1e-6, abs=1e-9)
    assert fixed["split_ms"]["distribution objects"] == pytest.approx(steps["distributions"] - steps["reference"], rel=1e-6)
    groups = result["cprofile"]["by_group_s"]
    assert sum(groups.values()) == pytest.approx(result["cprofile"]["total_s"], rel=0.01)
    assert_finite(result)


def test_peak_rss_of_a_child():
    run = peak_rss_of([sys.executable, "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"])
    assert run["returncode"] == 0
    assert run["peak_rss_bytes"] >= 200 * 2**20


def test_target_lines_say_met_missed_or_not_run():
    from benchmarks.run import TARGETS, target_lines

    lines = target_lines({"svi": {"trace": {"ratio_reference": 1.0, "ratio_conventional": 0.9}}, "memory": {"peak_rss_bytes": 1e9}})
    assert len(lines) == len(TARGETS)
    assert lines[0].endswith("met") and lines[1].endswith("missed")
    assert sum(line.endswith("not run") for line in lines) == 4
    assert lines[-1].endswith("met")


def test_target_lines_of_several_runs_give_the_median():
    from benchmarks.run import target_lines

    runs = [{"ae": {"ratio_reference": r}} for r in (1.2, 1.0, 1.04)]
    line = next(line for line in target_lines(runs) if line.startswith("ae:"))
    assert "1.040x" in line and " met " in line and "(runs: 1.200x, 1.000x, 1.040x)" in line


def test_distributed_runs_one_and_two_processes(settings):
    from benchmarks.bench_distributed import bench_distributed, format_distributed

    result = bench_distributed(settings, processes=(1, 2), total_threads=2, epochs=2, subset=300)
    rows = {row["processes"]: row for row in result["rows"]}
    assert set(rows) == {1, 2} and not any("error" in row for row in rows.values()), result
    assert [rows[1]["threads_per_process"], rows[2]["threads_per_process"]] == [2, 1]
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(300 / row["median_s"], rel=1e-6)
    assert rows[2]["ratio_to_one_process"] == pytest.approx(rows[2]["images_per_s"] / rows[1]["images_per_s"], rel=1e-6)
    assert "2 process(es) x 1 thread(s)" in format_distributed(result)
