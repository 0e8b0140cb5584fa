"""The Llama/Qwen2 GQA model against transformers' LlamaForCausalLM and Qwen2ForCausalLM with the
same (randomized, saved and reloaded) weights: checkpoint names, prefill and paged-decode logits,
tensor-parallel shards, the cache rows the model stores itself (fused_kv_write), loading errors,
and the Qwen2.5-1.5B shapes on the meta device."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, Qwen2Config
from transformers import LlamaForCausalLM as HFLlamaForCausalLM
from transformers import Qwen2ForCausalLM as HFQwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from runner.attention.torch_ref import TorchAttention
from runner.distributed import GroupHandle
from runner.errors import RunnerError
from runner.models.layers.rope import RotaryEmbedding, rope_inv_freq
from runner.models.llama import LlamaForCausalLM, checkpoint_shapes
from runner.parallel.plan import ParallelPlan
from helpers import PagedBatch, randomize_parameters, reference_logits

PROMPT_LENGTHS = [1, 7, 40, 203]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
            max_position_embeddings=512, attn_implementation="eager")
CONFIGS = {
    "llama_bias_llama3": lambda: LlamaConfig(
        **TINY, vocab_size=101, num_attention_heads=4, head_dim=24, attention_bias=True,
        mlp_bias=True, rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE)),
    "llama_nobias": lambda: LlamaConfig(
        **TINY, vocab_size=101, num_attention_heads=8, head_dim=12, attention_bias=False,
        rms_norm_eps=3e-5, rope_theta=5000.0),
    "qwen2_tied": lambda: Qwen2Config(
        **TINY, vocab_size=100, num_attention_heads=4, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=1e6, tie_word_embeddings=True),
    "qwen2_untied": lambda: Qwen2Config(
        **TINY, vocab_size=100, num_attention_heads=8, rms_norm_eps=2e-6, rope_theta=20000.0,
        tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(config, transformers model, {hf name: tensor} read back from save_pretrained)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    hf_class = HFQwen2ForCausalLM if config.model_type == "qwen2" else HFLlamaForCausalLM
    hf_model = hf_class(config).eval()
    randomize_parameters(hf_model, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return config, hf_model, load_file(path / "model.safetensors")


def _load(config, weights: dict, plan: ParallelPlan | None = None) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, plan or ParallelPlan())
    model.load_weights(weights.items())
    return model


def _prompts(vocab_size: int) -> list[list[int]]:
    return [torch.randint(vocab_size, (n,)).tolist() for n in PROMPT_LENGTHS]


def _prefill(model, batch: PagedBatch, prompts: list[list[int]]) -> torch.Tensor:
    lengths = [len(p) for p in prompts]
    positions, ctx = batch.context(lengths, lengths)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(sum(prompts, [])), positions, ctx))


def test_checkpoint_shapes_equal_save_pretrained(checkpoint):
    config, _, weights = checkpoint
    assert checkpoint_shapes(config) == {name: tuple(t.shape) for name, t in weights.items()}


def test_prefill_logits_match_transformers(checkpoint):
    config, hf_model, weights = checkpoint
    torch.manual_seed(1)
    model = _load(config, weights)
    prompts = _prompts(config.vocab_size)
    logits = _prefill(model, PagedBatch(model, PROMPT_LENGTHS), prompts)  # [T, V]
    assert logits.dtype == torch.float32
    expected = torch.cat([reference_logits(hf_model, p) for p in prompts])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_decode_step_matches_transformers(checkpoint):
    config, hf_model, weights = checkpoint
    torch.manual_seed(2)
    model = _load(config, weights)
    prompts = _prompts(config.vocab_size)
    batch = PagedBatch(model, [n + 1 for n in PROMPT_LENGTHS])
    _prefill(model, batch, prompts)
    next_ids = torch.randint(config.vocab_size, (len(prompts),))
    positions, ctx = batch.context([n + 1 for n in PROMPT_LENGTHS], [1] * len(prompts))
    assert not ctx.attn_meta.is_prefill
    with torch.no_grad():
        logits = model.compute_logits(model(next_ids, positions, ctx))  # [R, V]
    expected = torch.stack([reference_logits(hf_model, p + [t])[-1]
                            for p, t in zip(prompts, next_ids.tolist())])
    assert (logits - expected).abs().max().item() <= 1e-4


class _FusedWriteAttention(TorchAttention):
    """Torch attention that lets the model store its cache rows itself (as the Triton backend
    does, in the GQA prologue kernel) and fails if write_kv is called anyway."""
    fused_kv_write = True

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        raise AssertionError("write_kv was called although the backend lets the model write")


def test_gqa_stores_its_cache_rows_itself_when_the_backend_allows(checkpoint):
    """Prefill, then a decode step that reads the rows the prologue stored (the caches start as
    garbage), both against transformers."""
    config, hf_model, weights = checkpoint
    torch.manual_seed(4)
    model = _load(config, weights)
    prompts = _prompts(config.vocab_size)
    next_ids = torch.randint(config.vocab_size, (len(prompts),))
    batch = PagedBatch(model, [n + 1 for n in PROMPT_LENGTHS])
    attention = _FusedWriteAttention()
    with torch.no_grad():
        positions, ctx = batch.context(PROMPT_LENGTHS, PROMPT_LENGTHS, attention)
        prefill = model.compute_logits(model(torch.tensor(sum(prompts, [])), positions, ctx))
        positions, ctx = batch.context([n + 1 for n in PROMPT_LENGTHS], [1] * len(prompts),
                                       attention)
        decode = model.compute_logits(model(next_ids, positions, ctx))  # [R, V]
    expected_prefill = torch.cat([reference_logits(hf_model, p) for p in prompts])
    expected_decode = torch.stack([reference_logits(hf_model, p + [t])[-1]
                                   for p, t in zip(prompts, next_ids.tolist())])
    assert (prefill - expected_prefill).abs().max().item() <= 1e-4
    assert (decode - expected_decode).abs().max().item() <= 1e-4


def _head_rows(full: torch.Tensor, heads: list[int], head_dim: int, dim: int = 0) -> torch.Tensor:
    return torch.cat([full.narrow(dim, h * head_dim, head_dim) for h in heads], dim=dim)


def _expected_shards(config, weights: dict, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s parameters, sliced from the full tensors: query heads split evenly, each
    rank keeping the KV heads its query heads read (head h reads KV head h // group)."""
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    q_heads = list(range(rank * num_heads // tp, (rank + 1) * num_heads // tp))
    kv_heads = sorted({h // (num_heads // num_kv_heads) for h in q_heads})
    local_inter = config.intermediate_size // tp
    inter = slice(rank * local_inter, (rank + 1) * local_inter)
    expect = {}
    for name, full in weights.items():
        *parents, projection, leaf = name.split(".")
        prefix = ".".join(parents)
        if projection == "q_proj":
            expect[f"{prefix}.qkv_proj.{leaf}"] = torch.cat([
                _head_rows(full, q_heads, head_dim),
                _head_rows(weights[f"{prefix}.k_proj.{leaf}"], kv_heads, head_dim),
                _head_rows(weights[f"{prefix}.v_proj.{leaf}"], kv_heads, head_dim)])
        elif projection == "gate_proj":
            expect[f"{prefix}.gate_up_proj.{leaf}"] = torch.cat(
                [full[inter], weights[f"{prefix}.up_proj.{leaf}"][inter]])
        elif projection == "o_proj" and leaf == "weight":
            expect[name] = _head_rows(full, q_heads, head_dim, dim=1)
        elif projection == "down_proj" and leaf == "weight":
            expect[name] = full[:, inter]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            local_vocab = -(-config.vocab_size // tp)
            expect[name] = torch.zeros(local_vocab, config.hidden_size)
            rows = full[rank * local_vocab:(rank + 1) * local_vocab]
            expect[name][:rows.shape[0]] = rows
        elif projection not in ("k_proj", "v_proj", "up_proj"):
            expect[name] = full  # norms and the biases added after the row-parallel sum
    return expect


@pytest.mark.parametrize("tp", [2, 4])
def test_each_tp_rank_loads_its_slices(checkpoint, tp):
    """No processes: each rank's plan is set by hand (loading calls no collective)."""
    config, _, weights = checkpoint
    for rank in range(tp):
        plan = ParallelPlan(tp=tp)
        plan.tp = GroupHandle(size=tp, rank=rank)
        model = _load(config, weights, plan)
        params = dict(model.named_parameters())
        expect = _expected_shards(config, weights, tp, rank)
        assert params.keys() == expect.keys()
        for name, tensor in expect.items():
            assert torch.equal(params[name], tensor), name
        spec = model.kv_cache_spec()  # k and v rows = qkv rows - q rows (o_proj's inputs)
        assert 2 * spec.num_kv_heads * spec.head_size == (
            expect["model.layers.0.self_attn.qkv_proj.weight"].shape[0]
            - expect["model.layers.0.self_attn.o_proj.weight"].shape[1])
        if config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_weights_errors_name_the_tensor(checkpoint):
    config, _, weights = checkpoint
    with pytest.raises(RunnerError, match=r"model\.layers\.0\.self_attn\.qkv\.weight"):
        _load(config, {**weights, "model.layers.0.self_attn.qkv.weight": torch.zeros(3)})
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RunnerError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(config, missing)
    bad = {**weights, "model.layers.1.self_attn.k_proj.weight":
           weights["model.layers.1.self_attn.k_proj.weight"][:-1]}
    shape = tuple(weights["model.layers.1.self_attn.k_proj.weight"].shape)
    with pytest.raises(RunnerError, match=rf"k_proj\.weight.*{shape[0] - 1}, {shape[1]}.*{shape}"):
        _load(config, bad)
    if config.tie_word_embeddings:
        with pytest.raises(RunnerError, match="lm_head.weight"):
            _load(config, {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]})


def test_config_errors_name_the_field():
    config = LlamaConfig(**TINY, vocab_size=101, num_attention_heads=4,
                         rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(RunnerError, match=r"rope_parameters\.rope_type='linear'"):
        LlamaForCausalLM(config, ParallelPlan())
    with pytest.raises(RunnerError, match=r"parallel\.tp=3.*num_attention_heads"):
        LlamaForCausalLM(CONFIGS["llama_nobias"](), ParallelPlan(tp=3))


@pytest.mark.parametrize("rope_parameters", [{"rope_type": "default", "rope_theta": 5000.0},
                                             LLAMA3_ROPE])
def test_rope_cache_matches_transformers(rope_parameters):
    config = LlamaConfig(**TINY, vocab_size=101, num_attention_heads=4, head_dim=24,
                         rope_parameters=dict(rope_parameters))
    rope_type = rope_parameters["rope_type"]
    init = (LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
            else ROPE_INIT_FUNCTIONS[rope_type])
    assert torch.equal(rope_inv_freq(config.rope_parameters, 24), init(config)[0])
    positions = torch.arange(512)
    cos, sin = RotaryEmbedding(config.rope_parameters, 24, 512)(positions)  # [P, 12]
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])  # [1, P, 24]
    assert torch.allclose(torch.cat((cos, cos), -1), hf_cos[0], atol=1e-6)
    assert torch.allclose(torch.cat((sin, sin), -1), hf_sin[0], atol=1e-6)


def test_qwen25_1p5b_shapes_on_meta_device():
    config = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, ParallelPlan())
        hf_model = HFQwen2ForCausalLM(config)
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 1_543_714_304  # Qwen2.5-1.5B's count
    assert sum(p.numel() for p in hf_model.parameters()) == 1_543_714_304
    assert checkpoint_shapes(config) == {n: tuple(p.shape) for n, p in hf_model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layer = "model.layers.27."
    assert params[layer + "self_attn.qkv_proj.weight"].shape == (1536 + 2 * 256, 1536)
    assert params[layer + "self_attn.qkv_proj.bias"].shape == (2048,)
    assert params[layer + "self_attn.o_proj.weight"].shape == (1536, 1536)
    assert layer + "self_attn.o_proj.bias" not in params
    assert params[layer + "mlp.gate_up_proj.weight"].shape == (2 * 8960, 1536)
    assert params[layer + "mlp.down_proj.weight"].shape == (1536, 8960)
    assert params["model.embed_tokens.weight"].shape == (151936, 1536)
    assert model.num_layers == 28
    spec = model.kv_cache_spec()
    assert (spec.num_kv_heads, spec.head_size, spec.v_head_size) == (2, 128, 128)
    assert not spec.shared
    assert model.model.rotary_emb.cos_sin_cache.shape == (32768, 128)
