"""Safe reading of a Hugging Face-format checkpoint folder: config.json and safetensors weights.

Every check runs before the first tensor is yielded, so a bad folder fails fast with one line
naming `model.path` and the file or tensor. Pickled weights and remote code are never run.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from runner.errors import RunnerError

# architecture -> the model_type whose built-in transformers config class must read it
SUPPORTED_ARCHITECTURES = {
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def fail(path: str, message: str) -> RunnerError:
    """A one-line RunnerError about the checkpoint folder `path`."""
    return RunnerError(f"model.path={path}: {' '.join(message.split())}")


def read_json(path: str, file_name: str) -> dict:
    """The JSON object in `path/file_name`; RunnerError if it is not valid JSON or not an object."""
    try:
        with open(os.path.join(path, file_name), encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(path, f"{file_name} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise fail(path, f"{file_name} cannot be read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise fail(path, f"{file_name} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise fail(path, "a file, not a checkpoint folder" if os.path.exists(path)
                   else "no such checkpoint folder")


def load_hf_config(path: str) -> PretrainedConfig:
    """The transformers config of the checkpoint at `path`, read with built-in classes only."""
    _check_folder(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise fail(path, "no config.json in the checkpoint folder")
    raw = read_json(path, "config.json")
    allowed = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        raise fail(path, f"config.json names no architectures; allowed: {allowed}")
    architecture = architectures[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise fail(path, f"config.json architecture {architecture!r} is not supported; "
                         f"allowed: {allowed}")
    model_type = SUPPORTED_ARCHITECTURES[architecture]
    if raw.get("model_type") != model_type:
        # NOTE: a model_type transformers does not know would need the folder's own code
        # (auto_map), which is never run; a known but different one would read the wrong fields.
        raise fail(path, f"config.json model_type {raw.get('model_type')!r} does not match "
                         f"architecture {architecture} (expected {model_type!r})")
    try:
        # With a built-in model_type, trust_remote_code=False ignores any auto_map entry.
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise fail(path, f"config.json cannot be read as {model_type}: {exc}") from None


def _pickled_files(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(PICKLE_SUFFIXES))


def _index_weight_map(path: str) -> dict[str, str]:
    index = read_json(path, INDEX_FILE)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise fail(path, f"{INDEX_FILE} has no weight_map of tensor name -> shard file")
    for name, shard in weight_map.items():
        # a shard must be a plain file name in the folder (no path that leaves it)
        if (not isinstance(shard, str) or os.path.basename(shard) != shard
                or shard in ("", ".", "..")):
            raise fail(path, f"{INDEX_FILE} maps tensor {name} to {shard!r}, "
                             "which is not a file name inside the folder")
    return weight_map


def _shard_keys(path: str, shard: str) -> set[str]:
    file_path = os.path.join(path, shard)
    if not os.path.isfile(file_path):
        raise fail(path, f"shard {shard} is missing (listed in {INDEX_FILE})")
    try:
        with safe_open(file_path, framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as exc:
        raise fail(path, f"{shard} is not a valid safetensors file "
                         f"(truncated or corrupt: {exc})") from None


def weight_files(path: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, after checking every file's header."""
    _check_folder(path)
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        weight_map = _index_weight_map(path)
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
        weight_map = {name: SINGLE_FILE for name in _shard_keys(path, SINGLE_FILE)}
    elif _pickled_files(path):
        raise fail(path, f"only pickled weights ({', '.join(_pickled_files(path))}); they are "
                         "refused because unpickling runs arbitrary code: convert them to "
                         "safetensors")
    else:
        raise fail(path, f"no weights: neither {SINGLE_FILE} nor {INDEX_FILE} in the folder")
    for shard, names in _names_by_shard(weight_map).items():
        keys = _shard_keys(path, shard)
        for name in names:
            if name not in keys:
                raise fail(path, f"tensor {name} is listed in {INDEX_FILE} "
                                 f"but missing from {shard}")
    return weight_map


def _names_by_shard(weight_map: dict[str, str]) -> dict[str, list[str]]:
    names_by_shard: dict[str, list[str]] = {}
    for name in sorted(weight_map):
        names_by_shard.setdefault(weight_map[name], []).append(name)
    return dict(sorted(names_by_shard.items()))


def iter_safetensors(path: str, device: str | torch.device = "cpu",
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor, in sorted name order, one tensor at a time.

    All files are checked in this call, before an iterator is returned.
    """
    return _read_tensors(path, weight_files(path), str(device))


def _read_tensors(path: str, weight_map: dict[str, str],
                  device: str) -> Iterator[tuple[str, torch.Tensor]]:
    with ExitStack() as stack:
        handles = {shard: stack.enter_context(
                       safe_open(os.path.join(path, shard), framework="pt", device=device))
                   for shard in _names_by_shard(weight_map)}
        for name in sorted(weight_map):
            yield name, handles[weight_map[name]].get_tensor(name)
