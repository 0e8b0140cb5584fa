"""parallel.dcp_comm=fused (perf.md §11) on CPU, gloo, float32: greedy tokens equal tp1's and
ag_rs's for MLA (tiny: tp4+dcp4, tp4+dcp2, tp2+dcp2, interleave 2) and GQA (tiny_llama: tp4+dcp2),
with prompts shorter than dcp x interleave (empty shards) and spanning several virtual blocks,
some joining while others decode; a decode step moves only the LSEs between DCP ranks (one
all-gather of [R, H_group] float32 per layer) and the same TP traffic as ag_rs; prefill moves
nothing between DCP ranks; transformers agrees through task=verify. Unit tests, N ranks simulated
in one process: padding rows (empty on every rank) give exactly 0, never NaN, and the summed
partials equal float64 attention; fused prefill counts each head once; the plan's head shards."""
from __future__ import annotations

import math
import random

import pytest
import torch

from runner.attention.dcp import DCPAttention
from runner.attention.torch_ref import TorchAttention
from runner.compose import compose_config
from runner.distributed import GroupHandle
from runner.forward_context import AttentionMetadata
from runner.models.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard
from runner.parallel.plan import ParallelPlan
from runner.request import SamplingParams

BLOCK_SIZE = 4
# synchronous steps: the collectives recorded per step() call are those of one forward
BASE = ["device=cpu", "print_config=false", f"block_table.block_size={BLOCK_SIZE}",
        "model.max_model_len=96", "scheduler.async_scheduling=false"]
FUSED = ["parallel.dcp_comm=fused"]
# name -> overrides, by world size; "-tp1" layouts run on rank 0 only
LAYOUTS = {
    4: {"tiny-tp1": ["model=tiny"],
        "llama-tp1": ["model=tiny_llama"],
        "tiny-tp4-dcp4-ag_rs": ["model=tiny", "parallel.dcp=4"],
        "tiny-tp4-dcp4": ["model=tiny", "parallel.dcp=4", *FUSED],
        "tiny-tp4-dcp4-il2": ["model=tiny", "parallel.dcp=4", "block_table.interleave=2", *FUSED],
        "tiny-tp4-dcp2": ["model=tiny", "parallel.tp=4", "parallel.dcp=2", *FUSED],
        "llama-tp4-dcp2": ["model=tiny_llama", "parallel.tp=4", "parallel.dcp=2", *FUSED]},
    2: {"tiny-tp2-dcp2": ["model=tiny", "parallel.dcp=2", *FUSED]},
}
VERIFY_LAYOUT = ["model=tiny", "parallel.dcp=4", *FUSED, "task=verify"]  # cli.py's, default lens


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


# name -> (prompts, max_tokens, how many join after NUM_STEPS_BEFORE_JOIN steps). A virtual block
# holds 4 * dcp tokens: 1, 3 and 6 stay below dcp x interleave for part of the run; 45 spans three.
PROMPT_SETS = {"batch": (_prompts([1, 3, 6, 21, 45], seed=1), 8, 0),
               "staggered": (_prompts([20, 2, 33, 9], seed=2), 7, 2)}
NUM_STEPS_BEFORE_JOIN = 3


# --- what each rank runs --------------------------------------------------------------------
def _record_calls(handle: GroupHandle, calls: list) -> None:
    """Make every collective of `handle` append (name, input shape, dtype) to `calls`."""
    def wrap(name, fn):
        def recorded(x, *args, **kwargs):
            tensor = isinstance(x, torch.Tensor)
            calls.append((name, tuple(x.shape) if tensor else None, str(x.dtype) if tensor else
                          type(x).__name__))
            return fn(x, *args, **kwargs)
        return recorded

    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast_object",
                 "min_int"):
        setattr(handle, name, wrap(name, getattr(handle, name)))


def _run_prompt_set(runner, prompts, max_tokens: int, num_join_later: int, calls: dict) -> tuple:
    """(greedy tokens per prompt, (was prefill, dcp calls, tp calls) per step)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    first = len(prompts) - num_join_later
    ids = [runner.add_request(p, params) for p in prompts[:first]]
    steps = []
    while runner.has_unfinished():
        if len(steps) == NUM_STEPS_BEFORE_JOIN and len(ids) < len(prompts):
            ids += [runner.add_request(p, params) for p in prompts[first:]]
        for recorded in calls.values():
            recorded.clear()
        runner.step()
        steps.append((runner.last_step_was_prefill, list(calls["dcp"]), list(calls["tp"])))
    return [runner.output(i).token_ids for i in ids], steps


def _run_layout(cfg) -> dict:
    from runner.build import build_runner

    runner = build_runner(cfg)
    calls = {"dcp": [], "tp": []}
    _record_calls(runner.plan.dcp, calls["dcp"])
    _record_calls(runner.plan.tp, calls["tp"])
    tokens, steps = {}, {}
    try:
        for name, (prompts, max_tokens, num_join_later) in PROMPT_SETS.items():
            tokens[name], steps[name] = _run_prompt_set(runner, prompts, max_tokens,
                                                        num_join_later, calls)
    finally:
        runner.shutdown()
    return {"tokens": tokens, "steps": steps}


def _run_verify(cfg) -> dict:
    from runner.build import build_runner, instantiate

    runner = build_runner(cfg)
    try:
        return instantiate(cfg, "task", {}).run(runner)
    finally:
        runner.shutdown()


def run_layouts(cfg, rank: int, layouts: dict, verify_cfg) -> list[dict]:
    """Rank function: every layout (tp1 ones on rank 0 only), then task=verify if given;
    rank 0 gets [rank] -> {layout: result}."""
    import torch.distributed as dist

    results = {}
    for name, layout_cfg in layouts.items():
        if layout_cfg.parallel.tp == 1 and rank != 0:
            continue
        try:
            results[name] = _run_layout(layout_cfg)
        except Exception as e:
            raise RuntimeError(f"layout {name}: {type(e).__name__}: {e}") from e
    if verify_cfg is not None:
        results["verify"] = _run_verify(verify_cfg)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered


@pytest.fixture(scope="module")
def results():
    """world size -> [per-rank {layout: result}]; one spawned run per world size."""
    from runner.launch import launch

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # the CPU path users run
        mp.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "120")  # a hang fails, not waits
        for world, layouts in LAYOUTS.items():
            cfgs = {name: compose_config(BASE + overrides) for name, overrides in layouts.items()}
            verify_cfg = compose_config(["device=cpu", *VERIFY_LAYOUT]) if world == 4 else None
            launch_cfg = next(c for c in cfgs.values() if c.parallel.tp == world)
            out[world] = launch(launch_cfg, run_layouts, cfgs, verify_cfg)
    return out


def _per_rank(results, name: str) -> list[dict]:
    world = next(w for w, layouts in LAYOUTS.items() if name in layouts)
    return [per_rank[name] for per_rank in results[world] if name in per_rank]


def _layout_config(name: str):
    overrides = next(layouts[name] for layouts in LAYOUTS.values() if name in layouts)
    return compose_config(BASE + overrides)


FUSED_LAYOUTS = [n for layouts in LAYOUTS.values() for n, o in layouts.items() if FUSED[0] in o]


@pytest.mark.parametrize("name", FUSED_LAYOUTS)
def test_fused_greedy_tokens_equal_tp1(results, name):
    per_rank = _per_rank(results, name)
    assert len(per_rank) == _layout_config(name).parallel.tp
    for rank, other in enumerate(per_rank[1:], 1):
        assert other["tokens"] == per_rank[0]["tokens"], f"rank {rank} out of lockstep"
    tp1 = _per_rank(results, f"{name.split('-')[0]}-tp1")[0]
    for prompt_set in PROMPT_SETS:
        assert per_rank[0]["tokens"][prompt_set] == tp1["tokens"][prompt_set], prompt_set


def test_fused_equals_ag_rs(results):
    assert (_per_rank(results, "tiny-tp4-dcp4")[0]["tokens"]
            == _per_rank(results, "tiny-tp4-dcp4-ag_rs")[0]["tokens"])


@pytest.mark.parametrize("name", FUSED_LAYOUTS)
def test_fused_decode_moves_only_the_lses(results, name):
    """Per decode step and layer one all-gather of [R, H_group] float32 LSEs, H_group the
    model's heads * dcp / tp; nothing else between DCP ranks, and nothing in prefill."""
    cfg = _layout_config(name)
    hf_config, parallel = cfg.model.hf_config, cfg.parallel
    group_heads = hf_config.num_attention_heads * parallel.dcp // parallel.tp
    for m in _per_rank(results, name):
        for prompt_set, steps in m["steps"].items():
            assert {prefill for prefill, _, _ in steps} == {True, False}
            for prefill, dcp_calls, _ in steps:
                if prefill:
                    assert dcp_calls == [], f"{prompt_set}: prefill used the DCP group"
                    continue
                num_reqs = dcp_calls[0][1][0] if dcp_calls else 0
                assert num_reqs > 0
                assert dcp_calls == ([("all_gather", (num_reqs, group_heads), "torch.float32")]
                                     * hf_config.num_hidden_layers)


def test_fused_adds_no_tp_traffic(results):
    """Decode steps of the fused and ag_rs layouts make the same TP collectives: the combine's
    sum rides on the all-reduce o_proj already does."""
    fused = _per_rank(results, "tiny-tp4-dcp4")[0]["steps"]["batch"]
    ag_rs = _per_rank(results, "tiny-tp4-dcp4-ag_rs")[0]["steps"]["batch"]
    assert [(p, tp) for p, _, tp in fused] == [(p, tp) for p, _, tp in ag_rs]
    assert any(tp for p, _, tp in fused if not p)


def test_cli_verify_fused_passes(results):
    """`cli.py task=verify parallel.dcp=4 parallel.dcp_comm=fused`: transformers agrees."""
    metrics = results[4][0]["verify"]
    assert metrics["exit_code"] == 0, metrics
    assert metrics["min_agreement"] == 1.0


# --- unit tests: N ranks simulated in one process ------------------------------------------
class _GatheredLses:
    """A DCP group whose only collective returns the LSEs every rank computed (N ranks in one
    process: the test does the all-gather)."""

    def __init__(self, size: int, rank: int, lses: torch.Tensor):
        self.size, self.rank, self.lses = size, rank, lses  # lses [N * R, H]

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        assert dim == 0
        assert torch.equal(x, self.lses.view(self.size, *x.shape)[self.rank])
        return self.lses


class _NaNOnEmptyRows(TorchAttention):
    """A decode kernel that divides 0 by 0 where its shard is empty (out NaN, lse -inf)."""

    def decode(self, q, k_cache, v_cache, meta, scale):
        out, lse = super().decode(q, k_cache, v_cache, meta, scale)
        empty = meta.local_seq_lens == 0
        return out.masked_fill(empty[:, None, None], float("nan")), lse


def _decode_meta(lens: list[int], num_blocks_per_row: int) -> AttentionMetadata:
    num_reqs = len(lens)
    table = torch.arange(num_reqs * num_blocks_per_row, dtype=torch.int32).view(num_reqs, -1)
    local = torch.tensor(lens, dtype=torch.int32)
    return AttentionMetadata(
        is_prefill=False, slot_mapping=torch.full((num_reqs,), -1, dtype=torch.int64),
        query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int32),
        query_start_loc_cpu=list(range(num_reqs + 1)), seq_lens=local, local_seq_lens=local,
        block_table=table, max_local_seq_len=max(lens))


def _shard_cache(keys: list[torch.Tensor], n: int, r: int) -> tuple[torch.Tensor, list[int]]:
    """Rank r's paged cache [R * blocks, BLOCK_SIZE, Hkv, D] holding keys j with j % n == r of
    each row (keys[i] [L_i, Hkv, D]), and its local lengths."""
    mine = [k[r::n] for k in keys]
    blocks = max(1, math.ceil(max(len(k) for k in mine) / BLOCK_SIZE))
    cache = torch.zeros(len(keys) * blocks * BLOCK_SIZE, *keys[0].shape[1:])
    for i, k in enumerate(mine):
        cache[i * blocks * BLOCK_SIZE:i * blocks * BLOCK_SIZE + len(k)] = k
    return cache.view(len(keys) * blocks, BLOCK_SIZE, *keys[0].shape[1:]), [len(k) for k in mine]


@pytest.mark.parametrize("kernels", ["torch", "triton_interpreter"])
@pytest.mark.parametrize("backend", [TorchAttention, _NaNOnEmptyRows])
def test_fused_decode_sums_to_attention_and_pads_with_zeros(monkeypatch, kernels, backend):
    if kernels == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    n, num_heads, dim, scale = 4, 3, 8, 0.4
    lens = [13, 2, 0, 0, 5]  # row 1: empty on ranks 2, 3; rows 2, 3: padding (empty everywhere)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(lens), num_heads, dim, generator=gen)  # [R, H, D]
    keys = [torch.randn(length, 1, dim, generator=gen) for length in lens]  # one shared KV head
    values = [torch.randn(length, 1, dim, generator=gen) for length in lens]
    shards = [(_shard_cache(keys, n, r), _shard_cache(values, n, r)[0]) for r in range(n)]
    metas = [_decode_meta(local, k_cache.shape[0] // len(lens))
             for (k_cache, local), _ in shards]
    lses = torch.cat([backend().decode(q, k, v, meta, scale)[1]
                      for ((k, _), v), meta in zip(shards, metas)])  # [N * R, H]
    total = torch.zeros(len(lens), num_heads, dim)
    for r, (((k_cache, _), v_cache), meta) in enumerate(zip(shards, metas)):
        wrapper = DCPAttention(backend(), _GatheredLses(n, r, lses), "fused")
        scaled, lse = wrapper.decode(q, k_cache, v_cache, meta, scale)
        assert not scaled.isnan().any()
        total += scaled
    for i, length in enumerate(lens):
        if length == 0:
            assert torch.equal(total[i], torch.zeros(num_heads, dim)), f"padding row {i}"
            assert (lse[i] == float("-inf")).all()
            continue
        scores = (q[i].double() @ keys[i][:, 0].double().T) * scale  # [H, L]
        expected = torch.softmax(scores, dim=-1) @ values[i][:, 0].double()  # [H, D]
        torch.testing.assert_close(total[i].double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[i].double(), torch.logsumexp(scores, -1), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 4], ids=["gqa_shared_kv", "mla_per_head_kv"])
def test_fused_prefill_counts_each_head_once(num_kv_heads):
    """Every rank sees the same fresh tokens; summed over the group (as o_proj's all-reduce
    does), the outputs equal float64 causal attention of every head once. No collective runs:
    the handles have no process group."""
    n, num_heads, dim, scale, starts = 2, 4, 8, 0.3, [0, 2, 7]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(starts[-1], num_heads, dim, generator=gen)  # [T, H_g, D]
    k = torch.randn(starts[-1], num_kv_heads, dim, generator=gen)
    v = torch.randn(starts[-1], num_kv_heads, dim, generator=gen)
    lens = torch.tensor([2, 5], dtype=torch.int32)
    meta = AttentionMetadata(
        is_prefill=True, slot_mapping=torch.zeros(starts[-1], dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32), query_start_loc_cpu=starts,
        seq_lens=lens, local_seq_lens=lens, block_table=torch.zeros(2, 2, dtype=torch.int32),
        max_local_seq_len=5)
    total = sum(DCPAttention(TorchAttention(), GroupHandle(n, r), "fused").prefill(
        q, k, v, meta, scale)[0] for r in range(n))
    kv_of_head = torch.arange(num_heads) * num_kv_heads // num_heads
    for start, end in zip(starts[:-1], starts[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(),
                              k[start:end, kv_of_head].double()) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        expected = torch.einsum("hqk,khd->qhd", probs, v[start:end, kv_of_head].double())
        torch.testing.assert_close(total[start:end].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp,dcp", [(4, 4), (4, 2), (2, 2), (8, 2)])
def test_fused_plan_gives_each_rank_its_groups_heads(tp, dcp):
    """Fused: a rank's heads are the union of its DCP group's TP shards, and its projections
    load exactly those heads' rows (q) and columns (o_proj)."""
    num_heads, head_dim, hidden = 16, 3, 5
    q_full = torch.randn(num_heads * head_dim, hidden)  # [H * D, hidden]
    o_full = torch.randn(hidden, num_heads * head_dim)  # [hidden, H * D]
    for rank in range(tp):
        group = range(rank - rank % dcp, rank - rank % dcp + dcp)
        tp_heads = []
        for member in group:
            tp_plan = ParallelPlan(tp=tp, dcp=dcp, dcp_comm="ag_rs")
            tp_plan.tp = GroupHandle(tp, member)
            shard = tp_plan.attention_heads(num_heads)
            tp_heads += range(shard.offset, shard.offset + shard.num_heads)
        plan = ParallelPlan(tp=tp, dcp=dcp, dcp_comm="fused")
        plan.tp = GroupHandle(tp, rank)
        heads = plan.attention_heads(num_heads)
        assert list(range(heads.offset, heads.offset + heads.num_heads)) == sorted(tp_heads)
        shard = Shard.of_heads(heads, num_heads)
        q_proj = ColumnParallelLinear(hidden, [num_heads * head_dim], plan.tp, shard=shard)
        o_proj = RowParallelLinear(num_heads * head_dim, hidden, plan.tp, shard=shard)
        q_proj.weight.weight_loader(q_proj.weight, q_full)
        o_proj.weight.weight_loader(o_proj.weight, o_full)
        rows = [h * head_dim + d for h in sorted(tp_heads) for d in range(head_dim)]
        assert torch.equal(q_proj.weight, q_full[rows])
        assert torch.equal(o_proj.weight, o_full[:, rows])
