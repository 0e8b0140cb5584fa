"""build_runner(cfg, **objects): instantiate each component (or take the object given for its
group), check that they fit together, and wire them into a Runner. Every cross-component check
lives in `check_config`, which runs before any rank is spawned."""
from __future__ import annotations

import functools
import os

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError
from runner.kv_cache import bytes_per_block
from runner.parallel.layout import check_layout
from runner.runner import Runner

ACTIVATION_RESERVE_BYTES = 4 << 30  # GPU: prefill activations and CUDA graphs, outside the KV cache
GROUPS = ("model", "attention", "block_table", "parallel", "graph")  # a task just runs a runner


def resolve_device(cfg: DictConfig) -> torch.device:
    name = cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunnerError("device=cuda: no GPU is visible; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise RunnerError(f"device={name!r}: allowed auto, cpu, cuda")
    return torch.device(name)


def instantiate(cfg: DictConfig, group: str, objects: dict, **runtime):
    """The object given for `group`, else the config group's `_target_` with runtime args."""
    if objects.get(group) is not None:
        return objects[group]
    node = cfg[group]
    try:
        return hydra.utils.instantiate(node, _convert_="all", **runtime)
    except hydra.errors.InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, RunnerError):
            raise cause from None
        raise RunnerError(f"{group}: {cause or e}") from None


def check_config(cfg: DictConfig, objects: dict | None = None, device: torch.device | None = None):
    """Every check that can fail before ranks start. Returns the loader (its config is read)."""
    objects = objects or {}
    device = device or resolve_device(cfg)
    sched = cfg.scheduler
    if sched.max_num_seqs < 1:
        raise RunnerError(f"scheduler.max_num_seqs={sched.max_num_seqs}: must be >= 1")
    bt = cfg.block_table
    if objects.get("block_table") is None:
        if bt.block_size <= 0:
            raise RunnerError(f"block_table.block_size={bt.block_size}: must be >= 1")
        if bt.num_blocks is not None and bt.num_blocks <= 0:
            raise RunnerError(f"block_table.num_blocks={bt.num_blocks}: must be >= 1 or null")
        if not 0 < bt.memory_fraction <= 1:
            raise RunnerError(f"block_table.memory_fraction={bt.memory_fraction}: "
                              f"must be in (0, 1]")
    loader = instantiate(cfg, "model", objects, seed=cfg.seed)
    if getattr(loader, "requires_gpu", False) and device.type != "cuda":
        raise RunnerError("this model needs a GPU (model.requires_gpu=true) and none is visible: "
                          "use a smaller model (model=tiny) or run on a GPU machine")
    hf_config = loader.hf_config()
    max_model_len = loader.max_model_len()
    if sched.max_num_batched_tokens is not None and sched.max_num_batched_tokens < max_model_len:
        raise RunnerError(f"scheduler.max_num_batched_tokens={sched.max_num_batched_tokens} must be"
                          f" >= max_model_len={max_model_len} (no chunked prefill): raise it or"
                          f" lower model.max_model_len")
    if objects.get("parallel") is None:
        check_layout(cfg.parallel, hf_config, bt.block_size, bt.interleave, device)
    dcp_size = getattr(objects.get("parallel"), "dcp_size", None) or cfg.parallel.dcp
    if dcp_size > 1:
        attention = instantiate(cfg, "attention", objects, device=device)
        if not getattr(attention, "returns_lse", False):
            raise RunnerError(f"parallel.dcp={dcp_size} needs an attention backend that returns "
                              f"the LSE of its partial results; {type(attention).__name__} does "
                              f"not (returns_lse is not true)")
    _check_fits(loader, device, cfg.parallel.tp)
    return loader


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_fits(loader, device: torch.device, tp: int) -> None:
    """Refuse a model whose weights alone exceed one rank's device memory."""
    from runner.parallel.plan import ParallelPlan
    model = loader.build(ParallelPlan(), torch.device("meta"))
    element_size = torch.empty((), dtype=loader.torch_dtype(device)).element_size()
    weight_bytes = sum(p.numel() for p in model.parameters()) * element_size // tp
    memory = _device_memory(device)
    if weight_bytes > 0.9 * memory:
        raise RunnerError(f"the model's weights need {weight_bytes / 2**30:.1f} GiB per rank but "
                          f"the {device.type} device has {memory / 2**30:.1f} GiB: use more ranks "
                          f"(parallel.tp), a smaller model.dtype, or a larger device")


def _num_blocks(block_table, model, plan, device, kv_dtype, max_model_len, max_num_seqs) -> int:
    """Physical blocks per rank: explicit, else from GPU memory, else (CPU) enough for
    max_num_seqs full-length requests without DCP. The same count for every rank (the minimum)."""
    spec = model.kv_cache_spec()
    per_block = bytes_per_block(spec, model.num_layers, block_table.block_size, kv_dtype)
    if block_table.num_blocks is not None:
        num_blocks = block_table.num_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free  # weights, CUDA context, other processes
        budget = total * block_table.memory_fraction - in_use - ACTIVATION_RESERVE_BYTES
        num_blocks = int(budget // per_block)
    else:
        num_blocks = -(-max_num_seqs * max_model_len // block_table.block_size)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if num_blocks * per_block * plan.world_size > memory // 2:
            raise RunnerError(
                f"the CPU KV cache for scheduler.max_num_seqs={max_num_seqs} requests of "
                f"model.max_model_len={max_model_len} tokens needs "
                f"{num_blocks * per_block * plan.world_size / 2**30:.1f} GiB, more than half of "
                f"this machine's {memory / 2**30:.1f} GiB: lower scheduler.max_num_seqs or "
                f"model.max_model_len, or set block_table.num_blocks")
    num_blocks = plan.tp.min_int(num_blocks)
    per_request = -(-max_model_len // block_table.virtual_block_size)
    if num_blocks < per_request:
        longest = max(num_blocks, 0) * block_table.virtual_block_size
        raise RunnerError(f"the KV cache ({num_blocks} blocks) cannot hold one request of "
                          f"max_model_len={max_model_len} tokens; the longest that fits is "
                          f"{longest}:"
                          f" set model.max_model_len<={longest} or give more memory/num_blocks")
    return num_blocks


def build_runner(cfg: DictConfig, **objects) -> Runner:
    """Build this rank's Runner. `objects` maps a group name to a ready component, which
    replaces that group's config (Lightning style): build_runner(cfg, attention=MyBackend())."""
    unknown = set(objects) - set(GROUPS)
    if unknown:
        raise RunnerError(f"build_runner: unknown component {sorted(unknown)}; allowed {GROUPS}")
    device = resolve_device(cfg)
    loader = check_config(cfg, objects, device)
    plan = instantiate(cfg, "parallel", objects)
    if plan.world_size > 1:
        if not dist.is_initialized():
            raise RunnerError("a multi-rank plan must be run through runner.launch (or cli.py)")
        plan.setup(dist.get_rank())
    attention = instantiate(cfg, "attention", objects, device=device)
    graph = instantiate(cfg, "graph", objects, device=device, attention=attention)
    block_table = objects.get("block_table") or instantiate(cfg, "block_table", {})
    if isinstance(block_table, functools.partial):
        block_table = block_table(cp_size=plan.cp_size, cp_rank=plan.cp_rank)
    model = loader.build(plan, device)
    loader.load_weights(model, plan)
    model.eval()
    kv_dtype = loader.torch_dtype(device)
    max_model_len = loader.max_model_len()
    num_blocks = _num_blocks(block_table, model, plan, device, kv_dtype, max_model_len,
                             cfg.scheduler.max_num_seqs)
    from runner.loaders.generation import eos_token_ids, load_tokenizer
    tokenizer = load_tokenizer(loader.path) if loader.path else None
    runner = Runner(model, plan.wrap_attention(attention), block_table, plan, graph, num_blocks,
                    max_model_len, cfg.scheduler.max_num_seqs,
                    cfg.scheduler.max_num_batched_tokens or max_model_len, device, kv_dtype,
                    eos_token_ids(loader.path, loader.hf_config()), tokenizer,
                    cfg.scheduler.async_scheduling)
    runner.loader = loader
    if loader.load_format == "safetensors":
        runner.weights_source = loader.path
    return runner


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
