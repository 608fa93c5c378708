"""HF interop: parity of our logits with transformers' PyTorch models, save_hf round trips, loader errors, tokenizers.

Checkpoints are written by transformers itself (tests/hf_fixtures.py), so the reference is independent of our code.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from capo_jax.models import CausalLM, ModelConfig, hf_name, load_hf, save_hf
from capo_jax.tokenization import check_tokenizer_fits, load_tokenizer
from tests.hf_fixtures import (CHAT_TEMPLATE, build_tiny_tokenizer, load_torch_model, write_tiny_hf_checkpoint,
                               write_tiny_tokenizer)

# Left-padded batch: rows with 0, 3 and 1 pads.
TOKENS = np.array([[3, 77, 12, 101, 45, 9, 127, 60],
                   [0, 0, 0, 18, 5, 99, 23, 71],
                   [0, 64, 2, 31, 88, 14, 7, 120]], np.int64)
MASK = (np.arange(8)[None, :] >= np.array([[0], [3], [1]])).astype(np.int64)
REAL = MASK.astype(bool)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)


def torch_forward(path):
  """transformers' logits and final normed hidden states on the padded batch (positions as generate() sets them)."""
  model = load_torch_model(path)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(TOKENS), attention_mask=torch.from_numpy(MASK),
                position_ids=torch.from_numpy(POSITIONS), output_hidden_states=True)
  return out.logits.numpy(), out.hidden_states[-1].numpy()


def our_forward(model: CausalLM):
  out = jax.jit(lambda m, t, a: m(t, attention_mask_bt=a))(model, jnp.asarray(TOKENS, jnp.int32),
                                                           jnp.asarray(MASK, jnp.int32))
  return np.asarray(out.logits), np.asarray(out.hidden)


VARIANTS = {
    "qwen2-untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    # Llama style: no biases, head_dim ≠ hidden/heads, MQA (1 KV head), read from a sharded checkpoint.
    "llama-sharded": dict(model_type="llama", head_dim=16, num_kv_heads=1, max_shard_size="20KB"),
    # Llama with attention_bias: biases on q/k/v and on o_proj.
    "llama-bias-tied": dict(model_type="llama", attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_and_save_hf_round_trips(variant, tmp_path):
  kwargs = VARIANTS[variant]
  ckpt = write_tiny_hf_checkpoint(tmp_path / "hf", seed=1, **kwargs)
  if "max_shard_size" in kwargs:
    assert (ckpt / "model.safetensors.index.json").exists()
  ref_logits, ref_hidden = torch_forward(ckpt)

  model = load_hf(ckpt)
  cfg = model.config
  assert cfg.model_type == kwargs["model_type"] and cfg.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
  assert cfg.attention_bias == (kwargs["model_type"] == "qwen2" or kwargs.get("attention_bias", False))
  assert cfg.attention_out_bias == kwargs.get("attention_bias", False)
  logits, hidden = our_forward(model)
  assert np.abs(ref_logits[REAL]).max() > 0.1  # the comparison below is not between two near-zero arrays
  np.testing.assert_allclose(logits[REAL], ref_logits[REAL], atol=1e-4, rtol=0)
  np.testing.assert_allclose(hidden[REAL], ref_hidden[REAL], atol=1e-4, rtol=0)

  # save_hf → transformers (AutoConfig + AutoModelForCausalLM) → the same logits; the sharded variant saves shards.
  import transformers
  sharded = "max_shard_size" in kwargs
  out_dir = save_hf(model, tmp_path / "ours", max_shard_bytes=20_000 if sharded else None)
  hf_config = transformers.AutoConfig.from_pretrained(str(out_dir))
  assert type(hf_config).__name__ == {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}[kwargs["model_type"]]
  assert hf_config.rope_parameters["rope_theta"] == 10000.0
  saved_logits, _ = torch_forward(out_dir)
  np.testing.assert_allclose(saved_logits[REAL], logits[REAL], atol=1e-4, rtol=0)
  if sharded:
    shard_files = sorted(out_dir.glob("model-*-of-*.safetensors"))
    assert len(shard_files) > 2 and not (out_dir / "model.safetensors").exists()
    assert all(f.stat().st_size < 20_000 + 4_096 for f in shard_files)  # tensors + safetensors header
    saved = {k: v for f in shard_files for k, v in load_file(f).items()}
  else:
    saved = load_file(out_dir / "model.safetensors")
  assert ("lm_head.weight" in saved) != cfg.tie_word_embeddings
  # Block i of every stacked parameter is HF's layer i, as written by transformers itself.
  reference = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(f).items()}
  assert set(saved) == set(reference) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
  for name in saved:
    np.testing.assert_array_equal(saved[name], reference[name], err_msg=name)
  reloaded = load_hf(out_dir)
  for a, b in zip(jax.tree.leaves(nnx.state(reloaded)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, b)


def test_hf_name_maps_block_i_of_a_stacked_parameter():
  assert hf_name(("layers", "mlp", "up_proj", "kernel"), 3) == ("model.layers.3.mlp.up_proj.weight", True)
  assert hf_name(("layers", "self_attn", "q_proj", "bias"), 0) == ("model.layers.0.self_attn.q_proj.bias", False)
  assert hf_name(("embed", "embedding")) == ("model.embed_tokens.weight", False)
  with pytest.raises(ValueError, match="pass layer=<block index>"):
    hf_name(("layers", "mlp", "up_proj", "kernel"))
  with pytest.raises(ValueError, match="pass layer=<block index>"):
    hf_name(("norm", "weight"), 0)
  with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
    save_hf(CausalLM(ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                                 num_kv_heads=1), rngs=nnx.Rngs(0)), "/nonexistent", max_shard_bytes=0)


def test_legacy_top_level_rope_theta_and_bfloat16_load(tmp_path):
  ckpt = write_tiny_hf_checkpoint(tmp_path / "hf", rope_theta=500.0)
  config = json.loads((ckpt / "config.json").read_text())
  del config["rope_parameters"]
  config.update(rope_theta=500.0, rope_scaling=None, torch_dtype="bfloat16")  # as in Qwen2.5's config.json
  (ckpt / "config.json").write_text(json.dumps(config))
  model = load_hf(ckpt, dtype="bfloat16")
  assert model.config.rope_theta == 500.0
  assert model.config.param_dtype == "bfloat16" and model.embed.embedding[...].dtype == jnp.bfloat16
  f32 = load_hf(ckpt, param_dtype="float32")
  np.testing.assert_array_equal(model.embed.embedding[...], f32.embed.embedding[...].astype(jnp.bfloat16))
  logits, _ = our_forward(model)
  ref, _ = our_forward(f32)
  assert logits.dtype == np.float32
  assert np.abs(logits[REAL] - ref[REAL]).max() < 0.1


def _rewrite_weights(ckpt: pathlib.Path, edit):
  tensors = load_file(ckpt / "model.safetensors")
  edit(tensors)
  save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _edit_config(ckpt: pathlib.Path, **changes):
  config = json.loads((ckpt / "config.json").read_text())
  config.update(changes)
  (ckpt / "config.json").write_text(json.dumps(config))


def test_bad_checkpoints_raise_one_clear_error(tmp_path):
  base = write_tiny_hf_checkpoint(tmp_path / "base")

  def fresh(name):
    return pathlib.Path(shutil.copytree(base, tmp_path / name))

  ckpt = fresh("missing")
  _rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf(ckpt)

  ckpt = fresh("shape")
  _edit_config(ckpt, intermediate_size=48)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[64, 32\].*\[48, 32\]"):
    load_hf(ckpt)

  ckpt = fresh("extra")  # biases in the weights but a config (llama, attention_bias=false) that has none
  _edit_config(ckpt, model_type="llama")
  with pytest.raises(ValueError, match=r"unexpected tensors.*self_attn\.k_proj\.bias"):
    load_hf(ckpt)

  ckpt = fresh("type")
  _edit_config(ckpt, model_type="gpt2")
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    load_hf(ckpt)

  ckpt = fresh("noconfig")
  (ckpt / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    load_hf(ckpt)

  ckpt = fresh("noweights")
  (ckpt / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="model.safetensors"):
    load_hf(ckpt)

  with pytest.raises(ValueError, match="not a folder"):
    load_hf(tmp_path / "does-not-exist")


def test_save_hf_refuses_non_empty_folder_and_writes_tokenizer(tmp_path):
  model = CausalLM(ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                               num_kv_heads=2, tie_word_embeddings=True), rngs=nnx.Rngs(0))
  target = tmp_path / "out"
  target.mkdir()
  (target / "notes.txt").write_text("keep me?")
  with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
    save_hf(model, target)
  assert not (target / "model.safetensors").exists()
  tok = build_tiny_tokenizer()
  save_hf(model, target, tokenizer=tok, overwrite=True)
  reloaded = load_hf(target)
  np.testing.assert_array_equal(reloaded.embed.embedding[...], model.embed.embedding[...])
  tok2 = load_tokenizer(target)
  assert tok2.encode("x=1+2\n") == tok.encode("x=1+2\n")
  check_tokenizer_fits(tok2, reloaded)


def test_load_tokenizer_special_tokens_and_chat_template(tmp_path):
  folder = write_tiny_tokenizer(tmp_path / "tok")
  tok = load_tokenizer(folder)
  assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
  assert tok.padding_side == "left"
  text = "Compute 12*3.\nAnswer: 36"
  ids = tok.encode(text)
  # Character-level vocab: ids are 3 + position of the char in string.printable (space is printable[94]).
  assert ids[:3] == [3 + 38, 3 + 24, 3 + 22] and len(ids) == len(text)
  assert tok.decode(ids) == text
  messages = [{"role": "user", "content": "1+1?"}]
  prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert prompt == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
  prompt_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
  # <|im_start|> (1) and <|im_end|> (2) are single special tokens; "\n" is the last character id (98).
  assert prompt_ids == [1, *tok.encode("user\n1+1?"), 2, 98, 1, *tok.encode("assistant\n")]
  batch = tok(["ab", "abcd"], padding=True)
  assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1]

  # The template stored inline in tokenizer_config.json (older transformers) is found too.
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "chat_template.jinja").unlink()
  (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
  assert load_tokenizer(folder).apply_chat_template(messages, tokenize=False) == "<|im_start|>user\n1+1?<|im_end|>\n"

  (folder / "tokenizer.json").unlink()
  with pytest.raises(ValueError, match="tokenizer.json not found"):
    load_tokenizer(folder)


def test_tokenizer_larger_than_embedding_is_rejected():
  tok = build_tiny_tokenizer()  # 99 tokens
  small = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match="tokenizer has 99 tokens.*vocab_size.*64"):
    check_tokenizer_fits(tok, small)
  check_tokenizer_fits(tok, small.replace(vocab_size=99))


def test_load_hf_places_blocks_with_given_shardings(tmp_path):
  """On 2 (forced host) devices, stacked [L, in, out] kernels sharded along the layer axis (one HF tensor per device)
  or along either matrix axis (blocks of every layer's transposed memory-mapped tensor), from a sharded checkpoint,
  equal an unsharded load and the checkpoint's own per-layer tensors."""
  ckpt = write_tiny_hf_checkpoint(tmp_path / "hf", model_type="qwen2", max_shard_size="20KB")
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from flax import nnx
      from safetensors import safe_open
      from capo_jax.models import load_hf
      mesh = Mesh(np.array(jax.devices()), ("x",))
      def shardings(path):
        if path[-1] == "kernel":
          spec = {{"q_proj": P(None, None, "x"), "up_proj": P(None, None, "x"), "k_proj": P("x")}}
          return NamedSharding(mesh, next((v for k, v in spec.items() if k in path), P(None, "x", None)))
        return NamedSharding(mesh, P("x")) if path == ("embed", "embedding") else None
      sharded, plain = load_hf({str(ckpt)!r}, shardings=shardings), load_hf({str(ckpt)!r})
      q = sharded.layers.self_attn.q_proj.kernel[...]
      assert q.shape == (2, 32, 32) and len(q.sharding.device_set) == 2
      assert sharded.layers.mlp.down_proj.kernel[...].sharding.spec == P(None, "x", None)
      assert sharded.layers.self_attn.k_proj.kernel[...].sharding.spec == P("x")
      for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      import json, pathlib
      folder = pathlib.Path({str(ckpt)!r})
      files = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
      name = "model.layers.1.self_attn.q_proj.weight"
      with safe_open(folder / files[name], framework="numpy") as f:
        np.testing.assert_array_equal(np.asarray(q)[1], f.get_tensor(name).T)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
