"""End-of-sequence ids and the tokenizer of a checkpoint folder (no remote code is run).

EOS comes from generation_config.json, then config.json, then the tokenizer: the first that has one.
"""
from __future__ import annotations

import os

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from runner.loaders.checkpoint import fail, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _as_id_list(path: str, where: str, value: object) -> list[int]:
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise fail(path, f"{where} eos_token_id must be a token id or a list of them, "
                         f"got {value!r}")
    return list(dict.fromkeys(ids))  # order kept, duplicates dropped


def _file_eos(path: str, file_name: str) -> list[int] | None:
    if not os.path.isfile(os.path.join(path, file_name)):
        return None
    value = read_json(path, file_name).get("eos_token_id")
    return None if value is None else _as_id_list(path, file_name, value)


def eos_token_ids(path: str | None, hf_config: PretrainedConfig) -> list[int]:
    """The ids that end a request; [] if no source names one.

    With a folder, config.json is read as written (not the config class's default); without one
    (dummy weights), `hf_config.eos_token_id` stands in for it.
    """
    if path is None:
        value = getattr(hf_config, "eos_token_id", None)
        return [] if value is None else _as_id_list("null", "config", value)
    for file_name in ("generation_config.json", "config.json"):
        ids = _file_eos(path, file_name)
        if ids is not None:
            return ids
    tokenizer = load_tokenizer(path)
    if tokenizer is None or tokenizer.eos_token_id is None:
        return []
    return [tokenizer.eos_token_id]


def load_tokenizer(path: str | None) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    if path is None or not any(os.path.isfile(os.path.join(path, name))
                               for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001  # tokenizers raise many types; any means a broken one
        raise fail(path, f"the tokenizer cannot be loaded: {exc}") from None
