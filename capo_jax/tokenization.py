"""Tokenizers from HF folders, built from `tokenizer.json` directly.

`AutoTokenizer` on a qwen2 folder would instantiate a model-specific class that rebuilds the pre-tokenizer; here the
serialized `tokenizers` pipeline is used exactly as stored (`PreTrainedTokenizerFast(tokenizer_file=...)`), with the
special tokens, padding side and chat template taken from tokenizer_config.json (and chat_template.jinja /
chat_template.json, where transformers v5 saves templates).

transformers is imported inside the functions, so importing this module stays cheap and torch-free.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

_SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_EXTRA_SPECIAL_FIELDS = ("additional_special_tokens", "extra_special_tokens")


def _token_content(value: Any):
  """tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _chat_template(folder: pathlib.Path, config: dict) -> str | None:
  template = config.get("chat_template")
  if template is None and (folder / "chat_template.jinja").exists():
    template = (folder / "chat_template.jinja").read_text()
  if template is None and (folder / "chat_template.json").exists():
    template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
  if isinstance(template, list):  # named templates [{"name": ..., "template": ...}]: use "default"
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template


def load_tokenizer(path, *, padding_side: str | None = None):
  """Loads the tokenizer of an HF folder as a `transformers.PreTrainedTokenizerFast`.

  Args:
    path: folder holding tokenizer.json (and usually tokenizer_config.json / chat_template.jinja).
    padding_side: overrides the folder's padding side; the folder's value, else "left" (what `CausalLM` expects for
      prompts), is used when None.

  Returns:
    A tokenizer whose bos/eos/pad/unk/... tokens and `chat_template` come from tokenizer_config.json, so
    `tok.apply_chat_template(messages, ...)` works when the folder has a template.

  Raises:
    ValueError: the folder or its tokenizer.json is missing, or tokenizer_config.json is not valid JSON.
  """
  from transformers import PreTrainedTokenizerFast

  folder = pathlib.Path(path)
  tokenizer_file = folder / "tokenizer.json"
  if not tokenizer_file.exists():
    raise ValueError(f"load_tokenizer: {tokenizer_file} not found; the folder must hold a fast-tokenizer "
                     "tokenizer.json (save one with tokenizer.save_pretrained).")
  config_file = folder / "tokenizer_config.json"
  try:
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
  except json.JSONDecodeError as e:
    raise ValueError(f"load_tokenizer: {config_file} is not valid JSON ({e}).") from None

  kwargs = {}
  for field in _SPECIAL_TOKEN_FIELDS:
    token = _token_content(config.get(field))
    if token is not None:
      kwargs[field] = token
  for field in _EXTRA_SPECIAL_FIELDS:
    extra = config.get(field)
    if isinstance(extra, list) and extra:
      kwargs["additional_special_tokens"] = [_token_content(t) for t in extra]
      break
  if "model_max_length" in config:
    kwargs["model_max_length"] = config["model_max_length"]
  kwargs["padding_side"] = padding_side or config.get("padding_side") or "left"
  template = _chat_template(folder, config)
  tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), chat_template=template, **kwargs)
  if template is not None and tokenizer.chat_template != template:
    tokenizer.chat_template = template
  return tokenizer


def check_tokenizer_fits(tokenizer, config) -> None:
  """Raises ValueError unless every token id of `tokenizer` indexes a row of the model's embedding.

  `config` is a `ModelConfig` or anything with `.config` (a `CausalLM`). Checkpoints often pad the embedding beyond
  the tokenizer (Qwen2.5: 151,936 rows, ~151,665 tokens), which is fine; the reverse would read out of bounds.
  """
  config = getattr(config, "config", config)
  vocab_size = getattr(config, "vocab_size", None)
  if vocab_size is None:
    raise TypeError(f"check_tokenizer_fits: expected a ModelConfig or CausalLM, got {type(config).__name__}.")
  num_tokens = len(tokenizer)
  if num_tokens > vocab_size:
    raise ValueError(f"tokenizer has {num_tokens} tokens (ids up to {num_tokens - 1}) but the model's vocab_size "
                     f"(embedding rows) is {vocab_size}; use the tokenizer that belongs to this checkpoint.")
