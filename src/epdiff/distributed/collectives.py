"""Collectives over one `Group`, row-wise (dim 0). A group of size 1 costs nothing.

The same calls run on NCCL and gloo. Uneven row counts are handled by padding to the largest
count, so every rank issues the same collective with the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .parallel_state import Group

# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor (same arguments); older releases
# only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def even_chunk(n: int, rank: int, shards: int) -> tuple[int, int]:
    """[lo, hi) of chunk `rank` when n rows are split as evenly as possible, earlier chunks
    larger (torch.tensor_split's rule)."""
    base, extra = divmod(n, shards)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(x, group=group.process_group)
    return x


def gather_counts(n: int, group: Group, device: torch.device) -> list[int]:
    """Every rank's row count. One tiny all-gather and a host sync; call once per forward."""
    if group.size == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(group.size, dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group.process_group)
    return out.tolist()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


class Pending:
    """A collective in flight. wait() returns its result; on NCCL the current stream waits for
    it, not the host, so work issued before wait() overlaps the communication."""

    def __init__(self, work, finish):
        self.work, self.finish = work, finish

    @classmethod
    def done(cls, value):
        return cls(None, lambda: value)

    def wait(self):
        if self.work is not None:
            self.work.wait()
        return self.finish()


def all_gather_rows_async(x: torch.Tensor, group: Group, counts: list[int]) -> Pending:
    """Concatenation of every rank's rows, in group order (counts[i] = rows of rank i), in flight."""
    if group.size == 1:
        return Pending.done(x)
    most = max(counts)
    out = x.new_empty((group.size * most,) + tuple(x.shape[1:]))
    work = _all_gather_single(out, _pad_rows(x, most), group=group.process_group, async_op=True)
    if all(c == most for c in counts):
        return Pending(work, lambda: out)
    return Pending(work, lambda: torch.cat([out[i * most: i * most + c] for i, c in enumerate(counts)]))


def all_gather_rows(x: torch.Tensor, group: Group, counts: list[int]) -> torch.Tensor:
    """Concatenation of every rank's rows, in group order. counts[i] = rows of rank i."""
    return all_gather_rows_async(x, group, counts).wait()


def reduce_scatter_rows(y: torch.Tensor, group: Group, counts: list[int]) -> torch.Tensor:
    """Inverse of all_gather_rows: sums y over the group and returns this rank's rows."""
    if group.size == 1:
        return y
    most = max(counts)
    if any(c != most for c in counts):
        y = torch.cat([_pad_rows(part, most) for part in torch.split(y, counts)])
    out = y.new_empty((most,) + tuple(y.shape[1:]))
    _reduce_scatter_single(out, y.contiguous(), group=group.process_group)
    return out[: counts[group.rank]]


def all_to_all_rows_async(x: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                          group: Group) -> Pending:
    """Rows send_counts[i] of x (in order) go to rank i; the rows received, by source, in flight."""
    if group.size == 1:
        return Pending.done(x)
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts,
                                  input_split_sizes=send_counts, group=group.process_group, async_op=True)
    return Pending(work, lambda: out)


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group: Group) -> torch.Tensor:
    """Rows send_counts[i] of x (in order) go to rank i; returns the rows received, by source."""
    return all_to_all_rows_async(x, send_counts, recv_counts, group).wait()


def exchange_counts(send_counts: torch.Tensor, group: Group) -> torch.Tensor:
    """send_counts[i] = rows this rank sends to rank i; returns rows it receives from each."""
    if group.size == 1:
        return send_counts
    out = torch.empty_like(send_counts)
    dist.all_to_all_single(out, send_counts.contiguous(), group=group.process_group)
    return out


def all_gather_tensor(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[group.size, *x.shape]: the same-shaped tensor from every rank."""
    if group.size == 1:
        return x.unsqueeze(0)
    out = x.new_empty(group.size * x.numel())
    _all_gather_single(out, x.reshape(-1).contiguous(), group=group.process_group)
    return out.view((group.size,) + tuple(x.shape))


def broadcast_from_first(x: torch.Tensor | None, group: Group, dtype: torch.dtype, device) -> torch.Tensor:
    """The tensor of the group's first rank (x there; None elsewhere), shape and all, on every rank."""
    if group.size == 1:
        return x
    src = group.ranks[0]
    ndim = torch.tensor([x.dim() if group.rank == 0 else 0], device=device)
    dist.broadcast(ndim, src=src, group=group.process_group)
    shape = torch.tensor(x.shape if group.rank == 0 else [0] * int(ndim), dtype=torch.long, device=device)
    dist.broadcast(shape, src=src, group=group.process_group)
    out = x.contiguous() if group.rank == 0 else torch.empty(shape.tolist(), dtype=dtype, device=device)
    dist.broadcast(out, src=src, group=group.process_group)
    return out
