"""Llama and Qwen2 decoder-only GQA models, tensor parallel, over a paged KV cache.

Qwen2 is Llama with q/k/v biases. Parameter names follow the Hugging Face checkpoint, except that
q/k/v and gate/up are fused (`qkv_proj`, `gate_up_proj`) and loaded part by part.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gqa_prologue import gqa_prologue, gqa_prologue_ref
from runner.errors import RunnerError
from runner.forward_context import ForwardContext, KVCacheSpec
from runner.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from runner.models.layers.linear import RowParallelLinear, Shard, _copy_into
from runner.models.layers.decoder_layer import DecoderLayer, run_decoder_layers
from runner.models.layers.mlp import GatedMLP
from runner.models.layers.norm import RMSNorm
from runner.models.layers.rope import RotaryEmbedding
from runner.parallel.plan import HeadShard, ParallelPlan

# checkpoint projection -> (fused parameter, part index)
_FUSED_PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


@dataclass
class LlamaDims:
    """The shape fields of a Llama or Qwen2 config, read once."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> LlamaDims:
        is_qwen2 = config.model_type == "qwen2"  # Qwen2: q/k/v biases always, o_proj never
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=(getattr(config, "head_dim", None)
                      or config.hidden_size // config.num_attention_heads),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=not is_qwen2 and attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(config.tie_word_embeddings),
        )


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Hugging Face checkpoint -> its full shape."""
    d = LlamaDims.from_config(config)
    q_size, kv_size = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    shapes = {"model.embed_tokens.weight": (d.vocab_size, d.hidden_size),
              "model.norm.weight": (d.hidden_size,)}
    if not d.tie_word_embeddings:
        shapes["lm_head.weight"] = (d.vocab_size, d.hidden_size)
    for i in range(d.num_layers):
        layer = {"input_layernorm.weight": (d.hidden_size,),
                 "post_attention_layernorm.weight": (d.hidden_size,)}
        projections = {"self_attn.q_proj": (q_size, d.hidden_size, d.qkv_bias),
                       "self_attn.k_proj": (kv_size, d.hidden_size, d.qkv_bias),
                       "self_attn.v_proj": (kv_size, d.hidden_size, d.qkv_bias),
                       "self_attn.o_proj": (d.hidden_size, q_size, d.o_bias),
                       "mlp.gate_proj": (d.intermediate_size, d.hidden_size, d.mlp_bias),
                       "mlp.up_proj": (d.intermediate_size, d.hidden_size, d.mlp_bias),
                       "mlp.down_proj": (d.hidden_size, d.intermediate_size, d.mlp_bias)}
        for name, (out_features, in_features, bias) in projections.items():
            layer[f"{name}.weight"] = (out_features, in_features)
            if bias:
                layer[f"{name}.bias"] = (out_features,)
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _check_config(config, d: LlamaDims, tp_size: int) -> None:
    if config.hidden_act != "silu":
        raise RunnerError(f"hidden_act={config.hidden_act!r}: only 'silu' is supported")
    if getattr(config, "use_sliding_window", False):
        raise RunnerError("use_sliding_window=true: sliding-window attention is not supported")
    if d.num_heads % d.num_kv_heads:
        raise RunnerError(f"num_key_value_heads={d.num_kv_heads} must divide "
                          f"num_attention_heads={d.num_heads}")
    if d.num_heads % tp_size:
        raise RunnerError(f"parallel.tp={tp_size} must divide num_attention_heads={d.num_heads}")
    if d.num_kv_heads % tp_size and tp_size % d.num_kv_heads:
        raise RunnerError(f"parallel.tp={tp_size} must divide or be a multiple of "
                          f"num_key_value_heads={d.num_kv_heads}")
    if d.intermediate_size % tp_size:
        raise RunnerError(f"parallel.tp={tp_size} must divide "
                          f"intermediate_size={d.intermediate_size}")


class QKVParallelLinear(nn.Module):
    """Fused q/k/v projection of this rank's heads: q rows of its query heads, then k and v rows
    of its KV head(s), which several ranks share when tp > num_kv_heads."""

    def __init__(self, hidden_size: int, head_dim: int, q_heads: HeadShard, kv_heads: HeadShard,
                 bias: bool):
        super().__init__()
        self.head_dim = head_dim
        self.offsets = (q_heads.offset, kv_heads.offset, kv_heads.offset)  # first head per part
        self.sizes = [q_heads.num_heads * head_dim, kv_heads.num_heads * head_dim,
                      kv_heads.num_heads * head_dim]
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), hidden_size),
                                   requires_grad=False)  # [(Hq_local + 2 Hkv_local) D, hidden]
        self.weight.weight_loader = self._load
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(self.sizes)), requires_grad=False)
            self.bias.weight_loader = self._load

    def _load(self, param: torch.Tensor, full: torch.Tensor, shard_id: int) -> None:
        """Copy rows of full q (shard_id 0), k (1) or v (2) into this rank's part."""
        size = self.sizes[shard_id]
        rows = full.narrow(0, self.offsets[shard_id] * self.head_dim, size)
        _copy_into(param.data.narrow(0, sum(self.sizes[:shard_id]), size), rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, (Hq + 2 Hkv) D]: q, k, v of this rank's heads, side by side."""
        return F.linear(x, self.weight, self.bias)


class LlamaAttention(nn.Module):
    def __init__(self, d: LlamaDims, plan: ParallelPlan, layer_index: int):
        super().__init__()
        q_heads, kv_heads = plan.attention_heads(d.num_heads), plan.kv_heads(d.num_kv_heads)
        self.layer_index = layer_index
        self.num_heads = q_heads.num_heads
        self.num_kv_heads = kv_heads.num_heads
        self.head_dim = d.head_dim
        self.scale = d.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(d.hidden_size, d.head_dim, q_heads, kv_heads, d.qkv_bias)
        self.o_proj = RowParallelLinear(d.num_heads * d.head_dim, d.hidden_size, plan.tp,
                                        bias=d.o_bias, shard=Shard.of_heads(q_heads, d.num_heads))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, num_qk_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, num_qk_heads:]  # [T, Hkv, D], strided views: backends take strides
        qk = torch.empty_like(qkv[:, :num_qk_heads])  # [T, Hq + Hkv, D], rotated
        meta = ctx.attn_meta
        k_cache, v_cache = ctx.kv_caches[self.layer_index]
        fused_write = ctx.fused_kv_write  # the cache rows stored by the prologue kernel
        prologue = gqa_prologue if x.is_cuda else gqa_prologue_ref  # the same rounding
        prologue(qkv[:, :num_qk_heads], v, cos, sin, qk, k_cache if fused_write else None,
                 v_cache if fused_write else None, meta.slot_mapping)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        if not fused_write:
            ctx.attention.write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        if meta.is_prefill:
            out, _ = ctx.attention.prefill(q, k, v, meta, self.scale)
        else:
            out, _ = ctx.attention.decode(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaModel(nn.Module):
    def __init__(self, config, d: LlamaDims, plan: ParallelPlan):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(d.vocab_size, d.hidden_size, plan.tp)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, d.head_dim,
                                          config.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(LlamaAttention(d, plan, i),
                         GatedMLP(d.hidden_size, d.intermediate_size, plan.tp, bias=d.mlp_bias),
                         d.hidden_size, config.rms_norm_eps)
            for i in range(d.num_layers))
        self.norm = RMSNorm(d.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM and Qwen2ForCausalLM configs (see the runner's model contract)."""

    def __init__(self, config, plan: ParallelPlan):
        super().__init__()
        self.config = config
        self.dims = LlamaDims.from_config(config)
        _check_config(config, self.dims, plan.tp_size)
        self.num_layers = self.dims.num_layers
        self.model = LlamaModel(config, self.dims, plan)
        self.lm_head = ParallelLMHead(self.dims.vocab_size, self.dims.hidden_size, plan.tp)
        if self.dims.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (after the last norm)."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.model.rotary_emb(positions)  # [T, D/2] each
        return run_decoder_layers(self.model.layers, self.model.norm, x, cos, sin, ctx)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[R, H] -> [R, vocab] in the model's dtype, the whole vocabulary on every rank (into
        `out` if given)."""
        return self.lm_head.logits(hidden, out)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(num_kv_heads=attn.num_kv_heads, head_size=attn.head_dim,
                           v_head_size=attn.head_dim, shared=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter with this rank's shard of the named checkpoint tensors."""
        expected = checkpoint_shapes(self.config)
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):  # stored by some old Llama conversions
                continue
            if name == "lm_head.weight" and self.dims.tie_word_embeddings:
                raise RunnerError("checkpoint tensor lm_head.weight: present although "
                                  "tie_word_embeddings=true (set it to false in config.json)")
            if name not in expected:
                raise RunnerError(f"checkpoint tensor {name}: unknown to {type(self).__name__} "
                                  f"({self.config.model_type})")
            if tuple(tensor.shape) != expected[name]:
                raise RunnerError(f"checkpoint tensor {name}: shape {tuple(tensor.shape)}, "
                                  f"expected {expected[name]}")
            module_name, _, leaf = name.rpartition(".")
            parent, _, projection = module_name.rpartition(".")
            if projection in _FUSED_PARTS:
                fused, part = _FUSED_PARTS[projection]
                param = params[f"{parent}.{fused}.{leaf}"]
                param.weight_loader(param, tensor, part)
            else:
                param = params[name]
                param.weight_loader(param, tensor)
            loaded.add(name)
        missing = sorted(expected.keys() - loaded)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RunnerError(f"missing tensor {missing[0]}{more} in the checkpoint")
