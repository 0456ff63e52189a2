"""Benchmark 4b: where the time of a training step goes (forward, backward, optimizer, Pyro tracing).

Two views of the same few hundred steps of batch 256:

1. A phase split. Each step of pyrovae's VAE (``Trace_ELBO().differentiable_loss(vae.model,
   vae.guide, x)``, ``backward``, ``Adam.step``) and of the plain reference is timed phase by
   phase. Pyro's tracing overhead is the pyrovae forward minus the reference forward (the same
   arithmetic without Pyro); the trainer's own overhead is a Trainer epoch over the same batches
   minus the sum of pyrovae's phases.
2. A ``cProfile`` of ``Trainer.fit`` over those batches: the functions with the most own time,
   and own time grouped by package (pyro, pyrovae, torch's Python, and C calls: kernels and builtins).
"""

from __future__ import annotations

import cProfile
import math
import pstats
import time
from collections import defaultdict

import torch

from .bench_svi import _fused_adam, pyrovae_vae_runner
from .common import Settings, load_mnist, sync, timed
from .references import ReferenceVAE, make_adam, trace_elbo_loss

__all__ = ["bench_profile", "format_profile"]


def _phase_split(step_loss, params, x: torch.Tensor, batch_size: int, device, fused) -> dict:
    """Seconds spent in forward, backward and the optimizer over one pass through ``x``."""
    optimizer = make_adam(params, fused=fused)
    totals = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        batch = x[index[start : start + batch_size]]
        sync(device)
        t0 = time.perf_counter()
        loss = step_loss(batch)
        sync(device)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        sync(device)
        t3 = time.perf_counter()
        totals["forward"] += t1 - t0
        totals["backward"] += t2 - t1
        totals["optimizer"] += t3 - t2
    totals["total"] = sum(totals.values())
    return totals


def _per_call_ms(fns: dict, device, seconds: float = 0.3, rounds: int = 7) -> dict:
    """Best milliseconds per call of each function in ``fns``, measured in interleaved blocks.

    Round after round, each function runs a block of calls in turn; the best block of each is
    kept (the least disturbed by the machine's other work), so the differences between them hold.
    """
    repeats = {}
    for name, fn in fns.items():
        fn()
        spent = timed(lambda: [fn() for _ in range(10)], device)
        repeats[name] = max(10, int(10 * seconds / max(spent, 1e-6)))
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(lambda: [fn() for _ in range(repeats[name])], device) / repeats[name])
    return {name: 1000 * t for name, t in best.items()}


def _fixed_costs(vae, reference, elbo, x2: torch.Tensor, device, fused) -> dict:
    """Per-step costs that do not grow with the batch: whole training steps on 2 images, four ways.

    Each step is forward, backward and Adam, on 2 images where arithmetic is nil:

    * ``reference``: the plain PyTorch loss;
    * ``distributions``: the same estimator from pyrovae's modules and ``torch.distributions``
      objects (the guide's Normal, the prior, the likelihood), without Pyro;
    * ``traced``: Pyro runs ``vae.guide`` under ``poutine.trace`` and ``vae.model`` under
      ``trace(replay(...))``, and the loss is the sum of each site's scaled ``log_prob``: Pyro's
      effect handlers without the ELBO class;
    * ``pyrovae``: ``Trace_ELBO().differentiable_loss``, as the Trainer calls it.

    The differences split Pyro's cost per step: distribution objects, tracing, and
    ``Trace_ELBO``'s own bookkeeping (log-prob and score-part tables, ``.item()`` reads,
    NaN checks and their backward hooks, the surrogate loss). ``declare_parameters_ms`` is the
    part of tracing that declares the networks' parameters (``pyro.module``) as Pyro ``param`` sites.
    """
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    n = 60000  # the batch stands for MNIST's training set, as in the Trainer

    def distributions_loss(x):
        loc, scale = vae.encoder(x)
        q = dist.Normal(loc, scale).to_event(1)
        z = q.rsample()
        log_w = vae.likelihood(vae.decoder(z)).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
        return -log_w.mean()

    def traced_loss(x):
        guide = poutine.trace(vae.guide).get_trace(x, n)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, n)
        elbo_value = 0.0
        for trace, sign in ((model, 1), (guide, -1)):
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    elbo_value = elbo_value + sign * (site["fn"].log_prob(site["value"]) * site["scale"]).sum()
        return -elbo_value / n

    def step(loss_fn, params):
        optimizer = make_adam(list(params), fused=fused)

        def run():
            loss = loss_fn(x2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    def declare():
        vae._declare("decoder", "likelihood", "prior", "encoder")

    steps = _per_call_ms(
        {
            "reference": step(lambda x: trace_elbo_loss(reference, x), reference.parameters()),
            "distributions": step(distributions_loss, vae.parameters()),
            "traced": step(traced_loss, vae.parameters()),
            "pyrovae": step(lambda x: elbo.differentiable_loss(vae.model, vae.guide, x, num_data=n) / n, vae.parameters()),
        },
        device,
    )
    with torch.no_grad():
        declare_ms = _per_call_ms({"declare": lambda: poutine.trace(declare).get_trace()}, device)["declare"]
    return {
        "step_ms": steps,
        "pyro_fixed": steps["pyrovae"] - steps["reference"],
        "split_ms": {
            "distribution objects": steps["distributions"] - steps["reference"],
            "Pyro tracing (model and guide under trace/replay)": steps["traced"] - steps["distributions"],
            "Trace_ELBO bookkeeping": steps["pyrovae"] - steps["traced"],
        },
        "declare_parameters_ms": declare_ms,
    }


def _group(path: str) -> str:
    if path == "~" or path.startswith("<"):
        return "C calls (torch kernels, builtins)"
    for marker, name in (("/pyrovae/", "pyrovae (Python)"), ("/pyro/", "pyro (Python)"), ("/torch/", "torch (Python)")):
        if marker in path:
            return name
    return "other Python"


def _cprofile(run, top: int) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler)
    by_group: dict[str, float] = defaultdict(float)
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        by_group[_group(path)] += own
        rows.append({"function": f"{path.split('site-packages/')[-1]}:{line}({name})" if path != "~" else name, "calls": calls, "own_s": own, "cumulative_s": cumulative})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return {"total_s": stats.total_tt, "by_group_s": dict(sorted(by_group.items(), key=lambda kv: -kv[1])), "top": rows[:top]}


def bench_profile(settings: Settings, steps: int | None = None, batch_size: int = 256, top: int = 15, data=None) -> dict:
    """The phase split and the cProfile summary over ``steps`` steps (default 80 quick, 235 full = one MNIST epoch)."""
    import pyro
    from pyro.infer import Trace_ELBO

    from pyrovae import VAE, VAEConfig

    steps = steps or (80 if settings.quick else 235)
    if data is None:
        data = load_mnist(settings, subset=steps * batch_size)
    x = data.train[: steps * batch_size]
    device, fused = settings.device, _fused_adam(settings.device)

    torch.manual_seed(settings.seed)
    vae = VAE(VAEConfig()).to(device)
    elbo = Trace_ELBO()
    torch.manual_seed(settings.seed)
    reference = ReferenceVAE().to(device)

    n = len(x)
    phases = {}
    with pyro.validation_enabled(False):  # as in Trainer.fit, which checks the data once up front
        for _ in range(2):  # the first round warms up; keep the second
            phases["reference"] = _phase_split(lambda b: trace_elbo_loss(reference, b), reference.parameters(), x, batch_size, device, fused)
            phases["pyrovae"] = _phase_split(
                lambda b: elbo.differentiable_loss(vae.model, vae.guide, b, num_data=n) / n, vae.parameters(), x, batch_size, device, fused
            )
        fixed = _fixed_costs(vae, reference, elbo, x[:2], device, fused)

    trainer_epoch = pyrovae_vae_runner(settings, x, batch_size=batch_size)
    trainer_epoch()  # warm-up
    trainer_epoch()
    trainer_s, setup_s = trainer_epoch.in_loop[-1], trainer_epoch.wall[-1] - trainer_epoch.in_loop[-1]
    profile = _cprofile(trainer_epoch, top)

    return {
        "steps": len(range(0, len(x), batch_size)),
        "batch_size": batch_size,
        "device": str(device),
        "pyro_version": pyro.__version__,
        "phases_s": phases,
        "pyro_tracing_overhead_s": phases["pyrovae"]["forward"] - phases["reference"]["forward"],
        "fixed_per_step_ms": fixed,
        "trainer_epoch_s": trainer_s,
        "trainer_setup_per_run_s": setup_s,
        "trainer_overhead_s": trainer_s - phases["pyrovae"]["total"],
        "cprofile": profile,
    }


def format_profile(result: dict) -> str:
    """A readable summary of :func:`bench_profile`'s figures."""
    steps = result["steps"]
    lines = [f"profile: {steps} steps of batch {result['batch_size']} on {result['device']} (Pyro validation off in the steps, as in the Trainer)"]
    lines.append(f"  {'phase':<12}{'reference s':>13}{'pyrovae s':>12}{'pyrovae ms/step':>17}")
    for phase in ("forward", "backward", "optimizer", "total"):
        ref, pv = result["phases_s"]["reference"][phase], result["phases_s"]["pyrovae"][phase]
        lines.append(f"  {phase:<12}{ref:>13.3f}{pv:>12.3f}{1000 * pv / steps:>17.3f}")
    lines.append(f"  Pyro tracing overhead (pyrovae forward - reference forward): {result['pyro_tracing_overhead_s']:.3f} s, {1000 * result['pyro_tracing_overhead_s'] / steps:.3f} ms/step")
    fixed = result["fixed_per_step_ms"]
    step_ms = fixed["step_ms"]
    lines.append(
        "  fixed cost per step (forward, backward and Adam on 2 images, best of interleaved blocks): "
        + ", ".join(f"{name} {ms:.3f} ms" for name, ms in step_ms.items())
    )
    lines.append(f"  Pyro's fixed cost, pyrovae - reference: {fixed['pyro_fixed']:.3f} ms per step, of which")
    for part, ms in fixed["split_ms"].items():
        lines.append(f"    {ms:+.3f} ms  {part}")
    lines.append(f"    ({fixed['declare_parameters_ms']:.3f} ms of the tracing declare the networks' parameters as param sites)")
    lines.append(f"  Trainer epoch over the same batches: {result['trainer_epoch_s']:.3f} s; beyond the steps themselves: {result['trainer_overhead_s']:.3f} s")
    lines.append(f"  Trainer.fit's setup before its first epoch (data check, optimizer): {result['trainer_setup_per_run_s']:.3f} s per run")
    profile = result["cprofile"]
    lines.append(f"  cProfile of Trainer.fit ({profile['total_s']:.2f} s under the profiler), own time by group:")
    for group, seconds in profile["by_group_s"].items():
        lines.append(f"    {group:<36}{seconds:8.3f} s  {100 * seconds / max(profile['total_s'], 1e-9):5.1f}%")
    lines.append("  functions with the most own time:")
    for row in profile["top"]:
        lines.append(f"    {row['own_s']:8.3f} s {row['calls']:>8} calls  {row['function']}")
    return "\n".join(lines)
