"""DeepSeek-V2 (MLA + MoE + YaRN) against transformers' DeepseekV2ForCausalLM with the same
randomized, saved and reloaded weights: checkpoint names, prefill and absorbed-decode logits,
tensor and expert parallel over two gloo processes, the router's norm_topk_prob branch and
fused_moe against float64 brute force, loading errors, and DeepSeek-V2-Lite on the meta device."""
from __future__ import annotations

import math
import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import DeepseekV2Config
from transformers import DeepseekV2ForCausalLM as HFDeepseekV2ForCausalLM
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (DeepseekV2Attention,
                                                                  DeepseekV2RotaryEmbedding)

from runner.attention.torch_ref import TorchAttention
from runner.errors import RunnerError
from runner.models.deepseek_v2 import DeepseekV2ForCausalLM, checkpoint_shapes
from runner.models.layers.moe import DeepseekMoE, fused_moe
from runner.models.layers.yarn_rope import DeepseekRotaryEmbedding, mla_softmax_scale
from runner.parallel.plan import ParallelPlan
from helpers import PagedBatch, randomize_parameters, reference_logits

PROMPT_LENGTHS = [1, 16, 40, 203]  # decode at 16 opens a new block
YARN = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
        "original_max_position_embeddings": 128, "mscale": 0.9, "mscale_all_dim": 0.8,
        "beta_fast": 16, "beta_slow": 2}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
            kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20,
            n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
            max_position_embeddings=512, attn_implementation="eager",
            experts_implementation="eager")
CONFIGS = {
    "qlora_yarn_grouped": lambda: DeepseekV2Config(
        **TINY, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=48,
        rope_parameters=dict(YARN), topk_method="group_limited_greedy", n_group=4, topk_group=2,
        n_shared_experts=2, routed_scaling_factor=1.7, rms_norm_eps=1e-5),
    "dense_q_tied_bias": lambda: DeepseekV2Config(
        **TINY, num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=None,
        rope_theta=20000.0, topk_method="greedy", n_shared_experts=3, routed_scaling_factor=0.6,
        rms_norm_eps=3e-5, attention_bias=True, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(config, transformers model, safetensors path, {hf name: tensor} from save_pretrained)."""
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    hf_model = HFDeepseekV2ForCausalLM(config).eval()
    randomize_parameters(hf_model, seed=0)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    return config, hf_model, path / "model.safetensors", load_file(path / "model.safetensors")


def _load(config, weights: dict, plan: ParallelPlan | None = None) -> DeepseekV2ForCausalLM:
    model = DeepseekV2ForCausalLM(config, plan or ParallelPlan())
    model.load_weights(weights.items())
    return model


def _prefill_then_decode(model, prompts: list[list[int]], next_ids: list[int], attention=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a batched prefill [T, V], then of one decode step per request [R, V]."""
    lengths = [len(p) for p in prompts]
    batch = PagedBatch(model, [n + 1 for n in lengths])
    with torch.no_grad():
        positions, ctx = batch.context(lengths, lengths, attention)
        prefill = model.compute_logits(model(torch.tensor(sum(prompts, [])), positions, ctx))
        positions, ctx = batch.context([n + 1 for n in lengths], [1] * len(lengths), attention)
        assert not ctx.attn_meta.is_prefill
        decode = model.compute_logits(model(torch.tensor(next_ids), positions, ctx))
    return prefill, decode


def _prompts_and_next(vocab_size: int) -> tuple[list[list[int]], list[int]]:
    torch.manual_seed(1)
    prompts = [torch.randint(vocab_size, (n,)).tolist() for n in PROMPT_LENGTHS]
    return prompts, torch.randint(vocab_size, (len(prompts),)).tolist()


def _expected(hf_model, prompts, next_ids) -> tuple[torch.Tensor, torch.Tensor]:
    prefill = torch.cat([reference_logits(hf_model, p) for p in prompts])
    decode = torch.stack([reference_logits(hf_model, p + [t])[-1]
                          for p, t in zip(prompts, next_ids)])
    return prefill, decode


def test_checkpoint_shapes_equal_save_pretrained(checkpoint):
    config, _, _, weights = checkpoint
    assert checkpoint_shapes(config) == {name: tuple(t.shape) for name, t in weights.items()}


def test_prefill_and_decode_logits_match_transformers(checkpoint):
    config, hf_model, _, weights = checkpoint
    model = _load(config, weights)
    prompts, next_ids = _prompts_and_next(config.vocab_size)
    prefill, decode = _prefill_then_decode(model, prompts, next_ids)
    expected_prefill, expected_decode = _expected(hf_model, prompts, next_ids)
    assert prefill.dtype == torch.float32 and prefill.shape == expected_prefill.shape
    assert (prefill - expected_prefill).abs().max().item() <= 1e-4
    assert (decode - expected_decode).abs().max().item() <= 1e-4
    assert expected_decode.std() > 0.3  # the comparison is not between near-zero logits


class _FusedWriteAttention(TorchAttention):
    """Torch attention that lets the model store its cache rows itself (as the Triton backend
    does, in MLA's prologue kernel) and fails if write_kv is called anyway."""
    fused_kv_write = True

    def write_kv(self, k_cache, v_cache, slot_mapping, key, value) -> None:
        raise AssertionError("write_kv was called although the backend lets the model write")


def test_mla_stores_its_cache_rows_itself_when_the_backend_allows(checkpoint):
    config, hf_model, _, weights = checkpoint
    prompts, next_ids = _prompts_and_next(config.vocab_size)
    prefill, decode = _prefill_then_decode(_load(config, weights), prompts, next_ids,
                                           _FusedWriteAttention())
    expected_prefill, expected_decode = _expected(hf_model, prompts, next_ids)
    assert (prefill - expected_prefill).abs().max().item() <= 1e-4
    assert (decode - expected_decode).abs().max().item() <= 1e-4  # decode read those rows


def _greedy_tokens(cfg, rank: int, attention_class, prompts: list[list[int]]) -> list[list[int]]:
    """Rank function: greedy tokens of `prompts` with an attention backend of attention_class."""
    from runner.build import build_runner
    from runner.request import SamplingParams
    runner = build_runner(cfg, attention=attention_class())
    try:
        outputs = runner.generate(prompts, params=SamplingParams(max_tokens=6, ignore_eos=True))
    finally:
        runner.shutdown()
    return [o.token_ids for o in outputs]


def test_mla_stores_rank_local_cache_rows_itself_under_dcp(monkeypatch):
    """DCP hands the prologue each rank's own slot mapping (-1 for rows another rank stores)."""
    from runner.compose import compose_config
    from runner.launch import launch
    monkeypatch.setenv("DCP_RUNNER_COLLECTIVE_TIMEOUT", "120")  # a hang fails, not waits
    prompts = [[5, 9, 2], [(7 * i) % 500 + 1 for i in range(29)]]  # 29: several blocks per rank
    base = ["model=tiny", "device=cpu", "print_config=false", "block_table.block_size=4"]
    expected = _greedy_tokens(compose_config(base), 0, TorchAttention, prompts)
    got = launch(compose_config(base + ["parallel.dcp=2"]), _greedy_tokens, _FusedWriteAttention,
                 prompts)
    assert got == expected


def _parallel_worker(rank: int, port: int, config, weights_path, ep: bool, out_path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        plan = ParallelPlan(tp=2, ep=ep)
        plan.setup(rank)
        model = _load(config, load_file(weights_path), plan)
        prompts, next_ids = _prompts_and_next(config.vocab_size)
        torch.manual_seed(3)  # the same block table on both ranks
        if rank == 0:
            torch.save(_prefill_then_decode(model, prompts, next_ids), out_path)
        else:
            _prefill_then_decode(model, prompts, next_ids)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2_ep"])
def test_two_ranks_match_transformers(checkpoint, tmp_path, ep):
    config, hf_model, weights_path, _ = checkpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out_path = tmp_path / "logits.pt"
    procs = [ctx.Process(target=_parallel_worker,
                         args=(r, port, config, weights_path, ep, out_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    prefill, decode = torch.load(out_path)
    expected_prefill, expected_decode = _expected(hf_model, *_prompts_and_next(config.vocab_size))
    assert (prefill - expected_prefill).abs().max().item() <= 1e-4
    assert (decode - expected_decode).abs().max().item() <= 1e-4


def _moe_brute_force(x, gate_w, experts, shared, config) -> torch.Tensor:
    """float64, token by token: DeepSeek-V2's routing rule written out with sorted()."""
    c = config
    scores = torch.softmax(x @ gate_w.T, dim=-1)  # [T, E]
    per_group = c.n_routed_experts // (c.n_group or 1)
    out = []
    for t in range(x.shape[0]):
        s = scores[t].tolist()
        candidates = range(c.n_routed_experts)
        if c.topk_method == "group_limited_greedy":
            best = [max(s[g * per_group:(g + 1) * per_group]) for g in range(c.n_group)]
            groups = sorted(range(c.n_group), key=lambda g: -best[g])[:c.topk_group]
            candidates = [e for e in candidates if e // per_group in groups]
        chosen = sorted(candidates, key=lambda e: -s[e])[:c.num_experts_per_tok]
        weights = [s[e] for e in chosen]
        weights = ([w / sum(weights) for w in weights] if c.norm_topk_prob
                   else [w * c.routed_scaling_factor for w in weights])
        y = sum(w * experts[e][2] @ (F.silu(experts[e][0] @ x[t]) * (experts[e][1] @ x[t]))
                for w, e in zip(weights, chosen))
        out.append(y + shared[2] @ (F.silu(shared[0] @ x[t]) * (shared[1] @ x[t])))
    return torch.stack(out)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_moe_routing_matches_brute_force(norm_topk_prob, topk_method):
    torch.manual_seed(4)
    config = DeepseekV2Config(**TINY, n_shared_experts=2, routed_scaling_factor=2.5,
                              norm_topk_prob=norm_topk_prob, topk_method=topk_method,
                              n_group=4, topk_group=2)
    moe = DeepseekMoE(config, ParallelPlan().tp, expert_parallel=False)
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    experts = [(torch.randn(inter, hidden) * 0.2, torch.randn(inter, hidden) * 0.2,
                torch.randn(hidden, inter) * 0.2) for _ in range(config.n_routed_experts)]
    for e, tensors in enumerate(experts):
        for proj, full in zip(("gate", "up", "down"), tensors):
            moe.experts.load_expert(e, proj, full)
    shared = (torch.randn(2 * inter, hidden) * 0.2, torch.randn(2 * inter, hidden) * 0.2,
              torch.randn(hidden, 2 * inter) * 0.2)
    moe.shared_experts.gate_up_proj.weight.data.copy_(torch.cat(shared[:2]))
    moe.shared_experts.down_proj.weight.data.copy_(shared[2])
    moe.gate.weight.data.normal_(0, 0.5)
    x = torch.randn(20, hidden)
    expected = _moe_brute_force(x.double(), moe.gate.weight.double(),
                                [[t.double() for t in e] for e in experts],
                                [t.double() for t in shared], config)
    assert (moe(x).double() - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("hidden,inter", [(32, 16), (30, 6)], ids=["grouped_mm", "per_expert"])
def test_fused_moe_skips_other_ranks_experts(hidden, inter):
    torch.manual_seed(5)
    num_tokens, num_experts, top_k = 13, 5, 3
    x = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
    ids = torch.stack([torch.randperm(num_experts + 2)[:top_k] for _ in range(num_tokens)]) - 2
    weights = torch.rand(num_tokens, top_k)
    expected = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for t in range(num_tokens):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            if e >= 0:
                gate, up = (w13[e].double() @ x[t].double()).chunk(2)
                expected[t] += w * w2[e].double() @ (F.silu(gate) * up)
    got = fused_moe(x, w13, w2, ids, weights)
    assert (got.double() - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 20000.0},
    dict(YARN),
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "truncate": False,
     "original_max_position_embeddings": 64}], ids=["default", "yarn", "yarn_v2lite", "yarn_bare"])
def test_rotary_and_softmax_scale_match_transformers(rope_parameters):
    config = DeepseekV2Config(**TINY, num_hidden_layers=1, rope_parameters=rope_parameters)
    positions = torch.arange(0, 4000, 7)
    cos, sin = DeepseekRotaryEmbedding(16, config.rope_parameters, 512)(positions)
    hf_freqs = DeepseekV2RotaryEmbedding(config)(torch.zeros(1), positions[None])[0]  # complex
    assert torch.allclose(cos, hf_freqs.real, atol=2e-5)
    assert torch.allclose(sin, hf_freqs.imag, atol=2e-5)
    expected_scale = DeepseekV2Attention(config, 0).scaling
    assert mla_softmax_scale(40, config.rope_parameters, 512) == pytest.approx(expected_scale,
                                                                               rel=1e-12)


def test_load_weights_errors_name_the_tensor(checkpoint):
    config, _, _, weights = checkpoint
    with pytest.raises(RunnerError, match=r"unknown tensor 'model\.layers\.0\.self_attn\.wq"):
        _load(config, {**weights, "model.layers.0.self_attn.wq.weight": torch.zeros(3)})
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    with pytest.raises(RunnerError, match=rf"missing tensor '{name}'"):
        _load(config, {k: v for k, v in weights.items() if k != name})
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shape = tuple(weights[name].shape)
    with pytest.raises(RunnerError, match=rf"'{name}'.*\({shape[0] - 1}, {shape[1]}\).*"
                                          rf"\({shape[0]}, {shape[1]}\)"):
        _load(config, {**weights, name: weights[name][:-1]})
    if config.tie_word_embeddings:
        with pytest.raises(RunnerError, match="lm_head.weight"):
            _load(config, {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]})


def test_config_errors_name_the_field():
    with pytest.raises(RunnerError, match=r"num_attention_heads=4.*parallel\.tp=3"):
        DeepseekV2ForCausalLM(CONFIGS["qlora_yarn_grouped"](), ParallelPlan(tp=3))
    config = DeepseekV2Config(**{**TINY, "num_hidden_layers": 1, "topk_method": "noaux_tc"})
    with pytest.raises(RunnerError, match="topk_method='noaux_tc'"):
        DeepseekV2ForCausalLM(config, ParallelPlan())


def test_deepseek_v2_lite_shapes_on_meta_device():
    config = DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
            "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707,
            "beta_fast": 32, "beta_slow": 1})
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config, ParallelPlan())
        hf_model = HFDeepseekV2ForCausalLM(config)
    params = dict(model.named_parameters())
    num_params = sum(p.numel() for p in params.values())
    assert num_params == sum(p.numel() for p in hf_model.parameters())
    assert 15.6e9 < num_params < 15.8e9
    assert num_params == sum(math.prod(s) for s in checkpoint_shapes(config).values())
    layer = "model.layers.26."
    # q_proj's rows, then kv_a_proj_with_mqa's: one GEMM
    assert params[layer + "self_attn.fused_qkv_a_proj.weight"].shape == (16 * 192 + 576, 2048)
    assert params[layer + "self_attn.kv_b_proj.weight"].shape == (16 * 256, 512)
    assert params[layer + "self_attn.o_proj.weight"].shape == (2048, 16 * 128)
    assert params[layer + "mlp.gate.weight"].shape == (64, 2048)
    assert params[layer + "mlp.experts.w13"].shape == (64, 2 * 1408, 2048)
    assert params[layer + "mlp.experts.w2"].shape == (64, 2048, 1408)
    assert params[layer + "mlp.shared_experts.gate_up_proj.weight"].shape == (2 * 2816, 2048)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 10944, 2048)
    assert params["lm_head.weight"].shape == (102400, 2048)
    assert model.num_layers == 27
    spec = model.kv_cache_spec()
    assert (spec.num_kv_heads, spec.head_size, spec.v_head_size, spec.shared) == (1, 576, 512, True)
    expected_scale = 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
    assert model.model.layers[0].self_attn.scale == pytest.approx(expected_scale)
