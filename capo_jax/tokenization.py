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
_SAVE_AGAIN = "save the tokenizer again (tokenizer.save_pretrained(folder)) or copy the folder again"
_JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _read_text(file: pathlib.Path) -> str:
  try:
    return file.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"load_tokenizer: {file} is not UTF-8 text (byte {e.start}: {e.reason}); {_SAVE_AGAIN}.") from None
  except OSError as e:
    raise ValueError(f"load_tokenizer: {file} cannot be read ({e.strerror or e}); {_SAVE_AGAIN}.") from None


def _read_json_object(file: pathlib.Path) -> dict:
  text = _read_text(file)
  try:
    value = json.loads(text)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, an int over the digit limit, deep nesting
    raise ValueError(f"load_tokenizer: {file} is not valid JSON ({e}); {_SAVE_AGAIN}.") from None
  if not isinstance(value, dict):
    raise ValueError(f"load_tokenizer: {file} holds a JSON {_json_type(value)}, not an object; {_SAVE_AGAIN}.")
  return value


def _token_content(value: Any, file: pathlib.Path, field: str) -> str | None:
  """tokenizer_config.json stores a special token as a string or as a serialized AddedToken dict."""
  content = value.get("content") if isinstance(value, dict) else value
  if content is not None and not isinstance(content, str):
    raise ValueError(f"load_tokenizer: {file} field {field!r} holds a JSON {_json_type(content)}, not a token (a "
                     f"string, or an object with a string 'content'); {_SAVE_AGAIN}.")
  return content


def _chat_template(folder: pathlib.Path, config: dict, config_file: pathlib.Path) -> tuple[str | None, pathlib.Path]:
  """The chat template and the file it comes from: tokenizer_config.json, chat_template.jinja, chat_template.json."""
  template, source = config.get("chat_template"), config_file
  if template is None and (folder / "chat_template.jinja").exists():
    source = folder / "chat_template.jinja"
    template = _read_text(source)
  if template is None and (folder / "chat_template.json").exists():
    source = folder / "chat_template.json"
    template = _read_json_object(source).get("chat_template")
  if isinstance(template, list):  # named templates [{"name": ..., "template": ...}]: use "default"
    if not all(isinstance(t, dict) for t in template):
      raise ValueError(f"load_tokenizer: {source} has a chat_template list whose items are not all "
                       f"{{\"name\": ..., \"template\": ...}} objects; {_SAVE_AGAIN}.")
    named = {t.get("name"): t.get("template") for t in template}
    template = named.get("default", next(iter(named.values()), None))
  if template is not None and not isinstance(template, str):
    raise ValueError(f"load_tokenizer: the chat template in {source} is a JSON {_json_type(template)}, not a "
                     f"Jinja string; {_SAVE_AGAIN}.")
  return template, source


def _check_template(template: str, source: pathlib.Path) -> None:
  """Compiles ``template`` as ``apply_chat_template`` does, so a template that is not valid Jinja fails here."""
  import jinja2
  try:  # the compiler apply_chat_template uses (with transformers' own {% generation %} tag and filters)
    from transformers.utils.chat_template_utils import _compile_jinja_template
  except ImportError:  # another transformers layout: the template is checked when it is first applied
    return

  try:
    _compile_jinja_template(template)
  except Exception as e:  # noqa: BLE001 — jinja2's TemplateError, and ValueError / RecursionError from its lexer.
    line = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) else ""
    reason = (e.message if isinstance(e, jinja2.TemplateError) and e.message else f"{type(e).__name__}: {e}")
    reason = reason.rstrip(".")
    raise ValueError(f"load_tokenizer: the chat template in {source} is not valid Jinja{line}: {reason}; fix the "
                     f"template or {_SAVE_AGAIN}.") from None


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
    ValueError: the folder or its tokenizer.json is missing, or a file of the folder is unreadable or malformed
      (tokenizer.json not a `tokenizers` serialization, tokenizer_config.json or chat_template.json not a JSON object,
      a special token that is not a string, a padding side other than "left"/"right", a chat template that is not
      valid Jinja); the message names the file and the fix.
  """
  from transformers import PreTrainedTokenizerFast

  folder = pathlib.Path(path)
  tokenizer_file = folder / "tokenizer.json"
  if not tokenizer_file.exists():
    raise ValueError(f"load_tokenizer: {tokenizer_file} not found; the folder must hold a fast-tokenizer "
                     "tokenizer.json (save one with tokenizer.save_pretrained).")
  if not tokenizer_file.is_file():
    raise ValueError(f"load_tokenizer: {tokenizer_file} is not a file; {_SAVE_AGAIN}.")
  config_file = folder / "tokenizer_config.json"
  config = _read_json_object(config_file) if config_file.exists() else {}

  kwargs = {}
  for field in _SPECIAL_TOKEN_FIELDS:
    token = _token_content(config.get(field), config_file, field)
    if token is not None:
      kwargs[field] = token
  for field in _EXTRA_SPECIAL_FIELDS:
    extra = config.get(field)
    if isinstance(extra, list) and extra:
      kwargs["additional_special_tokens"] = [_token_content(t, config_file, field) for t in extra]
      if None in kwargs["additional_special_tokens"]:
        raise ValueError(f"load_tokenizer: {config_file} field {field!r} holds a null token; {_SAVE_AGAIN}.")
      break
  if "model_max_length" in config:
    max_length = config["model_max_length"]
    if isinstance(max_length, bool) or not isinstance(max_length, (int, float)):
      raise ValueError(f"load_tokenizer: {config_file} field 'model_max_length' holds a JSON "
                       f"{_json_type(max_length)}, not a number; {_SAVE_AGAIN}.")
    kwargs["model_max_length"] = max_length
  kwargs["padding_side"] = padding_side or config.get("padding_side") or "left"
  if kwargs["padding_side"] not in ("left", "right"):
    source = "the padding_side argument" if padding_side else f"{config_file} field 'padding_side'"
    raise ValueError(f"load_tokenizer: {source} is {kwargs['padding_side']!r}; use 'left' or 'right'.")
  template, template_file = _chat_template(folder, config, config_file)
  if template:
    _check_template(template, template_file)
  try:
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), chat_template=template, **kwargs)
  except Exception as e:  # noqa: BLE001 — `tokenizers` raises a bare Exception for a malformed file.
    raise ValueError(f"load_tokenizer: {tokenizer_file} cannot be loaded ({type(e).__name__}: {e}); it must be a "
                     f"`tokenizers` serialization whose vocabulary holds the special tokens of {config_file.name}; "
                     f"{_SAVE_AGAIN}.") from None
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
