"""Every option of every config group composes and builds (CPU, or the meta device for the large
models), the schemas reject misspelled keys and wrong types at compose time, and tp defaults to dcp.

References are independent of the runner: Hugging Face transformers' own model classes built from
the same config (parameter counts), the published DeepSeek-V2-Lite / Qwen2.5-1.5B shapes, and
DeepSeek's YaRN softmax-scale formula.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner import config as schemas
from runner.build import build_runner, check_config, instantiate
from runner.compose import CONF_DIR, compose_config
from runner.errors import RunnerError

GROUPS = ("model", "attention", "block_table", "parallel", "graph", "task")
CPU_MODELS = ("tiny", "tiny_llama")
GPU_SIZED_MODELS = ("dsv2lite", "qwen2_5_1_5b")
# Schema of each option; a task option's schema depends on the option.
SCHEMAS = {"model": schemas.ModelConfig, "attention": schemas.AttentionConfig,
           "block_table": schemas.BlockTableConfig, "parallel": schemas.ParallelConfig,
           "graph": schemas.GraphConfig}
TASK_SCHEMAS = {"generate": schemas.GenerateTaskConfig, "bench": schemas.BenchTaskConfig,
                "verify": schemas.VerifyTaskConfig}
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)
GPU_ONLY = {"attention": ("triton",), "graph": ("cuda",)}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


ALL_OPTIONS = [(group, option) for group in GROUPS for option in _options(group)]


def test_every_group_has_options_and_every_model_is_covered():
    assert all(_options(group) for group in GROUPS)
    assert set(_options("model")) == set(CPU_MODELS) | set(GPU_SIZED_MODELS)


@pytest.mark.parametrize("group,schema", [("model", "base_model"), ("attention", "base_attention"),
                                          ("graph", "base_graph"), ("task", "base_bench")])
def test_a_schema_is_refused_as_an_option(group, schema):
    """Hydra lists the base_* schemas among a group's options; choosing one names the options."""
    options = ", ".join(_options(group))
    with pytest.raises(RunnerError, match=rf"^{group}={schema} is the schema of conf/{group}, "
                                          rf"not an option: choose one of {options}$"):
        compose_config([f"{group}={schema}"])


@pytest.mark.parametrize("group,option", ALL_OPTIONS)
def test_every_option_composes_typed_by_its_schema(group, option):
    cfg = compose_config([f"{group}={option}"])
    node = cfg[group]
    expected = TASK_SCHEMAS[option] if group == "task" else SCHEMAS[group]
    assert OmegaConf.get_type(node) is expected  # a misspelled key or wrong type fails here
    assert node._target_
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("option", _options("task"))
def test_every_task_option_instantiates(option):
    task = instantiate(compose_config([f"task={option}"]), "task", {})
    assert type(task).__name__.lower() == f"{option}task"


@pytest.mark.parametrize("model", CPU_MODELS)
@pytest.mark.parametrize("attention", _options("attention"))
@pytest.mark.parametrize("graph", _options("graph"))
def test_cpu_models_build_a_runner_for_every_backend_and_graph(model, attention, graph):
    cfg = compose_config([f"model={model}", f"attention={attention}", f"graph={graph}"])
    gpu_only = [f"{group}={option}" for group, option in
                (("attention", attention), ("graph", graph)) if option in GPU_ONLY[group]]
    if gpu_only and not torch.cuda.is_available():
        with pytest.raises(RunnerError, match=f"{gpu_only[0]} needs a GPU"):
            build_runner(cfg)
        return
    runner = build_runner(cfg)
    if not torch.cuda.is_available():  # auto means the torch backend and eager graphs on CPU
        assert type(runner.attention).__name__ == "TorchAttention"
        assert type(runner.graph).__name__ == "EagerGraph"
    hf_config = runner.loader.hf_config()
    reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(runner.model).__name__ == type(reference).__name__
    assert _num_params(runner.model) == _num_params(reference)
    outputs = runner.generate([[3, 4, 5]], max_tokens=3)
    assert len(outputs[0].token_ids) == 3
    assert all(0 <= t < hf_config.vocab_size for t in outputs[0].token_ids)


@pytest.mark.parametrize("model", CPU_MODELS)
def test_every_task_option_runs_on_a_cpu_model(model, tmp_path):
    """generate and bench run to completion; verify agrees with transformers' own model."""
    overrides = {
        "generate": ["task.prompt_token_ids=[[3,4,5],[6]]", "task.max_tokens=2",
                     f"task.output={tmp_path}/out.json"],
        "bench": ["task.num_prompts=2", "task.input_len=4", "task.output_len=3",
                  "task.output=null"],
        "verify": ["task.num_prompts=2", "task.max_tokens=4"],
    }
    assert set(overrides) == set(_options("task"))
    runner = build_runner(compose_config([f"model={model}"]))
    for option, extra in overrides.items():
        cfg = compose_config([f"model={model}", f"task={option}", *extra])
        task = instantiate(cfg, "task", {})
        task.output_dir = str(tmp_path)
        metrics = task.run(runner)
        assert not metrics.get("exit_code"), (option, metrics)
    assert (tmp_path / "out.json").is_file()
    assert metrics["min_agreement"] == 1.0  # verify: runner vs transformers


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a tied weight counts once


def _meta_build(model: str):
    cfg = compose_config([f"model={model}"])
    loader = instantiate(cfg, "model", {}, seed=cfg.seed)
    plan = instantiate(cfg, "parallel", {})
    return loader, loader.build(plan, torch.device("meta"))


def _hf_meta_params(hf_config) -> int:
    with torch.device("meta"):
        return _num_params(transformers.AutoModelForCausalLM.from_config(hf_config))


def test_dsv2lite_shapes_on_meta():
    loader, model = _meta_build("dsv2lite")
    c = loader.hf_config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (27, 2048, 16)
    assert (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (
        512, 64, 128, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (64, 2, 6)
    assert (c.moe_intermediate_size, c.intermediate_size, c.first_k_dense_replace) == (
        1408, 10944, 1)
    assert c.vocab_size == 102400 and c.q_lora_rank is None
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 40.0
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.model.layers) == 27
    assert params["model.embed_tokens.weight"] == (102400, 2048)
    assert params["lm_head.weight"] == (102400, 2048)
    attn = "model.layers.0.self_attn."
    # q_proj (16 heads of 128 + 64), then kv_a_proj_with_mqa (512 + 64): one GEMM
    assert params[attn + "fused_qkv_a_proj.weight"] == (16 * (128 + 64) + 512 + 64, 2048)
    assert params[attn + "kv_b_proj.weight"] == (16 * (128 + 128), 512)
    assert params[attn + "o_proj.weight"] == (2048, 16 * 128)
    assert params["model.layers.0.mlp.down_proj.weight"] == (2048, 10944)  # layer 0 is dense
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in params)
    assert params["model.layers.26.mlp.gate.weight"] == (64, 2048)
    assert params["model.layers.26.mlp.shared_experts.down_proj.weight"] == (2048, 2 * 1408)
    routed = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("model.layers.1.mlp.experts."))
    assert routed == 64 * 3 * 1408 * 2048  # gate, up, down of 64 experts of width 1408
    assert model.kv_cache_spec().head_size == 512 + 64  # one latent + rope key per token
    # DeepSeek's YaRN softmax scale: qk_head_dim**-0.5 * (0.1 * mscale_all_dim * ln(factor) + 1)**2
    yarn_mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert model.model.layers[0].self_attn.scale == pytest.approx(192 ** -0.5 * yarn_mscale ** 2)
    assert _num_params(model) == _hf_meta_params(c)  # 15.7B, transformers' own count
    assert 15.6e9 < _num_params(model) < 15.8e9


def test_qwen2_5_1_5b_shapes_on_meta():
    loader, model = _meta_build("qwen2_5_1_5b")
    c = loader.hf_config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads) == (28, 1536, 12, 2)
    assert c.tie_word_embeddings and c.vocab_size == 151936
    assert len(model.model.layers) == 28
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    attn = model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (12, 2, 128)
    params = dict(model.named_parameters())
    assert "lm_head.weight" not in params
    assert sum(p.numel() for n, p in params.items()
               if n.startswith("model.layers.0.self_attn.") and n.endswith(".bias")) == (
        (12 + 2 + 2) * 128)  # q, k, v biases
    assert _num_params(model) == _hf_meta_params(c)  # 1.54B, transformers' own count
    assert 1.5e9 < _num_params(model) < 1.6e9


def test_dsv2lite_refused_on_cpu_before_building():
    cfg = compose_config(["model=dsv2lite"])
    with pytest.raises(RunnerError, match="needs a GPU"):
        check_config(cfg, device=torch.device("cpu"))


H200_BYTES = 141 * 10**9


def _pretend_gpus(monkeypatch, count: int, total_memory: int) -> None:
    """Make the layout and memory checks see `count` GPUs of `total_memory` bytes each."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=total_memory))


@pytest.mark.parametrize("overrides", [
    ["model=tiny"],
    ["model=tiny_llama", "parallel.tp=4", "parallel.dcp=2"],
    ["model=dsv2lite"],
    ["model=dsv2lite", "parallel.dcp=4"],
    ["model=qwen2_5_1_5b", "parallel.tp=4", "parallel.dcp=2"],
], ids=lambda overrides: "-".join(o.split("=")[-1] for o in overrides))
def test_default_configs_pass_the_checks_on_a_gpu_machine(overrides, monkeypatch):
    """DESIGN §1's commands, checked as on a machine with 8 H200s (nothing is built)."""
    _pretend_gpus(monkeypatch, 8, H200_BYTES)
    check_config(compose_config(overrides), device=torch.device("cuda"))


def test_memory_check_counts_the_gpu_dtype(monkeypatch):
    """Qwen2.5-1.5B: 3.1 GB in bf16 (the GPU default), 6.2 GB in float32; a 5 GB GPU holds it."""
    _pretend_gpus(monkeypatch, 1, 5 * 10**9)
    check_config(compose_config(["model=qwen2_5_1_5b"]), device=torch.device("cuda"))


def test_memory_check_refuses_weights_larger_than_the_gpu(monkeypatch):
    _pretend_gpus(monkeypatch, 1, 10 * 10**9)  # DeepSeek-V2-Lite is 31 GB in bf16
    with pytest.raises(RunnerError, match="GiB"):
        check_config(compose_config(["model=dsv2lite"]), device=torch.device("cuda"))


@pytest.mark.parametrize("overrides,tp,dcp", [
    ([], 1, 1),
    (["parallel.dcp=4"], 4, 4),
    (["parallel.dcp=2", "parallel.tp=4"], 4, 2),
    (["parallel.tp=2"], 2, 1),
])
def test_tp_defaults_to_dcp(overrides, tp, dcp):
    cfg = compose_config(overrides)
    assert (cfg.parallel.tp, cfg.parallel.dcp) == (tp, dcp)
    plan = instantiate(cfg, "parallel", {})
    assert (plan.tp_size, plan.dcp_size) == (tp, dcp)


@pytest.mark.parametrize("override", [
    "model.dtyp=float32", "block_table.blocksize=32", "parallel.dpc=2", "graph.batch_size=[1]",
    "task.max_token=4", "scheduler.max_num_seq=4", "devise=cpu",
])
def test_misspelled_key_fails_at_compose(override):
    with pytest.raises(COMPOSE_ERRORS, match=override.split("=")[0].split(".")[-1]):
        compose_config([override])


@pytest.mark.parametrize("overrides", [
    ["model.max_model_len=abc"], ["model.requires_gpu=maybe"], ["block_table.block_size=abc"],
    ["block_table.memory_fraction=lots"], ["parallel.dcp=four"], ["parallel.ep=sometimes"],
    ["graph.batch_sizes=abc"], ["graph.batch_sizes=[1,x]"], ["task.max_tokens=abc"],
    ["task=bench", "task.num_prompts=abc"], ["task=verify", "task.min_agreement=high"],
    ["scheduler.max_num_seqs=abc"], ["seed=abc"], ["print_config=maybe"],
])
def test_wrong_type_fails_at_compose(overrides):
    with pytest.raises(COMPOSE_ERRORS):
        compose_config(overrides)


def test_misspelled_key_in_an_option_file_fails_at_compose(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    text = (conf / "model" / "tiny.yaml").read_text()
    (conf / "model" / "typo.yaml").write_text(text.replace("architecture:", "architectur:"))
    schemas.register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        compose(config_name="config", overrides=["model=tiny"])  # the copy itself is fine
        with pytest.raises(COMPOSE_ERRORS, match="architectur"):
            compose(config_name="config", overrides=["model=typo"])


def test_dcp_refuses_a_backend_without_lse():
    """DCP combines partial attention by its LSE: a backend that cannot return one is refused
    before any rank starts."""
    from runner.attention.torch_ref import TorchAttention

    class NoLseAttention(TorchAttention):
        returns_lse = False

    cfg = compose_config(["parallel.dcp=2"])
    with pytest.raises(RunnerError, match="parallel.dcp=2 needs an attention backend"):
        check_config(cfg, {"attention": NoLseAttention()}, device=torch.device("cpu"))
    check_config(cfg, {"attention": TorchAttention()}, device=torch.device("cpu"))


def test_max_model_len_above_the_models_positions_is_refused():
    """Never silently capped: a length the model was not built for is an error naming the field."""
    with pytest.raises(RunnerError, match=r"model.max_model_len=4096 .* max_position_embeddings"):
        check_config(compose_config(["model.max_model_len=4096"]), device=torch.device("cpu"))
    check_config(compose_config(["model.max_model_len=2048"]), device=torch.device("cpu"))


@pytest.mark.parametrize("max_model_len", [0, 1, -5])
def test_max_model_len_below_two_is_refused_before_building(max_model_len):
    with pytest.raises(RunnerError, match=f"model.max_model_len={max_model_len}: must be >= 2"):
        check_config(compose_config(["model=tiny", "device=cpu",
                                     f"model.max_model_len={max_model_len}"]))


def test_a_cpu_kv_cache_larger_than_memory_is_refused():
    cfg = compose_config(["model=tiny", "device=cpu", "scheduler.max_num_seqs=10000000"])
    with pytest.raises(RunnerError, match="scheduler.max_num_seqs=10000000 .* GiB"):
        build_runner(cfg)


@pytest.mark.parametrize("field", ["vocab_size=0", "num_hidden_layers=0", "hidden_size=-64"])
def test_a_size_field_below_one_is_refused_by_name(field):
    name = field.split("=")[0]
    with pytest.raises(RunnerError, match=f"model.hf_config: {name}=.* must be an integer >= 1"):
        check_config(compose_config(["model=tiny", "device=cpu", f"model.hf_config.{field}"]))
