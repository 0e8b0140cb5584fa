"""DeepSeek mixture of experts: softmax router (greedy or group-limited top-k), routed experts
split by intermediate size (TP) or by whole experts (EP), shared experts (split over tp) computed
in the same fused MoE call; ONE all-reduce over tp combines the ranks' partial sums."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.fused_moe import fused_moe_triton
from kernels.moe_router import moe_route, moe_route_ref
from runner.distributed import GroupHandle
from runner.errors import RunnerError
from runner.models.layers.linear import ReplicatedLinear

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
              topk_weights: torch.Tensor, shared_w13: torch.Tensor | None = None,
              shared_w2: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k],
    plus the shared experts' MLP (shared_w13 [2Is, H], shared_w2 [H, Is]) when given.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, K] indexes w13,
    -1 = an expert held elsewhere (skipped); topk_weights [T, K]. Returns [T, H] in x's dtype,
    accumulated in fp32. Token-expert pairs are sorted by expert: one matmul per expert.
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
    gate, up = gate_up.chunk(2, dim=-1)
    pair_out = _grouped_matmul(F.silu(gate) * up, w2.transpose(1, 2), offs)  # [P, H]
    pair_weight = topk_weights.reshape(-1)[order].float()[:, None]  # [P, 1]
    pair_out = torch.where(valid[order][:, None], pair_out.float() * pair_weight, 0.0)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    if shared_w13 is not None:
        gate, up = F.linear(x, shared_w13).chunk(2, dim=-1)  # [T, Is] each
        out += F.linear(F.silu(gate) * up, shared_w2).float()
    return out.index_add_(0, token_of_pair, pair_out).to(x.dtype)


class FusedExperts(nn.Module):
    """This rank's routed experts, w13 [E_local, 2*I_local, H] and w2 [E_local, H, I_local] (TP:
    every expert, a 1/tp slice of I; EP: experts [r*E/tp, (r+1)*E/tp), whole), and its slice of
    the shared experts (one MLP of width Is = n_shared * I, always split over tp like any
    column-parallel MLP): shared_w13 [2*Is/tp, H], shared_w2 [H, Is/tp]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 group: GroupHandle, expert_parallel: bool, shared_intermediate_size: int = 0):
        super().__init__()
        split_what, split_size = ("n_routed_experts", num_experts) if expert_parallel else (
            "moe_intermediate_size", intermediate_size)
        if split_size % group.size:
            raise RunnerError(f"{split_what}={split_size} must be divisible by parallel.tp="
                              f"{group.size}")
        if shared_intermediate_size % group.size:
            raise RunnerError(f"n_shared_experts * moe_intermediate_size="
                              f"{shared_intermediate_size} must be divisible by parallel.tp="
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
        self.local_shared = shared_intermediate_size // group.size
        self.shared_start = group.rank * self.local_shared
        self.shared_w13 = self.shared_w2 = None
        if shared_intermediate_size:
            self.shared_w13 = nn.Parameter(torch.empty(2 * self.local_shared, hidden_size),
                                           requires_grad=False)
            self.shared_w2 = nn.Parameter(torch.empty(hidden_size, self.local_shared),
                                          requires_grad=False)

    def is_local(self, expert_id: int) -> bool:
        return 0 <= expert_id - self.expert_start < self.num_local_experts

    @staticmethod
    def _load_columns(w13: torch.Tensor, w2: torch.Tensor, proj: str, full: torch.Tensor,
                      start: int) -> None:
        """Columns [start, start + I) of I in checkpoint tensor `proj` ("gate", "up" or "down")
        -> w13 [2I, H] (gate rows, then up rows) or w2 [H, I]."""
        size = w2.shape[1]
        if proj == "down":  # [H, I]
            w2.copy_(full.narrow(1, start, size))
        else:  # [I, H]
            w13.narrow(0, 0 if proj == "gate" else size, size).copy_(full.narrow(0, start, size))

    def load_expert(self, expert_id: int, proj: str, full: torch.Tensor) -> None:
        """This rank's part of a local routed expert's checkpoint tensor `proj`."""
        local = expert_id - self.expert_start
        self._load_columns(self.w13.data[local], self.w2.data[local], proj, full,
                           self.intermediate_start)

    def load_shared(self, proj: str, full: torch.Tensor) -> None:
        """This rank's columns of the shared experts' checkpoint tensor `proj`."""
        self._load_columns(self.shared_w13.data, self.shared_w2.data, proj, full,
                           self.shared_start)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        """Partial sum over this rank's experts (or slices) and its shared slice; topk_ids are
        global expert ids."""
        local_ids = topk_ids
        if self.num_local_experts != self.num_experts:  # EP: other ranks' experts become -1
            local_ids = topk_ids - self.expert_start
            local_ids = local_ids.masked_fill(
                (local_ids < 0) | (local_ids >= self.num_local_experts), -1)
        moe = fused_moe_triton if x.is_cuda and x.shape[0] <= MAX_TRITON_MOE_TOKENS else fused_moe
        return moe(x, self.w13, self.w2, local_ids, topk_weights, shared_w13=self.shared_w13,
                   shared_w2=self.shared_w2)


class DeepseekMoE(nn.Module):
    """Router (`gate`, replicated, computed in fp32; kernels/moe_router.py has the rule) and
    `experts`: the routed experts and the shared experts."""

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
        self.experts = FusedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, group,
            expert_parallel, config.moe_intermediate_size * (config.n_shared_experts or 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H], summed over ranks."""
        c = self.config
        route = moe_route if x.is_cuda else moe_route_ref  # the same rule; fp32 logits
        num_groups = c.n_group if c.topk_method == "group_limited_greedy" else 1
        topk_weights, topk_ids = route(x, self.gate.weight, c.num_experts_per_tok, num_groups,
                                       c.topk_group, bool(c.norm_topk_prob),
                                       c.routed_scaling_factor)  # [T, K] each
        return self.group.all_reduce(self.experts(x, topk_ids, topk_weights))
