"""Gathers of embeddings across processes (``torch.distributed``); with one process each
returns its input unchanged.

The loss sees the global batch: :func:`gather_with_grad` concatenates every process's rows
with gradient (``torch.distributed.nn.functional.all_gather``), as a single process with the
same batch would see them; DDP then averages the parameter gradients. ``sizes`` (from
:func:`gathered_sizes`) handles batches of different sizes between processes (a batch that
skipped a bad sample).
"""

from __future__ import annotations

import torch


def _world_size() -> int:
    """Processes in the default group; 1 without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every process; gradients flow back to each process's own part.
    ``sizes``: rows of ``x`` on each process when they may differ (``gathered_sizes``; a batch
    that skipped a bad sample), None when every process holds as many."""
    if _world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    if sizes is None or len(set(sizes)) == 1:
        return torch.cat(all_gather(x), dim=0)
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]) if x.shape[0] < max(sizes) else x
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), sizes)], dim=0)


def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every process, without gradient (ids, teacher embeddings)."""
    import torch.distributed as dist

    world = _world_size()
    if world == 1:
        return x
    x = x.contiguous()
    sizes = sizes or [x.shape[0]] * world
    if x.shape[0] < max(sizes):
        x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gathered_sizes(x: torch.Tensor) -> list[int] | None:
    """Rows of ``x`` on every process (one small all_gather); None with one process."""
    import torch.distributed as dist

    world = _world_size()
    if world == 1:
        return None
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    parts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(parts, n)
    return [int(p) for p in parts]
