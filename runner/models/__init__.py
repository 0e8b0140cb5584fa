"""Model classes by the `architectures` name in a Hugging Face config.json."""
from __future__ import annotations

import importlib

# architecture -> (module, class); imported lazily so a model's code loads only when used
ARCHITECTURES = {
    "DeepseekV2ForCausalLM": ("runner.models.deepseek_v2", "DeepseekV2ForCausalLM"),
    "LlamaForCausalLM": ("runner.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("runner.models.llama", "LlamaForCausalLM"),
}


def model_class(architecture: str) -> type:
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)
