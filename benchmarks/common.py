"""Helpers shared by the benchmarks: timing, FLOP counts, the machine's matmul rate, data, peak memory.

Every benchmark function returns a plain dict of figures (JSON-ready); ``run.py`` prints them,
checks the targets and writes ``results.json``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / "data"

#: The network of every benchmark unless told otherwise: 784-400-50 (encoder to loc and scale).
INPUT_DIM, HIDDEN, LATENT = 784, (400,), 50


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device: torch.device):
    """``(seconds, fn())``: the seconds that ``fn()`` takes, GPU work included, and what it returns."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def timed(fn, device: torch.device) -> float:
    """Seconds that ``fn()`` takes, GPU work included."""
    return timed_call(fn, device)[0]


def median(values) -> float:
    return float(statistics.median(values))


def interleave(contenders: dict, epochs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time one epoch of each contender in turn, ``warmup + epochs`` rounds; drop the warm-up rounds.

    ``contenders`` maps a name to a function that runs one epoch and returns its seconds.
    Interleaving spreads the machine's slow moments (other processes, clock changes) over
    all contenders instead of penalising whichever ran during them.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + epochs):
        for name, run_epoch in contenders.items():
            seconds = run_epoch()
            if round_ >= warmup:
                times[name].append(seconds)
    return times


# --------------------------------------------------------------------------- FLOPs and the matmul rate


def linear_flops(widths, rows: int) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of a chain of linear layers ``widths[0] -> widths[1] -> ...`` on ``rows`` inputs."""
    return float(sum(2 * rows * a * b for a, b in zip(widths, widths[1:])))


def encoder_widths(hidden=HIDDEN, latent=LATENT, input_dim=INPUT_DIM, gaussian=True) -> list[int]:
    return [input_dim, *hidden, 2 * latent if gaussian else latent]


def decoder_widths(hidden=HIDDEN, latent=LATENT, input_dim=INPUT_DIM) -> list[int]:
    return [latent, *reversed(hidden), input_dim]


_BEST_RATES: dict[tuple, float] = {}


def matmul_rate(device: torch.device, hidden=HIDDEN, batch_size: int = 256, input_dim: int = INPUT_DIM, seconds: float = 0.3) -> float:
    """FLOP/s of the network's two big layers (``B x 784 -> h`` and ``B x h -> 784``) on ``device``.

    Each layer's matmul (``F.linear`` with the weight laid out as in ``nn.Linear``) is timed in
    blocks of repeats for about ``seconds``; the best block of the faster layer gives the rate, and
    the best rate measured for this shape so far in this process is returned. Taking the best
    makes the rate high (another process slowing the machine only lowers a measurement), so a time
    computed from it is a true lower bound. Call it again after a timed run to refine it.
    """
    device = torch.device(device)
    width = hidden[0] if hidden else LATENT
    key = (str(device), batch_size, input_dim, width)
    best = _BEST_RATES.get(key, 0.0)
    for rows, a, b in ((batch_size, input_dim, width), (batch_size, width, input_dim)):
        x = torch.randn(rows, a, device=device)
        w = torch.randn(b, a, device=device)
        flops = 2.0 * rows * a * b
        repeats = 4
        for _ in range(3):  # warm up, then size a block to about ``seconds / 10``
            spent = timed(lambda: [F.linear(x, w) for _ in range(repeats)], device)
            repeats = max(2, int(repeats * (seconds / 10) / max(spent, 1e-6)))
        for _ in range(5):
            spent = timed(lambda: [F.linear(x, w) for _ in range(repeats)], device)
            best = max(best, flops * repeats / spent)
    _BEST_RATES[key] = best
    return best


def best_rates(device: torch.device) -> dict[tuple, float]:
    """The best rate measured so far on ``device`` for each (batch, input, width) shape."""
    return {key[1:]: rate for key, rate in _BEST_RATES.items() if key[0] == str(torch.device(device))}


# --------------------------------------------------------------------------- settings and data


@dataclass
class Settings:
    """What every benchmark needs to know: the device, data folder, mode, and where to write."""

    device: torch.device
    data_dir: Path = DEFAULT_DATA_DIR
    quick: bool = False
    out_dir: Path | None = None
    seed: int = 0
    #: seconds spent on each measurement of the matmul rate (tests make it tiny)
    rate_seconds: float = 0.3


_MNIST: dict[tuple, object] = {}


def load_mnist(settings: Settings, subset: int | None = None, quick_subset: int | None = None):
    """MNIST as pyrovae loads it (grey levels in [0, 1], training set shuffled with the seed) on the device.

    Read once per process; ``subset`` slices the first images of each split, which is exactly what
    ``load_dataset(subset=...)`` returns (it shuffles before it cuts). In quick mode ``quick_subset``
    stands in for a ``subset`` that was not given.
    """
    if subset is None and settings.quick:
        subset = quick_subset
    import dataclasses

    from pyrovae.data import load_dataset

    key = (str(settings.data_dir), str(settings.device), settings.seed)
    if key not in _MNIST:
        _MNIST[key] = load_dataset("mnist", root=settings.data_dir, device=settings.device, seed=settings.seed)
    data = _MNIST[key]
    if subset is None:
        return data
    first = slice(0, subset)
    return dataclasses.replace(data, train=data.train.select(first), train_labels=data.train_labels[first], test=data.test.select(first), test_labels=data.test_labels[first])


def machine_info(device: torch.device) -> dict:
    """The machine, the libraries and the thread count, for the record."""
    import pyro

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------- peak memory of a subprocess


def thread_env() -> dict[str, str]:
    """Environment that gives a child process this process's torch thread count (``--threads`` included)."""
    threads = str(torch.get_num_threads())
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


#: A tiny parent for the measured command. It must be a fresh, small process: on Linux a child's
#: ``ru_maxrss`` starts from the size of the process it was forked from, so forking the command
#: straight from this (torch-laden) process would count this process's memory as the command's.
_WRAPPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print("PEAK_RSS_KIB", usage.ru_maxrss, os.waitstatus_to_exitcode(status), flush=True)
"""


def peak_rss_of(command: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run ``command`` in a fresh process; return its exit code, peak resident memory (bytes), seconds and output tail.

    The peak is ``ru_maxrss`` of that one process (with the processes it waited for), read with
    ``os.wait4`` by a small wrapper process (Linux reports KiB).
    """
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *command],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout,
        )
        text, code = done.stdout.decode(errors="replace"), done.returncode
    except subprocess.TimeoutExpired as error:
        text, code = (error.output or b"").decode(errors="replace") + "\n(timed out)", None
    peak = None
    for line in text.splitlines():
        if line.startswith("PEAK_RSS_KIB"):
            _, kib, code = line.split()
            peak, code = int(kib) * 1024, int(code)
    return {"returncode": code, "peak_rss_bytes": peak, "seconds": time.perf_counter() - start, "output_tail": text[-3000:]}
