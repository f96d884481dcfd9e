"""Token dispatch and combine for expert parallelism (docs/architecture.md, 'The MoE block').

Every backend has two halves around the expert compute:

    rows, local_ids, weights, handle = dispatcher.dispatch(x, ids, weights, placement, token_counts)
    y_rows, load = experts(rows, local_ids, weights)
    partial = dispatcher.combine(y_rows, handle)

`start_dispatch` is the same first half left in flight (`.wait()` gives dispatch's result), so the
caller can compute something that needs no routed tokens (the shared expert) meanwhile.

`partial` is this rank's share of the routed output for its own tokens; the MoE layer's one TP
all-reduce completes it.

With FP8 experts (`fp8_tokens`) the token rows travel as float8 codes with their per-row scales
(the scale rides in the routing metadata): half the bytes of bf16, and the same numbers the
experts would compute from bf16 rows, since each row is quantized on its own. The partial sums
coming back stay in the model dtype.
"""

from __future__ import annotations

import torch

from ..distributed import collectives as C
from ..distributed.parallel_state import ParallelState
from ..quantization.fp8 import FP8_DTYPE, Fp8Rows
from .experts import quantize_tokens


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


def _pack(ids: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    # Expert ids are small integers, exact in fp32: one collective moves ids, weights (and the
    # FP8 row scales) together.
    parts = [ids.float(), weights.float()] + ([] if scale is None else [scale.float()[:, None]])
    return torch.cat(parts, dim=1)


def _unpack(meta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    scale = meta[:, 2 * k] if meta.shape[1] > 2 * k else None
    return meta[:, :k].long(), meta[:, k:2 * k], scale


def _token_rows(x: torch.Tensor, fp8_tokens: bool):
    """What travels for the rows of x: x itself, or its FP8 codes (as bytes, which every backend
    moves) and row scales."""
    if not fp8_tokens:
        return x, None
    rows = quantize_tokens(x)
    return rows.q.view(torch.uint8), rows.scale


def _received_rows(rows: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype):
    return rows if scale is None else Fp8Rows(rows.view(FP8_DTYPE), scale.contiguous(), dtype)


class AllGatherReduceScatter(Dispatcher):
    """All-gather tokens and routing over the token group; each rank applies its experts to every
    gathered token; reduce-scatter the partial sums back."""

    def __init__(self, parallel: ParallelState, fp8_tokens: bool = False):
        self.group, self.fp8_tokens = parallel.token, fp8_tokens

    def start_dispatch(self, x, ids, weights, placement, token_counts=None) -> C.Pending:
        counts = token_counts if token_counts is not None else C.gather_counts(x.shape[0], self.group, x.device)
        rows, scale = _token_rows(x, self.fp8_tokens)
        x_all = C.all_gather_rows_async(rows, self.group, counts)
        meta = C.all_gather_rows_async(_pack(ids, weights, scale), self.group, counts)
        k = ids.shape[1]

        def finish():
            ids_all, w_all, scale_all = _unpack(meta.wait(), k)
            return _received_rows(x_all.wait(), scale_all, x.dtype), placement.expert_map[ids_all], w_all, counts
        return C.Pending(None, finish)

    def combine(self, y_all, counts):
        return C.reduce_scatter_rows(y_all, self.group, counts)


class AllToAll(Dispatcher):
    """Each token goes once to every EP rank that holds one of its experts; results come back
    and are added at the owner. TP ranks hold the same tokens, so TP rank t sends only its
    t-th chunk of them, and the MoE's TP all-reduce assembles the chunks."""

    def __init__(self, parallel: ParallelState, fp8_tokens: bool = False):
        self.group, self.tp, self.fp8_tokens = parallel.ep, parallel.tp, fp8_tokens

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
        rows, scale = _token_rows(x_own, self.fp8_tokens)
        meta = _pack(torch.where(on_dst, placement.local_index[ids_own[tok]], -1),
                     torch.where(on_dst, w_own[tok], 0.0), None if scale is None else scale[tok])
        x_recv = C.all_to_all_rows_async(rows[tok], send_list, recv_list, self.group)
        meta_recv = C.all_to_all_rows_async(meta, send_list, recv_list, self.group)
        k = ids.shape[1]

        def finish():
            local_ids, w_recv, scale_recv = _unpack(meta_recv.wait(), k)
            return (_received_rows(x_recv.wait(), scale_recv, x.dtype), local_ids, w_recv,
                    (x.shape, lo, tok, send_list, recv_list, x.dtype))
        return C.Pending(None, finish)

    def combine(self, y_recv, handle):
        shape, lo, tok, send_list, recv_list, dtype = handle
        y_back = C.all_to_all_rows(y_recv, recv_list, send_list, self.group)
        out = torch.zeros(shape, dtype=dtype, device=y_back.device)
        return out.index_add_(0, tok + lo, y_back)


def make_dispatcher(parallel: ParallelState, fp8_tokens: bool = False):
    """fp8_tokens: send token rows as FP8 (the experts are FP8); LocalDispatch moves no rows."""
    config = parallel.config
    if not config.enable_expert_parallel or parallel.token.size == 1:
        return LocalDispatch()
    if config.all2all_backend == "alltoall":
        return AllToAll(parallel, fp8_tokens)
    return AllGatherReduceScatter(parallel, fp8_tokens)


def token_counts_for(parallel: ParallelState, num_tokens: int, device) -> list[int] | None:
    """Rows of every token-group rank, once per model forward, for the MoE layers that need
    them (the all-gather backend); None where no MoE layer does."""
    config = parallel.config
    if not config.enable_expert_parallel or parallel.token.size == 1 or config.all2all_backend != "allgather_reducescatter":
        return None
    return C.gather_counts(num_tokens, parallel.token, device)
