"""Shared test helpers: tiny Hugging Face checkpoints with every parameter randomized, a word-level
tokenizer, runners built through the real config path, and transformers' greedy generate() as
the reference. Import with `from helpers import ...` (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM,
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

from runner import build_runner
from runner.compose import compose_config

MAX_POSITIONS = 512  # max_position_embeddings of every tiny checkpoint: the runner's max_model_len

# Every field differs from its config class's default, so a loader that ignores one shows.
_DEEPSEEK_V2 = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
    kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
    routed_scaling_factor=1.7, topk_method="group_limited_greedy", n_group=4, topk_group=2,
    rms_norm_eps=1e-5, max_position_embeddings=MAX_POSITIONS,
    rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                     "original_max_position_embeddings": 128, "mscale": 0.9,
                     "mscale_all_dim": 0.8, "beta_fast": 16, "beta_slow": 2})
_LLAMA = dict(
    vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=16, rms_norm_eps=3e-5,
    max_position_embeddings=MAX_POSITIONS,
    rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64})
_QWEN2 = dict(
    vocab_size=120, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=2e-6, tie_word_embeddings=True,
    max_position_embeddings=MAX_POSITIONS,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# kind -> (config class, model class, fields); Qwen2 always has q/k/v biases
KINDS = {"deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM, _DEEPSEEK_V2),
         "llama": (LlamaConfig, LlamaForCausalLM, _LLAMA),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM, _QWEN2)}


def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a generator seeded with `seed`: norm weights ~ 1 + 0.2 N,
    embeddings 0.1 N, everything else (projections, biases, routers, experts) 0.2 N.
    Initialization leaves norms at exactly 1 and biases at 0, which would hide loader bugs; these
    scales give varied greedy continuations (no one-token loops, even with tied embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # definition order: deterministic
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def make_checkpoint(path, kind: str, *, seed: int = 0, max_shard_size: str | None = None,
                    **overrides) -> str:
    """Save a tiny randomized `kind` model ("deepseek_v2", "llama", "qwen2") to `path` with
    save_pretrained (sharded when `max_shard_size` is given, e.g. "20KB"); returns the folder.

    `overrides` replace config fields (e.g. q_lora_rank=None). No EOS is set (eos_token_id
    None), so generation runs to max_tokens unless a test writes one.
    """
    config_class, model_class, fields = KINDS[kind]
    config = config_class(**{**fields, "eos_token_id": None, "pad_token_id": None, **overrides})
    model = model_class(config)
    randomize_parameters(model, seed)
    os.makedirs(path, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return str(path)


def tokenizer_vocab(vocab_size: int) -> dict[str, int]:
    """Word -> id for every id below `vocab_size`: specials, a few words, then `tok<i>`."""
    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat", "on", "mat"]
    return {w: i for i, w in enumerate(words)} | {f"tok{i}": i
                                                   for i in range(len(words), vocab_size)}


def save_tokenizer(path, vocab_size: int) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer covering ids [0, vocab_size), built offline and saved to
    `path` (tokenizer.json + tokenizer_config.json); it names no EOS token.

    NOTE: next to a Qwen2 config.json, transformers 5's AutoTokenizer loads it as a Qwen2Tokenizer
    (which encodes nothing); next to Llama or DeepSeek-V2 configs it loads as saved.
    """
    backend = Tokenizer(WordLevel(tokenizer_vocab(vocab_size), unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>")
    tokenizer.save_pretrained(path)
    return tokenizer


def build_test_runner(path: str, *overrides: str):
    """The runner `cli.py model.path=PATH device=cpu OVERRIDES...` would build (one rank)."""
    return build_runner(compose_config([f"model.path={path}", "device=cpu", *overrides]))


def reference_model(path: str) -> torch.nn.Module:
    """transformers' own model read from the checkpoint folder, float32, eager attention."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits [L, V] float32 of one token sequence."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int,
                     eos_token_id: int | list[int] | None = None) -> list[int]:
    """transformers' generate(do_sample=False) for one prompt: the new tokens (EOS included
    when it stops on `eos_token_id`; None: runs to max_tokens)."""
    input_ids = torch.tensor([prompt])  # [1, L]
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                             eos_token_id=eos_token_id)
    return out[0, len(prompt):].tolist()


class GreedyReference:
    """A checkpoint folder with transformers' model read from it; greedy continuations are
    computed once per (prompt, max_tokens, eos) and reused by every test that asks."""

    def __init__(self, path: str):
        self.path = path
        self.model = reference_model(path)
        self.vocab_size = self.model.config.vocab_size
        self._cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_tokens: int,
               eos_token_id: int | list[int] | None = None) -> list[int]:
        key = (tuple(prompt), max_tokens, str(eos_token_id))
        if key not in self._cache:
            self._cache[key] = reference_greedy(self.model, prompt, max_tokens, eos_token_id)
        return self._cache[key]


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 1) -> list[list[int]]:
    """One prompt of uniform random token ids per length, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (n,), generator=generator).tolist() for n in lengths]


class PagedBatch:
    """Requests laid out in a model's paged KV cache (block size 16) with a shuffled block
    table, for driving a model's forward by hand. The caches start as garbage, not zeros: a
    slot read before it is written changes the result."""

    BLOCK_SIZE = 16

    def __init__(self, model, max_lengths: list[int], num_blocks: int = 64):
        import math

        spec = model.kv_cache_spec()
        shape = (num_blocks, self.BLOCK_SIZE, spec.num_kv_heads, spec.head_size)
        if spec.shared:  # MLA: V is the first v_head_size dims of the latent
            caches = [torch.randn(shape) for _ in range(model.num_layers)]
            self.kv_caches = [(k, k[..., :spec.v_head_size]) for k in caches]
        else:
            self.kv_caches = [(torch.randn(shape), torch.randn(shape))
                              for _ in range(model.num_layers)]
        blocks_per_req = [math.ceil(n / self.BLOCK_SIZE) for n in max_lengths]
        ids = torch.randperm(num_blocks)[:sum(blocks_per_req)].split(blocks_per_req)
        self.block_table = torch.zeros(len(max_lengths), max(blocks_per_req), dtype=torch.int32)
        for row, req_ids in enumerate(ids):
            self.block_table[row, :len(req_ids)] = req_ids

    def context(self, seq_lens: list[int], num_new: list[int], attention=None):
        """(positions [T], ForwardContext) of a step where request r adds its last num_new[r]
        tokens (prefill when num_new == seq_lens); attention defaults to TorchAttention()."""
        from runner.attention.torch_ref import TorchAttention
        from runner.forward_context import AttentionMetadata, ForwardContext

        positions = torch.cat([torch.arange(total - n, total)
                               for total, n in zip(seq_lens, num_new)])
        req_of_token = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(num_new))
        block = self.block_table[req_of_token, positions // self.BLOCK_SIZE].long()
        starts = [0]
        for n in num_new:
            starts.append(starts[-1] + n)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        meta = AttentionMetadata(
            is_prefill=seq_lens == num_new,
            slot_mapping=block * self.BLOCK_SIZE + positions % self.BLOCK_SIZE,
            query_start_loc=torch.tensor(starts, dtype=torch.int32), query_start_loc_cpu=starts,
            seq_lens=lens, local_seq_lens=lens, block_table=self.block_table,
            max_local_seq_len=max(seq_lens))
        return positions, ForwardContext(meta, self.kv_caches, attention or TorchAttention())


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, which vLLM uses)."""
    import math

    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def assert_latency_stats(metrics: dict, name: str, values_ms: list[float]) -> None:
    """mean/median/std/p99 `{name}` fields of a bench report equal those of `values_ms`."""
    import statistics

    import pytest

    assert metrics[f"mean_{name}_ms"] == pytest.approx(statistics.fmean(values_ms))
    assert metrics[f"median_{name}_ms"] == pytest.approx(statistics.median(values_ms))
    assert metrics[f"std_{name}_ms"] == pytest.approx(statistics.pstdev(values_ms), abs=1e-9)
    assert metrics[f"p99_{name}_ms"] == pytest.approx(percentile(values_ms, 99))


REPORT_ROWS = {  # every row of `vllm bench serve`'s report -> the metric key it prints
    "Successful requests:": "completed", "Failed requests:": "failed",
    "Benchmark duration (s):": "duration", "Total input tokens:": "total_input_tokens",
    "Total generated tokens:": "total_output_tokens",
    "Request throughput (req/s):": "request_throughput",
    "Output token throughput (tok/s):": "output_throughput",
    "Peak output token throughput (tok/s):": "max_output_tokens_per_s",
    "Peak concurrent requests:": "max_concurrent_requests",
    "Total token throughput (tok/s):": "total_token_throughput",
    **{f"{stat} {row} (ms):": f"{stat.lower()}_{key}_ms"
       for key, row in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"))
       for stat in ("Mean", "Median", "P99")},
}
