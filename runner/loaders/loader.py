"""The model loader component: a Hugging Face-format folder (config.json + safetensors), or the
shape fields of the config group with deterministic dummy weights."""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from runner.errors import RunnerError
from runner.models import ARCHITECTURES, model_class

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# config.json "model_type" of each architecture, to build a config from the shape fields
MODEL_TYPES = {"DeepseekV2ForCausalLM": "deepseek_v2", "LlamaForCausalLM": "llama",
               "Qwen2ForCausalLM": "qwen2"}
# config fields that size tensors: each must be a positive integer where the config has it
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "kv_lora_rank",
               "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size",
               "n_routed_experts", "num_experts_per_tok", "max_position_embeddings")


class HFModelLoader:
    """`path` set: architecture and shapes from its config.json (the shape fields are ignored).
    `path` null: `architecture` + `hf_config` (config.json fields) describe the model."""

    def __init__(self, path: str | None = None, load_format: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, architecture: str = "DeepseekV2ForCausalLM",
                 hf_config: dict[str, Any] | None = None, requires_gpu: bool = False,
                 seed: int = 0):
        if load_format not in LOAD_FORMATS:
            raise RunnerError(f"model.load_format={load_format!r}: "
                              f"allowed {', '.join(LOAD_FORMATS)}")
        if dtype != "auto" and dtype not in DTYPES:
            raise RunnerError(f"model.dtype={dtype!r}: allowed auto, {', '.join(DTYPES)}")
        if path is None and load_format == "safetensors":
            raise RunnerError("model.load_format=safetensors needs model.path")
        if path is None and architecture not in MODEL_TYPES:
            raise RunnerError(f"model.architecture={architecture!r}: allowed "
                              f"{', '.join(MODEL_TYPES)}")
        self.path = path
        self.load_format = "safetensors" if load_format == "auto" and path else load_format
        if self.load_format == "auto":
            self.load_format = "dummy"
        self.dtype_name = dtype
        self.max_model_len_cap = max_model_len
        self.architecture = architecture
        self.hf_fields = dict(hf_config or {})
        self.requires_gpu = requires_gpu  # too large for a CPU run: refuse at once
        self.seed = seed
        self._config: PretrainedConfig | None = None

    def hf_config(self) -> PretrainedConfig:
        if self._config is None:
            if self.path:
                from runner.loaders.checkpoint import load_hf_config
                self._config = load_hf_config(self.path)
            else:
                try:
                    self._config = AutoConfig.for_model(MODEL_TYPES[self.architecture],
                                                        architectures=[self.architecture],
                                                        **self.hf_fields)
                except (ValueError, TypeError) as e:
                    message = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise RunnerError(f"model.hf_config: {message}") from None
            for name in SIZE_FIELDS:
                size = getattr(self._config, name, None)
                if size is not None and (not isinstance(size, int) or size < 1):
                    source = f"model.path={self.path}" if self.path else "model.hf_config"
                    raise RunnerError(f"{source}: {name}={size!r} must be an integer >= 1")
        return self._config

    @property
    def model_architecture(self) -> str:
        return (self.hf_config().architectures or [self.architecture])[0]

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype_name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype_name]

    def max_model_len(self) -> int:
        """model.max_model_len, or the model's max_position_embeddings when null; never more."""
        limit = self.hf_config().max_position_embeddings
        if self.max_model_len_cap is not None and self.max_model_len_cap < 2:
            raise RunnerError(f"model.max_model_len={self.max_model_len_cap}: must be >= 2 (a "
                              f"prompt token and a generated one) or null")
        if self.max_model_len_cap and self.max_model_len_cap > limit:
            raise RunnerError(f"model.max_model_len={self.max_model_len_cap} is more than the "
                              f"model's max_position_embeddings={limit}: set it <= {limit}")
        return self.max_model_len_cap or limit

    def model_module(self):
        return importlib.import_module(ARCHITECTURES[self.model_architecture][0])

    def build(self, plan, device: torch.device) -> nn.Module:
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.torch_dtype(device))
        try:
            with torch.device(device):
                return model_class(self.model_architecture)(self.hf_config(), plan)
        finally:
            torch.set_default_dtype(dtype)

    def load_weights(self, model: nn.Module, plan) -> None:
        if self.load_format == "safetensors":
            from runner.loaders.checkpoint import iter_safetensors
            model.load_weights(iter_safetensors(self.path))
        else:
            from runner.loaders.dummy import iter_dummy_weights
            shapes = self.model_module().checkpoint_shapes(self.hf_config())
            device = next(model.parameters()).device
            model.load_weights(iter_dummy_weights(shapes, self.seed, torch.float32, device))
