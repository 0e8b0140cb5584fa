"""Standard rotary position embedding on rotate-half pairs (dim i with dim i + D/2): inverse
frequencies for rope_type "default" and "llama3", a float32 cos/sin cache indexed by position."""
from __future__ import annotations

import math

import torch
from torch import nn

from runner.errors import RunnerError

ROPE_TYPES = ("default", "llama3")
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor",
                  "original_max_position_embeddings")


def rope_inv_freq(rope_parameters: dict, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [D/2] float32 on the CPU, from a transformers `rope_parameters` dict."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise RunnerError(f"rope_parameters.rope_type={rope_type!r}: supported are {ROPE_TYPES}")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise RunnerError("rope_parameters.partial_rotary_factor: only 1.0 is supported")
    theta = rope_parameters.get("rope_theta")
    if theta is None:
        raise RunnerError("rope_parameters.rope_theta is missing")
    exponents = torch.arange(0, head_dim, 2, device="cpu").float() / head_dim  # [D/2]
    inv_freq = 1.0 / (float(theta) ** exponents)
    if rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope_parameters)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, and a linear
    blend (in 1/wavelength) between the two bands."""
    for field in _LLAMA3_FIELDS:
        if field not in params:
            raise RunnerError(f"rope_parameters.{field} is required for rope_type 'llama3'")
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long_band = wavelen > old_context_len / low_freq_factor
    short_band = wavelen < old_context_len / high_freq_factor
    return torch.where(long_band, inv_freq / factor, torch.where(short_band, inv_freq, blended))


class RotaryEmbedding(nn.Module):
    """Holds cos/sin for positions [0, max_positions); `forward(positions)` looks them up once per
    step; the attention prologue kernels rotate q and k with them in every layer."""

    def __init__(self, rope_parameters: dict, head_dim: int, max_positions: int):
        super().__init__()
        if head_dim % 2:
            raise RunnerError(f"head_dim={head_dim}: rotary embedding needs an even head_dim")
        inv_freq = rope_inv_freq(rope_parameters, head_dim)
        positions = torch.arange(max_positions, device="cpu").float()  # [P]
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [P, D]: cos | sin
        # computed on the CPU, so the same on every device; float32 whatever the model dtype
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, D/2] float32."""
        return self.cos_sin_cache[positions].chunk(2, dim=-1)
