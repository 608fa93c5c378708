"""Tests of capo_jax.sampling: logits processing (statistical), and the jitted KV-cache sampler end to end."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capo_jax.models import CausalLM, ModelConfig, apply
from capo_jax.sampling import Sampler, bucket_length, pad_prompts, sample
from capo_jax.sampling import logits_processing as lp
from capo_jax.sampling import sampler as sampler_lib

# --------------------------------------------------------------------------------------------------------------------
# Logits processing: exact truncated distributions, and empirical frequencies of vectorised draws.
# --------------------------------------------------------------------------------------------------------------------

_NUM_DRAWS = 200_000
# Each empirical frequency is a mean of N Bernoulli(p) draws, std sqrt(p(1-p)/N) <= 1/(2 sqrt N) ~ 1.1e-3. We allow 5
# such standard deviations per category (a false-alarm rate < 1e-5 per category for a fresh seed; the seed is fixed,
# so the test is deterministic), and require *exact* zero counts on truncated tokens.
_SIGMAS = 5.0


def _reference_distribution(logits_v: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Independent float64 NumPy reference: temperature, then top-k, then top-p on the renormalised top-k mass."""
  s = logits_v.astype(np.float64) / temperature
  order = np.argsort(-s, kind="stable")
  k = len(s) if top_k <= 0 else min(top_k, len(s))
  kept = list(order[:k])
  q = np.exp(s[kept] - s[kept].max())
  q /= q.sum()
  if top_p < 1.0:
    cum, n = 0.0, 0
    while n < len(kept) and (n == 0 or cum < top_p):
      cum += q[n]
      n += 1
    kept = kept[:n]
  probs = np.zeros_like(s)
  w = np.exp(s[kept] - s[kept].max())
  probs[kept] = w / w.sum()
  return probs


def _empirical(logits_v, temperature, top_k, top_p, seed=0, num_draws=_NUM_DRAWS):
  """Frequencies of ``num_draws`` vectorised draws through ``sample_tokens`` (one jitted call)."""
  logits_nv = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (num_draws, len(logits_v)))
  draw = jax.jit(lp.sample_tokens)
  tokens_n = np.asarray(draw(jax.random.key(seed), logits_nv, temperature, top_k, top_p))
  return np.bincount(tokens_n, minlength=len(logits_v)) / num_draws


@pytest.mark.parametrize(
    "temperature, top_k, top_p, expected",
    [
        # Logits log([.4, .3, .2, .1]); each line's expected distribution is derived by hand.
        (1.0, 0, 1.0, [0.4, 0.3, 0.2, 0.1]),
        (1.0, 3, 1.0, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0.0]),
        # top-p 0.6: mass before .3 is .4 < .6 (kept), mass before .2 is .7 >= .6 (dropped).
        (1.0, 0, 0.6, [0.4 / 0.7, 0.3 / 0.7, 0.0, 0.0]),
        # T = 2 takes square roots: sqrt(.4), sqrt(.3), ... renormalised.
        (2.0, 0, 1.0, list(np.sqrt([0.4, 0.3, 0.2, 0.1]) / np.sqrt([0.4, 0.3, 0.2, 0.1]).sum())),
        # top-k 3 then top-p .5 on the renormalised {4/9, 3/9, 2/9}: mass before 3/9 is 4/9 < .5, before 2/9 is 7/9.
        (1.0, 3, 0.5, [4 / 7, 3 / 7, 0.0, 0.0]),
        # top-k 1 is greedy whatever the temperature.
        (5.0, 1, 1.0, [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_truncated_distribution_hand_derived(temperature, top_k, top_p, expected):
  """softmax(process_logits) equals the hand-derived truncated distribution, and so does the NumPy reference."""
  logits_v = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
  probs = np.asarray(jax.nn.softmax(lp.process_logits(jnp.asarray(logits_v)[None], temperature, top_k, top_p)))[0]
  np.testing.assert_allclose(probs, expected, atol=1e-6)
  np.testing.assert_allclose(_reference_distribution(logits_v, temperature, top_k, top_p), expected, atol=1e-12)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 6, 0.9), (0.5, 0, 0.95)],
)
def test_empirical_frequencies_match_truncated_distribution(temperature, top_k, top_p):
  """Draw 200k tokens from random logits over V = 12; every frequency is within 5σ of the reference probability
  (σ = sqrt(p(1-p)/N)) and truncated tokens are never drawn."""
  logits_v = np.random.default_rng(1).normal(size=12) * 1.5
  expected = _reference_distribution(logits_v, temperature, top_k, top_p)
  freq = _empirical(logits_v, temperature, top_k, top_p, seed=3)
  sigma = np.sqrt(expected * (1 - expected) / _NUM_DRAWS)
  # A floor of 1/N on the tolerance so a p ~ 1e-6 token that shows up once is not a failure.
  np.testing.assert_array_less(np.abs(freq - expected), _SIGMAS * sigma + 1.0 / _NUM_DRAWS)
  assert np.all(freq[expected == 0.0] == 0.0), "a truncated token was sampled"
  # Sanity of the test itself: the truncation really removes something for the truncating settings.
  if top_k > 0 or top_p < 1.0:
    assert np.sum(expected == 0.0) > 0


def test_sampling_parameters_are_traced_no_recompile():
  """Changing temperature/top-k/top-p does not retrace the jitted sampler step (they are traced values)."""
  traces = []

  @jax.jit
  def step(key, logits_bv, temperature, top_k, top_p):
    traces.append(None)
    return lp.sample_tokens(key, logits_bv, temperature, top_k, top_p)

  logits_bv = jnp.zeros((2, 7))
  for t, k, p in [(1.0, 0, 1.0), (0.5, 3, 0.9), (0.0, 1, 0.2), (2.0, 7, 1.0)]:
    step(jax.random.key(0), logits_bv, t, k, p).block_until_ready()
  assert len(traces) == 1


def test_greedy_temperature_zero_is_argmax_and_logprob_at_temperature():
  """T = 0 returns the argmax regardless of key; the reported log-prob is log softmax(z / T) at the token, T = 1 for
  greedy."""
  logits_bv = jnp.asarray(np.random.default_rng(0).normal(size=(5, 9)), jnp.float32)
  tokens_b = lp.sample_tokens(jax.random.key(7), logits_bv, 0.0, 0, 1.0)
  np.testing.assert_array_equal(tokens_b, np.argmax(np.asarray(logits_bv), axis=-1))
  for temperature, scale in [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0)]:
    got = lp.token_logprobs_at_temperature(logits_bv, tokens_b, temperature)
    z = np.asarray(logits_bv, np.float64) * scale
    want = z[np.arange(5), tokens_b] - np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tiny_temperatures_give_finite_logprobs_and_the_argmax():
  """|z| = 50 at T = 1e-37: z / T overflows float32 (5e38 > 3.4e38), yet the draw is the argmax and its log-prob is
  log 1 = 0, in a row whose logits are all negative too; the runner-up 1 below scores -1 / T = -1e37 (finite).
  Subnormal temperatures (below GREEDY_BELOW_TEMPERATURE) are greedy, scored at T = 1, on every backend."""
  logits_bv = jnp.asarray([[50.0, -50.0, 10.0, 49.0], [-60.0, -10.0, -30.0, -20.0]])
  tokens_b = lp.sample_tokens(jax.random.key(0), logits_bv, 1e-37)
  np.testing.assert_array_equal(tokens_b, [0, 1])
  np.testing.assert_array_equal(lp.token_logprobs_at_temperature(logits_bv, tokens_b, 1e-37), [0.0, 0.0])
  runner_up = lp.token_logprobs_at_temperature(logits_bv, jnp.asarray([3, 3]), 1e-37)
  np.testing.assert_allclose(runner_up, [-1e37, -1e38], rtol=1e-6)
  assert lp.GREEDY_BELOW_TEMPERATURE == np.finfo(np.float32).tiny
  subnormal = 1e-40
  np.testing.assert_array_equal(lp.sample_tokens(jax.random.key(1), logits_bv, subnormal), [0, 1])
  np.testing.assert_allclose(lp.token_logprobs_at_temperature(logits_bv, tokens_b, subnormal),
                             lp.token_logprobs_at_temperature(logits_bv, tokens_b, 1.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# The sampler end to end on a tiny random model, against full (uncached) forwards of the same model.
# --------------------------------------------------------------------------------------------------------------------

_VOCAB = 48
_MAX_NEW = 6
_G = 2
# Three prompts of lengths 3, 7, 5, left-padded to one bucket of 8 (pads of 5, 1 and 3).
_PROMPTS = [[5, 17, 3], [11, 4, 40, 25, 8, 31, 6], [30, 12, 7, 44, 1]]


@functools.lru_cache(maxsize=None)
def _model_split():
  # initializer_range 0.3 makes the logits peaked enough that greedy argmaxes are far from ties (cache vs no-cache
  # logits differ by ~1e-6).
  cfg = ModelConfig(vocab_size=_VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    rope_theta=10000.0, initializer_range=0.3)
  return nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))


def _prompts():
  return pad_prompts(_PROMPTS, pad_id=0, multiple=8)


@functools.lru_cache(maxsize=None)
def _full_logits_fn():
  graphdef, _ = _model_split()
  return jax.jit(lambda state, tokens, mask: apply(graphdef, state, tokens, attention_mask_bt=mask).logits)


def _full_forward(tokens_rt, mask_rt):
  """[R, T, V] logits of one uncached forward (causal, so position t depends on tokens <= t only)."""
  _, state = _model_split()
  return np.asarray(_full_logits_fn()(state, jnp.asarray(tokens_rt), jnp.asarray(mask_rt)), np.float64)


def _sample(key=0, **kw):
  graphdef, state = _model_split()
  tokens, mask = _prompts()
  kw.setdefault("max_new_tokens", _MAX_NEW)
  kw.setdefault("num_samples", _G)
  out = sample(graphdef, state, tokens, mask, jax.random.key(key), **kw)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 1)])
def test_greedy_equals_stepwise_argmax_of_full_forward(temperature, top_k):
  """Greedy decoding (T = 0, or top-k = 1) equals re-running the model without cache on the growing left-padded
  sequence and taking the argmax at the last position, for every row."""
  out = _sample(temperature=temperature, top_k=top_k)
  tokens, mask = _prompts()
  prompt_len = tokens.shape[1]
  rows = np.repeat(tokens, _G, axis=0)
  np.testing.assert_array_equal(out.prompt_tokens, rows)
  np.testing.assert_array_equal(out.prompt_mask, np.repeat(mask, _G, axis=0))
  # Fixed-length buffer prompt + N: the not-yet-generated tail (zeros) sits after the read position, so causality makes
  # it invisible, and one compiled forward serves every step.
  seq = np.concatenate([rows, np.zeros((len(rows), _MAX_NEW), np.int32)], axis=1)
  seq_mask = np.concatenate([out.prompt_mask, np.ones((len(rows), _MAX_NEW), np.int32)], axis=1)
  for n in range(_MAX_NEW):
    seq[:, prompt_len + n] = np.argmax(_full_forward(seq, seq_mask)[:, prompt_len + n - 1], axis=-1)
  np.testing.assert_array_equal(out.completion_tokens, seq[:, prompt_len:])
  assert out.completion_mask.all() and int(out.num_steps) == _MAX_NEW
  # Samples of the same prompt are identical under greedy decoding; different prompts are not.
  np.testing.assert_array_equal(out.completion_tokens[0::2], out.completion_tokens[1::2])
  assert not np.array_equal(out.completion_tokens[0], out.completion_tokens[2])


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_logprobs_equal_full_forward_log_softmax(temperature, top_k):
  """logprobs[r, n] = log softmax(z / T)[a_n] of a full forward over prompt + completion, at the position before
  a_n; untruncated even when top-k is on (it is the tempered policy a learner recomputes)."""
  out = _sample(key=3, temperature=temperature, top_k=top_k)
  prompt_len = out.prompt_tokens.shape[1]
  seq = np.concatenate([out.prompt_tokens, out.completion_tokens], axis=1)
  seq_mask = np.concatenate([out.prompt_mask, out.completion_mask], axis=1)
  z_rnv = _full_forward(seq, seq_mask)[:, prompt_len - 1:-1] / temperature
  logp_rnv = z_rnv - np.log(np.exp(z_rnv - z_rnv.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z_rnv.max(
      -1, keepdims=True)
  want = np.take_along_axis(logp_rnv, out.completion_tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(out.logprobs, want, atol=2e-5, rtol=0)
  assert out.logprobs.dtype == np.float32
  if top_k:
    # With top-k 5 every emitted token is among the 5 largest logits at its step.
    rank = np.sum(z_rnv > np.take_along_axis(z_rnv, out.completion_tokens[..., None], axis=-1), axis=-1)
    assert rank.max() < 5


def test_stop_tokens_rows_stop_independently():
  """Stop ids end each row at its first stop token: mask 1 up to and including it, pad_id and log-prob 0 after; the
  tokens before are those of the same key without stop ids; the loop exits early once every row is done."""
  free = _sample(key=5)
  # One stop id per row taken from the unstopped run at different columns, so rows stop at different steps.
  stop_ids = sorted({int(free.completion_tokens[r, c]) for r, c in enumerate([1, 3, 0, 2, 2, 1])})
  pad_id = 47
  out = _sample(key=5, stop_ids=stop_ids, pad_id=pad_id)
  is_stop = np.isin(free.completion_tokens, stop_ids)
  first_stop = np.argmax(is_stop, axis=1)
  assert is_stop.any(axis=1).all() and len(set(first_stop.tolist())) > 1
  cols = np.arange(_MAX_NEW)[None, :]
  want_mask = (cols <= first_stop[:, None]).astype(np.int32)
  np.testing.assert_array_equal(out.completion_mask, want_mask)
  np.testing.assert_array_equal(out.completion_tokens, np.where(want_mask == 1, free.completion_tokens, pad_id))
  np.testing.assert_allclose(out.logprobs, np.where(want_mask == 1, free.logprobs, 0.0), atol=1e-6)
  assert int(out.num_steps) == first_stop.max() + 1 < _MAX_NEW
  # Per-prompt stop sets ([P, E], -1 padded): only prompt 1's rows stop, at their first occurrence of its id.
  per_prompt = np.full((3, 1), -1)
  per_prompt[1, 0] = free.completion_tokens[2, 1]
  out_pp = _sample(key=5, stop_ids=per_prompt)
  stops_pp = free.completion_tokens == per_prompt[np.arange(6) // _G]
  for r in range(6):
    n_real = np.argmax(stops_pp[r]) + 1 if stops_pp[r].any() else _MAX_NEW
    assert out_pp.completion_mask[r].sum() == n_real, r
  assert out_pp.completion_mask[[0, 1, 4, 5]].all()
  # Per-row stop sets ([R, E]): only row 4 stops, at column 2 (its own token there, unless it occurred earlier).
  per_row = np.full((6, 1), -1)
  per_row[4, 0] = free.completion_tokens[4, 2]
  out_pr = _sample(key=5, stop_ids=per_row)
  want_len = np.full(6, _MAX_NEW)
  want_len[4] = np.argmax(free.completion_tokens[4] == per_row[4, 0]) + 1
  np.testing.assert_array_equal(out_pr.completion_mask.sum(axis=1), want_len)
  assert want_len[4] <= 3


def test_same_key_same_output_different_key_different_output_no_recompile():
  """Deterministic in the key; a new key changes the samples; new sampling parameters, stop ids and pad id reuse the
  compiled prefill/decode (one compile per shape bucket)."""
  a, b, c = _sample(key=11), _sample(key=11), _sample(key=12)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.completion_tokens, c.completion_tokens)
  sizes = (sampler_lib._prefill._cache_size(), sampler_lib._decode._cache_size())
  _sample(key=1, temperature=0.3, top_k=7, top_p=0.9, stop_ids=[1, 2, 3], pad_id=9)
  Sampler(*_model_split(), pad_id=3, stop_ids=[4])(*_prompts(), jax.random.key(2), max_new_tokens=_MAX_NEW,
                                                   num_samples=_G, temperature=1.5)
  assert (sampler_lib._prefill._cache_size(), sampler_lib._decode._cache_size()) == sizes


def test_end_to_end_first_token_frequencies_match_truncated_distribution():
  """Through the whole sampler (prefill, cache repeat, draw): 8192 samples of one prompt's first token follow
  softmax(top-p(top-k(z / T))) of the full-forward logits, within 5σ per token; truncated tokens never appear."""
  graphdef, state = _model_split()
  temperature, top_k, top_p, draws = 1.5, 6, 0.9, 8192
  tokens, mask = pad_prompts([_PROMPTS[1]], multiple=8)
  out = sample(graphdef, state, tokens, mask, jax.random.key(4), max_new_tokens=1, num_samples=draws,
               temperature=temperature, top_k=top_k, top_p=top_p)
  z_v = _full_forward(tokens, mask)[0, -1]
  expected = _reference_distribution(z_v, temperature, top_k, top_p)
  assert 2 <= np.sum(expected > 0) <= top_k  # both filters matter here
  freq = np.bincount(np.asarray(out.completion_tokens[:, 0]), minlength=_VOCAB) / draws
  sigma = np.sqrt(expected * (1 - expected) / draws)
  np.testing.assert_array_less(np.abs(freq - expected), _SIGMAS * sigma + 1.0 / draws)
  assert np.all(freq[expected == 0.0] == 0.0)


def test_bad_input_raises_clear_errors():
  graphdef, state = _model_split()
  tokens, mask = _prompts()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="LEFT-padded"):
    sample(graphdef, state, tokens, mask[:, ::-1], key, max_new_tokens=2)
  with pytest.raises(ValueError, match="no real token"):
    sample(graphdef, state, tokens, mask * np.array([[1], [0], [1]]), key, max_new_tokens=2)
  with pytest.raises(ValueError, match="token ids must lie"):
    sample(graphdef, state, tokens + _VOCAB, mask, key, max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="pad_id"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=2, pad_id=_VOCAB)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=0)
  with pytest.raises(ValueError, match="stop_ids"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=2, stop_ids=np.zeros((2, 1)))
  with pytest.raises(ValueError, match="shorter than the longest"):
    pad_prompts(_PROMPTS, max_length=4)
  for bad in (float("nan"), float("inf"), -0.5):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
      sample(graphdef, state, tokens, mask, key, max_new_tokens=2, temperature=bad)
  with pytest.raises(ValueError, match="cache_dtype must be None"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=2, cache_dtype="int8")
  with pytest.raises(ValueError, match="weights must be 'auto', 'gathered' or 'sharded', got 'replicated'"):
    sample(graphdef, state, tokens, mask, key, max_new_tokens=2, weights="replicated")


def test_pad_prompts_buckets():
  tokens, mask = pad_prompts([[1, 2], [3, 4, 5]], pad_id=9, multiple=4)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 3, 4, 5]])
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
  assert [bucket_length(n, 32) for n in (1, 32, 33, 64, 65)] == [32, 32, 64, 64, 96]


# Log-prob tolerances of half-precision decoding against the float32 model (stated in the ModelConfig docstring):
# a bfloat16 KV cache under float32 compute rounds keys/values once (8 mantissa bits); a bfloat16 model rounds every
# activation.
BF16_CACHE_LOGPROB_ATOL = 0.05
BF16_MODEL_LOGPROB_ATOL = 0.15


def test_cache_dtype_option():
  """At float32 parameters: cache_dtype="float32" is the default bit for bit; a bfloat16 cache (whose k/v really are
  bfloat16) keeps the greedy and the sampled tokens and moves log-probs by less than BF16_CACHE_LOGPROB_ATOL."""
  graphdef, state = _model_split()
  for temperature in (0.0, 1.0):
    default = _sample(key=3, temperature=temperature)
    f32_cache = _sample(key=3, temperature=temperature, cache_dtype="float32")
    bf16_cache = _sample(key=3, temperature=temperature, cache_dtype=jnp.bfloat16)
    for x, y in zip(default, f32_cache):
      np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(bf16_cache.completion_tokens, default.completion_tokens)
    err = np.abs(bf16_cache.logprobs - default.logprobs).max()
    assert 0 < err < BF16_CACHE_LOGPROB_ATOL, err
  tokens, mask = _prompts()
  decode_state = sampler_lib._prefill(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), sampler_lib.SamplingParams.create(),
      sampler_lib._stop_ids_array(None, 3, 1), jnp.asarray(0), num_samples=1, max_new_tokens=2,
      cache_dtype="bfloat16")
  assert decode_state.cache.k.dtype == decode_state.cache.v.dtype == jnp.bfloat16


def test_bfloat16_model_with_bfloat16_cache_decodes_like_float32():
  """The float32 test model cast to bfloat16 parameters and compute (cache in bfloat16 by default) greedily decodes
  the same tokens, with float32 log-probs within BF16_MODEL_LOGPROB_ATOL."""
  graphdef, state = _model_split()
  bf16_cfg = nnx.merge(graphdef, state).config.replace(dtype="bfloat16", param_dtype="bfloat16")
  bf16_graphdef, _ = nnx.split(CausalLM(bf16_cfg, rngs=nnx.Rngs(0)))
  bf16_state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
  tokens, mask = _prompts()
  out = jax.tree.map(np.asarray, sample(bf16_graphdef, bf16_state, tokens, mask, jax.random.key(0),
                                        max_new_tokens=_MAX_NEW, num_samples=_G, temperature=0.0))
  ref = _sample(key=0, temperature=0.0)
  np.testing.assert_array_equal(out.completion_tokens, ref.completion_tokens)
  assert out.logprobs.dtype == np.float32
  err = np.abs(out.logprobs - ref.logprobs).max()
  assert 0 < err < BF16_MODEL_LOGPROB_ATOL, err


def test_tiny_temperature_through_the_sampler_is_the_greedy_path_with_finite_logprobs():
  """T = 1e-37 samples (it is above GREEDY_BELOW_TEMPERATURE) yet draws the greedy tokens, each with the finite
  log-prob log 1 = 0, through prefill, cache repeat and decode."""
  greedy = _sample(key=2, temperature=0.0)
  tiny = _sample(key=2, temperature=1e-37)
  np.testing.assert_array_equal(tiny.completion_tokens, greedy.completion_tokens)
  np.testing.assert_array_equal(tiny.logprobs, np.zeros_like(tiny.logprobs))
