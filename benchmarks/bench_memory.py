"""Benchmark 5: peak resident memory of ``pyrovae train`` on MNIST with its defaults.

The command runs in a fresh process, writing its run folder to a temporary directory; its peak
RSS comes from ``os.wait4`` (see :func:`benchmarks.common.peak_rss_of`). ``--quick`` trains one
epoch instead of the default ten: the peak is reached in the first epoch (the data, the model,
Adam's state and one batch's activations are all there by then) and in the evaluation after it.
For scale, the peak of a process that only imports torch, torchvision, pyro and pyrovae is
measured too.
"""

from __future__ import annotations

import sys
import tempfile

from .common import Settings, peak_rss_of, thread_env

__all__ = ["bench_memory", "train_command"]


def train_command(settings: Settings, out: str, epochs: int | None) -> list[str]:
    """``pyrovae train`` (as ``python -m pyrovae.cli train``) with its defaults, but the output folder, data folder and device."""
    command = [sys.executable, "-m", "pyrovae.cli", "train", "--out", out, "--data-dir", str(settings.data_dir), "--device", str(settings.device), "--no-progress"]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    return command


def bench_memory(settings: Settings, epochs: int | None = None) -> dict:
    """Peak RSS of ``pyrovae train`` (``epochs``: default 1 quick, the CLI's default full) and of the bare imports."""
    if epochs is None and settings.quick:
        epochs = 1
    with tempfile.TemporaryDirectory(prefix="pyrovae-bench-") as out:
        command = train_command(settings, out + "/run", epochs)
        run = peak_rss_of(command, env=thread_env())
    imports = peak_rss_of([sys.executable, "-c", "import torch, torchvision, pyro, pyrovae"], env=thread_env())
    result = {
        "command": " ".join(["pyrovae", *command[3:]]),
        "epochs": epochs if epochs is not None else "default",
        "returncode": run["returncode"],
        "peak_rss_bytes": run["peak_rss_bytes"],
        "seconds": run["seconds"],
        "imports_peak_rss_bytes": imports["peak_rss_bytes"],
    }
    if run["returncode"] != 0:
        result["error"] = run["output_tail"][-1500:]
    return result
