"""DeepSeek MoE routing in two launches: the fp32 router logits as a split-K GEMM (16 programs per
16 tokens: a decode step's 128 tokens alone are only 8 row blocks for 132 SMs), then one kernel
that sums the splits in order, and takes the softmax, the optional group-limited selection,
top-k, and renormalisation or the routed scaling factor; optionally it also groups the pairs by
expert for the fused MoE (kernels/expert_buckets.py).

The rule (DeepSeek-V2's): scores = softmax(x @ W.T) in fp32; group-limited: only experts of the
`topk_group` groups with the highest best score compete; the K best scores are the weights,
renormalised to sum 1 with `renormalize` (and K > 1), else multiplied by `scaling`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dependent_launch import (dependent_launch, release_next_kernel,
                                      wait_for_previous_kernel)
from kernels.dot_operands import DOT_DTYPES, dot_operands
from kernels.expert_buckets import ExpertBuckets, add_to_buckets

BLOCK_T = 16  # tokens per program of the logits GEMM
# tokens per program of the top-k kernel, one warp each: its K rounds of row reductions are
# serial. On one H200 at batch 128 (E=64, top-6), alone: 4 tokens 2.85 us, 16 tokens x 4 warps
# 3.80; in the step, beside the shared experts' first GEMM: 2 tokens TPOT 9.06 -> 9.03 ms
TOPK_BLOCK_T = 2
MAX_TILE_ELEMENTS = 8192  # router weight elements per dot (BLOCK_E x BLOCK_K): no spills
MAX_SPLITS = 16  # K splits of the logits GEMM: 8 token blocks x 16 = 128 programs at batch 128


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every batch size
def _router_logits_kernel(x_ptr, w_ptr, partial_ptr, counts_ptr, num_tokens, num_experts,
                          hidden_size, x_stride, w_stride, split_stride, k_per_split,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          FILL_BUCKETS: tl.constexpr, PDL: tl.constexpr):
    """partial[s, t, e] = sum over split s's k_per_split columns of x[t, k] * w[e, k], in fp32;
    with FILL_BUCKETS, program (0, 0) zeroes the bucket counts the top-k kernel then fills. The
    top-k is released at once (kernels/dependent_launch.py says why)."""
    wait_for_previous_kernel(PDL)
    release_next_kernel(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    experts = tl.arange(0, BLOCK_E)
    ks = tl.arange(0, BLOCK_K)
    token_mask, expert_mask = tokens < num_tokens, experts < num_experts
    if FILL_BUCKETS:
        first = (tl.program_id(0) == 0) & (split == 0)
        tl.store(counts_ptr + experts, tl.zeros([BLOCK_E], dtype=tl.int32),
                 mask=expert_mask & first)
    x_rows = x_ptr + tokens[:, None].to(tl.int64) * x_stride
    w_rows = w_ptr + experts[:, None] * w_stride
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    k_begin = split * k_per_split
    for k_start in range(k_begin, tl.minimum(k_begin + k_per_split, hidden_size), BLOCK_K):
        k_mask = (k_start + ks) < hidden_size
        xk = tl.load(x_rows + k_start + ks[None, :],
                     mask=token_mask[:, None] & k_mask[None, :], other=0.0)  # [BT, BK]
        wk = tl.load(w_rows + k_start + ks[None, :],
                     mask=expert_mask[:, None] & k_mask[None, :], other=0.0)  # [BE, BK]
        acc = tl.dot(xk.to(DOT_DTYPE), tl.trans(wk.to(DOT_DTYPE)), acc,
                     input_precision=DOT_PRECISION)
    offsets = (split * split_stride + tokens[:, None].to(tl.int64) * num_experts
               + experts[None, :])
    tl.store(partial_ptr + offsets, acc, mask=token_mask[:, None] & expert_mask[None, :])


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every batch size
def _moe_topk_kernel(partial_ptr, weights_ptr, ids_ptr, counts_ptr, buckets_ptr, num_tokens,
                     num_experts, split_stride, scaling, NUM_SPLITS: tl.constexpr,
                     TOP_K: tl.constexpr, NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     RENORMALIZE: tl.constexpr, BLOCK_TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_E: tl.constexpr, FILL_BUCKETS: tl.constexpr, PDL: tl.constexpr):
    """The choices of BLOCK_T tokens from their split logits; with FILL_BUCKETS each pair also
    joins its expert's bucket (buckets of num_tokens * TOP_K pairs each)."""
    wait_for_previous_kernel(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    token_mask, expert_mask = tokens < num_tokens, experts < num_experts
    rows = tokens[:, None].to(tl.int64) * num_experts + experts[None, :]
    logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):  # in order; unrolled: the loads issue at once
        logits += tl.load(partial_ptr + split * split_stride + rows,
                          mask=token_mask[:, None] & expert_mask[None, :], other=0.0)
    logits = tl.where(expert_mask[None, :], logits, float("-inf"))  # [BT, BE]
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    scores = exp / tl.sum(exp, axis=1)[:, None]  # [BT, BE]; 0 for padding experts
    if NUM_GROUPS > 1:
        group_size = num_experts // NUM_GROUPS
        group_of = experts // group_size
        best = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) - 1.0  # best score per group
        for g in tl.static_range(NUM_GROUPS):
            in_group = (group_of == g) & expert_mask
            top = tl.max(tl.where(in_group[None, :], scores, -1.0), axis=1)
            best = tl.where(in_group[None, :], top[:, None], best)
        keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):  # the groups with the highest best score
            top = tl.max(best, axis=1)
            first = tl.min(tl.where(best == top[:, None], group_of[None, :], NUM_GROUPS), axis=1)
            chosen = group_of[None, :] == first[:, None]
            keep = keep | chosen
            best = tl.where(chosen, -1.0, best)
        scores = tl.where(keep, scores, 0.0)
    remaining = tl.where(expert_mask[None, :], scores, -1.0)
    slots = tl.arange(0, BLOCK_TOP_K)
    top_weights = tl.zeros([BLOCK_T, BLOCK_TOP_K], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, BLOCK_TOP_K], dtype=tl.int64)
    for k in tl.static_range(TOP_K):  # the best remaining expert (lowest id on ties)
        top = tl.max(remaining, axis=1)  # [BT]
        pick = tl.min(tl.where(remaining == top[:, None], experts[None, :], BLOCK_E), axis=1)
        top_weights = tl.where(slots[None, :] == k, top[:, None], top_weights)
        top_ids = tl.where(slots[None, :] == k, pick[:, None].to(tl.int64), top_ids)
        remaining = tl.where(experts[None, :] == pick[:, None], -1.0, remaining)
    if RENORMALIZE:
        top_weights = top_weights / (tl.sum(top_weights, axis=1)[:, None] + 1e-20)
    else:
        top_weights = top_weights * scaling
    offsets = tokens[:, None] * TOP_K + slots[None, :]
    mask = token_mask[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + offsets, top_weights, mask=mask)
    tl.store(ids_ptr + offsets, top_ids, mask=mask)
    if FILL_BUCKETS:
        add_to_buckets(top_ids, offsets, mask, num_experts, counts_ptr, buckets_ptr,
                       num_tokens * TOP_K)


def moe_route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, num_groups: int,
              topk_group: int, renormalize: bool, scaling: float,
              buckets: ExpertBuckets | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate_weight [E, H] (any float dtype, used in fp32) -> (topk_weights [T, K]
    fp32, topk_ids [T, K] int64). num_groups <= 1: plain greedy top-k. buckets (of E experts
    and T * K pairs, e.g. ExpertBuckets.empty(...)): also filled with the pairs, for
    fused_moe_triton, in the same launches."""
    num_tokens, hidden_size = x.shape
    num_experts = gate_weight.shape[0]
    if x.stride(-1) != 1 or gate_weight.shape[1] != hidden_size or gate_weight.stride(-1) != 1:
        raise ValueError(f"moe_route: x [T, H] and gate_weight [E, H] with unit column stride; "
                         f"got {tuple(x.shape)} and {tuple(gate_weight.shape)}")
    if not 1 <= top_k <= num_experts or (num_groups > 1 and num_experts % num_groups):
        raise ValueError(f"moe_route: top_k={top_k}, num_groups={num_groups} do not fit "
                         f"{num_experts} experts")
    if buckets is not None:
        buckets.check(num_experts, num_tokens * top_k, x.device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    if not num_tokens:
        if buckets is not None:
            buckets.counts.zero_()
        return weights, ids
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_k = max(16, min(MAX_TILE_ELEMENTS // block_e, triton.next_power_of_2(hidden_size)))
    num_token_blocks = triton.cdiv(num_tokens, BLOCK_T)
    # splits from the shapes alone, not the batch: a token's logits are the same in any batch
    k_per_split = triton.cdiv(triton.cdiv(hidden_size, MAX_SPLITS), block_k) * block_k
    num_splits = triton.cdiv(hidden_size, k_per_split)
    partial = torch.empty(num_splits, num_tokens, num_experts, dtype=torch.float32,
                          device=x.device)  # [S, T, E]
    # mixed or other dtypes: both operands in fp32 (the rule's fp32 logits)
    same = x.dtype == gate_weight.dtype and x.dtype in DOT_DTYPES
    dot_dtype, precision = dot_operands(x.dtype if same else torch.float32)
    pdl = dependent_launch(x.device)
    counts, pairs = (ids, ids) if buckets is None else (buckets.counts, buckets.pairs)
    _router_logits_kernel[(num_token_blocks, num_splits)](
        x, gate_weight, partial, counts, num_tokens, num_experts, hidden_size, x.stride(0),
        gate_weight.stride(0), partial.stride(0), k_per_split, BLOCK_T=BLOCK_T, BLOCK_E=block_e,
        BLOCK_K=block_k, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        FILL_BUCKETS=buckets is not None, num_warps=4, **pdl)
    _moe_topk_kernel[(triton.cdiv(num_tokens, TOPK_BLOCK_T),)](
        partial, weights, ids, counts, pairs, num_tokens, num_experts, partial.stride(0), scaling,
        NUM_SPLITS=num_splits, TOP_K=top_k, NUM_GROUPS=num_groups if num_groups > 1 else 1,
        TOPK_GROUP=topk_group if num_groups > 1 else 1, RENORMALIZE=renormalize and top_k > 1,
        BLOCK_TOP_K=triton.next_power_of_2(top_k), BLOCK_T=TOPK_BLOCK_T, BLOCK_E=block_e,
        FILL_BUCKETS=buckets is not None, num_warps=1, **pdl)
    return weights, ids


def moe_route_ref(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, num_groups: int,
                  topk_group: int, renormalize: bool, scaling: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `moe_route` (the reference models' order of operations)."""
    scores = torch.nn.functional.linear(x.float(), gate_weight.float()).softmax(dim=-1)  # [T, E]
    if num_groups > 1:
        grouped = scores.unflatten(-1, (num_groups, -1))  # [T, G, E/G]
        best_groups = grouped.amax(dim=-1).topk(topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        scores = grouped.masked_fill(~keep[..., None], 0.0).flatten(1)
    topk_weights, topk_ids = scores.topk(top_k, dim=-1, sorted=False)
    if renormalize and top_k > 1:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        topk_weights = topk_weights * scaling
    return topk_weights, topk_ids
