"""Benchmark 3: importance-sampled NLL with ``pyrovae.evaluation.log_likelihood``.

* Seconds for ``k`` samples per image over MNIST test images, against the compute lower
  bound of the ``k`` decoder passes per image (``k x N x decoder FLOPs / matmul rate``).
* Against a Python loop over images that encodes ``k`` copies of each image
  (:func:`benchmarks.references.per_image_log_likelihood`), timed on fewer images in the same
  rounds; the speed-up compares seconds per image.
* Peak resident memory of a fresh process computing the estimate with ``k = 5000``.

Both contenders run in each of ``rounds`` rounds, one after the other (after a warm-up of each);
the figures are the medians over the rounds, so one slow moment of a shared machine moves
neither. The model is a freshly initialised VAE: the cost does not depend on the weights. Both
estimates are printed (mean NLL on the images both ran) as a check that they compute the same thing.
"""

from __future__ import annotations

import json
import sys

import torch

from .common import Settings, decoder_widths, linear_flops, load_mnist, matmul_rate, median, peak_rss_of, thread_env, timed_call
from .references import per_image_log_likelihood

__all__ = ["bench_nll", "nll_memory"]


def _vae(settings: Settings, device=None):
    from pyrovae import VAE, VAEConfig

    torch.manual_seed(settings.seed)
    return VAE(VAEConfig()).to(device or settings.device).eval()


def bench_nll(
    settings: Settings,
    num_images: int | None = None,
    num_samples: int = 1000,
    loop_images: int | None = None,
    rounds: int = 3,
    memory_samples: int | None = 5000,
    memory_images: int | None = None,
    data=None,
) -> dict:
    """Seconds of ``log_likelihood`` on ``num_images`` test images (default 500 quick, 2,000 full) with ``num_samples``,
    and of the per-image loop on the first ``loop_images`` of them (default 50 quick, 200 full), in each of ``rounds``
    rounds; medians over the rounds.

    A fresh process estimates ``memory_images`` images (default 50 quick, 1,000 full) with ``memory_samples`` for
    the memory figure (``None`` skips it).
    """
    from pyrovae.evaluation import log_likelihood

    num_images = num_images or (500 if settings.quick else 2000)
    loop_images = min(loop_images or (50 if settings.quick else 200), num_images)
    memory_images = memory_images or (50 if settings.quick else 1000)
    if data is None:
        data = load_mnist(settings)
    x = data.test[:num_images]
    n, k = len(x), num_samples
    vae = _vae(settings)
    rate = matmul_rate(settings.device, seconds=settings.rate_seconds)  # measured again after the timings; the higher rate counts
    decoder_flops = linear_flops(decoder_widths(), 1)

    runs, loop_runs = [], []
    with torch.no_grad():
        log_likelihood(vae, x[:8], num_samples=k)  # warm-up
        # the loop runs pyrovae's own encoder (-> loc, scale) and decoder (-> logits) modules
        per_image_log_likelihood(vae.encoder, vae.decoder, x[:2], k)  # warm-up
        for round_ in range(rounds):
            torch.manual_seed(settings.seed + round_)
            seconds, ll = timed_call(lambda: log_likelihood(vae, x, num_samples=k), settings.device)
            loop_seconds, loop_ll = timed_call(lambda: per_image_log_likelihood(vae.encoder, vae.decoder, x[:loop_images], k), settings.device)
            runs.append(seconds)
            loop_runs.append(loop_seconds)

    rate = max(rate, matmul_rate(settings.device, seconds=settings.rate_seconds))
    bound = k * n * decoder_flops / rate
    seconds, loop_seconds = median(runs), median(loop_runs)
    result = {
        "images": n,
        "num_samples": k,
        "device": str(settings.device),
        "rounds": rounds,
        "seconds": seconds,
        "seconds_runs": [round(t, 6) for t in runs],
        "images_per_s": n / seconds,
        "matmul_gflops": rate / 1e9,
        "compute_bound_s": bound,
        "ratio_bound": seconds / bound,
        "loop_images": loop_images,
        "loop_seconds": loop_seconds,
        "loop_seconds_runs": [round(t, 6) for t in loop_runs],
        "loop_extrapolated_s": loop_seconds * n / loop_images,
        "speedup_vs_loop": (loop_seconds / loop_images) / (seconds / n),
        "mean_nll": float(-ll.mean()),
        "mean_nll_first_loop_images": float(-ll[:loop_images].mean()),
        "loop_mean_nll": float(-loop_ll.mean()),
        "finite": bool(torch.isfinite(ll).all()),
    }
    if memory_samples:
        result["memory"] = nll_memory(settings, memory_images, memory_samples)
    return result


def nll_memory(settings: Settings, num_images: int, num_samples: int) -> dict:
    """Peak resident memory (bytes) of a fresh Python process that estimates the NLL of ``num_images`` test images."""
    code = (
        "from benchmarks.bench_nll import _memory_child; "
        f"_memory_child({str(settings.data_dir)!r}, {str(settings.device)!r}, {num_images}, {num_samples}, {settings.seed})"
    )
    run = peak_rss_of([sys.executable, "-c", code], env=thread_env())
    result = {"images": num_images, "num_samples": num_samples, "peak_rss_bytes": run["peak_rss_bytes"], "returncode": run["returncode"]}
    for line in run["output_tail"].splitlines():
        if line.startswith("NLL_CHILD "):
            result.update(json.loads(line[len("NLL_CHILD ") :]))
    if run["returncode"] != 0:
        result["error"] = run["output_tail"][-1500:]
    return result


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _memory_child(data_dir: str, device: str, num_images: int, num_samples: int, seed: int) -> None:
    """Run in the fresh process of :func:`nll_memory`: load, estimate, print one JSON line."""
    import time

    from pyrovae.data import load_dataset
    from pyrovae.evaluation import log_likelihood

    device = torch.device(device)
    x = load_dataset("mnist", root=data_dir, device=device, subset=num_images, seed=seed).test
    vae = _vae(Settings(device=device, seed=seed))
    before = _rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        ll = log_likelihood(vae, x, num_samples=num_samples)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    figures = {"rss_before_bytes": before, "seconds": time.perf_counter() - start, "mean_nll": float(-ll.mean())}
    if device.type == "cuda":
        figures["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    print("NLL_CHILD " + json.dumps(figures), flush=True)
