"""Deterministic random weights: each tensor is a function of (seed, name, device type) only.

Every rank and every tp/ep/dcp layout thus builds the same full tensors and slices its own shard.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

NORM_NOISE_STD = 0.02
BIAS_STD = 0.02


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from `seed` and `name`, the same in every process (no hash())."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the normal distribution for the tensor `name`."""
    in_features = shape[-1] if shape else 1
    if name.endswith("norm.weight"):
        return 1.0, NORM_NOISE_STD
    if name.endswith(".bias"):
        return 0.0, BIAS_STD
    if "embed_tokens" in name:
        return 0.0, 1.0
    if "lm_head" in name:
        return 0.0, 2.0 / math.sqrt(in_features)
    return 0.0, 1.0 / math.sqrt(in_features)


def iter_dummy_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                       device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every name in sorted order, drawn in float32 on `device`, cast to dtype.

    Scale rule, chosen so a deep model keeps its residual stream O(1) per layer and gives
    peaked, finite logits in bf16 (in = shape[-1], the input features of a [.., out, in] weight):
      - names ending in "norm.weight" (RMSNorm: input/post_attention/q_a/kv_a layernorms,
        model.norm): 1 + N(0, 0.02)
      - names ending in ".bias": N(0, 0.02)
      - embed_tokens: N(0, 1), so the first hidden states have unit RMS
      - lm_head: N(0, 2/sqrt(in)), logits of std ~2 after the final norm
      - every other tensor (projections, experts, router gate "mlp.gate.weight"):
        N(0, 1/sqrt(in)), which keeps each matmul's output at the scale of its input
    The values depend on (seed, name) and the device type (CPU and CUDA generators differ),
    never on which other names are asked for or in what order.
    """
    device = torch.device(device)
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        mean, std = _init_std(name, shape)
        generator = torch.Generator(device=device)
        generator.manual_seed(name_seed(seed, name))
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        yield name, values.mul_(std).add_(mean).to(dtype)
