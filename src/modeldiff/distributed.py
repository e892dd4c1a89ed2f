"""Data-parallel diffing on ``torch.distributed``: batches sharded over ranks, merged on rank 0.

``diff_latents(..., distributed=True)`` under ``torchrun`` runs batch ``k`` of the run's global
batch plan on rank ``k % world_size``. Batches go in rounds of ``world_size``; after each round every
rank's per-batch statistics travel to rank 0 with tensor collectives (an ``all_gather`` of the byte
sizes, then a ``gather`` of the padded bytes: nothing is pickled), and rank 0 folds them into the
running statistics in global batch order. That is exactly the arithmetic of a single-process run, so
the float64 statistics, the ranking and the intervals (same ``seed``) are bit-identical. Rank 0
returns the :class:`~modeldiff.LatentDiff`; every other rank returns ``None``.

The process group is the caller's if one is initialised, otherwise it is initialised from
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with ``nccl``
when CUDA is available and ``gloo`` otherwise. See docs/scale.md for the launch recipe.

Example:
    >>> import torch
    >>> state = {"a": torch.arange(3), "b": torch.tensor(2.5, dtype=torch.float64)}
    >>> buf, sizes = pack_state(state)
    >>> out = unpack_state(buf, sizes, state)
    >>> out["a"].tolist(), float(out["b"]), out["b"].dim()
    ([0, 1, 2], 2.5, 0)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Int, UInt8
from torch import Tensor

from .errors import ArgumentError
from .stats import SiteStats

__all__ = ["gather_batches", "gather_states", "init_from_env", "pack_state", "unpack_state"]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, initialising it from torchrun's
    environment when needed (``nccl`` with CUDA, else ``gloo``, unless ``backend`` says).

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ):  # not under torchrun: no group, no environment
        ...     for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        ...         _ = os.environ.pop(var, None)
        ...     try:
        ...         init_from_env()
        ...     except ArgumentError as err:
        ...         print(str(err).split(":")[0])
        distributed=True needs a process group, and RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> init_from_env()  # the caller's group is used as it is
        (0, 1)
        >>> dist.destroy_process_group()
    """
    if not dist.is_available():
        raise ArgumentError(
            "this torch build has no torch.distributed; run without distributed=True"
        )
    if not dist.is_initialized():
        missing = [
            v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
        ]
        if missing:
            raise ArgumentError(
                f"distributed=True needs a process group, and {', '.join(missing)} are not set: "
                "launch with torchrun (torchrun --nproc-per-node N script.py) or call "
                "torch.distributed.init_process_group first"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def pack_state(state: Mapping[str, Tensor]) -> tuple[UInt8[Tensor, " n"], Int[Tensor, " k"]]:
    """A state dict as one byte tensor and the byte size of each entry (keys in sorted order).

    Example:
        >>> buf, sizes = pack_state({"b": torch.zeros(2, dtype=torch.int64), "a": torch.ones(3)})
        >>> buf.dtype, sizes.tolist()  # "a": 3 float32 (12 bytes), then "b": 2 int64 (16 bytes)
        (torch.uint8, [12, 16])
    """
    parts = [
        state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8) for k in sorted(state)
    ]
    sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
    buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return buf, sizes


def unpack_state(
    buf: UInt8[Tensor, " n"], sizes: Int[Tensor, " k"], template: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Invert :func:`pack_state`; ``template`` (a state dict of the same kind) gives each entry's
    dtype and whether it is a scalar.

    Example:
        >>> state = {"count": torch.tensor(7), "mean": torch.tensor([0.5, -1.0], dtype=torch.float64)}
        >>> out = unpack_state(*pack_state(state), template=state)
        >>> out["count"], out["mean"]
        (tensor(7), tensor([ 0.5000, -1.0000], dtype=torch.float64))
    """
    out, at = {}, 0
    for key, n in zip(sorted(template), sizes.tolist(), strict=True):
        t = buf[at : at + n].clone().view(template[key].dtype)  # clone: aligned for the view
        out[key] = t.reshape(()) if template[key].dim() == 0 else t
        at += n
    return out


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_states(
    n_batches: int,
    run_batch: Callable[[int], dict[str, Tensor]],
    template: Mapping[str, Tensor],
    fold: Callable[[dict[str, Tensor]], Any],
) -> bool:
    """Run this rank's share of ``n_batches`` and hand every batch's flat state to ``fold`` on
    rank 0, in global batch order. Returns whether this is rank 0.

    ``run_batch(k)`` returns batch ``k``'s partial statistics as one flat ``dict[str, Tensor]`` with
    the keys, dtypes and ranks of ``template`` (shapes may differ). Batch ``k`` runs on rank
    ``k % world_size``; after each round of ``world_size`` batches the states travel to rank 0 as
    bytes (an ``all_gather`` of their sizes, then a ``gather`` of the padded bytes, nothing
    pickled). Every rank must call this with the same ``n_batches``.

    Example:
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> seen = []
        >>> gather_states(3, lambda k: {"x": torch.full((2,), float(k))}, {"x": torch.zeros(2)},
        ...               lambda state: seen.append(state["x"].tolist()))
        True
        >>> seen  # in global batch order
        [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
        >>> dist.destroy_process_group()
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _device()
    for first in range(0, n_batches, world):
        k = first + rank
        if k < n_batches:
            buf, sizes = pack_state(run_batch(k))
        else:  # the last round may have fewer batches than ranks
            buf = torch.zeros(0, dtype=torch.uint8)
            sizes = torch.zeros(len(template), dtype=torch.int64)
        # sizes first (so rank 0 can receive padded buffers), then the bytes
        head = sizes.to(dev)
        heads = [torch.empty_like(head) for _ in range(world)]
        dist.all_gather(heads, head)
        width = max(int(h.sum()) for h in heads)
        padded = torch.zeros(width, dtype=torch.uint8, device=dev)
        padded[: buf.numel()] = buf.to(dev)
        got = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, got, dst=0)
        del padded, buf
        if rank != 0:
            continue
        assert got is not None
        for r in range(world):
            if first + r >= n_batches:
                break
            fold(unpack_state(got[r].cpu(), heads[r].cpu(), template))
        del got
    return rank == 0


def gather_batches(
    n_batches: int,
    run_batch: Callable[[int], tuple[SiteStats, SiteStats, int]],
    stats: tuple[SiteStats, SiteStats],
    *,
    on_batch: Callable[[], Any] | None = None,
) -> int | None:
    """Run this rank's share of ``n_batches`` and fold every rank's partial statistics into
    ``stats`` on rank 0, in global batch order.

    ``run_batch(k)`` returns batch ``k``'s fresh ``(base, fine-tuned)`` statistics and its outlier
    count. Returns the total outlier count on rank 0, ``None`` on the other ranks (whose ``stats``
    stay untouched). Every rank must call this with the same ``n_batches``.

    Example:
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> def run_batch(k):
        ...     base, tuned = SiteStats(3, 2), SiteStats(3, 2)
        ...     for st in (base, tuned):
        ...         st.update(torch.ones(1, 3), torch.ones(1, 2),
        ...                   prompt_index=torch.tensor([k]), position=torch.tensor([0]))
        ...     return base, tuned, 1  # one outlier dropped in each batch
        >>> stats = (SiteStats(3, 2), SiteStats(3, 2))
        >>> gather_batches(2, run_batch, stats), stats[0].latents.count, stats[1].latents.count
        (2, 2, 2)
        >>> dist.destroy_process_group()
    """
    d_sae, d_model = stats[0].latents.d_sae, stats[0].resid.d
    track = stats[0].latents.track_prompts
    blank = SiteStats(d_sae, d_model, track_prompts=track).state_dict()
    template = {
        **{f"base.{k}": v for k, v in blank.items()},
        **{f"finetuned.{k}": v for k, v in blank.items()},
        "n_outliers": torch.tensor(0, dtype=torch.int64),
    }
    n_outliers = 0

    def run(k: int) -> dict[str, Tensor]:
        part_b, part_f, dropped = run_batch(k)
        return {
            **{f"base.{n}": v for n, v in part_b.state_dict().items()},
            **{f"finetuned.{n}": v for n, v in part_f.state_dict().items()},
            "n_outliers": torch.tensor(dropped, dtype=torch.int64),
        }

    def fold(part: dict[str, Tensor]) -> None:
        nonlocal n_outliers
        for i, name in enumerate(("base", "finetuned")):
            prefix = name + "."
            sub = {k[len(prefix) :]: v for k, v in part.items() if k.startswith(prefix)}
            stats[i].merge(SiteStats.from_state_dict(sub))
        n_outliers += int(part["n_outliers"])
        if on_batch is not None:
            on_batch()

    is_root = gather_states(n_batches, run, template, fold)
    return n_outliers if is_root else None
