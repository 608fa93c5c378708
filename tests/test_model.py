"""Tests of the NNX decoder (capo_jax.models): KV-cache decoding, padding, hidden/logits contract, remat, dtypes.

Parity against HF transformers lives in tests/test_hf_interop.py.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capo_jax.models import CausalLM, ModelConfig, apply, apply_rope, init_cache, rms_norm, rope_cos_sin


# One jitted forward shared by the tests, so equal shapes compile once.
APPLY = jax.jit(apply, static_argnames=("return_logits",))


def forward(model, tokens_bt, mask_bt=None, **kw):
  graphdef, state = nnx.split(model)
  return APPLY(graphdef, state, jnp.asarray(tokens_bt), attention_mask_bt=None if mask_bt is None else
               jnp.asarray(mask_bt), **kw)


def tiny_config(**kw):
  base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              rope_theta=10000.0)
  base.update(kw)
  return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def tiny_model(**kw):
  model = CausalLM(tiny_config(**kw), rngs=nnx.Rngs(0))
  # Non-trivial norm weights and biases, so that a wrong mapping of any of them changes the numbers.
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# Three rows with 0, 2 and 5 left pads; 9 tokens each.
TOKENS = np.array([[5, 17, 3, 88, 41, 9, 60, 2, 33],
                   [0, 0, 11, 4, 73, 25, 8, 91, 6],
                   [0, 0, 0, 0, 0, 50, 12, 7, 64]], np.int32)
MASK = (np.arange(9)[None, :] >= np.array([[0], [2], [5]])).astype(np.int32)


def test_kv_cache_decode_matches_full_forward_with_left_padding():
  """Prefill 6 tokens, then decode 3 one at a time in a lax.scan over a donated cache: every step's logits equal
  those of one full forward over the same prefix (causality: position t of the full forward sees exactly t's prefix),
  and an explicit forward over the 7-token prefix agrees too."""
  model = tiny_model()
  graphdef, state = nnx.split(model)
  prefill_len, total = 6, TOKENS.shape[1]
  full = forward(model, TOKENS, MASK).logits

  @functools.partial(jax.jit, donate_argnums=(2,))
  def prefill_and_decode(state, tokens_bt, cache):
    out = apply(graphdef, state, tokens_bt[:, :prefill_len], attention_mask_bt=MASK[:, :prefill_len], cache=cache)

    def step(cache, token_b):
      step_out = apply(graphdef, state, token_b[:, None], cache=cache)
      return step_out.cache, step_out.logits[:, 0]

    cache, step_logits_tbv = jax.lax.scan(step, out.cache, tokens_bt[:, prefill_len:].T)
    return out.logits, jnp.swapaxes(step_logits_tbv, 0, 1), cache

  cache0 = model.init_cache(batch_size=3, max_length=12)
  prefill_logits, step_logits, cache = prefill_and_decode(state, TOKENS, cache0)
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(prefill_logits)[real[:, :prefill_len]],
                             np.asarray(full[:, :prefill_len])[real[:, :prefill_len]], atol=1e-5, rtol=0)
  np.testing.assert_allclose(step_logits, full[:, prefill_len:], atol=1e-5, rtol=0)
  assert int(cache.index) == total
  np.testing.assert_array_equal(cache.valid[:, :total], real)
  assert not cache.valid[:, total:].any()

  prefix = forward(model, TOKENS[:, :7], MASK[:, :7]).logits
  np.testing.assert_allclose(step_logits[:, 0], prefix[:, 6], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_real_token_logits():
  """A row padded on the left gives the same logits at its real tokens as the same row alone without pads:
  default positions restart at 0 on the first real token and pads are never attended to."""
  model = tiny_model()
  padded = forward(model, TOKENS, MASK).logits
  alone = forward(model, TOKENS[2:3, 5:]).logits
  np.testing.assert_allclose(padded[2, 5:], alone[0], atol=1e-5, rtol=0)
  # Changing the pad token ids changes nothing at real positions either.
  other_pads = np.where(MASK == 1, TOKENS, 42)
  repadded = forward(model, other_pads, MASK).logits
  np.testing.assert_allclose(np.asarray(repadded)[MASK == 1], np.asarray(padded)[MASK == 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_are_hidden_times_unembedding(tied):
  model = tiny_model(tie_word_embeddings=tied)
  out = forward(model, TOKENS, MASK)
  w_vh = model.unembedding()
  assert w_vh.shape == (97, 32)
  if tied:
    assert not hasattr(model, "lm_head")
    np.testing.assert_array_equal(w_vh, model.embed.embedding[...])
  else:
    np.testing.assert_array_equal(w_vh, model.lm_head.weight[...])
    assert not np.allclose(w_vh, model.embed.embedding[...])
  np.testing.assert_allclose(out.logits, np.einsum("bth,vh->btv", out.hidden, w_vh), atol=1e-5, rtol=1e-5)
  assert out.logits.dtype == jnp.float32 and out.cache is None
  no_logits = forward(model, TOKENS, MASK, return_logits=False)
  assert no_logits.logits is None
  np.testing.assert_array_equal(no_logits.hidden, out.hidden)


def test_remat_gives_the_same_loss_and_gradients():
  plain = tiny_model()
  graphdef, state = nnx.split(plain)
  remat_graphdef, _ = nnx.split(CausalLM(tiny_config(remat=True), rngs=nnx.Rngs(0)))

  def loss(graphdef, state):
    logits = apply(graphdef, state, TOKENS, attention_mask_bt=MASK).logits
    return jnp.mean(jax.nn.logsumexp(logits, -1) * MASK)

  # Each of the 2 layers is wrapped in a checkpoint (remat) primitive only when remat=True.
  count_remat = lambda g: str(jax.make_jaxpr(functools.partial(loss, g))(state)).count("remat")
  assert (count_remat(graphdef), count_remat(remat_graphdef)) == (0, 2)
  value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  l0, g0 = value_and_grad(graphdef, state)
  l1, g1 = value_and_grad(remat_graphdef, state)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0)) > 0


def test_bfloat16_params_and_compute_keep_float32_logits():
  f32 = tiny_model()
  bf16 = CausalLM(tiny_config(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(bf16)
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32))
  out = APPLY(graphdef, state, TOKENS, attention_mask_bt=MASK)
  assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(bf16)))
  ref = forward(f32, TOKENS, MASK).logits
  real = MASK == 1
  err = np.abs(np.asarray(out.logits)[real] - np.asarray(ref)[real]).max()
  assert err < 0.1, err  # bf16 rounding of a random tiny model; logits have scale ~1
  cache = init_cache(bf16.config, 3, 10)
  assert cache.k.dtype == jnp.bfloat16 and cache.k.shape == (2, 3, 10, 2, 8)


def test_rope_and_rms_norm_hand_values():
  # D=2: the single frequency is θ^0 = 1, so (1, 0) at position p rotates to (cos p, sin p).
  cos, sin = rope_cos_sin(jnp.array([[0, 1, 2]]), head_dim=2, theta=10000.0)
  x = jnp.broadcast_to(jnp.array([1.0, 0.0]), (1, 3, 1, 2))
  np.testing.assert_allclose(apply_rope(x, cos, sin)[0, :, 0],
                             [[1, 0], [np.cos(1), np.sin(1)], [np.cos(2), np.sin(2)]], atol=1e-6)
  # D=4, θ=100: frequencies 1 and 0.1; pairs are (x0, x2) and (x1, x3).
  cos, sin = rope_cos_sin(jnp.array([[3]]), head_dim=4, theta=100.0)
  y = apply_rope(jnp.array([1.0, 2.0, 0.0, 0.0]).reshape(1, 1, 1, 4), cos, sin)[0, 0, 0]
  np.testing.assert_allclose(y, [np.cos(3), 2 * np.cos(0.3), np.sin(3), 2 * np.sin(0.3)], atol=1e-6)
  # RMSNorm: x=(3,4), mean(x²)=12.5 → x/√12.5 = (0.8485, 1.1314), times w=(1,2).
  np.testing.assert_allclose(rms_norm(jnp.array([3.0, 4.0]), jnp.array([1.0, 2.0]), 0.0),
                             [3 / np.sqrt(12.5), 8 / np.sqrt(12.5)], rtol=1e-6)


def test_config_validation_and_hf_dict_parsing():
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny_config(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype"):
    tiny_config(dtype="float64")
  with pytest.raises(ValueError, match="model_type"):
    tiny_config(model_type="gpt2")
  hf = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
  with pytest.raises(ValueError, match="rope"):
    ModelConfig.from_hf_dict(hf)
  assert ModelConfig.from_hf_dict({**hf, "rope_theta": 500.0}).rope_theta == 500.0
  v5 = ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
  assert v5.rope_theta == 123.0 and v5.attention_bias and not v5.attention_out_bias and v5.head_dim is None
  with pytest.raises(ValueError, match="yarn"):
    ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}})
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    ModelConfig.from_hf_dict({**hf, "model_type": "mistral", "rope_theta": 1.0})
  with pytest.raises(ValueError, match="'hidden_size'"):
    ModelConfig.from_hf_dict({k: v for k, v in hf.items() if k != "hidden_size"} | {"rope_theta": 1.0})
  llama = ModelConfig.from_hf_dict({**hf, "model_type": "llama", "rope_theta": 1.0, "head_dim": 6})
  assert not llama.attention_bias and not llama.attention_out_bias and llama.resolved_head_dim == 6
  assert ModelConfig.from_hf_dict(llama.to_hf_dict()) == llama


def test_importing_models_does_not_import_torch_or_tensorflow():
  code = ("import sys, capo_jax.models, capo_jax.tokenization; "
          "bad = [m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
