"""Run pyrovae's speed and memory benchmarks and check them against their targets.

    python benchmarks/run.py                  # everything, full sizes (about 15 min on 2 CPU threads)
    python benchmarks/run.py --quick          # everything, small sizes (under 5 min)
    python benchmarks/run.py --only svi,ae    # some of: svi ae nll scaling profile memory distributed gpu uint8
    python benchmarks/run.py --only mmap      # opt-in, never in CI: a generated 4.3 GB array file read from its memory map
    python benchmarks/run.py --device cuda    # benchmarks 1-4 on the GPU
    python benchmarks/run.py --quick --repeat 3   # everything three times; each target's median

Prints each benchmark's figures as it finishes, then one line per target:
name, measured figure, target, ``met`` or ``missed``. With ``--repeat N`` the chosen benchmarks
run N times in a row and each target's figure is the median of the N runs (the runs' figures
are printed beside it). Every ratio compares pyrovae with its reference timed in the same run,
interleaved, as medians of repeats. The load average is printed at the start and at the end:
timings taken while other processes run are noisy. Writes ``results.json`` and ``scaling.png``
to ``--out`` (default ``runs/benchmarks``). No timing is asserted anywhere else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import DEFAULT_DATA_DIR, Settings, machine_info  # noqa: E402

BENCHMARKS = ("svi", "ae", "nll", "scaling", "profile", "memory", "distributed", "gpu", "uint8")
#: benchmarks run only when named in --only (they write gigabytes to the temporary folder)
OPT_IN = ("mmap",)
GB = 1e9


# --------------------------------------------------------------------------- running


def run_benchmark(name: str, settings: Settings) -> dict:
    """Run benchmark ``name``; its dict of figures."""
    if name == "svi":
        from benchmarks.bench_svi import bench_svi

        return bench_svi(settings)
    if name == "ae":
        from benchmarks.bench_ae import bench_ae

        return bench_ae(settings)
    if name == "nll":
        from benchmarks.bench_nll import bench_nll

        return bench_nll(settings)
    if name == "scaling":
        from benchmarks.bench_scaling import bench_scaling

        return bench_scaling(settings)
    if name == "profile":
        from benchmarks.bench_profile import bench_profile

        return bench_profile(settings)
    if name == "memory":
        from benchmarks.bench_memory import bench_memory

        return bench_memory(settings)
    if name == "distributed":
        from benchmarks.bench_distributed import bench_distributed

        return bench_distributed(settings)
    if name == "gpu":
        return run_gpu(settings)
    if name == "uint8":
        from benchmarks.bench_images import bench_uint8

        return bench_uint8(settings)
    if name == "mmap":
        from benchmarks.bench_images import bench_mmap

        return bench_mmap(settings)
    raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")


def run_gpu(settings: Settings) -> dict:
    """Benchmark 1 (Trace_ELBO, with the conventional pattern) on CUDA, or why it was not run."""
    command = "python benchmarks/run.py --only gpu" + (" --quick" if settings.quick else "")
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine", "command": command}
    from benchmarks.bench_svi import bench_svi

    gpu = Settings(device=torch.device("cuda"), data_dir=settings.data_dir, quick=settings.quick, out_dir=settings.out_dir, seed=settings.seed)
    result = bench_svi(gpu, elbos=("trace",))
    result["gpu"] = torch.cuda.get_device_name(gpu.device)
    result["command"] = command
    return result


# --------------------------------------------------------------------------- reporting


def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f} GB"


def describe(name: str, r: dict) -> str:
    """A few readable lines of benchmark ``name``'s figures."""
    if "error" in r and name not in ("memory",):
        return f"{name}: ERROR {r['error']}"
    if name in ("svi", "gpu"):
        if "skipped" in r:
            return f"{name}: skipped ({r['skipped']}); command ready: {r['command']}"
        lines = [f"{name}: {r['images']:,} images, batch {r['batch_size']}, {r['epochs_timed']} timed epochs each after a warm-up, on {r['device']} (matmul {r['matmul_gflops']:.0f} GFLOP/s)"]
        for elbo in ("trace", "meanfield", "iwae"):
            if elbo not in r:
                continue
            row = r[elbo]
            lines.append(f"  {elbo} (k={row['num_particles']}): compute bound {row['compute_bound_s']:.3f} s/epoch")
            for contender in ("pyrovae", "reference", "conventional"):
                if contender in row:
                    c = row[contender]
                    lines.append(f"    {contender:<13} median {c['median_s']:7.3f} s/epoch  {c['images_per_s']:9.0f} images/s  epochs {c['epoch_s']}")
            p = row["pyrovae"]
            lines.append(f"    (pyrovae's whole fit(epochs=1) call: median {p['fit_call_median_s']:.3f} s, of which {p['setup_per_run_s']:.3f} s per-run setup)")
            ratios = f"    pyrovae / reference {row['ratio_reference']:.3f}"
            if "ratio_conventional" in row:
                ratios += f"   pyrovae / conventional {row['ratio_conventional']:.3f}"
            lines.append(ratios + f"   reference / bound {row['reference_over_bound']:.2f}")
        return "\n".join(lines)
    if name == "ae":
        return (
            f"ae: {r['images']:,} images, batch {r['batch_size']}, {r['epochs_timed']} timed epochs, compute bound {r['compute_bound_s']:.3f} s\n"
            f"  pyrovae   median {r['pyrovae']['median_s']:.3f} s/epoch  epochs {r['pyrovae']['epoch_s']}"
            f"  (whole fit call {r['pyrovae']['fit_call_median_s']:.3f} s, setup {r['pyrovae']['setup_per_run_s']:.3f} s)\n"
            f"  reference median {r['reference']['median_s']:.3f} s/epoch  epochs {r['reference']['epoch_s']}\n"
            f"  pyrovae / reference {r['ratio_reference']:.3f}"
        )
    if name == "nll":
        lines = [
            f"nll: {r['images']:,} test images, k={r['num_samples']}: median {r['seconds']:.2f} s of {r['rounds']} rounds {[round(t, 2) for t in r['seconds_runs']]} ({r['images_per_s']:.0f} images/s), compute bound {r['compute_bound_s']:.2f} s, ratio {r['ratio_bound']:.2f}",
            f"  per-image loop (k copies encoded), in the same rounds: median {r['loop_seconds']:.2f} s {[round(t, 2) for t in r['loop_seconds_runs']]} for {r['loop_images']} images -> {r['loop_extrapolated_s']:.1f} s for {r['images']:,}; speed-up {r['speedup_vs_loop']:.2f}x",
            f"  mean NLL on those {r['loop_images']} images: pyrovae {r['mean_nll_first_loop_images']:.2f}, loop {r['loop_mean_nll']:.2f} nats (untrained model)",
        ]
        if "memory" in r:
            m = r["memory"]
            lines.append(f"  k={m['num_samples']} on {m['images']} images in a fresh process: peak RSS {_gb(m['peak_rss_bytes'])} (before the estimate {_gb(m.get('rss_before_bytes'))}), {m.get('seconds', float('nan')):.1f} s")
            if "error" in m:
                lines.append(f"  ERROR {m['error']}")
        return "\n".join(lines)
    if name == "scaling":
        from benchmarks.bench_scaling import format_scaling_table

        text = f"scaling: {r['images']:,} images, {r['epochs_timed']} timed epochs per point\n" + format_scaling_table(r["rows"])
        return text + (f"\n  plot: {r['plot']}" if "plot" in r else "")
    if name == "profile":
        from benchmarks.bench_profile import format_profile

        return format_profile(r)
    if name == "distributed":
        from benchmarks.bench_distributed import format_distributed

        return format_distributed(r)
    if name == "uint8":
        return (
            f"uint8: VAE 784-400-50 on {r['images']:,} MNIST images, batch {r['batch_size']}, {r['epochs_timed']} interleaved epochs on {r['device']}\n"
            f"  uint8 (floats per batch) median {r['uint8']['median_s']:.3f} s/epoch, holds {_gb(r['uint8_bytes'])}  epochs {r['uint8']['epoch_s']}\n"
            f"  float32 tensor           median {r['float']['median_s']:.3f} s/epoch, holds {_gb(r['float_bytes'])}  epochs {r['float']['epoch_s']}\n"
            f"  uint8 / float {r['ratio']:.3f}; resident size {r['bytes_ratio']:.1f}x smaller"
        )
    if name == "mmap":
        lines = [f"mmap: {r['images']:,} images {r['image_shape']} uint8 = {_gb(r['file_bytes'])} generated in {r['generate_s']:.0f} s; {r['network']}, batch {r['batch_size']}"]
        for part in ("mmap", "memory"):
            p = r[part]
            if "error" in p:
                lines.append(f"  {part}: ERROR {p['error']}")
                continue
            lines.append(f"  {part:<6} {p['steps']} steps: {p['images_per_s']:.0f} images/s, peak RssAnon {_gb(p['peak_rss_anon_bytes'])} (storage {p['storage']}, loaded in {p['load_s']:.2f} s)")
        return "\n".join(lines)
    if name == "memory":
        text = f"memory: `{r['command']}`: peak RSS {_gb(r['peak_rss_bytes'])} in {r['seconds']:.1f} s (importing torch, torchvision, pyro, pyrovae alone: {_gb(r['imports_peak_rss_bytes'])})"
        return text + (f"\n  ERROR (exit {r['returncode']}): {r['error']}" if "error" in r else "")
    return json.dumps(r, indent=2, default=str)


def _get(results: dict, *keys):
    value = results
    for key in keys:  # dict keys, or list indices
        if isinstance(value, list) and isinstance(key, int) and key < len(value):
            value = value[key]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return None
    return value


#: (name, path in the results, "<=" or ">=", target, unit)
TARGETS = (
    ("svi: pyrovae / plain PyTorch (Trace_ELBO)", ("svi", "trace", "ratio_reference"), "<=", 1.10, "x"),
    ("svi: pyrovae / conventional Pyro", ("svi", "trace", "ratio_conventional"), "<=", 0.70, "x"),
    ("ae: pyrovae / plain PyTorch", ("ae", "ratio_reference"), "<=", 1.05, "x"),
    ("nll k=1000: time / compute bound", ("nll", "ratio_bound"), "<=", 2.0, "x"),
    ("nll k=1000: speed-up over per-image loop", ("nll", "speedup_vs_loop"), ">=", 2.0, "x"),
    ("nll k=5000: peak memory", ("nll", "memory", "peak_rss_bytes"), "<=", 2 * GB, "GB"),
    ("pyrovae train: peak memory", ("memory", "peak_rss_bytes"), "<=", 1.5 * GB, "GB"),
    ("uint8: MNIST epoch, uint8 / float32 path", ("uint8", "ratio"), "<=", 1.05, "x"),
    ("mmap: peak RssAnon (4.3 GB file; --quick 0.25)", ("mmap", "peak_rss_anon_bytes"), "<=", 2 * GB, "GB"),
    ("mmap: images/s, memory map / in memory", ("mmap", "ratio_to_memory"), ">=", 0.9, "x"),
)

#: figures reported without a target
INFO = (
    ("svi: pyrovae / plain PyTorch (TraceMeanField_ELBO)", ("svi", "meanfield", "ratio_reference"), "x"),
    ("svi: pyrovae / plain PyTorch (IWAE, k=5)", ("svi", "iwae", "ratio_reference"), "x"),
    ("distributed: 2 processes / 1 process, images/s", ("distributed", "rows", 1, "ratio_to_one_process"), "x"),
    ("gpu: pyrovae images/s (Trace_ELBO)", ("gpu", "trace", "pyrovae", "images_per_s"), "/s"),
    ("gpu: pyrovae / plain PyTorch (Trace_ELBO)", ("gpu", "trace", "ratio_reference"), "x"),
)


def _fmt(value, unit: str) -> str:
    if unit == "GB":
        return f"{value / GB:.2f} GB"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:.3f}{unit}"


def target_figures(runs: list[dict]) -> dict[str, dict]:
    """Each target's figure in every run that has it, and their median: ``{name: {"median": ..., "runs": [...]}}``."""
    figures = {}
    for name, path, _, _, _ in TARGETS:
        values = [v for v in (_get(results, *path) for results in runs) if v is not None]
        figures[name] = {"median": statistics.median(values) if values else None, "runs": values}
    return figures


def target_lines(runs: dict | list[dict]) -> list[str]:
    """One line per target: name, figure (the median over ``runs``, a list of results, or one run's results),
    target, met / missed (``not run`` when its benchmark did not run); with several runs, their figures after it."""
    runs = [runs] if isinstance(runs, dict) else runs
    figures = target_figures(runs)
    lines = []
    for name, path, op, target, unit in TARGETS:
        value = figures[name]["median"]
        if value is None:
            status, shown = ("not run" if all(path[0] not in results for results in runs) else "missed (no figure)"), "-"
        else:
            met = value <= target if op == "<=" else value >= target
            status, shown = ("met" if met else "missed"), _fmt(value, unit)
        line = f"{name:<44} {shown:>12}   target {op} {_fmt(target, unit):<9} {status}"
        if len(runs) > 1 and figures[name]["runs"]:
            line += "   (runs: " + ", ".join(_fmt(v, unit) for v in figures[name]["runs"]) + ")"
        lines.append(line)
    return lines


def info_lines(results: dict) -> list[str]:
    lines = []
    for name, path, unit in INFO:
        value = _get(results, *path)
        if value is not None:
            lines.append(f"{name:<52} {_fmt(value, unit):>12}   (no target)")
    if _get(results, "gpu", "skipped"):
        lines.append(f"{'gpu':<52} {'not run':>12}   ({results['gpu']['skipped']}; command: {results['gpu']['command']})")
    return lines


def busy_warning(machine: dict) -> str | None:
    """A warning when other processes keep the CPU busy (load average over a quarter of the cores), else ``None``."""
    load = machine.get("load_average")
    cores = machine.get("cpu_cores") or 1
    if load and load[0] > 0.25 * cores:
        return (
            f"WARNING: the load average is {load[0]:.2f} on {cores} cores: other processes are running, so the timings "
            "will be noisy (with several threads per process, oversubscribed cores can slow each epoch many times over). "
            "Run on a quiet machine for figures to keep; --threads 1 is steadier on a busy one."
        )
    return None


# --------------------------------------------------------------------------- entry point


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 5 minutes")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all), or the opt-in {','.join(OPT_IN)}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto, for benchmarks svi..memory (default: cpu); gpu always uses cuda")
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks"), help="folder for results.json and scaling.png (default: runs/benchmarks)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding MNIST/raw (default: the repository's data/)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="run the chosen benchmarks this many times in a row; each target's figure is the median (default 1)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS + OPT_IN]
    if unknown:
        print(f"run.py: error: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS + OPT_IN)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from pyrovae.devices import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(device=resolve_device(args.device), data_dir=Path(args.data_dir), quick=args.quick, out_dir=out, seed=args.seed)
    machine = machine_info(settings.device)
    print(f"machine: {machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']} with {machine['torch_threads']} threads, pyro {machine['pyro']}, device {machine['device']}")
    if args.repeat < 1:
        print(f"run.py: error: --repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    print(f"mode: {'quick' if args.quick else 'full'}; benchmarks: {', '.join(names)}; runs: {args.repeat}", flush=True)
    print(f"load average (1, 5, 15 min) at the start: {machine.get('load_average')}", flush=True)
    busy = busy_warning(machine)
    if busy:
        print(busy, flush=True)
    print(flush=True)

    runs: list[dict] = []
    started = time.perf_counter()
    for repeat in range(args.repeat):
        if args.repeat > 1:
            print(f"=== run {repeat + 1} of {args.repeat} (load average {machine_info(settings.device).get('load_average')})\n", flush=True)
        results: dict = {}
        for name in names:
            start = time.perf_counter()
            try:
                results[name] = run_benchmark(name, settings)
            except Exception as error:  # one broken benchmark must not hide the others' figures
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            results[name]["wall_s"] = time.perf_counter() - start
            print(describe(name, results[name]))
            print(f"  ({results[name]['wall_s']:.0f} s)\n", flush=True)
        runs.append(results)
    total = time.perf_counter() - started

    machine["load_average_at_end"] = machine_info(settings.device).get("load_average")
    record = {
        "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine,
        "total_s": total,
        "targets": target_figures(runs),
        "results": runs[-1],
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    for line in info_lines(runs[-1]):
        print(line)
    print(f"load average (1, 5, 15 min) at the end: {machine['load_average_at_end']}")
    what = "the median of " + str(len(runs)) + " runs" if len(runs) > 1 else "one run"
    print(f"targets ({what}; {total:.0f} s in all; figures in {out / 'results.json'}):")
    for line in target_lines(runs):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
