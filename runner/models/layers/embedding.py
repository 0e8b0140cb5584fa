"""Vocab-parallel embedding and LM head: rank r holds rows [r*V/tp, (r+1)*V/tp) of a vocab
padded up to a multiple of tp. Embedding sums the ranks' lookups; the head gathers logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runner.distributed import GroupHandle
from runner.models.layers.linear import _copy_into


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, group: GroupHandle):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // group.size)
        self.vocab_start = group.rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden_size), requires_grad=False)
        self.weight.weight_loader = self._load  # [V/tp, H]

    def _load(self, param: torch.Tensor, full: torch.Tensor, shard_id: int | None = None) -> None:
        rows = full[self.vocab_start:self.vocab_start + self.local_vocab]
        param.data.zero_()
        _copy_into(param.data[:rows.shape[0]], rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        mine = (local_ids >= 0) & (local_ids < self.local_vocab)
        out = F.embedding(local_ids.clamp(0, self.local_vocab - 1), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the whole vocab on every rank: local [T, V/tp] matmul, then all-gather."""

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] -> [T, V] in the weight's dtype (the sampler reduces them in fp32), into `out`
        [T, V] if given: on one rank the GEMM writes it directly."""
        if self.group.size == 1:
            return torch.mm(hidden, self.weight.t(), out=out)
        local = F.linear(hidden, self.weight)  # [T, V/tp]
        full = self.group.all_gather(local, dim=-1)[..., :self.vocab_size]  # [T, V]
        return full if out is None else out.copy_(full)
