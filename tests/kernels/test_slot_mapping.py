"""DCP slot mapping and local lengths: kernel vs torch reference vs a brute-force layout
(tokens go round-robin to ranks in chunks of `interleave`; each rank keeps its tokens in order)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.slot_mapping import (local_seq_lens, local_seq_lens_ref, slot_mapping,
                                  slot_mapping_ref)


def _layout_case(seq_lens, block_size, cp_size, num_padding, seed):
    """Every token of every request (plus padding tokens, shuffled in) and a block table of
    distinct random block ids, with one spare column past each request's need."""
    gen = torch.Generator().manual_seed(seed)
    virtual_size = block_size * cp_size
    max_blocks = max(-(-length // virtual_size) for length in seq_lens) + 1
    block_table = torch.randperm(len(seq_lens) * max_blocks + 7, generator=gen)[
        :len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).int()
    positions = [p for length in seq_lens for p in range(length)] + [0] * num_padding
    reqs = [r for r, length in enumerate(seq_lens) for _ in range(length)] + [-1] * num_padding
    order = torch.randperm(len(positions), generator=gen)
    return (torch.tensor(positions, dtype=torch.int64)[order],
            torch.tensor(reqs, dtype=torch.int32)[order], block_table)


@settings(max_examples=25, deadline=None)
@given(seq_lens=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       block_size=st.sampled_from([4, 8]), cp_size=st.integers(1, 4),
       interleave_kind=st.sampled_from(["one", "two", "block"]), num_padding=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_layout_covers_every_token_once_in_order(seq_lens, block_size, cp_size, interleave_kind,
                                                 num_padding, seed):
    interleave = {"one": 1, "two": 2, "block": block_size}[interleave_kind]
    positions, reqs, block_table = _layout_case(seq_lens, block_size, cp_size, num_padding, seed)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    owner_count = torch.zeros(len(positions), dtype=torch.int64)
    for rank in range(cp_size):
        args = (block_size, cp_size, rank, interleave)
        slots = slot_mapping(positions, reqs, block_table, *args)
        assert torch.equal(slots, slot_mapping_ref(positions, reqs, block_table, *args))
        assert (slots[reqs < 0] == -1).all()
        owner_count += slots >= 0
        local_lens = local_seq_lens(lens, cp_size, rank, interleave)
        assert torch.equal(local_lens, local_seq_lens_ref(lens, cp_size, rank, interleave))
        for req, length in enumerate(seq_lens):
            # Brute force: position p is rank (p // I) % N's j-th token, j = earlier such tokens.
            mine = [p for p in range(length) if (p // interleave) % cp_size == rank]
            assert local_lens[req] == len(mine)
            # The j-th local token sits at the j-th slot of an ordinary paged row.
            expected = {p: int(block_table[req, j // block_size]) * block_size + j % block_size
                        for j, p in enumerate(mine)}
            for p in range(length):
                token = ((reqs == req) & (positions == p)).nonzero().item()
                assert slots[token] == expected.get(p, -1)
    assert torch.equal(owner_count, (reqs >= 0).long())


def test_single_rank_is_plain_paged_mapping():
    positions, reqs, block_table = _layout_case([13, 0, 6], 4, 1, 2, seed=3)
    slots = slot_mapping(positions, reqs.long(), block_table, block_size=4)
    plain = block_table[reqs.long().clamp(min=0), positions // 4].long() * 4 + positions % 4
    assert torch.equal(slots, torch.where(reqs >= 0, plain, -1))
    assert torch.equal(local_seq_lens(torch.tensor([13, 0, 6], dtype=torch.int32)),
                       torch.tensor([13, 0, 6], dtype=torch.int32))


def test_worked_example_from_the_design_notes():
    # B=4, N=2, I=1, row [7, 3]: rank 0 holds even positions, rank 1 odd ones.
    positions, reqs = torch.arange(10), torch.zeros(10, dtype=torch.int32)
    table = torch.tensor([[7, 3]], dtype=torch.int32)
    assert slot_mapping(positions, reqs, table, 4, 2, 0).tolist() == [
        28, -1, 29, -1, 30, -1, 31, -1, 12, -1]
    assert slot_mapping(positions, reqs, table, 4, 2, 1).tolist() == [
        -1, 28, -1, 29, -1, 30, -1, 31, -1, 12]


def test_positions_past_the_table_and_empty_batches():
    table = torch.tensor([[5]], dtype=torch.int32)
    slots = slot_mapping(torch.tensor([3, 4, 9]), torch.tensor([0, 0, 0]), table, 4)
    assert slots.tolist() == [23, -1, -1]
    assert slot_mapping(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32),
                        table, 4).shape == (0,)
    assert local_seq_lens(torch.empty(0, dtype=torch.int32), 2, 1).shape == (0,)


def test_local_lengths_sum_to_the_sequence_length():
    lens = torch.arange(0, 3 * 4 * 2 * 8 + 1, dtype=torch.int32)
    for cp_size, interleave in [(2, 1), (3, 2), (4, 8)]:
        total = sum(local_seq_lens(lens, cp_size, rank, interleave) for rank in range(cp_size))
        assert torch.equal(total, lens)


@pytest.mark.parametrize("bad, match", [
    (dict(cp_rank=2), "cp_rank"), (dict(interleave=3), "block_size"),
    (dict(positions=torch.arange(3, dtype=torch.int32)), "positions"),
    (dict(req_indices=torch.zeros(2, dtype=torch.int32)), "req_indices"),
    (dict(block_table=torch.zeros(1, 2, dtype=torch.int64)), "block_table"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(positions=torch.arange(3), req_indices=torch.zeros(3, dtype=torch.int32),
                block_table=torch.zeros(1, 2, dtype=torch.int32), block_size=4, cp_size=2,
                cp_rank=0, interleave=1) | bad
    with pytest.raises(ValueError, match=match):
        slot_mapping(**args)
    with pytest.raises(ValueError, match="seq_lens"):
        local_seq_lens(torch.zeros(2, dtype=torch.int64))
