"""Token dispatch and combine for expert parallelism (docs/architecture.md, 'The MoE block').

A `Dispatcher` has two halves around the expert compute:

    pending = dispatcher.start_dispatch(x, ids, weights, placement, token_counts)
    ...                                   # work that needs no routed token (the shared expert)
    rows, local_ids, row_weights, handle = pending.wait()
    y_rows, load = experts(rows, local_ids, row_weights)
    partial = dispatcher.combine(y_rows, handle)

`partial` is this rank's share of the routed output for its own tokens; the MoE layer's one TP
all-reduce completes it. A backend that sizes its buffers from every token-group rank's row count
says so (`needs_token_counts`); the MoE layer then keeps those counts (`TokenCounts`), so the
backend never waits on the host for them inside a denoising step.

Token rows travel in the experts' quantization method's form (`pack_tokens`: FP8 rows as codes with
their row scales, riding with the routing metadata); the partial sums coming back stay in the
model dtype. The backends are registered by name in moe/backends.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..distributed import collectives as C
from ..distributed.parallel_state import Group, ParallelState
from ..quantization import ExpertsMethod
from .backends import dispatcher_class


class Placement:
    """Where each expert lives, seen from one rank (the tables are identical on every rank)."""

    def __init__(self, owner: torch.Tensor, shard: int):
        self.owner = owner  # [E] EP rank holding expert e
        self.local_index = torch.zeros_like(owner)  # [E] index of e on its owner
        for s in owner.unique().tolist():
            ids = torch.nonzero(owner == s).flatten()
            self.local_index[ids] = torch.arange(len(ids))
        self.global_ids = torch.nonzero(owner == shard).flatten()  # this rank's experts, local order
        self.expert_map = torch.where(owner == shard, self.local_index, -1)  # [E] local index or -1

    def to(self, device):
        for name in ("owner", "local_index", "global_ids", "expert_map"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # An expert id of -1 is an empty slot (an expert-choice router's expert that did not pick the
    # token): it stays -1, never an index from the end.
    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's local index, or -1 (another rank's, or an empty slot)."""
        return torch.where(ids >= 0, self.expert_map[ids.clamp_min(0)], -1)

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> the EP rank holding each, or -1 for an empty slot."""
        return torch.where(ids >= 0, self.owner[ids.clamp_min(0)], -1)


class Dispatcher(ABC):
    """Moves each token's rows to the ranks holding its experts, and their outputs back."""

    # start_dispatch needs token_counts: every token-group rank's row count, in group order.
    needs_token_counts: ClassVar[bool] = False

    def __init__(self, parallel: ParallelState, experts_method: ExpertsMethod):
        self.parallel, self.experts_method = parallel, experts_method

    @abstractmethod
    def start_dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, placement: Placement,
                       token_counts: list[int] | None = None) -> C.Pending:
        """x [T, D], ids and weights [T, k] (global expert ids). The result, once waited for:
        (the rows this rank's experts compute, their local expert ids [R, k] (-1: not here),
        their weights [R, k], a handle for combine)."""

    @abstractmethod
    def combine(self, y: torch.Tensor, handle) -> torch.Tensor:
        """The experts' weighted outputs [R, D] -> this rank's partial sums for its own tokens [T, D]."""

    def dispatch(self, x, ids, weights, placement: Placement, token_counts=None):
        return self.start_dispatch(x, ids, weights, placement, token_counts).wait()

    @staticmethod
    def _metadata(ids: torch.Tensor, weights: torch.Tensor, row_values: torch.Tensor | None) -> torch.Tensor:
        """Routing metadata [T, 2k + m] of the rows that travel: expert ids are small integers,
        exact in fp32, so one collective moves ids, weights and the rows' m values per row."""
        parts = [ids.float(), weights.float()]
        if row_values is not None:
            parts.append((row_values[:, None] if row_values.dim() == 1 else row_values).float())
        return torch.cat(parts, dim=1)

    def _received(self, rows: torch.Tensor, meta: torch.Tensor, k: int, dtype: torch.dtype):
        """(expert input, ids [R, k], weights [R, k]) of the rows and metadata received."""
        row_values = meta[:, 2 * k:] if meta.shape[1] > 2 * k else None
        return self.experts_method.unpack_tokens(rows, row_values, dtype), meta[:, :k].long(), meta[:, k:2 * k]


class LocalDispatch(Dispatcher):
    """No token movement: every rank applies its experts to its own tokens. Used when EP is off
    (experts TP-sharded) and when EP spans only the TP group (tokens already on every rank)."""

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        return C.Pending.done((x, placement.local(ids), weights, None))

    def combine(self, y, handle):
        return y


class AllGatherReduceScatter(Dispatcher):
    """All-gather tokens and routing over the token group; each rank applies its experts to every
    gathered token; reduce-scatter the partial sums back."""

    needs_token_counts = True

    def __init__(self, parallel, experts_method):
        super().__init__(parallel, experts_method)
        self.group = parallel.token

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        counts = token_counts if token_counts is not None else C.gather_counts(x.shape[0], self.group, x.device)
        rows, row_values = self.experts_method.pack_tokens(x)
        rows_all = C.all_gather_rows_async(rows, self.group, counts)
        meta_all = C.all_gather_rows_async(self._metadata(ids, weights, row_values), self.group, counts)

        def finish():
            x_all, ids_all, w_all = self._received(rows_all.wait(), meta_all.wait(), ids.shape[1], x.dtype)
            return x_all, placement.local(ids_all), w_all, counts
        return C.Pending(None, finish)

    def combine(self, y_all, counts):
        return C.reduce_scatter_rows(y_all, self.group, counts)


class AllToAll(Dispatcher):
    """Each token goes once to every EP rank that holds one of its experts; results come back
    and are added at the owner. TP ranks hold the same tokens, so TP rank t sends only its
    t-th chunk of them, and the MoE's TP all-reduce assembles the chunks."""

    def __init__(self, parallel, experts_method):
        super().__init__(parallel, experts_method)
        self.group, self.tp = parallel.ep, parallel.tp

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        lo, hi = C.even_chunk(x.shape[0], self.tp.rank, self.tp.size)
        x_own, ids_own, w_own = x[lo:hi], ids[lo:hi], weights[lo:hi]
        dest = placement.owners(ids_own)  # [To, k] EP rank of each choice (-1: an empty slot)
        ranks = torch.arange(self.group.size, device=x.device)
        goes = dest.unsqueeze(1) == ranks[None, :, None]  # [To, EP, k]
        send = goes.any(-1)  # [To, EP]: each token once per destination rank
        dst, tok = torch.nonzero(send.t(), as_tuple=True)  # rows ordered by destination
        send_counts = send.sum(0)
        recv_counts = C.exchange_counts(send_counts, self.group)
        both = torch.cat([send_counts, recv_counts]).tolist()  # host sync: split sizes
        send_list, recv_list = both[:self.group.size], both[self.group.size:]
        on_dst = goes[tok, dst]  # [S, k]: which of the token's choices live on that rank
        rows, row_values = self.experts_method.pack_tokens(x_own)
        meta = self._metadata(torch.where(on_dst, placement.local_index[ids_own[tok].clamp_min(0)], -1),
                              torch.where(on_dst, w_own[tok], 0.0), None if row_values is None else row_values[tok])
        x_recv = C.all_to_all_rows_async(rows[tok], send_list, recv_list, self.group)
        meta_recv = C.all_to_all_rows_async(meta, send_list, recv_list, self.group)
        k = ids.shape[1]

        def finish():
            x_in, local_recv, w_recv = self._received(x_recv.wait(), meta_recv.wait(), k, x.dtype)
            return x_in, local_recv, w_recv, (x.shape, lo, tok, send_list, recv_list, x.dtype)
        return C.Pending(None, finish)

    def combine(self, y_recv, handle):
        shape, lo, tok, send_list, recv_list, dtype = handle
        y_back = C.all_to_all_rows(y_recv, recv_list, send_list, self.group)
        out = torch.zeros(shape, dtype=dtype, device=y_back.device)
        return out.index_add_(0, tok + lo, y_back)


def make_dispatcher(parallel: ParallelState, experts_method: ExpertsMethod) -> Dispatcher:
    config = parallel.config
    if not config.enable_expert_parallel or parallel.token.size == 1:
        return LocalDispatch(parallel, experts_method)
    return dispatcher_class(config.all2all_backend)(parallel, experts_method)


class TokenCounts:
    """Every token-group rank's row count, for a backend that `needs_token_counts`. Exchanging
    them reads them on the host (a sync), so they are exchanged on the first forward after
    `reset()` and reused until the next one: call reset (reset_token_counts) on every rank
    wherever the token layout may change (a new batch, a prefill before its steps), and every
    rank then makes the same decision to exchange."""

    def __init__(self, group: Group):
        self.group = group
        self.reset()

    def reset(self) -> None:
        self._counts: list[int] | None = None

    def get(self, num_tokens: int, device) -> list[int]:
        if self._counts is None:
            self._counts = C.gather_counts(num_tokens, self.group, device)
        elif num_tokens != self._counts[self.group.rank]:
            raise ValueError(f"{num_tokens} tokens in this forward but {self._counts[self.group.rank]} in the one "
                             "before it: the token layout changed, and every rank must reset its MoE token counts "
                             "(epdiff.moe.reset_token_counts) before such a forward")
        return self._counts
