"""DeepSeek-V2 (MLA attention + DeepSeek MoE + YaRN rotary), tensor/expert parallel, paged cache.

MLA caches one latent per token (kv_lora_rank normed dims + qk_rope_head_dim roped dims). Prefill
expands it to per-head K/V; decode folds W_UK into the query and W_UV after attention (absorbed
form), both read as views of kv_b_proj's weight. The query projection (q_proj, or q_a_proj with
q_lora_rank) and kv_a_proj_with_mqa, which read the same input, are one GEMM (`fused_qkv_a_proj`).
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from kernels.mla_norm_rope import mla_norm_rope, mla_norm_rope_ref
from runner.errors import RunnerError
from runner.forward_context import ForwardContext, KVCacheSpec
from runner.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from runner.models.layers.linear import ColumnParallelLinear, RowParallelLinear, Shard
from runner.models.layers.decoder_layer import DecoderLayer, run_decoder_layers
from runner.models.layers.mlp import GatedMLP
from runner.models.layers.moe import DeepseekMoE
from runner.models.layers.norm import RMSNorm
from runner.models.layers.yarn_rope import DeepseekRotaryEmbedding, mla_softmax_scale
from runner.parallel.plan import ParallelPlan

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the reference ignores rms_norm_eps here
_EXPERT_KEY = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_GATE_UP_KEY = re.compile(r"(.+\.(?:mlp|shared_experts))\.(gate|up)_proj\.weight")
_QKV_A_KEY = re.compile(r"(.+\.self_attn)\.(q_proj|q_a_proj|kv_a_proj_with_mqa)\.(weight|bias)")


def _check_supported(config) -> None:
    if config.hidden_act != "silu":
        raise RunnerError(f"hidden_act={config.hidden_act!r}: only 'silu' is supported")
    if getattr(config, "mlp_bias", False):
        raise RunnerError("mlp_bias=true is not supported (DeepSeek-V2 MLPs have no bias)")


class MLAAttention(nn.Module):
    def __init__(self, config, plan: ParallelPlan, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        if c.num_attention_heads % plan.tp_size:
            raise RunnerError(f"num_attention_heads={c.num_attention_heads} must be divisible by "
                              f"parallel.tp={plan.tp_size}")
        heads = plan.attention_heads(c.num_attention_heads)
        shard = Shard.of_heads(heads, c.num_attention_heads)  # rows/columns of those heads
        self.num_local_heads = heads.num_heads
        self.nope_dim, self.rope_dim, self.v_dim = (c.qk_nope_head_dim, c.qk_rope_head_dim,
                                                    c.v_head_dim)
        self.kv_lora_rank = c.kv_lora_rank
        qk_head_dim = self.nope_dim + self.rope_dim
        q_out = c.num_attention_heads * qk_head_dim
        bias = c.attention_bias
        self.q_lora_rank = c.q_lora_rank
        kv_a_size = c.kv_lora_rank + self.rope_dim
        if c.q_lora_rank is None:  # [q of this rank's heads; kv_a], q_proj has no bias
            self.q_a_size = q_out // shard.count
            self.fused_qkv_a_proj = ColumnParallelLinear(
                c.hidden_size, [q_out, kv_a_size], plan.tp, bias=bias, shard=shard,
                replicated_outputs=(1,))
        else:  # [q_a; kv_a], both replicated
            self.q_a_size = c.q_lora_rank
            self.fused_qkv_a_proj = ColumnParallelLinear(
                c.hidden_size, [c.q_lora_rank, kv_a_size], plan.tp, bias=bias,
                replicated_outputs=(0, 1))
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(c.q_lora_rank, [q_out], plan.tp, shard=shard)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(
            c.kv_lora_rank, [c.num_attention_heads * (self.nope_dim + self.v_dim)], plan.tp,
            shard=shard)
        self.o_proj = RowParallelLinear(c.num_attention_heads * self.v_dim, c.hidden_size,
                                        plan.tp, bias=bias, shard=shard)
        self.scale = mla_softmax_scale(qk_head_dim, c.rope_parameters, c.max_position_embeddings)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj: W_UK [H, nope, kv_lora], W_UV [H, v, kv_lora]."""
        w = self.kv_b_proj.weight.view(self.num_local_heads, self.nope_dim + self.v_dim,
                                       self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """Roped parts and projections are written straight into the buffers the cache write
        and the attention read (no concatenation copies in a decode step)."""
        num_tokens, num_heads = hidden.shape[0], self.num_local_heads
        q, latent, k_pe = self.fused_qkv_a_proj(hidden).split(
            [self.q_a_size, self.kv_lora_rank, self.rope_dim], dim=-1)  # views of one GEMM
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(num_tokens, num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, nope], [T, H, r]
        meta = ctx.attn_meta
        kv = hidden.new_empty(num_tokens, 1, self.kv_lora_rank + self.rope_dim)  # the cache row
        # decode: the query in the absorbed form, [q_nope @ W_UK, roped q_pe] per head
        q_absorbed = None if meta.is_prefill else hidden.new_empty(
            num_tokens, num_heads, self.kv_lora_rank + self.rope_dim)
        q_pe_roped = torch.empty_like(q_pe) if meta.is_prefill else (
            q_absorbed[:, :, self.kv_lora_rank:])
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]  # v_cache: a view of k_cache
        fused_write = ctx.fused_kv_write  # the cache rows stored by the prologue kernel
        norm_rope = mla_norm_rope if hidden.is_cuda else mla_norm_rope_ref  # the same rounding
        norm_rope(latent, k_pe, q_pe, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos,
                  sin, kv[:, 0], q_pe_roped, k_cache if fused_write else None, meta.slot_mapping)
        if not fused_write:
            ctx.attention.write_kv(k_cache, v_cache, meta.slot_mapping, kv, None)
        latent, k_pe = kv[:, 0, :self.kv_lora_rank], kv[:, :, self.kv_lora_rank:]  # [T,c] [T,1,r]

        if meta.is_prefill:
            q_pe = q_pe_roped
            kv_up = self.kv_b_proj(latent).view(num_tokens, num_heads, self.nope_dim + self.v_dim)
            k_nope, v = kv_up.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_pe.expand(-1, num_heads, -1)), dim=-1)  # [T, H, nope + r]
            out, _ = ctx.attention.prefill(torch.cat((q_nope, q_pe), dim=-1), k, v, meta,
                                           self.scale)  # [T, H, v]
            return self.o_proj(out.reshape(num_tokens, num_heads * self.v_dim))
        w_uk, w_uv = self._absorbed_weights()
        torch.bmm(q_nope.transpose(0, 1), w_uk,
                  out=q_absorbed[:, :, :self.kv_lora_rank].transpose(0, 1))  # [H, T, c] view
        out_latent, _ = ctx.attention.decode(q_absorbed, k_cache, v_cache, meta,
                                             self.scale)  # [T, H, c]
        out = hidden.new_empty(num_tokens, num_heads, self.v_dim)
        torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return self.o_proj(out.view(num_tokens, num_heads * self.v_dim))


def _decoder_layer(config, plan: ParallelPlan, layer_idx: int) -> DecoderLayer:
    """MLA attention; a dense MLP for the first `first_k_dense_replace` layers, then MoE."""
    if layer_idx >= config.first_k_dense_replace:
        mlp = DeepseekMoE(config, plan.tp, plan.ep)
    else:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, plan.tp)
    return DecoderLayer(MLAAttention(config, plan, layer_idx), mlp, config.hidden_size,
                        config.rms_norm_eps)


class DeepseekV2Model(nn.Module):
    def __init__(self, config, plan: ParallelPlan):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, plan.tp)
        self.layers = nn.ModuleList(_decoder_layer(config, plan, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, config, plan: ParallelPlan):
        super().__init__()
        _check_supported(config)
        self.config = config
        self.plan = plan
        self.num_layers = config.num_hidden_layers
        self.model = DeepseekV2Model(config, plan)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, plan.tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = DeepseekRotaryEmbedding(config.qk_rope_head_dim, config.rope_parameters,
                                                  config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] (all requests' tokens) -> hidden after the final norm [T, H]."""
        cos, sin = self.rotary_emb(positions)  # [T, rope / 2] each
        hidden = self.model.embed_tokens(input_ids)  # [T, H]
        return run_decoder_layers(self.model.layers, self.model.norm, hidden, cos, sin, ctx)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[R, H] -> [R, vocab] in the model's dtype, the whole vocabulary on every rank (into
        `out` if given)."""
        return self.lm_head.logits(hidden, out)

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(num_kv_heads=1, head_size=c.kv_lora_rank + c.qk_rope_head_dim,
                           v_head_size=c.kv_lora_rank, shared=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF checkpoint tensors (full, unsharded); each parameter keeps its own shard."""
        shapes = checkpoint_shapes(self.config)
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in shapes:
                raise RunnerError(f"unknown tensor {name!r} in the checkpoint for "
                                  "DeepseekV2ForCausalLM")
            if tuple(tensor.shape) != shapes[name]:
                raise RunnerError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the "
                                  f"checkpoint, expected {shapes[name]}")
            self._load_tensor(name, tensor, params)
            loaded.add(name)
        missing = sorted(name for name in shapes if name not in loaded and self._needs(name))
        if missing:
            raise RunnerError(f"missing tensor {missing[0]!r} in the checkpoint "
                              f"({len(missing)} missing in all)")

    def _needs(self, name: str) -> bool:
        """Whether this rank holds (part of) checkpoint tensor `name` (EP skips others' experts)."""
        match = _EXPERT_KEY.fullmatch(name)
        return match is None or self.get_submodule(match[1]).is_local(int(match[2]))

    def _load_tensor(self, name: str, tensor: torch.Tensor, params: dict) -> None:
        if match := _EXPERT_KEY.fullmatch(name):
            experts = self.get_submodule(match[1])
            if experts.is_local(int(match[2])):
                experts.load_expert(int(match[2]), match[3], tensor)
        elif match := _QKV_A_KEY.fullmatch(name):
            param = params[f"{match[1]}.fused_qkv_a_proj.{match[3]}"]
            param.weight_loader(param, tensor, 1 if match[2] == "kv_a_proj_with_mqa" else 0)
        elif match := _GATE_UP_KEY.fullmatch(name):
            param = params[f"{match[1]}.gate_up_proj.weight"]
            param.weight_loader(param, tensor, 0 if match[2] == "gate" else 1)
        else:
            param = params[name]
            param.weight_loader(param, tensor)


def checkpoint_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Hugging Face DeepSeek-V2 checkpoint -> its full (unsharded) shape."""
    _check_supported(config)
    c = config
    hidden, heads = c.hidden_size, c.num_attention_heads
    qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, hidden)
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        attn = {
            "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, hidden),
            "kv_a_layernorm.weight": (c.kv_lora_rank,),
            "kv_b_proj.weight": (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "o_proj.weight": (hidden, heads * c.v_head_dim),
        }
        if c.q_lora_rank is None:
            attn["q_proj.weight"] = (heads * qk_head_dim, hidden)
        else:
            attn["q_a_proj.weight"] = (c.q_lora_rank, hidden)
            attn["q_a_layernorm.weight"] = (c.q_lora_rank,)
            attn["q_b_proj.weight"] = (heads * qk_head_dim, c.q_lora_rank)
        if c.attention_bias:
            attn["kv_a_proj_with_mqa.bias"] = (c.kv_lora_rank + c.qk_rope_head_dim,)
            attn["o_proj.bias"] = (hidden,)
            if c.q_lora_rank is not None:
                attn["q_a_proj.bias"] = (c.q_lora_rank,)
        shapes.update({layer + "self_attn." + k: v for k, v in attn.items()})
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        if i < c.first_k_dense_replace:
            shapes.update(_mlp_shapes(layer + "mlp.", hidden, c.intermediate_size))
            continue
        shapes[layer + "mlp.gate.weight"] = (c.n_routed_experts, hidden)
        for e in range(c.n_routed_experts):
            shapes.update(_mlp_shapes(f"{layer}mlp.experts.{e}.", hidden, c.moe_intermediate_size))
        if c.n_shared_experts:
            shapes.update(_mlp_shapes(layer + "mlp.shared_experts.", hidden,
                                      c.moe_intermediate_size * c.n_shared_experts))
    return shapes


def _mlp_shapes(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (intermediate, hidden),
            prefix + "up_proj.weight": (intermediate, hidden),
            prefix + "down_proj.weight": (hidden, intermediate)}
