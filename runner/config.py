"""Structured-config schemas, registered in Hydra's ConfigStore as `base_<group>`.

Every option file under conf/<group>/ lists its schema first in its defaults list, so a
misspelled key or a wrong type fails when the config is composed. Field names equal the
constructor arguments of the `_target_` (a config file and a Python call say the same thing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    _target_: str = "runner.loaders.loader.HFModelLoader"
    path: Optional[str] = None  # HF-format folder; null: dummy weights of the shapes below
    load_format: str = "auto"  # auto (safetensors if path, else dummy) | safetensors | dummy
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    max_model_len: Optional[int] = None  # cap on the checkpoint's max_position_embeddings
    architecture: str = "DeepseekV2ForCausalLM"  # used when path is null
    hf_config: Dict[str, Any] = field(default_factory=dict)  # config.json fields when path is null
    requires_gpu: bool = False  # refuse to run on CPU (models too large for it)


@dataclass
class AttentionConfig:
    _target_: str = MISSING
    name: str = MISSING  # torch | triton | auto


@dataclass
class BlockTableConfig:
    _target_: str = "runner.block_table.paged.PagedBlockTable"
    _partial_: bool = True  # the parallel plan adds cp_size and cp_rank
    block_size: int = 16  # tokens per physical block on one rank (powers of two decode fastest)
    interleave: int = 1  # DCP interleave: consecutive tokens per rank before moving on
    num_blocks: Optional[int] = None  # physical blocks per rank; null: sized from memory
    memory_fraction: float = 0.9  # of GPU memory, weights included, less 4 GiB (GPU only)


@dataclass
class ParallelConfig:
    _target_: str = "runner.parallel.plan.ParallelPlan"
    tp: int = "${.dcp}"  # tensor parallel size (ranks); defaults to dcp
    dcp: int = 1  # decode context parallel size (must divide tp)
    ep: bool = False  # experts split over the tp ranks instead of their width
    dcp_comm: str = "fused"  # DCP combine: fused (LSE gather; fastest measured) | ag_rs | a2a
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class GraphConfig:
    _target_: str = MISSING
    name: str = MISSING  # eager | cuda | auto
    batch_sizes: List[int] = field(default_factory=list)  # cuda: decode sizes to capture


@dataclass
class GenerateTaskConfig:
    _target_: str = "runner.tasks.generate.GenerateTask"
    prompts: Optional[List[str]] = None  # text; needs a tokenizer at model.path
    prompt_token_ids: Optional[List[List[int]]] = None  # token ids per prompt (no BOS added)
    prompts_file: Optional[str] = None  # JSONL: {"prompt": str} or {"prompt_token_ids": [...]}
    max_tokens: int = 16  # new tokens per request, at most
    ignore_eos: bool = False  # keep generating past EOS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    seed: int = 0  # sampling seed: draws keyed by (seed, request, output index)
    output: Optional[str] = None  # JSON path for the outputs


@dataclass
class BenchTaskConfig:
    _target_: str = "runner.tasks.bench.BenchTask"
    num_prompts: int = 64  # measured requests
    input_len: int = 32  # random prompt tokens per request (seeded)
    output_len: int = 64  # tokens generated per request
    num_warmups: int = 0  # requests run first and not measured
    request_rate: float = float("inf")  # requests per second (Poisson); inf = all at once
    max_concurrency: Optional[int] = None  # requests in flight at most; null = no limit
    ignore_eos: bool = True  # every request generates output_len tokens
    seed: int = 0  # random prompts and arrivals
    output: Optional[str] = "bench.json"  # written in the run's output folder


@dataclass
class VerifyTaskConfig:
    _target_: str = "runner.tasks.verify.VerifyTask"
    prompt_token_ids: Optional[List[List[int]]] = None  # default: seeded random prompts
    num_prompts: int = 4  # random prompts of lengths 1, 7, 33, 130, 17...
    max_tokens: int = 16  # greedy tokens per prompt
    logprob_tolerance: float = 1e-3  # largest allowed |logprob difference| (fp32)
    min_agreement: float = 1.0  # fraction of tokens that must agree


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # requests decoded together
    max_num_batched_tokens: Optional[int] = None  # tokens in one prefill step; null: max_model_len
    async_scheduling: bool = True  # launch greedy decode step N+1 before reading step N's tokens


@dataclass
class RunConfig:
    model: Any = MISSING
    attention: Any = MISSING
    block_table: Any = MISSING
    parallel: Any = MISSING
    graph: Any = MISSING
    task: Any = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # dummy weights (a function of seed and tensor name)
    print_config: bool = True  # print the composed config at start (rank 0)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="attention", name="base_attention", node=AttentionConfig)
    cs.store(group="block_table", name="base_block_table", node=BlockTableConfig)
    cs.store(group="parallel", name="base_parallel", node=ParallelConfig)
    cs.store(group="graph", name="base_graph", node=GraphConfig)
    cs.store(group="task", name="base_generate", node=GenerateTaskConfig)
    cs.store(group="task", name="base_bench", node=BenchTaskConfig)
    cs.store(group="task", name="base_verify", node=VerifyTaskConfig)
