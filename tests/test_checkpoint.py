"""Checkpoint folders (config, safetensors, EOS, tokenizer) and the deterministic dummy weights.

References are independent: transformers' save_pretrained / LlamaForCausalLM and
safetensors.torch.load_file; the error cases damage real checkpoints by hand.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (DeepseekV2Config, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config)

from runner.errors import RunnerError
from runner.loaders.checkpoint import iter_safetensors, load_hf_config
from runner.loaders.dummy import iter_dummy_weights
from runner.loaders.generation import eos_token_ids, load_tokenizer

INDEX = "model.safetensors.index.json"


def _tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    return LlamaConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama saved once as one file and once sharded (several shards and an index)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config())
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert len(glob.glob(str(root / "sharded" / "*.safetensors"))) > 2
    return {"single": str(root / "single"), "sharded": str(root / "sharded")}


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def _raises(match: str, fn, *args):
    with pytest.raises(RunnerError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value) and "model.path=" in str(info.value)
    return str(info.value)


def _shard_names(path: str) -> list[str]:
    with open(os.path.join(path, INDEX)) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_iter_safetensors_yields_every_tensor_sorted(saved, layout):
    expected = {}
    for file_path in glob.glob(os.path.join(saved[layout], "*.safetensors")):
        expected.update(load_file(file_path))
    names = [name for name, _ in iter_safetensors(saved[layout])]
    got = dict(iter_safetensors(saved[layout]))
    assert names == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_truncated_shard_named(saved, tmp_path):
    path = _copy(saved["sharded"], tmp_path)
    shard = _shard_names(path)[1]
    file_path = os.path.join(path, shard)
    os.truncate(file_path, os.path.getsize(file_path) - 10)
    _raises(f"{shard} is not a valid safetensors", iter_safetensors, path)


def test_garbage_single_file_named(saved, tmp_path):
    path = _copy(saved["single"], tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    _raises("model.safetensors is not a valid safetensors", iter_safetensors, path)


def test_missing_shard_named(saved, tmp_path):
    path = _copy(saved["sharded"], tmp_path)
    shard = _shard_names(path)[-1]
    os.remove(os.path.join(path, shard))
    _raises(f"shard {shard} is missing", iter_safetensors, path)


def test_index_tensor_missing_from_shard_named(saved, tmp_path):
    path = _copy(saved["sharded"], tmp_path)
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = _shard_names(path)[0]
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    _raises(r"tensor model\.layers\.0\.mlp\.extra\.weight .* missing from", iter_safetensors, path)


def test_index_shard_outside_folder_refused(saved, tmp_path):
    path = _copy(saved["sharded"], tmp_path)
    with open(os.path.join(path, INDEX)) as f:
        index = json.load(f)
    index["weight_map"]["lm_head.weight"] = "../model.safetensors"
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)
    _raises("not a file name inside the folder", iter_safetensors, path)


class _Payload:
    """Unpickling this object creates a directory: proof that pickled weights were run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_weights_refused_unread(saved, tmp_path):
    path = str(tmp_path / "pickled")
    os.mkdir(path)
    shutil.copy(os.path.join(saved["single"], "config.json"), path)
    torch.save(dict(load_file(os.path.join(saved["single"], "model.safetensors"))),
               os.path.join(path, "pytorch_model.bin"))
    marker = str(tmp_path / "unpickled")
    with open(os.path.join(path, "extra.pt"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    message = _raises("pytorch_model.bin", iter_safetensors, path)
    assert "unpickling runs arbitrary code" in message and "safetensors" in message
    assert not os.path.exists(marker)


def test_no_weights_and_no_folder(tmp_path):
    _raises("no weights", iter_safetensors, str(tmp_path))
    _raises("no such checkpoint folder", iter_safetensors, str(tmp_path / "absent"))
    (tmp_path / "a_file").write_text("")
    _raises("a file, not a checkpoint folder", iter_safetensors, str(tmp_path / "a_file"))


def _write_config(path: str, data: dict | str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


def test_load_hf_config_accepts_supported_architectures(saved, tmp_path):
    config = load_hf_config(saved["single"])
    assert isinstance(config, LlamaConfig) and config.hidden_size == 32
    for cls, arch in ((DeepseekV2Config, "DeepseekV2ForCausalLM"),
                      (Qwen2Config, "Qwen2ForCausalLM")):
        cls(architectures=[arch], num_hidden_layers=2).save_pretrained(tmp_path / arch)
        assert type(load_hf_config(str(tmp_path / arch))) is cls


def test_load_hf_config_errors(saved, tmp_path):
    _raises("no such checkpoint folder", load_hf_config, str(tmp_path / "absent"))
    _raises("no config.json", load_hf_config, str(tmp_path))
    _write_config(str(tmp_path / "bad"), '{"architectures": ["LlamaForCausalLM"],')
    _raises("config.json is not valid JSON", load_hf_config, str(tmp_path / "bad"))
    gpt2 = json.loads(open(os.path.join(saved["single"], "config.json")).read())
    gpt2.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _write_config(str(tmp_path / "gpt2"), gpt2)
    message = _raises("GPT2LMHeadModel", load_hf_config, str(tmp_path / "gpt2"))
    assert "LlamaForCausalLM" in message and "DeepseekV2ForCausalLM" in message


def test_remote_code_never_runs(saved, tmp_path):
    marker = str(tmp_path / "executed")
    raw = json.loads(open(os.path.join(saved["single"], "config.json")).read())
    raw["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    for model_type in ("llama", "evil"):
        path = str(tmp_path / model_type)
        _write_config(path, {**raw, "model_type": model_type})
        with open(os.path.join(path, "configuration_evil.py"), "w") as f:
            f.write(f"import os\nos.mkdir({marker!r})\n")
    assert isinstance(load_hf_config(str(tmp_path / "llama")), LlamaConfig)
    _raises("model_type 'evil' does not match", load_hf_config, str(tmp_path / "evil"))
    assert not os.path.exists(marker)


def _save_tokenizer(path: str) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<end>": 5}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="<end>").save_pretrained(path)


def test_eos_order_generation_config_then_config_then_tokenizer(tmp_path):
    path = str(tmp_path)
    _write_config(path, {"eos_token_id": 9})
    _save_tokenizer(path)
    hf_config = _tiny_llama_config(eos_token_id=9)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [7, 3, 7, 11]}, f)
    assert eos_token_ids(path, hf_config) == [7, 3, 11]
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1}, f)
    assert eos_token_ids(path, hf_config) == [9]
    _write_config(path, {"eos_token_id": None})
    assert eos_token_ids(path, hf_config) == [5]  # the tokenizer's "<end>"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(os.path.join(path, name))
    assert eos_token_ids(path, hf_config) == []
    assert eos_token_ids(None, _tiny_llama_config(eos_token_id=[4, 4, 2])) == [4, 2]


def test_eos_bad_value_named(tmp_path):
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": "</s>"}, f)
    _raises("generation_config.json eos_token_id", eos_token_ids, str(tmp_path), None)


def test_tokenizer_loaded_absent_or_broken(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None
    _save_tokenizer(str(tmp_path))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer("hello world").input_ids == [3, 4]
    with open(tmp_path / "tokenizer.json", "w") as f:
        f.write("{broken")
    _raises("tokenizer cannot be loaded", load_tokenizer, str(tmp_path))


def _llama_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def test_dummy_weights_depend_on_seed_and_name_only():
    shapes = _llama_shapes(_tiny_llama_config())
    full = dict(iter_dummy_weights(shapes, seed=3, dtype=torch.float32, device="cpu"))
    subset = {name: shapes[name] for name in reversed(sorted(shapes)[::3])}
    for name, tensor in iter_dummy_weights(subset, seed=3, dtype=torch.float32, device="cpu"):
        assert torch.equal(tensor, full[name]), name
    q0, q1 = (full[f"model.layers.{i}.self_attn.q_proj.weight"] for i in (0, 1))
    assert not torch.equal(q0, q1)
    other_seed = dict(iter_dummy_weights(shapes, seed=4, dtype=torch.float32, device="cpu"))
    assert not torch.equal(other_seed["model.layers.0.self_attn.q_proj.weight"], q0)


def test_dummy_weights_same_in_another_process():
    """A fresh interpreter with a different PYTHONHASHSEED (as every rank has) draws the same."""
    shapes = {"model.layers.1.mlp.up_proj.weight": (8, 4)}
    code = ("import torch; from runner.loaders.dummy import iter_dummy_weights; "
            f"print(next(iter_dummy_weights({shapes!r}, 5, torch.float32, 'cpu'))[1].tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    _, here = next(iter_dummy_weights(shapes, 5, torch.float32, "cpu"))
    assert torch.tensor(json.loads(result.stdout)).equal(here)


def test_dummy_weight_scales():
    shapes = {"model.embed_tokens.weight": (512, 256), "lm_head.weight": (512, 256),
              "model.layers.0.mlp.down_proj.weight": (128, 1024),
              "model.layers.0.mlp.gate.weight": (64, 256),
              "model.layers.0.self_attn.kv_a_layernorm.weight": (512,),
              "model.norm.weight": (256,), "model.layers.0.self_attn.q_proj.bias": (256,)}
    weights = dict(iter_dummy_weights(shapes, seed=0, dtype=torch.bfloat16, device="cpu"))
    expected_std = {"model.embed_tokens.weight": 1.0, "lm_head.weight": 2 / 16,
                    "model.layers.0.mlp.down_proj.weight": 1 / 32,
                    "model.layers.0.mlp.gate.weight": 1 / 16}
    for name, std in expected_std.items():
        assert weights[name].float().std().item() == pytest.approx(std, rel=0.05), name
        assert abs(weights[name].float().mean().item()) < 0.05 * std, name
    for name in ("model.layers.0.self_attn.kv_a_layernorm.weight", "model.norm.weight"):
        assert (weights[name].float() - 1).abs().max().item() < 0.15, name
    assert weights["model.layers.0.self_attn.q_proj.bias"].float().abs().max().item() < 0.15
    assert all(w.dtype == torch.bfloat16 and torch.isfinite(w).all() for w in weights.values())


def test_dummy_deep_llama_logits_finite_and_peaked_in_bf16():
    config = _tiny_llama_config(hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state = dict(iter_dummy_weights(shapes, seed=0, dtype=torch.bfloat16, device="cpu"))
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # meta buffers -> real
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (1, 16), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # [T, V]
    assert torch.isfinite(logits).all()
    top2 = logits.topk(2, dim=-1).values  # [T, 2]
    assert 1.0 < logits.std(dim=-1).mean().item() < 4.0
    assert (top2[:, 0] - top2[:, 1]).median().item() > 0.1  # greedy is not a coin toss
