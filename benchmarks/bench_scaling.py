"""Benchmark 4a: epoch time against batch size and hidden width, pyrovae (Trace_ELBO) beside the reference.

Two sweeps share the 784-400-50, batch 256 point: batch sizes at width 400, widths at batch 256.
For each point: medians of interleaved epochs, the ratio, the compute bound (its matmul FLOPs at
the best matmul rate measured over all the points' layer shapes), and Pyro's extra time per optimisation step
``(pyrovae - reference) / steps``, which stays roughly constant across batch sizes when the
overhead is per-step bookkeeping (tracing, Python) rather than per-image work.
"""

from __future__ import annotations

import math

from .bench_svi import pyrovae_vae_runner, reference_runner, train_flops
from .common import LATENT, Settings, best_rates, interleave, load_mnist, matmul_rate, median
from .references import trace_elbo_loss

__all__ = ["bench_scaling", "plot_scaling", "format_scaling_table"]


def _point(settings: Settings, x, batch_size: int, width: int, epochs: int) -> dict:
    hidden = (width,)
    contenders = {
        "pyrovae": pyrovae_vae_runner(settings, x, batch_size=batch_size, hidden=hidden),
        "reference": reference_runner(settings, x, trace_elbo_loss, batch_size=batch_size, hidden=hidden),
    }
    times = interleave(contenders, epochs)
    times["pyrovae"] = contenders["pyrovae"].epochs(epochs)  # the trainer's epoch time, without the per-run setup
    n = len(x)
    steps = math.ceil(n / batch_size)
    pyrovae_s, reference_s = median(times["pyrovae"]), median(times["reference"])
    matmul_rate(settings.device, hidden=hidden, batch_size=batch_size, seconds=settings.rate_seconds / 2)
    return {
        "batch_size": batch_size,
        "hidden": width,
        "pyrovae_s": pyrovae_s,
        "reference_s": reference_s,
        "ratio": pyrovae_s / reference_s,
        "matmul_flops": train_flops(n, hidden=hidden, latent=LATENT),
        "overhead_per_step_ms": 1000 * (pyrovae_s - reference_s) / steps,
        "pyrovae_images_per_s": n / pyrovae_s,
    }


def bench_scaling(settings: Settings, batch_sizes=None, widths=None, subset: int | None = None, epochs: int | None = None, data=None) -> dict:
    """Both sweeps; a dict with ``rows`` (one per point) and, with ``settings.out_dir``, the plot's path."""
    batch_sizes = tuple(batch_sizes or ((64, 256, 1024) if settings.quick else (64, 128, 256, 512, 1024)))
    widths = tuple(widths or ((200, 400, 800) if settings.quick else (100, 200, 400, 800, 1600)))
    epochs = epochs or (2 if settings.quick else 3)
    if data is None:
        data = load_mnist(settings, subset=subset, quick_subset=10_000)
    x = data.train[:]
    points = {(b, 400) for b in batch_sizes} | {(256, w) for w in widths}
    rows = [_point(settings, x, b, w, epochs) for b, w in sorted(points)]
    rate = max(best_rates(settings.device).values())  # one rate for all points, the best seen: a true lower bound
    for row in rows:
        row["compute_bound_s"] = row["matmul_flops"] / rate
    result = {"images": len(x), "epochs_timed": epochs, "device": str(settings.device), "matmul_gflops": rate / 1e9, "rows": rows}
    if settings.out_dir is not None:
        result["plot"] = str(plot_scaling(rows, settings.out_dir / "scaling.png", len(x)))
    return result


def format_scaling_table(rows) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| batch | hidden | pyrovae s/epoch | reference s/epoch | ratio | compute bound s | extra ms/step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['hidden']} | {r['pyrovae_s']:.3f} | {r['reference_s']:.3f} | {r['ratio']:.3f} | {r['compute_bound_s']:.3f} | {r['overhead_per_step_ms']:.3f} |"
        )
    return "\n".join(lines)


def plot_scaling(rows, path, images: int):
    """Two panels: seconds per epoch against batch size (width 400) and against hidden width (batch 256)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, fixed_key, fixed, label in ((axes[0], "batch_size", "hidden", 400, "batch size (hidden 400)"), (axes[1], "hidden", "batch_size", 256, "hidden width (batch 256)")):
        sweep = sorted((r for r in rows if r[fixed_key] == fixed), key=lambda r: r[key])
        xs = [r[key] for r in sweep]
        ax.plot(xs, [r["pyrovae_s"] for r in sweep], "o-", label="pyrovae Trainer (Trace_ELBO)")
        ax.plot(xs, [r["reference_s"] for r in sweep], "s--", label="plain PyTorch reference")
        ax.plot(xs, [r["compute_bound_s"] for r in sweep], ":", color="grey", label="compute lower bound")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(label)
        ax.set_ylabel(f"seconds per epoch ({images:,} images)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("VAE epoch time: pyrovae against the plain loop")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
