"""DeepSeek's rotary embedding: RoPE on interleaved pairs (x[2i], x[2i+1]), plain or YaRN-scaled,
and the MLA softmax scale that YaRN's `mscale_all_dim` enlarges. Settings come from a transformers
5 `config.rope_parameters` dict; inv_freq stays float32 whatever the model dtype."""
from __future__ import annotations

import math

import torch
from torch import nn

from runner.errors import RunnerError

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def _rope_type(rope_parameters: dict) -> str:
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise RunnerError(f"rope_parameters.rope_type={rope_type!r}: allowed "
                          f"{SUPPORTED_ROPE_TYPES}")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise RunnerError("rope_parameters.partial_rotary_factor: only 1.0 is supported")
    return rope_type


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_factor(rope_parameters: dict, max_position_embeddings: int) -> float:
    factor = rope_parameters.get("factor")
    if factor is None:  # implicit: the extension ratio of the context
        factor = max_position_embeddings / rope_parameters["original_max_position_embeddings"]
    return float(factor)


def _yarn_inv_freq(dim: int, base: float, rope_parameters: dict,
                   max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Per-pair frequencies blending interpolation (low frequencies, divided by `factor`) and
    extrapolation (high frequencies, unchanged) over a linear ramp between the pair indices where
    a wavelength fits beta_fast and beta_slow times into the original context; plus the cos/sin
    scale."""
    factor = _yarn_factor(rope_parameters, max_position_embeddings)
    original_len = rope_parameters["original_max_position_embeddings"]
    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1

    def pair_index_for(num_rotations: float) -> float:
        wavelength = original_len / (num_rotations * 2 * math.pi)
        return dim * math.log(wavelength) / (2 * math.log(base))

    low, high = pair_index_for(beta_fast), pair_index_for(beta_slow)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pairs = torch.arange(dim // 2, dtype=torch.float64, device="cpu")
    interpolated_share = ((pairs - low) / (high - low)).clamp(0, 1)  # 0: keep, 1: divide by factor
    extrapolated = 1.0 / base ** (2 * pairs / dim)
    inv_freq = extrapolated * (1 - interpolated_share) + extrapolated / factor * interpolated_share

    attention_factor = rope_parameters.get("attention_factor")
    if attention_factor is None:
        mscale = rope_parameters.get("mscale")
        mscale_all_dim = rope_parameters.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def mla_softmax_scale(qk_head_dim: int, rope_parameters: dict,
                      max_position_embeddings: int) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim."""
    scale = qk_head_dim ** -0.5
    mscale_all_dim = rope_parameters.get("mscale_all_dim")
    if _rope_type(rope_parameters) != "default" and mscale_all_dim:
        factor = _yarn_factor(rope_parameters, max_position_embeddings)
        scale *= _yarn_mscale(factor, mscale_all_dim) ** 2
    return scale


class DeepseekRotaryEmbedding(nn.Module):
    """cos/sin per position (computed once per forward), applied to interleaved pairs."""

    def __init__(self, rotary_dim: int, rope_parameters: dict, max_position_embeddings: int):
        super().__init__()
        base = float(rope_parameters["rope_theta"])
        if _rope_type(rope_parameters) == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(
                rotary_dim, base, rope_parameters, max_position_embeddings)
        else:
            pairs = torch.arange(rotary_dim // 2, dtype=torch.float64, device="cpu")
            inv_freq, self.attention_factor = 1.0 / base ** (2 * pairs / rotary_dim), 1.0
        # NOTE: a buffer, so it follows the build device; fp32 even when the model is bf16
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device(), torch.float32),
                             persistent=False)  # [rotary_dim / 2]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, rotary_dim / 2] float32, YaRN-scaled."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

