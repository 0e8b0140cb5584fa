"""The greedy summary (interpreter) against torch's max and logsumexp: several programs per row,
each over several column blocks, a ragged last one, ties across blocks and programs (lowest id
wins), -inf entries and rows, bf16 logits reduced in fp32, the argmax written to ids_out."""
import pytest
import torch

import kernels.greedy_summary as gs
from kernels.greedy_summary import greedy_summary, greedy_summary_ref

# The interpreter computes both sides of the tl.where that guards -inf - -inf, and takes log(0)
# for the row of -inf (lse -inf, as torch).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in subtract"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered in log")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(gs, "BLOCK", 64)  # several blocks per program and programs per row
    monkeypatch.setattr(gs, "CHUNK", 128)


@pytest.mark.parametrize("vocab_size", [1, 50, 64, 300])
def test_matches_torch(vocab_size):
    logits = torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(vocab_size)) * 8
    got, want = greedy_summary(logits), greedy_summary_ref(logits)
    assert torch.equal(got[:, :2], want[:, :2])
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-6)


def test_ties_across_chunks_pick_the_lowest_id():
    logits = torch.zeros(3, 300)
    logits[0, [250, 70, 71]] = 3.0  # programs 1 and 0 (blocks 3 and 1)
    logits[1, [299, 0]] = 5.0
    logits[2, [200, 130]] = 4.0  # one program, its second block and its first
    got = greedy_summary(logits)
    assert got[:, 0].tolist() == [70, 0, 130]
    assert got[:, 1].tolist() == [3.0, 5.0, 4.0]


def test_minus_infinity():
    logits = torch.randn(3, 200)
    logits[0, :150] = float("-inf")  # the first program holds nothing
    logits[1, ::2] = float("-inf")
    logits[2] = float("-inf")  # torch: id 0, max -inf, lse -inf
    got, want = greedy_summary(logits), greedy_summary_ref(logits)
    assert torch.equal(got[:, :2], want[:, :2])
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-6)


def test_bfloat16_logits_are_reduced_in_float32():
    logits = (torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 6).bfloat16()
    got, want = greedy_summary(logits), greedy_summary_ref(logits)
    assert torch.equal(got[:, :2], want[:, :2])
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=1e-6, atol=1e-6)
    assert not torch.equal(want[:, 2], torch.logsumexp(logits, -1).double())  # bf16's own lse


def test_ids_out_receives_the_argmax():
    logits = torch.randn(6, 333, generator=torch.Generator().manual_seed(1))
    ids = torch.full((6,), -1, dtype=torch.int64)
    got = greedy_summary(logits, ids_out=ids)
    assert ids.tolist() == got[:, 0].long().tolist() == logits.argmax(-1).tolist()


def test_empty_and_bad_input():
    assert greedy_summary(torch.empty(0, 10)).shape == (0, 3)
    with pytest.raises(ValueError, match="greedy_summary"):
        greedy_summary(torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="ids_out"):
        greedy_summary(torch.zeros(2, 10), ids_out=torch.zeros(2, dtype=torch.int32))
