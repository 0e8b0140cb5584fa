"""The component contracts: read this file first.

Six components, each chosen by a Hydra config group (`conf/<group>/`) or given as a Python object
to `build_runner(cfg, <group>=obj)`. Components never import each other; `runner/build.py` wires
them. Only the ParallelPlan knows DCP exists: the block table sees `cp_size`/`cp_rank`, the
attention backend sees local lengths, and the plan wraps the backend with the DCP combine.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from runner.forward_context import AttentionMetadata, KVCacheSpec
    from runner.parallel.plan import ParallelPlan
    from runner.runner import Runner
    from runner.step_inputs import DecodeBuffers, StepInputs


@runtime_checkable
class ModelLoader(Protocol):  # conf/model
    path: str | None  # the checkpoint folder, or None (dummy weights)

    def hf_config(self) -> PretrainedConfig:
        """The transformers config of the model (from `path`, or built from the shape fields)."""

    def build(self, plan: ParallelPlan, device: torch.device) -> nn.Module:
        """The model with this rank's shard shapes, weights not yet loaded."""

    def load_weights(self, model: nn.Module, plan: ParallelPlan) -> None:
        """Fill the weights (checkpoint or dummy), each parameter with its own shard."""

    def max_model_len(self) -> int:
        """Longest sequence (prompt + output) a request may reach."""

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """Weights and KV cache dtype on `device`."""


@runtime_checkable
class AttentionBackend(Protocol):  # conf/attention
    returns_lse: bool  # DCP needs the natural-log LSE of partial attention
    # rank-local context bounds at which decode launches differently (CUDA graphs capture each
    # batch size once per bound, and once at the longest context); a backend without it: none
    decode_length_buckets: tuple[int, ...]
    # True: graph=auto captures decode in CUDA graphs on a GPU; False: it runs decode eagerly (a
    # decode whose memory grows with the captured length bound, max_model_len); a backend
    # without it: True
    decode_in_graphs: bool
    # True: write_kv only stores rows at slot_mapping in kv_cache_shape's layout, so a model may
    # store its key rows itself inside a fused kernel (the MLA and GQA prologues) instead of calling
    # write_kv; a backend without it: False (write_kv is always called). A backend whose write_kv
    # does more (counts, quantizes, casts to another cache dtype, logs) must leave it False.
    fused_kv_write: bool

    def kv_cache_shape(self, spec: KVCacheSpec, num_blocks: int, block_size: int) -> tuple:
        """Shape of one layer's cache tensor."""

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                 slot_mapping: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor | None) -> None:
        """Store new tokens' key [T, Hkv, D] (and value) at `slot_mapping` [T]; skip slot -1.
        `value` is None when V is a view of K (MLA)."""

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention of fresh tokens within each request (no cached context).
        q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv] -> out [T, H, Dv], lse [T, H] fp32 or None
        (nothing combines prefill outputs, so a backend may skip the LSE)."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One query token per request against its paged cache (this rank's `local_seq_lens`).
        q [R, H, D] -> out [R, H, Dv], lse [R, H] fp32 natural log; -inf and out 0 if empty."""


@runtime_checkable
class BlockTable(Protocol):  # conf/block_table
    block_size: int  # tokens per physical block on one rank
    interleave: int  # DCP: consecutive tokens a rank stores before the next rank's turn
    cp_size: int  # DCP group size (1: an ordinary paged table)
    virtual_block_size: int  # tokens per allocated block id: block_size * cp_size
    num_blocks: int | None  # physical blocks per rank; None: sized from memory_fraction
    memory_fraction: float

    def slot_mapping(self, positions: torch.Tensor, req_indices: torch.Tensor,
                     block_table: torch.Tensor) -> torch.Tensor:
        """positions [T], each token's block-table row [T] (-1: padding), block_table
        [R, max_num_blocks] -> slots [T] int64, -1 where this rank does not store the token."""

    def local_seq_lens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Tokens of each sequence stored on this rank: [R] -> [R]."""

    def max_local_len(self, max_len: int) -> int:
        """Upper bound of this rank's share of a `max_len`-token sequence."""


@runtime_checkable
class GraphCapturer(Protocol):  # conf/graph
    def capture(self, step_fn: Callable[[StepInputs], Any], buffers: DecodeBuffers,
                length_buckets: tuple[int, ...] = ()) -> None:
        """Record decode steps over the persistent buffers (eager: just keep `step_fn`), once
        per length bucket (a bound on the batch's rank-local context) and at the longest."""

    def padded_size(self, num_reqs: int) -> int:
        """The batch size a decode step of `num_reqs` requests runs at."""

    def replay(self, inputs: StepInputs) -> Any:
        """What `step_fn` returns for the decode step whose inputs are staged in the buffers."""

    def release(self) -> None:
        """Free captured graphs (before process groups are destroyed)."""

    def describe(self) -> str:
        """One line for the run summary."""


@runtime_checkable
class Task(Protocol):  # conf/task
    def run(self, runner: Runner) -> dict:
        """Do the job; return its metrics (a sweep summary reads them)."""
