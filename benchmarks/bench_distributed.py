"""Benchmark 7: data-parallel training with torchrun, 1 process against N, at a fixed total thread count.

    python benchmarks/run.py --only distributed [--quick]

Each contender is ``torchrun --nproc_per_node=P -m pyrovae train`` (the 784-400-50 VAE, batch 256
global, ``--eval-images 0``) in a fresh set of processes, with ``OMP_NUM_THREADS = total / P`` so
that the machine's threads are shared the same way; P=1 is the single process. The figure is the
images per second of the timed epochs (every epoch after the first, from the run's
``metrics.json``), and the ratio P processes / 1 process. On one CPU machine this mostly measures
what the gradient all-reduce (gloo) and the per-step stop flag cost: the compute is the same, split
in two. On N GPUs the same command, with ``--device auto`` (``LOCAL_RANK`` picks the GPU), measures
scaling: see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .common import Settings

__all__ = ["bench_distributed", "torchrun_command"]


def torchrun_command(processes: int, out: str, settings: Settings, epochs: int, subset: int | None) -> list[str]:
    """``torchrun --nproc_per_node=processes -m pyrovae train ...`` (a single plain process for ``processes=1``)."""
    launcher = [sys.executable, "-m", "pyrovae"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "pyrovae",
    ]
    command = [*launcher, "train", "--out", out, "--data-dir", str(settings.data_dir), "--device", str(settings.device),
               "--epochs", str(epochs), "--eval-images", "0", "--no-progress", "--seed", str(settings.seed)]
    return command + (["--subset", str(subset)] if subset else [])


def bench_distributed(settings: Settings, processes: tuple[int, ...] = (1, 2), total_threads: int | None = None,
                      epochs: int | None = None, subset: int | None = None) -> dict:
    """Images per second of ``pyrovae train`` under torchrun with each count of ``processes``, ``total_threads`` shared."""
    total_threads = total_threads or torch.get_num_threads()
    epochs = epochs or (3 if settings.quick else 5)
    subset = subset if subset is not None else (20_000 if settings.quick else None)
    rows = []
    for count in processes:
        threads = max(1, total_threads // count)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        folder = tempfile.mkdtemp(prefix="pyrovae-bench-ddp-")
        try:
            command = torchrun_command(count, folder + "/run", settings, epochs, subset)
            run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if run.returncode != 0:
                rows.append({"processes": count, "threads_per_process": threads, "error": (run.stdout + run.stderr)[-1500:]})
                continue
            history = json.loads(Path(folder, "run", "metrics.json").read_text())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        seconds = [row["seconds"] for row in history[1:]] or [history[0]["seconds"]]
        images = subset or 60_000
        median = statistics.median(seconds)
        rows.append({"processes": count, "threads_per_process": threads, "epoch_s": [round(s, 3) for s in seconds],
                     "median_s": median, "images_per_s": images / median})
    single = next((row for row in rows if row["processes"] == 1 and "error" not in row), None)
    for row in rows:
        if single is not None and "error" not in row:
            row["ratio_to_one_process"] = row["images_per_s"] / single["images_per_s"]
    return {
        "device": str(settings.device),
        "total_threads": total_threads,
        "images": subset or 60_000,
        "epochs": epochs,
        "rows": rows,
        "gpu_command": "torchrun --nproc_per_node=N -m pyrovae train --device auto --epochs 5 --eval-images 0",
    }


def format_distributed(result: dict) -> str:
    lines = [f"distributed: {result['images']:,} images, {result['epochs']} epochs (the first untimed), "
             f"{result['total_threads']} threads in all, on {result['device']}"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"  {row['processes']} process(es): ERROR {row['error']}")
            continue
        ratio = f"   x{row['ratio_to_one_process']:.3f} of one process" if "ratio_to_one_process" in row else ""
        lines.append(f"  {row['processes']} process(es) x {row['threads_per_process']} thread(s): median {row['median_s']:.2f} s/epoch, "
                     f"{row['images_per_s']:,.0f} images/s{ratio}  epochs {row['epoch_s']}")
    lines.append(f"  on N GPUs: {result['gpu_command']}")
    return "\n".join(lines)
