"""DeepSeek mixture of experts: softmax router (greedy or group-limited top-k), routed experts
split by intermediate size (TP) or by whole experts (EP), shared experts; each rank sums its
partial routed + shared output (inside the fused MoE's fp32 sum) and ONE all-reduce over tp
combines them. On a GPU the shared experts run on a side stream, overlapping the routed experts'
GEMMs (both only read the layer's input). The side stream starts before the router: queued after
the top-k, the shared experts got SMs only in the routed GEMMs' tails and the final sum waited
~4 us a layer for them; queued first, TPOT 9.18 -> 9.13 ms (one H200, dsv2lite, batch 128)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from kernels.expert_buckets import ExpertBuckets
from kernels.fused_moe import fused_moe_triton
from kernels.moe_router import moe_route, moe_route_ref
from kernels.silu_mul import silu_mul_ref
from runner.distributed import GroupHandle
from runner.errors import RunnerError
from runner.models.layers.linear import ReplicatedLinear
from runner.models.layers.mlp import GatedMLP
from runner.models.layers.norm import RMSNorm

TOPK_METHODS = ("greedy", "group_limited_greedy")
# Decode-sized batches use the Triton fused MoE on a GPU (graph-safe, streams expert weights);
# larger (prefill) batches use torch._grouped_mm, whose cost is amortised over many tokens.
MAX_TRITON_MOE_TOKENS = 1024


def _can_use_grouped_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned strides and pointers (and bf16 on CUDA)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cuda" and (a.dtype != torch.bfloat16
                                    or torch.cuda.get_device_capability(a.device) < (8, 0)):
        return False
    for t in (a, b):
        if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride() if s != 1):
            return False
    return True


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of a [P, K] sorted by group; b [G, K, N]; group g owns rows [offs[g-1], offs[g]).
    Rows past offs[-1] are left unspecified."""
    if _can_use_grouped_mm(a, b):
        return torch._grouped_mm(a, b, offs=offs)
    out = a.new_zeros(a.shape[0], b.shape[-1])  # [P, N]
    start = 0
    for group, end in enumerate(offs.tolist()):  # one host sync for all groups
        if end > start:
            torch.mm(a[start:end], b[group], out=out[start:end])
        start = end
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """add[t] + sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with
    e = topk_ids[t, k].

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, K] indexes w13,
    -1 = an expert held elsewhere (skipped); topk_weights [T, K]; add [T, H] or None. Returns
    [T, H] in x's dtype, accumulated in fp32. Token-expert pairs are sorted by expert: one matmul
    per expert.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)  # [P]
    valid = flat_ids >= 0
    sort_key = torch.where(valid, flat_ids, num_experts)  # skipped pairs sort last
    order = torch.argsort(sort_key, stable=True)  # [P]
    experts = torch.arange(num_experts, device=x.device, dtype=sort_key.dtype)
    offs = torch.searchsorted(sort_key[order], experts, right=True, out_int32=True)  # [E] ends
    token_of_pair = order // top_k  # [P]

    gate_up = _grouped_matmul(x[token_of_pair], w13.transpose(1, 2), offs)  # [P, 2I]
    pair_out = _grouped_matmul(silu_mul_ref(gate_up), w2.transpose(1, 2), offs)  # [P, H]
    pair_weight = topk_weights.reshape(-1)[order].float()[:, None]  # [P, 1]
    pair_out = torch.where(valid[order][:, None], pair_out.float() * pair_weight, 0.0)
    out = (torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
           if add is None else add.to(torch.float32, copy=True))
    return out.index_add_(0, token_of_pair, pair_out).to(x.dtype)


class FusedExperts(nn.Module):
    """This rank's routed experts: w13 [E_local, 2*I_local, H], w2 [E_local, H, I_local].
    TP: every expert, a 1/tp slice of I. EP: experts [r*E/tp, (r+1)*E/tp), whole."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 group: GroupHandle, expert_parallel: bool):
        super().__init__()
        split_what, split_size = ("n_routed_experts", num_experts) if expert_parallel else (
            "moe_intermediate_size", intermediate_size)
        if split_size % group.size:
            raise RunnerError(f"{split_what}={split_size} must be divisible by parallel.tp="
                              f"{group.size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // group.size if expert_parallel else num_experts
        self.expert_start = group.rank * self.num_local_experts if expert_parallel else 0
        self.local_intermediate = intermediate_size if expert_parallel else (
            intermediate_size // group.size)
        self.intermediate_start = 0 if expert_parallel else group.rank * self.local_intermediate
        local_i = self.local_intermediate
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * local_i, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size, local_i),
                               requires_grad=False)

    def is_local(self, expert_id: int) -> bool:
        return 0 <= expert_id - self.expert_start < self.num_local_experts

    @property
    def holds_all_experts(self) -> bool:
        """No EP split: the router's ids are this rank's expert indices."""
        return self.num_local_experts == self.num_experts

    def load_expert(self, expert_id: int, proj: str, full: torch.Tensor) -> None:
        """Copy this rank's part of checkpoint tensor `proj` ("gate", "up" or "down") of a local
        expert: gate/up [I, H] -> rows of w13, down [H, I] -> w2."""
        local = expert_id - self.expert_start
        start, size = self.intermediate_start, self.local_intermediate
        if proj == "down":
            self.w2.data[local].copy_(full.narrow(1, start, size))
        else:
            rows = self.w13.data[local].narrow(0, 0 if proj == "gate" else size, size)
            rows.copy_(full.narrow(0, start, size))

    def uses_triton(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.shape[0] <= MAX_TRITON_MOE_TOKENS

    def routing_buckets(self, x: torch.Tensor, top_k: int) -> ExpertBuckets | None:
        """Buckets for the router to fill (moe_route), when the Triton MoE will run and every
        expert is local (EP remaps the ids first; fused_moe_triton buckets them itself)."""
        if not self.uses_triton(x) or not self.holds_all_experts:
            return None
        return ExpertBuckets.empty(self.num_experts, x.shape[0] * top_k, x.device)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None, add_ready: torch.cuda.Event | None = None,
                buckets: ExpertBuckets | None = None, residual: torch.Tensor | None = None,
                norm: RMSNorm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """add + partial sum over this rank's experts (or slices); topk_ids are global ids.
        add_ready: the event `add` is written by, on another stream; buckets: filled by the
        router from routing_buckets(...) (both for fused_moe_triton). With residual and norm:
        norm(that sum, residual), fused into the sum's kernel on the Triton path."""
        local_ids = topk_ids
        if not self.holds_all_experts:  # EP: other ranks' experts become -1
            local_ids = topk_ids - self.expert_start
            local_ids = local_ids.masked_fill(
                (local_ids < 0) | (local_ids >= self.num_local_experts), -1)
        if self.uses_triton(x):
            return fused_moe_triton(x, self.w13, self.w2, local_ids, topk_weights, add=add,
                                    add_ready=add_ready, buckets=buckets, residual=residual,
                                    norm=None if norm is None else (norm.weight, norm.eps),
                                    all_local=self.holds_all_experts)
        if add_ready is not None:
            torch.cuda.current_stream(x.device).wait_event(add_ready)
        out = fused_moe(x, self.w13, self.w2, local_ids, topk_weights, add=add)
        return out if norm is None else norm(out, residual)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for the shared experts of every layer (created at the first
    forward, which runs eagerly before any graph capture)."""
    return torch.cuda.Stream(device)


class DeepseekMoE(nn.Module):
    """Router (`gate`, replicated, computed in fp32; kernels/moe_router.py has the rule), routed
    `experts`, `shared_experts`."""

    def __init__(self, config, group: GroupHandle, expert_parallel: bool):
        super().__init__()
        if config.topk_method not in TOPK_METHODS:
            raise RunnerError(f"topk_method={config.topk_method!r}: allowed {TOPK_METHODS}")
        if config.topk_method == "group_limited_greedy" and (
                not config.n_group or config.n_routed_experts % config.n_group):
            raise RunnerError(f"n_group={config.n_group} must divide n_routed_experts="
                              f"{config.n_routed_experts} for group_limited_greedy")
        self.config = config
        self.group = group
        self.gate = ReplicatedLinear(config.hidden_size, config.n_routed_experts)
        self.experts = FusedExperts(config.n_routed_experts, config.hidden_size,
                                    config.moe_intermediate_size, group, expert_parallel)
        self.shared_experts = GatedMLP(
            config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, group,
            reduce=False) if config.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H], summed over ranks."""
        return self.group.all_reduce(self._experts_and_shared(x))

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm(self(x), residual): (the normed sum, the sum). Without an all-reduce between,
        the routed experts' final sum kernel adds and norms too (one launch fewer a layer)."""
        if self.group.size > 1:
            return norm(self(x), residual)
        return self._experts_and_shared(x, residual, norm)

    def _experts_and_shared(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                            norm: RMSNorm | None = None):
        """This rank's routed experts' partial sum plus the shared experts' (then normed with
        the residual, if given)."""
        c = self.config
        num_groups = c.n_group if c.topk_method == "group_limited_greedy" else 1
        rule = (c.num_experts_per_tok, num_groups, c.topk_group, bool(c.norm_topk_prob),
                c.routed_scaling_factor)
        shared, shared_ready = self._shared_output(x)
        buckets = self.experts.routing_buckets(x, c.num_experts_per_tok)
        if x.is_cuda:  # the same rule; fp32 logits
            topk_weights, topk_ids = moe_route(x, self.gate.weight, *rule, buckets=buckets)
        else:
            topk_weights, topk_ids = moe_route_ref(x, self.gate.weight, *rule)  # [T, K] each
        return self.experts(x, topk_ids, topk_weights, add=shared, add_ready=shared_ready,
                            buckets=buckets, residual=residual, norm=norm)

    def _shared_output(self, x: torch.Tensor) -> tuple[torch.Tensor | None,
                                                       torch.cuda.Event | None]:
        """The shared experts' output [T, H] (None without them) and, on a GPU, the event
        recorded when it is written: they run on a side stream that first waits for everything
        queued so far (the layer's input), and only the routed experts' final sum waits for
        them. Memory stays safe without record_stream: the next layer's side work waits for this
        layer's sum."""
        if self.shared_experts is None:
            return None, None
        if not x.is_cuda:
            return self.shared_experts(x), None
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            shared = self.shared_experts(x)  # [T, H]
            ready = torch.cuda.Event()
            ready.record(side)
        return shared, ready
