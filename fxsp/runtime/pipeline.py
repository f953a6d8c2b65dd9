"""Pipeline-stage boundaries: the receiving side of `fxsp.backend(..., shard_outputs=True)`.

A stage compiled with `shard_outputs=True` returns the residual stream as this rank's block,
skipping the all-gather; each TP rank sends its block to its peer in the next stage, which is
1/tp of the bytes. The next stage calls `gather_rows` to rebuild the full value (the layout:
`fxsp/sp/layout.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..sp.layout import padded_block_rows


def gather_rows(
    shard: torch.Tensor, shape: tuple | torch.Size, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The full value of `shape` ([*, H]) from every TP rank's block of rows."""
    tp = dist.get_world_size(group)
    rows = torch.Size(shape[:-1]).numel()
    expected = (padded_block_rows(rows, tp), shape[-1])
    if tuple(shard.shape) != expected:
        raise ValueError(
            f"a shard of {tuple(shape)} over {tp} ranks has shape {expected}, "
            f"got {tuple(shard.shape)}"
        )
    blocks = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(blocks, shard.contiguous(), group=group)
    return torch.cat(blocks)[:rows].reshape(shape)
