"""Data-parallel training with :mod:`torch.distributed`: who this process is, shards, all-reduces.

**Who am I.** With a process group initialised (by the user's own script, or by
:func:`init_from_env` from torchrun's environment) this process is rank :func:`rank` of
:func:`world_size`, and rank 0 is the main process (:func:`is_main`), the one that writes files
and prints. Without one, or with a group of one process, it is the only process: rank 0 of 1,
and every helper here returns its input unchanged without calling torch.distributed. Nothing
here keeps state of its own: every answer is read from torch.distributed each time.

**Global batches and shards.** ``batch_size`` is the global batch. Every rank draws the same
seeded permutation (and the same binarization noise) for the whole global batch, then keeps its
contiguous shard, :func:`shard_bounds`: ``b`` images over ``W`` ranks give the first ``b % W``
ranks ``b // W + 1`` images and the others ``b // W``. So ``W`` processes see exactly the images
that one process sees, in the same steps.

**Collectives.** Every helper that communicates is a collective: every rank of the group must
call it, in the same order, or the ranks wait for each other for ever (until the group's
timeout, or until the launcher stops them). Tensors travel on the device they are on (gloo for
CPU tensors, NCCL for CUDA tensors); Python numbers travel as float64 or int64 CPU tensors when
the group has a CPU backend (gloo, or ``"cpu:gloo,cuda:nccl"`` as :func:`init_from_env` starts
on GPUs), else on the current CUDA device. :func:`cpu_group` gives a group for small CPU-side
messages (the Trainer's per-step stop flag) that never waits for a GPU.

**Statistics of a global batch.** A loss that is a mean over the batch of per-image terms splits
over the shards: each rank's gradient of its shard's mean, weighted by its share of the batch and
summed (the Trainer does that), is one process's gradient. A loss that is a non-linear function of
a mean over the batch (free bits' floor on the batch's KL, a sparse autoencoder's penalty on the
batch's mean activation) does not: it needs that mean of the whole batch, :func:`batch_mean`.

**Threads.** On CPUs, each of ``W`` processes on a machine should use about ``cores / W``
threads: torchrun sets ``OMP_NUM_THREADS=1`` for each process unless it is set already, so say
``OMP_NUM_THREADS=4 torchrun --nproc_per_node=2 -m pyrovae train ...`` on 8 cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.batches import shard_bounds as data_shard_bounds
from ..errors import InputError

__all__ = [
    "is_initialized", "is_distributed", "rank", "world_size", "is_main", "shard_bounds", "rank_seed", "env_world_size", "init_from_env",
    "destroy", "cpu_group", "all_reduce_", "broadcast_", "batch_mean", "all_sum", "all_mean", "all_max", "any_rank", "all_gather_objects",
]

#: the environment variables torchrun sets for each process, read by :func:`init_from_env`
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- who am I


def is_initialized() -> bool:
    """Whether torch.distributed has a default process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and prints (the only one without a group)."""
    return rank() == 0


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank_``'s contiguous shard of ``n`` items over ``world`` ranks (default: this process's).

    The first ``n % world`` ranks hold one item more; a rank holds none when ``n < world``.
    One process holds ``(0, n)``.
    """
    return data_shard_bounds(n, rank() if rank_ is None else rank_, world_size() if world is None else world)


#: an odd 64-bit constant (2^64 / golden ratio) that spreads the seeds of ranks apart
_SPREAD = 0x9E3779B97F4A7C15


def rank_seed(seed: int, rank_: int, salt: int = 0) -> int:
    """The seed of torch's global RNG on rank ``rank_`` for a run seeded with ``seed``: ``seed`` itself on
    rank 0 (with ``salt`` 0), so one process is seeded as before; a different seed on every other rank,
    so that the random draws inside a step (a VAE's z, dropout) are independent across shards."""
    if rank_ == 0 and salt == 0:
        return seed
    return (seed + rank_ * _SPREAD + salt * _SPREAD * _SPREAD) % 2**64


# --------------------------------------------------------------------------- the group


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it), 1 when unset."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"WORLD_SIZE must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise InputError(f"WORLD_SIZE must be a positive integer, got {text!r}")
    return value


def init_from_env(device: torch.device, timeout: timedelta | None = None) -> bool:
    """Initialise the default process group from torchrun's environment for a process computing on ``device``.

    Does nothing, and returns ``False``, when a group is initialised already (by the caller's
    script) or ``WORLD_SIZE`` is unset or 1. Otherwise reads ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (``init_method="env://"``), starts the group with the
    backend ``"cpu:gloo,cuda:nccl"`` for a CUDA ``device`` (NCCL for the tensors on the GPU, gloo for
    small CPU messages), after making ``device`` the current CUDA device, or ``"gloo"`` for the
    CPU, and returns ``True``: the caller then ends it with :func:`destroy`.
    """
    if dist.is_available() and dist.is_initialized():
        return False
    world = env_world_size()
    if world == 1:
        return False
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={world} asks for several processes, but this torch has no torch.distributed")
    missing = [name for name in TORCHRUN_ENV if name != "LOCAL_RANK" and name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world} asks for several processes, but {', '.join(missing)} are not set: start them with torchrun")
    device = torch.device(device)
    options = {} if timeout is None else {"timeout": timeout}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method="env://", **options)
    else:
        dist.init_process_group("gloo", init_method="env://", **options)
    return True


def destroy() -> None:
    """End the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cpu_group():
    """The group of every rank to pass to collectives of CPU tensors: ``None``, torch.distributed's name for the
    default group, when one of its backends is for the CPU (gloo, ``"cpu:gloo,cuda:nccl"``), else a new gloo
    group (then this is a collective call). ``None`` too without a group of several processes.

    Why not the default group's object: a holder of it (a Trainer) could keep it alive after
    ``destroy_process_group`` until the interpreter exits (in a reference cycle, say), and a gloo group
    that lives that long aborts the process at exit ("terminate called without an active exception").
    """
    if not is_distributed() or "cpu" in str(dist.get_backend_config()):
        return None
    return dist.new_group(backend="gloo")


def _value_device(group) -> torch.device:
    """Where Python numbers travel in ``group``: the CPU when it has a CPU backend, else the current GPU."""
    if "cpu" in str(dist.get_backend_config(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# --------------------------------------------------------------------------- tensors


def _buckets(tensors: Sequence[Tensor]) -> dict:
    """The indices of ``tensors`` by (device, dtype): one flat buffer per bucket."""
    buckets: dict = {}
    for index, tensor in enumerate(tensors):
        buckets.setdefault((tensor.device, tensor.dtype), []).append(index)
    return buckets


def all_reduce_(tensors: Sequence[Tensor], scale: float | None = None, op=None, group=None) -> Sequence[Tensor]:
    """Sum (or reduce with ``op``, a ``torch.distributed.ReduceOp``) each tensor over the ranks, in place.

    ``scale`` multiplies this rank's values first (a weighted sum: each rank's share of a batch).
    The tensors are copied into one flat buffer per device and dtype, so that any number of them
    costs one collective per kind. Without a group of several processes, only ``scale`` is applied.
    Returns ``tensors``.
    """
    if scale is None and not is_distributed():
        return tensors
    op = dist.ReduceOp.SUM if op is None else op
    for indices in _buckets(tensors).values():
        parts = [tensors[i] for i in indices]
        flat = torch.cat([part.reshape(-1) for part in parts])
        if scale is not None:
            flat.mul_(scale)
        if is_distributed():
            dist.all_reduce(flat, op=op, group=group)
        offset = 0
        for part in parts:
            part.copy_(flat[offset : offset + part.numel()].view_as(part))
            offset += part.numel()
    return tensors


def broadcast_(tensors: Sequence[Tensor], src: int = 0, group=None) -> Sequence[Tensor]:
    """Overwrite each tensor, in place, with rank ``src``'s (one flat buffer per device and dtype). Returns ``tensors``."""
    if not is_distributed():
        return tensors
    for indices in _buckets(tensors).values():
        parts = [tensors[i] for i in indices]
        flat = torch.cat([part.detach().reshape(-1) for part in parts])
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        with torch.no_grad():
            for part in parts:
                part.copy_(flat[offset : offset + part.numel()].view_as(part))
                offset += part.numel()
    return tensors


class _BatchMean(torch.autograd.Function):
    """The share-weighted sum over the ranks of ``local`` forward; the identity backward (no collective there)."""

    @staticmethod
    def forward(ctx, local: Tensor, share: float, group) -> Tensor:
        return all_reduce_([local * share], group=group)[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def batch_mean(local: Tensor, share: float, group=None) -> Tensor:
    """The mean over the global batch of a statistic whose mean over this rank's shard is ``local`` (any shape),
    this rank holding ``share`` of the batch's images: ``sum_r share_r * local_r``, the same value on every rank
    (a collective call). One process gets ``local`` itself back.

    The gradient flows into this rank's ``local`` alone, unchanged, as if the result were ``local``: a
    loss ``f(batch_mean(local_r))`` on rank r has the gradient ``f'(mean) * d local_r``, and the sum over
    the ranks of these gradients, each weighted by its ``share_r`` (as the Trainer averages gradients), is
    ``f'(mean) * d mean``: one process's gradient of ``f(mean)`` on the whole batch. (An all-reduce
    differentiated as one, :func:`torch.distributed.nn.functional.all_reduce`, would all-reduce the
    gradients in backward too: with that weighting, ``W * share_r`` times the gradient, wrong for uneven shards.)
    """
    if not is_distributed():
        return local
    return _BatchMean.apply(local, float(share), group)


# --------------------------------------------------------------------------- Python numbers


def _reduce_numbers(values: Sequence[float], dtype: torch.dtype, op, group) -> list:
    buffer = torch.tensor(list(values), dtype=dtype, device=_value_device(group))
    dist.all_reduce(buffer, op=op, group=group)
    return buffer.tolist()


def all_sum(value, group=None):
    """The sum over the ranks of ``value``: a tensor (a new one, same shape), a float, or a sequence of floats (a list)."""
    if isinstance(value, Tensor):
        return all_reduce_([value.clone()], group=group)[0]
    if not is_distributed():
        return value if isinstance(value, (int, float)) else list(value)
    if isinstance(value, (int, float)):
        return _reduce_numbers([value], torch.float64, dist.ReduceOp.SUM, group)[0]
    return _reduce_numbers(value, torch.float64, dist.ReduceOp.SUM, group)


def all_mean(value, weight: float = 1.0, group=None):
    """The mean over the ranks of ``value`` (tensor, float or sequence of floats), each rank's weighted by
    ``weight`` (its images, say): ``sum_r weight_r * value_r / sum_r weight_r``. Needs a positive total weight.
    One process gets ``value`` back (a copy)."""
    if not is_distributed():
        return value.clone() if isinstance(value, Tensor) else value if isinstance(value, (int, float)) else list(value)
    if isinstance(value, Tensor):
        total = all_sum(float(weight), group)
        return all_reduce_([value.clone()], scale=float(weight), group=group)[0] / total
    values = [value] if isinstance(value, (int, float)) else list(value)
    sums = all_sum([float(v) * weight for v in values] + [float(weight)], group)
    means = [s / sums[-1] for s in sums[:-1]]
    return means[0] if isinstance(value, (int, float)) else means


def all_max(values: Sequence[int], group=None) -> list[int]:
    """The elementwise maximum over the ranks of a few integers (flags, signal numbers)."""
    if not is_distributed():
        return list(values)
    return [int(v) for v in _reduce_numbers(values, torch.int64, dist.ReduceOp.MAX, group)]


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` holds on any rank: the same answer on every rank."""
    return bool(all_max([int(bool(flag))], group)[0])


def all_gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable: tensors, numbers, dicts), in rank order; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered
