"""Helpers that write tiny HF checkpoints and tokenizers into a folder, for tests (import from any test file).

    from tests.hf_fixtures import write_tiny_hf_checkpoint, write_tiny_tokenizer
    ckpt = write_tiny_hf_checkpoint(tmp_path / "ckpt", model_type="qwen2", tie_word_embeddings=True)
    tok_dir = write_tiny_tokenizer(tmp_path / "tok")        # character-level, 99 tokens, ChatML template

(`python -m pytest` from the repo root, as `make test` runs it, puts the root on sys.path.)
`write_tiny_hf_checkpoint` needs torch (test extra) and writes with transformers' own `save_pretrained`, so it is an
independent reference for our loader. `write_tiny_tokenizer` needs only `tokenizers` + transformers' tokenizer
classes (no torch). Both are deterministic.
"""

from __future__ import annotations

import pathlib
import string

# Qwen2.5-style ChatML template (the part without tools).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Printable ASCII (95 chars incl. space) + newline: every ASCII text round-trips through encode/decode.
CHARACTERS = tuple(string.printable[:95]) + ("\n",)


def tiny_hf_config(model_type: str = "qwen2", *, tie_word_embeddings: bool = False, vocab_size: int = 128,
                   hidden_size: int = 32, intermediate_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                   num_kv_heads: int = 2, rope_theta: float = 10000.0, attention_bias: bool = False,
                   head_dim: int | None = None):
  """A transformers Qwen2Config / LlamaConfig of a really tiny model (attention_bias is used for llama only)."""
  import transformers

  kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6, max_position_embeddings=256)
  if head_dim is not None:
    kwargs["head_dim"] = head_dim
  if model_type == "qwen2":
    return transformers.Qwen2Config(**kwargs)
  if model_type == "llama":
    return transformers.LlamaConfig(attention_bias=attention_bias, **kwargs)
  raise ValueError(f"tiny_hf_config: model_type must be 'qwen2' or 'llama', got {model_type!r}.")


def write_tiny_hf_checkpoint(path, model_type: str = "qwen2", *, seed: int = 0, max_shard_size: str | None = None,
                             **config_kwargs) -> pathlib.Path:
  """Writes a random tiny HF causal LM (config.json + safetensors) with transformers+torch; returns the folder.

  Norm weights and biases, which HF initialises to exactly 1 and 0, are perturbed so that a loader that drops or
  swaps them is caught. `max_shard_size` (e.g. "20KB") makes a sharded checkpoint with an index file. Other keyword
  arguments go to `tiny_hf_config`.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  config = tiny_hf_config(model_type, **config_kwargs)
  cls = transformers.Qwen2ForCausalLM if model_type == "qwen2" else transformers.LlamaForCausalLM
  model = cls(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        param.add_(0.1 * torch.randn_like(param))
  folder = pathlib.Path(path)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(folder, **kwargs)
  return folder


def load_torch_model(path):
  """The HF PyTorch model of a checkpoint folder (float32, eager attention, eval mode), for parity references."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32, attn_implementation="eager").eval()


def build_tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
  """A character-level `PreTrainedTokenizerFast`: ids 0-2 are SPECIAL_TOKENS, then CHARACTERS (vocab 99).

  <|endoftext|> is eos and pad, as in Qwen2.5 base models.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
  backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("(?m)."), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 chat_template=chat_template, padding_side="left")


def write_tiny_tokenizer(path, chat_template: str | None = CHAT_TEMPLATE) -> pathlib.Path:
  """Saves `build_tiny_tokenizer()` (tokenizer.json, tokenizer_config.json, ...) into `path`; returns the folder."""
  folder = pathlib.Path(path)
  build_tiny_tokenizer(chat_template).save_pretrained(str(folder))
  return folder
