"""This rank's experts and their grouped compute (docs/architecture.md, 'The MoE block').

up_gate_proj[e] is expert e's fused input projection [2I, D], the *up* half first and the gate
half second; down_proj[e] is its down projection [D, I]. The experts' `quant_method`
(quantization/base.py) creates, loads and multiplies them; this module sorts the (token, expert)
pairs, runs them through the method in chunks and combines the results.

The grouped path's buffers hold the (token, expert) pairs in chunks sized from the number of
rows (known on the host once per request, from the token-group counts): a chunk is
CHUNK_CAPACITY × this rank's even share of the pairs, and as many chunks run as the worst case
needs. Which of them hold pairs only the device knows, so every chunk is launched and the kernels
stop at the device-side count: no host sync, and the memory shrinks with EP (E_local / E).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..kernels import moe as moe_kernels
from ..quantization import ExpertsMethod, QuantizationConfig, experts_method

EXPERT_KERNELS = ("auto", "grouped_mm", "loop")
# Rank imbalance of real (and dummy) routing stays well under 1.5× the even share (BENCHMARKS.md:
# up to 1.35 on the release's dummy weights), so one chunk usually holds a rank's pairs; a busier
# rank runs a second one. Each extra (empty) chunk costs a few launches.
CHUNK_CAPACITY = 1.5
CHUNK_ALIGN = 128


def expert_chunks(num_rows: int, top_k: int, num_local_experts: int, num_experts: int) -> tuple[int, int]:
    """(pair rows per chunk, chunks) of the grouped path for num_rows tokens. A token picks each
    local expert at most once, so a rank computes at most num_rows·min(k, E_local) pairs."""
    most = num_rows * min(top_k, num_local_experts)
    if most == 0:
        return 0, 0
    even = num_rows * top_k * num_local_experts / num_experts
    rows = min(most, CHUNK_ALIGN * math.ceil(CHUNK_CAPACITY * even / CHUNK_ALIGN))
    return rows, math.ceil(most / rows)


def expert_buffer_bytes(chunk_rows: int, hidden: int, inter: int, method: ExpertsMethod, act_bytes: int = 2) -> int:
    """Peak bytes of one chunk on the grouped path: the gathered rows and the activation stay
    alive while the first GEMM's output (during SwiGLU) or the second GEMM's output exists."""
    gemm_in, per_row = method.gemm_input_bytes(act_bytes)
    gathered, activation = hidden * gemm_in + per_row, inter * gemm_in + per_row
    return chunk_rows * (gathered + activation + max(2 * inter, hidden) * act_bytes)


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.float32, device=None, kernel: str = "auto",
                 num_experts: int | None = None, quant_config: QuantizationConfig | None = None):
        """num_experts: the global count (sizes the chunks; default: all are local)."""
        super().__init__()
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"unknown expert kernel {kernel!r}; choose one of {EXPERT_KERNELS}")
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts or num_local_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.kernel, self.dtype = kernel, dtype
        self.quant_method = experts_method(quant_config)
        self.quant_method.create_weights(self, self.weight_shapes(), dtype, device)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The logical (high-precision) shape of each weight kind, all local experts stacked."""
        return {"up_gate_proj": (self.num_local_experts, 2 * self.intermediate_size, self.hidden_size),
                "down_proj": (self.num_local_experts, self.hidden_size, self.intermediate_size)}

    def load_expert(self, local: int, kind: str, value: torch.Tensor, scale: torch.Tensor | None = None,
                    name: str = "expert"):
        """Copies one expert's `kind` weight ([N, K], this rank's slice): high precision, or as a
        pre-quantized checkpoint stores it, with its scale."""
        if kind not in self.weight_shapes():
            raise ValueError(f"unknown expert weight {kind!r}; expected one of {', '.join(self.weight_shapes())}")
        self.quant_method.load_expert(self, local, kind, value, scale, name)

    # -- compute ------------------------------------------------------------------------------

    def uses_grouped_mm(self, x) -> bool:
        """Whether rows like x take the grouped path (no host read-back: a CUDA graph can hold it)."""
        if self.kernel != "auto":
            return self.kernel == "grouped_mm"
        return self.quant_method.use_grouped_mm(self, x)

    def forward(self, x, local_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, D] (or the rows as the quant method's dispatch form delivers them); local_ids [R, k]
        (local expert index, -1 = not here); weights [R, k].

        Returns (y [R, D] = Σ_j weights[r, j]·expert_{local_ids[r, j]}(x[r]) over local j,
        tokens per local expert [E_local]).
        """
        R, k = local_ids.shape
        flat = local_ids.flatten()
        # Sort the (token, slot) pairs by local expert; pairs for other ranks sort last.
        key = torch.where(flat >= 0, flat, self.num_local_experts)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(self.num_local_experts + 1, dtype=torch.int64, device=flat.device)
        counts = counts.index_add_(0, key, torch.ones_like(key))[:-1]
        if R == 0:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype, device=flat.device), counts
        w = weights.flatten()[order]
        if self.uses_grouped_mm(x):
            return self._forward_grouped(x, order, w, counts, k), counts
        return self._forward_loop(x, order, w, counts, k), counts

    def forward_by_expert(self, x, token: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows already grouped by local expert, N each (expert choice): token [E_local, N] indexes x's
        rows, weight [E_local, N]. Returns (y [E_local·N, D], expert after expert, each row weighted;
        tokens per local expert [E_local]): no sort, no combine (the caller sums the rows per token)."""
        E, N = token.shape
        counts = torch.full((E,), N, dtype=torch.int64, device=token.device)
        token, weight = token.flatten(), weight.flatten()
        if token.numel() and self.uses_grouped_mm(x):
            return self.quant_method.equal_groups(self, x, token, weight, N), counts
        rows = [self.quant_method.expert(self, e, x, token[e * N:(e + 1) * N], weight[e * N:(e + 1) * N])
                for e in range(E)]
        return (torch.cat(rows) if rows else torch.zeros(0, self.hidden_size, dtype=self.dtype, device=token.device),
                counts)

    def _forward_grouped(self, x, order, w, counts, k):
        """No host sync: chunk sizes come from R (host), the local pair count stays on the device."""
        P = order.numel()
        R = P // k
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        num_pairs = offs[-1:]
        pair = torch.arange(P, device=order.device)
        slot_to_row = torch.empty_like(order)
        slot_to_row[order] = torch.where(pair < num_pairs, pair, -1)
        token = order // k  # the token of each sorted pair
        rows, chunks = expert_chunks(R, k, self.num_local_experts, self.num_experts)
        out = None
        for c in range(chunks):
            lo, hi = c * rows, min(P, (c + 1) * rows)
            y = self.quant_method.grouped(self, x, token[lo:hi], w[lo:hi], (offs - lo).clamp_(0, hi - lo))
            out = self._combine(out, y, lo, token, slot_to_row, num_pairs, R, k)
            del y  # before the next chunk allocates its own
        return out

    def _forward_loop(self, x, order, w, counts, k):
        """Per-expert matmuls, sized on the host (free on CPU; one sync on a GPU)."""
        sizes = counts.tolist()
        n = sum(sizes)
        token = order[:n] // k
        outs = []
        for e, (rows, part_w) in enumerate(zip(torch.split(token, sizes), torch.split(w[:n], sizes))):
            outs.append(self.quant_method.expert(self, e, x, rows, part_w))
        pair = torch.arange(order.numel(), device=order.device)
        slot_to_row = torch.empty_like(order)
        slot_to_row[order] = torch.where(pair < n, pair, -1)
        return self._combine(None, torch.cat(outs), 0, token, slot_to_row, None, order.numel() // k, k)

    @staticmethod
    def _combine(out, y, lo, token, slot_to_row, num_pairs, num_tokens, k):
        """Adds the chunk of pair rows lo .. lo + len(y) into out [num_tokens, D] (None: the first
        chunk, which also zeroes the tokens it does not touch). Per token the slots in the chunk
        are summed in slot order in fp32, then added to out: no atomics, the same order on every
        path."""
        if kernels.available(y):
            if out is None:
                return moe_kernels.combine(y, slot_to_row, num_tokens, k)
            return moe_kernels.combine_add(out, y, lo, token, slot_to_row, num_pairs, k)
        acc = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        if y.shape[0]:
            per_token = slot_to_row.view(num_tokens, k)
            inside = (per_token >= lo) & (per_token < lo + y.shape[0])
            at = (per_token - lo).clamp(0, y.shape[0] - 1)
            for j in range(k):
                # Rows past the local pairs were never written: select (not multiply) them away.
                acc += torch.where(inside[:, j, None], y[at[:, j]].float(), 0.0)
        return acc.to(y.dtype) if out is None else (out.float() + acc).to(out.dtype)
