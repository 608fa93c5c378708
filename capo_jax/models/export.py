"""Export a policy as a folder a serving stack loads as is: weights, config, tokenizer and generation defaults.

`export_hf` writes, through `capo_jax.models.hf.save_hf`,

    config.json               the architecture (`ModelConfig.to_hf_dict`) plus the token ids serving reads from it:
                              bos_token_id / eos_token_id / pad_token_id, and torch_dtype beside dtype (older
                              transformers read only torch_dtype)
    model.safetensors         the parameters in their stored dtype
    tokenizer.json, tokenizer_config.json (+ chat_template.jinja where transformers writes it)
                              the tokenizer, with the chat template also inline in tokenizer_config.json, where
                              readers that predate chat_template.jinja look for it
    generation_config.json    bos/eos/pad ids, do_sample, and the sampling settings given (temperature, top_p, top_k,
                              max_new_tokens): what `transformers.GenerationConfig.from_pretrained` and vLLM take as
                              the defaults of a request

so that `transformers.AutoModelForCausalLM.from_pretrained(folder)` gives the logits of the exported policy and a
server samples it as it was evaluated. Plain json and safetensors: nothing here imports torch.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

from flax import nnx

from capo_jax.models.decoder import CausalLM
from capo_jax.models.hf import save_hf

__all__ = ["export_hf", "generation_config"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _token_id(tokenizer, name: str) -> int | None:
  value = getattr(tokenizer, f"{name}_token_id", None)
  return None if value is None else int(value)


def generation_config(tokenizer, *, stop_ids: Sequence[int] = (), temperature: float | None = None,
                      top_p: float | None = None, top_k: int | None = None,
                      max_new_tokens: int | None = None) -> dict[str, Any]:
  """The generation_config.json dict of a policy sampled with these settings.

  eos_token_id lists the tokenizer's eos first, then each of ``stop_ids`` not already in it (one int when there is
  only one). do_sample is False exactly for greedy decoding (temperature 0), which then omits temperature and top_p,
  as transformers expects of a greedy config. Settings left None are omitted (the server's defaults apply).

  Raises:
    ValueError: the tokenizer has no eos token and no ``stop_ids`` are given, or a setting is out of range.
  """
  eos_ids = [] if _token_id(tokenizer, "eos") is None else [_token_id(tokenizer, "eos")]
  eos_ids += [int(i) for i in stop_ids if int(i) not in eos_ids]
  if not eos_ids:
    raise ValueError("generation_config: the tokenizer has no eos_token and no stop_ids were given; a served "
                     "model would never stop. Set tokenizer.eos_token or pass stop_ids.")
  if temperature is not None and not temperature >= 0.0:
    raise ValueError(f"generation_config: temperature must be >= 0 (0: greedy), got {temperature!r}.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"generation_config: top_p must be in (0, 1], got {top_p!r}.")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
    raise ValueError(f"generation_config: top_k must be an int >= 0 (0: off), got {top_k!r}.")
  if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
    raise ValueError(f"generation_config: max_new_tokens must be a positive int, got {max_new_tokens!r}.")
  config: dict[str, Any] = {"eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
  for name in ("bos", "pad"):
    if _token_id(tokenizer, name) is not None:
      config[f"{name}_token_id"] = _token_id(tokenizer, name)
  greedy = temperature == 0.0
  config["do_sample"] = not greedy
  if not greedy:
    if temperature is not None:
      config["temperature"] = float(temperature)
    if top_p is not None:
      config["top_p"] = float(top_p)
    # transformers samples with top_k = 50 unless told otherwise; 0 turns the filter off explicitly.
    config["top_k"] = 0 if top_k is None else int(top_k)
  if max_new_tokens is not None:
    config["max_new_tokens"] = int(max_new_tokens)
  return config


def export_hf(model: CausalLM | nnx.GraphDef, path, tokenizer, *, params: nnx.State | None = None,
              stop_ids: Sequence[int] = (), temperature: float | None = None, top_p: float | None = None,
              top_k: int | None = None, max_new_tokens: int | None = None,
              overwrite: bool = False) -> pathlib.Path:
  """Writes the policy, its tokenizer and its generation defaults as a serving-ready HF folder (module docstring).

  Args:
    model: a `CausalLM`, or its graphdef when ``params`` is given (``nnx.split`` of a model, e.g. the trainer's
      ``TrainState.params``).
    path: the folder (created; must be empty unless ``overwrite``).
    tokenizer: the policy's transformers tokenizer (its chat template is carried over).
    params: the state to merge into the graphdef ``model``.
    stop_ids: extra ids that end a completion besides the tokenizer's eos (e.g. ``<|im_end|>`` of a chat model).
    temperature, top_p, top_k, max_new_tokens: the sampling defaults to record (e.g. the evaluation's T 0.6,
      top-p 0.95); None leaves each to the server.
    overwrite: replace the checkpoint in a non-empty folder.

  Returns:
    The folder.

  Raises:
    ValueError: a non-empty folder without ``overwrite``, a graphdef without ``params``, a tokenizer whose ids do not
      fit the embedding, or a bad sampling setting (see `generation_config`).
  """
  if params is not None:
    model = nnx.merge(model, params)
  if not isinstance(model, CausalLM):
    raise ValueError(f"export_hf: model must be a CausalLM, or its graphdef with params=...; got "
                     f"{type(model).__name__}.")
  if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
    raise ValueError("export_hf: pass the policy's transformers tokenizer (a served model needs tokenizer.json).")
  if len(tokenizer) > model.config.vocab_size:
    raise ValueError(f"export_hf: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                     f"{model.config.vocab_size} rows; export the tokenizer this model was trained with.")
  generation = generation_config(tokenizer, stop_ids=stop_ids, temperature=temperature, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max_new_tokens)
  folder = save_hf(model, path, tokenizer=tokenizer, overwrite=overwrite)
  missing = [name for name in _TOKENIZER_FILES if not (folder / name).exists()]
  if missing:
    raise ValueError(f"export_hf: {type(tokenizer).__name__}.save_pretrained wrote no {', '.join(missing)}; "
                     "export needs a fast (tokenizers-backed) tokenizer, e.g. capo_jax.tokenization.load_tokenizer.")

  config_file = folder / "config.json"
  config = json.loads(config_file.read_text())
  for name in ("bos", "eos", "pad"):
    if generation.get(f"{name}_token_id") is not None:
      config.setdefault(f"{name}_token_id", generation[f"{name}_token_id"])
  config.setdefault("torch_dtype", config.get("dtype", model.config.param_dtype))
  config_file.write_text(json.dumps(config, indent=2) + "\n")

  template = getattr(tokenizer, "chat_template", None)
  if template:
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    tokenizer_config["chat_template"] = template
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
  (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  return folder
