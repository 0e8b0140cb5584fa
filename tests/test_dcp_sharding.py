"""DCP really shards the KV cache (a replicated cache with DCP bookkeeping fails these):
per-rank KV bytes equal dcp=1's at the same num_blocks; each rank holds exactly its L_r rows of
every request, in order, with the values dcp=1 stores for those positions; admission capacity
grows dcp times; a decode step moves only q, attention outputs and LSEs between DCP ranks and
prefill moves nothing; ranks stay in lockstep. Plus layout properties of PagedBlockTable's slot
mapping (hypothesis). Ownership is recomputed here from the formulas of DESIGN.md section 5."""
from __future__ import annotations

import contextlib
import inspect
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.block_table.paged import PagedBlockTable
from runner.compose import compose_config
from runner.request import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 40
MAX_MODEL_LEN = 64
BASE = ["device=cpu", "print_config=false", f"block_table.block_size={BLOCK_SIZE}",
        f"block_table.num_blocks={NUM_BLOCKS}", f"model.max_model_len={MAX_MODEL_LEN}",
        "scheduler.max_num_batched_tokens=1024",  # every prompt of a test in one prefill
        "scheduler.async_scheduling=false"]  # each step() call = one forward, read at once
LAYOUTS = {  # world size 4 for all; the dcp=1 layouts are the references
    "tiny-dcp1": ["model=tiny", "parallel.tp=4"],
    "tiny-dcp2": ["model=tiny", "parallel.tp=4", "parallel.dcp=2", "parallel.dcp_comm=ag_rs"],
    "tiny-dcp4-il4": ["model=tiny", "parallel.dcp=4", "block_table.interleave=4",
                      "parallel.dcp_comm=ag_rs"],
    "tiny-dcp4-a2a": ["model=tiny", "parallel.dcp=4", "parallel.dcp_comm=a2a"],
    "llama-dcp1": ["model=tiny_llama", "parallel.tp=4"],
    "llama-dcp2-il2": ["model=tiny_llama", "parallel.tp=4", "parallel.dcp=2",
                       "block_table.interleave=2", "parallel.dcp_comm=ag_rs"],
}
PROMPT_LENGTHS = [1, 2, 7, 23, 33]  # no preemption at dcp=1 with NUM_BLOCKS
MAX_TOKENS = 12
NUM_DECODE_BEFORE_FIRST_RECORD = 3
NUM_DECODE_BETWEEN_RECORDS = 4
CAPACITY_PROMPT_LEN = 16
NUM_CAPACITY_REQUESTS = 48  # more than dcp=4 can admit (NUM_BLOCKS)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter",
               "all_to_all_single", "all_to_all", "broadcast", "reduce", "gather", "scatter",
               "send", "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list",
               "gather_object", "scatter_object_list", "barrier", "batch_isend_irecv",
               "all_reduce_coalesced")
INPUT_ARGS = ("input_tensor", "input", "input_tensor_list", "input_list", "tensor", "tensors")


def _owner_and_local(p: int, n: int, interleave: int, block_size: int = BLOCK_SIZE
                     ) -> tuple[int, int]:
    """DESIGN.md section 5: (dcp rank storing position p, its index in that rank's sequence)."""
    vb, vo = divmod(p, block_size * n)
    owner = (vo // interleave) % n
    return owner, vb * block_size + (vo // (interleave * n)) * interleave + vo % interleave


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(n)] for n in lengths]


# --- what each rank measures ------------------------------------------------------------------
@contextlib.contextmanager
def _recording(plan, records: list):
    """Record (collective, group, input bytes) of every torch.distributed call (outermost only:
    deprecated names forward to new ones)."""
    import torch.distributed as dist

    groups = {id(plan.dcp.group): "dcp", id(plan.tp.group): "tp"}
    depth = [0]
    originals = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(name, fn):
        signature = inspect.signature(fn)

        def recorded(*args, **kwargs):
            if depth[0] == 0:
                bound = signature.bind_partial(*args, **kwargs).arguments
                group = bound.get("group")
                data = next((bound[a] for a in INPUT_ARGS if a in bound), None)
                tensors = data if isinstance(data, (list, tuple)) else [data]
                nbytes = sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))
                records.append((name, "world" if group is None else groups.get(id(group), "?"),
                                nbytes))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return recorded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield records
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _kv_bytes(runner) -> int:
    storages = {}
    for k_cache, v_cache in runner.kv_caches:
        for t in (k_cache, v_cache):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _request_rows(runner, request) -> tuple[list[int], list[torch.Tensor]]:
    """(local indices with a non-zero row in any layer, per layer [num_slots, ...] rows of the
    request's blocks in local order: k and v concatenated)."""
    ids = torch.tensor(request.block_ids)
    rows = []
    for k_cache, v_cache in runner.kv_caches:
        k = k_cache[ids].flatten(0, 1).flatten(1)  # [num_blocks * B, Hkv * D]
        v = v_cache[ids].flatten(0, 1).flatten(1)
        rows.append(torch.cat([k, v], dim=1).clone())
    nonzero = torch.stack([r.ne(0).any(1) for r in rows]).any(0)
    return nonzero.nonzero().flatten().tolist(), rows


def _num_nonzero_slots(runner) -> int:
    used = None
    for k_cache, v_cache in runner.kv_caches:
        slots = torch.cat([k_cache.flatten(2), v_cache.flatten(2)], dim=2).ne(0).any(2)
        used = slots if used is None else used | slots
    return int(used.sum())


def _measure_rows_and_collectives(runner) -> dict:
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    prefill_records, decode_records = [], [[], []]
    with _recording(runner.plan, prefill_records):
        ids = [runner.add_request(p, params) for p in _prompts(PROMPT_LENGTHS, seed=5)]
        events = runner.step()
    assert len(events) == len(ids), "the prompts did not prefill in one step"
    for i, num_before in enumerate((NUM_DECODE_BEFORE_FIRST_RECORD, NUM_DECODE_BETWEEN_RECORDS)):
        for _ in range(num_before):
            runner.step()
        with _recording(runner.plan, decode_records[i]):
            runner.step()
    requests = [runner.requests[i] for i in ids]
    assert all(r.finish_reason is None for r in requests)
    rows = [_request_rows(runner, r) for r in requests]
    return {"written_lens": [r.num_tokens - 1 for r in requests],
            "nonzero_local": [nz for nz, _ in rows], "rows": [rs for _, rs in rows],
            "num_nonzero_slots": _num_nonzero_slots(runner),
            "num_preemptions": runner.scheduler.log.num_preemptions,
            "tokens": [list(r.output_token_ids) for r in requests],
            "prefill_records": prefill_records, "decode_records": decode_records,
            "kv_bytes": _kv_bytes(runner), "num_blocks": runner.num_blocks,
            "dcp_rank": runner.plan.dcp.rank, "num_reqs": len(requests)}


def _measure_capacity(runner) -> int:
    """Requests admitted by one scheduling step when far more are waiting."""
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for prompt in _prompts([CAPACITY_PROMPT_LEN] * NUM_CAPACITY_REQUESTS, seed=6):
        runner.add_request(prompt, params)
    runner.step()
    return len(runner.scheduler.running)


def _with_fresh_runner(cfg, measure):
    from runner.build import build_runner

    runner = build_runner(cfg)  # an all-zero cache
    try:
        return measure(runner)
    finally:
        runner.shutdown()


def measure_layouts(cfg, rank: int, layouts: dict) -> list[dict]:
    """Rank function: measure every layout; rank 0 gets [rank] -> {layout: measurements}."""
    import torch.distributed as dist

    results = {}
    for name, layout_cfg in layouts.items():
        try:
            results[name] = _with_fresh_runner(layout_cfg, _measure_rows_and_collectives)
            results[name]["admitted"] = _with_fresh_runner(layout_cfg, _measure_capacity)
        except Exception as e:
            raise RuntimeError(f"layout {name}: {type(e).__name__}: {e}") from e
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered


@pytest.fixture(scope="module")
def measured():
    """layout -> [per-rank measurements], from one 4-rank run."""
    from runner.launch import launch

    cfgs = {name: compose_config(BASE + overrides) for name, overrides in LAYOUTS.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # the CPU path users run
        mp.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "120")  # a hang fails, not waits
        per_rank = launch(cfgs["tiny-dcp1"], measure_layouts, cfgs)
    return {name: [r[name] for r in per_rank] for name in LAYOUTS}, cfgs


def _dcp_layouts():
    return [n for n in LAYOUTS if "dcp1" not in n]


def _reference(name: str) -> str:
    return name.split("-")[0] + "-dcp1"


# --- checks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _dcp_layouts())
def test_kv_bytes_per_rank_equal_dcp1(measured, name):
    results, _ = measured
    reference = results[_reference(name)]
    for rank, m in enumerate(results[name]):
        assert m["num_blocks"] == NUM_BLOCKS
        assert m["kv_bytes"] == reference[rank]["kv_bytes"] > 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_rank_holds_exactly_its_rows(measured, name):
    results, cfgs = measured
    n, interleave = cfgs[name].parallel.dcp, cfgs[name].block_table.interleave
    reference = results[_reference(name)]
    for world_rank, m in enumerate(results[name]):
        assert m["num_preemptions"] == 0
        assert m["dcp_rank"] == world_rank % n
        total = 0
        for q, length in enumerate(m["written_lens"]):
            owned = [_owner_and_local(p, n, interleave) for p in range(length)]
            locals_ = sorted(j for r, j in owned if r == m["dcp_rank"])
            assert locals_ == list(range(len(locals_)))  # contiguous local order
            assert m["nonzero_local"][q] == locals_, f"rank {world_rank}, request {q}"
            total += len(locals_)
            group_start = world_rank - m["dcp_rank"]
            for p, (r, j) in enumerate(owned):  # every row has dcp=1's values at its position
                if r != m["dcp_rank"]:
                    continue
                for layer, rows in enumerate(m["rows"][q]):
                    expected = reference[group_start]["rows"][q][layer][p]
                    torch.testing.assert_close(rows[j], expected, rtol=1e-4, atol=1e-5)
        assert m["num_nonzero_slots"] == total, "rows written outside the requests' own slots"


@pytest.mark.parametrize("name", _dcp_layouts())
def test_admission_capacity_grows_dcp_times(measured, name):
    results, cfgs = measured
    n = cfgs[name].parallel.dcp
    dcp1 = results[_reference(name)][0]["admitted"]
    assert dcp1 == NUM_BLOCKS * BLOCK_SIZE // CAPACITY_PROMPT_LEN
    assert [m["admitted"] for m in results[name]] == [n * dcp1] * len(results[name])


def _attention_dims(cfg) -> tuple[int, int, int]:
    """(query heads per tp rank, q width, output width) of the decode attention."""
    from runner.build import check_config

    c = check_config(cfg).hf_config()
    heads = c.num_attention_heads // cfg.parallel.tp
    if getattr(c, "kv_lora_rank", None):  # MLA decodes in the latent space
        return heads, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank
    return heads, c.head_dim, c.head_dim


@pytest.mark.parametrize("name", _dcp_layouts())
def test_decode_moves_only_q_out_and_lse(measured, name):
    """Per layer and decode step the DCP group moves this rank's q (gathered) and, over all
    ranks, its heads' partial outputs with one LSE each; the TP traffic is dcp=1's."""
    results, cfgs = measured
    cfg = cfgs[name]
    n, num_layers = cfg.parallel.dcp, cfg.model.hf_config.num_hidden_layers
    heads, q_dim, out_dim = _attention_dims(cfg)
    reference = results[_reference(name)]
    for rank, m in enumerate(results[name]):
        assert not [r for r in m["prefill_records"] if r[1] == "dcp"], "prefill used DCP comm"
        first, second = m["decode_records"]
        assert first == second, "decode traffic depends on the context length"
        dcp = [r for r in first if r[1] == "dcp"]
        other = [r for r in first if r[1] != "dcp"]
        assert other == [r for r in reference[rank]["decode_records"][0] if r[1] != "dcp"]
        num_reqs = m["num_reqs"]
        q_bytes = num_reqs * heads * q_dim * 4  # float32
        out_lse_bytes = n * num_reqs * heads * (out_dim + 1) * 4  # own heads' partials, all ranks
        per_layer = 2 if cfg.parallel.dcp_comm == "a2a" else 3
        assert len(dcp) == per_layer * num_layers, dcp
        assert [r for r in dcp if r[2] == q_bytes and "gather" in r[0]] == dcp[::per_layer]
        assert sum(r[2] for r in dcp) == num_layers * (q_bytes + out_lse_bytes)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ranks_in_lockstep(measured, name):
    results, _ = measured
    tokens = [m["tokens"] for m in results[name]]
    assert all(t == tokens[0] for t in tokens)
    num_steps = 1 + NUM_DECODE_BEFORE_FIRST_RECORD + 1 + NUM_DECODE_BETWEEN_RECORDS + 1
    assert all(len(t) == num_steps for t in tokens[0])


# --- layout properties of the slot mapping ------------------------------------------------------
@st.composite
def _layouts(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    interleave = draw(st.sampled_from([i for i in (1, 2, 4, 8) if block_size % i == 0]))
    cp_size = draw(st.integers(1, 4))
    seq_lens = draw(st.lists(st.integers(0, 50), min_size=1, max_size=4))
    return block_size, interleave, cp_size, seq_lens, draw(st.randoms(use_true_random=False))


@pytest.mark.parametrize("triton_interpret", ["1", "0"], ids=["triton", "torch"])
@settings(max_examples=20, deadline=None)
@given(layout=_layouts())
def test_slot_mapping_covers_every_token_once(triton_interpret, layout):
    block_size, interleave, cp_size, seq_lens, rng = layout
    vbs = block_size * cp_size
    num_blocks_of = [-(-n // vbs) for n in seq_lens]
    max_blocks = max(num_blocks_of) + 1
    ids = list(range(sum(num_blocks_of) + 3))
    rng.shuffle(ids)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for q, count in enumerate(num_blocks_of):
        table[q, :count] = torch.tensor([ids.pop() for _ in range(count)], dtype=torch.int32)
    tokens = [(q, p) for q, n in enumerate(seq_lens) for p in range(n)] + [(-1, 0), (-1, 3)]
    rng.shuffle(tokens)  # token order in a batch is arbitrary; two padding tokens
    positions = torch.tensor([p for _, p in tokens], dtype=torch.int64)
    req_indices = torch.tensor([q for q, _ in tokens], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    num_owners = torch.zeros(len(tokens), dtype=torch.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", triton_interpret)
        for rank in range(cp_size):
            bt = PagedBlockTable(block_size, interleave, cp_size=cp_size, cp_rank=rank)
            slots = bt.slot_mapping(positions, req_indices, table)
            local_lens = bt.local_seq_lens(lens).tolist()
            mine = slots >= 0
            num_owners += mine.long()
            assert len(set(slots[mine].tolist())) == int(mine.sum())  # no shared slot
            for q, n in enumerate(seq_lens):
                owners = [_owner_and_local(p, cp_size, interleave, block_size)[0]
                          for p in range(n)]
                mine_q = sorted((p, int(s)) for (tq, p), s in zip(tokens, slots)
                                if tq == q and s >= 0)
                assert [p for p, _ in mine_q] == [p for p in range(n) if owners[p] == rank]
                assert local_lens[q] == len(mine_q)
                row = table[q].tolist()
                local_order = [row.index(s // block_size) * block_size + s % block_size
                               for _, s in mine_q]
                assert local_order == list(range(len(mine_q)))  # monotonic, no gaps
    is_padding = req_indices < 0
    assert num_owners[~is_padding].eq(1).all() and num_owners[is_padding].eq(0).all()
