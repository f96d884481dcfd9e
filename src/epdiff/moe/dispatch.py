"""Token dispatch and combine for expert parallelism (docs/architecture.md, 'The MoE block').

Every backend has two halves around the expert compute:

    rows, local_ids, weights, handle = dispatcher.dispatch(x, ids, weights, placement, token_counts)
    y_rows, load = experts(rows, local_ids, weights)
    partial = dispatcher.combine(y_rows, handle)

`start_dispatch` is the same first half left in flight (`.wait()` gives dispatch's result), so the
caller can compute something that needs no routed tokens (the shared expert) meanwhile.

`partial` is this rank's share of the routed output for its own tokens; the MoE layer's one TP
all-reduce completes it.
"""

from __future__ import annotations

import torch

from ..distributed import collectives as C
from ..distributed.parallel_state import ParallelState


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


class Dispatcher:
    def start_dispatch(self, x, ids, weights, placement: Placement, token_counts=None) -> C.Pending:
        raise NotImplementedError

    def dispatch(self, x, ids, weights, placement: Placement, token_counts=None):
        return self.start_dispatch(x, ids, weights, placement, token_counts).wait()


class LocalDispatch(Dispatcher):
    """No token movement: every rank applies its experts to its own tokens. Used when EP is off
    (experts TP-sharded) and when EP spans only the TP group (tokens already on every rank)."""

    def start_dispatch(self, x, ids, weights, placement: Placement, token_counts=None) -> C.Pending:
        return C.Pending.done((x, placement.expert_map[ids], weights, None))

    def combine(self, y, handle):
        return y


def _pack(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # Expert ids are small integers, exact in fp32: one collective moves ids and weights together.
    return torch.cat([ids.float(), weights.float()], dim=1)


def _unpack(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = meta.shape[1] // 2
    return meta[:, :k].long(), meta[:, k:]


class AllGatherReduceScatter(Dispatcher):
    """All-gather tokens and routing over the token group; each rank applies its experts to every
    gathered token; reduce-scatter the partial sums back."""

    def __init__(self, parallel: ParallelState):
        self.group = parallel.token

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        counts = token_counts if token_counts is not None else C.gather_counts(x.shape[0], self.group, x.device)
        x_all = C.all_gather_rows_async(x, self.group, counts)
        meta = C.all_gather_rows_async(_pack(ids, weights), self.group, counts)

        def finish():
            ids_all, w_all = _unpack(meta.wait())
            return x_all.wait(), placement.expert_map[ids_all], w_all, counts
        return C.Pending(None, finish)

    def combine(self, y_all, counts):
        return C.reduce_scatter_rows(y_all, self.group, counts)


class AllToAll(Dispatcher):
    """Each token goes once to every EP rank that holds one of its experts; results come back
    and are added at the owner. TP ranks hold the same tokens, so TP rank t sends only its
    t-th chunk of them, and the MoE's TP all-reduce assembles the chunks."""

    def __init__(self, parallel: ParallelState):
        self.group, self.tp = parallel.ep, parallel.tp

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        lo, hi = C.even_chunk(x.shape[0], self.tp.rank, self.tp.size)
        x_own, ids_own, w_own = x[lo:hi], ids[lo:hi], weights[lo:hi]
        dest = placement.owner[ids_own]  # [To, k] EP rank of each choice
        ranks = torch.arange(self.group.size, device=x.device)
        goes = dest.unsqueeze(1) == ranks[None, :, None]  # [To, EP, k]
        send = goes.any(-1)  # [To, EP]: each token once per destination rank
        dst, tok = torch.nonzero(send.t(), as_tuple=True)  # rows ordered by destination
        send_counts = send.sum(0)
        recv_counts = C.exchange_counts(send_counts, self.group)
        both = torch.cat([send_counts, recv_counts]).tolist()  # host sync: split sizes
        send_list, recv_list = both[:self.group.size], both[self.group.size:]
        on_dst = goes[tok, dst]  # [S, k]: which of the token's choices live on that rank
        meta = _pack(torch.where(on_dst, placement.local_index[ids_own[tok]], -1),
                     torch.where(on_dst, w_own[tok], 0.0))
        x_recv = C.all_to_all_rows_async(x_own[tok], send_list, recv_list, self.group)
        meta_recv = C.all_to_all_rows_async(meta, send_list, recv_list, self.group)

        def finish():
            local_ids, w_recv = _unpack(meta_recv.wait())
            return x_recv.wait(), local_ids, w_recv, (x.shape, lo, tok, send_list, recv_list)
        return C.Pending(None, finish)

    def combine(self, y_recv, handle):
        shape, lo, tok, send_list, recv_list = handle
        y_back = C.all_to_all_rows(y_recv, recv_list, send_list, self.group)
        out = y_recv.new_zeros(shape)
        return out.index_add_(0, tok + lo, y_back)


def make_dispatcher(parallel: ParallelState):
    config = parallel.config
    if not config.enable_expert_parallel or parallel.token.size == 1:
        return LocalDispatch()
    if config.all2all_backend == "alltoall":
        return AllToAll(parallel)
    return AllGatherReduceScatter(parallel)


def token_counts_for(parallel: ParallelState, num_tokens: int, device) -> list[int] | None:
    """Rows of every token-group rank, once per model forward, for the MoE layers that need
    them (the all-gather backend); None where no MoE layer does."""
    config = parallel.config
    if not config.enable_expert_parallel or parallel.token.size == 1 or config.all2all_backend != "allgather_reducescatter":
        return None
    return C.gather_counts(num_tokens, parallel.token, device)
