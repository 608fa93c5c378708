"""One RL step's data: prompts → sampled completions → rewards → advantages → a learner ``SequenceBatch``.

``Rollout`` holds the jitted pieces (the reference policy's log-probs take the reference parameters as an argument)
and turns the step's problems into the fixed-shape batch the learner consumes, together with the texts, rewards and
counts the host loop logs.

Behaviour log-probs. The batch's ``old_logprobs_bn`` are the log-probabilities of the sampled tokens under the
distribution the sampler drew them from. The sampler reports logπ_T(a) = log softmax(z / T)[a] of the untruncated
tempered policy; with a top-k or top-p filter the token was drawn from that policy renormalised over the kept set K,

    logπ_sampler(a) = logπ_T(a) − log Σ_{v ∈ K} π_T(v)      (``filtered_log_mass``: the second term, per position)

so the learner's agreement metrics and mismatch corrections (``capo_jax.learner.sampler_agreement``,
``mismatch_correction``) compare it with the distribution that produced the data. Without a filter the sampler's
values are used as they are.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capo_jax import advantages as adv_lib
from capo_jax import learner
from capo_jax import sharding
from capo_jax import sequences
from capo_jax.config import LossConfig, RolloutConfig
from capo_jax.evaluation import decode
from capo_jax.sampling.logits_processing import process_logits, scale_logits
from capo_jax.sampling.sampler import pad_prompts, sample

# Positions per chunk of ``filtered_log_mass`` are chosen so that one chunk's logits stay under this many floats.
_LOGITS_CHUNK_FLOATS = 1 << 25


class RolloutResult(NamedTuple):
  batch: learner.SequenceBatch
  rewards_b: np.ndarray  # float32 [B]
  texts: list[str]  # this process's rows' completions (every row on one process)
  row_weight_b: np.ndarray  # float32 [B]: 0 for the rows of groups dropped by dynamic sampling
  num_completion_tokens: int
  seconds: float


def keep_informative_groups(rewards_b: np.ndarray, group_size: int) -> np.ndarray:
  """Dynamic sampling's row weights: 1 for the rows of groups whose rewards differ, 0 for constant groups."""
  groups = np.asarray(rewards_b).reshape(-1, group_size)
  return np.repeat((groups.max(1) > groups.min(1)).astype(np.float32), group_size)


def filtered_log_mass(graphdef: nnx.GraphDef, params, tokens_bs: jax.Array, attention_mask_bs: jax.Array,
                      completion_length: int, *, temperature: float, top_k: int, top_p: float,
                      prompt_group_size: int = 1) -> jax.Array:
  """``[B, N]`` float32 log Σ_{v ∈ K_t} π_T(v): the log of the probability mass the sampler's top-k/top-p filter kept
  at each completion position (≤ 0; 0 without a filter), from the model's completion logits.

  Equal to LSE(process_logits(z_t)) − LSE(z_t / T) (``capo_jax.sampling.process_logits``: the same shift, filters and
  ties as the sampler), formed a chunk of positions at a time so the ``[B, N, V]`` logits are never stored.
  """
  hidden_bnh, w_vh, _ = learner.completion_hidden(graphdef, params, tokens_bs, attention_mask_bs, completion_length,
                                                  prompt_group_size=prompt_group_size)
  rows, n, h = hidden_bnh.shape
  vocab = w_vh.shape[0]
  chunk = max(1, min(n, _LOGITS_CHUNK_FLOATS // max(rows * vocab, 1)))
  num_chunks = -(-n // chunk)
  padded = jnp.pad(hidden_bnh, ((0, 0), (0, num_chunks * chunk - n), (0, 0)))
  chunks_cbkh = jnp.transpose(padded.reshape(rows, num_chunks, chunk, h), (1, 0, 2, 3))

  def one_chunk(hidden_bkh):
    logits = jnp.einsum("bkh,vh->bkv", hidden_bkh, w_vh.astype(hidden_bkh.dtype),
                        preferred_element_type=jnp.float32).reshape(rows * chunk, vocab)
    kept = jax.nn.logsumexp(process_logits(logits, temperature, top_k, top_p), axis=-1)
    full = jax.nn.logsumexp(scale_logits(logits, temperature), axis=-1)
    return jnp.minimum(kept - full, 0.0).reshape(rows, chunk)

  out_cbk = jax.lax.map(one_chunk, chunks_cbkh)
  return jnp.transpose(out_cbk, (1, 0, 2)).reshape(rows, num_chunks * chunk)[:, :n]


class Rollout:
  """Samples ``group_size`` completions of each problem with the current policy and builds the learner batch.

  With ``mesh`` the sampler runs on it (the batch's arrays come back split by rows); with several processes each
  decodes and scores its own rows (``capo_jax.sharding.process_rows``) and the rewards are gathered, so that every
  process computes the same advantages. ``prompt_group_size`` (the group size, or 1) is handed to the forward passes
  over the batch (reference log-probs, filtered mass; ``capo_jax.learner.completion_hidden``)."""

  def __init__(self, graphdef: nnx.GraphDef, task: Any, tokenizer, rollout: RolloutConfig, loss: LossConfig, *,
               track_kl: bool = True, mesh: jax.sharding.Mesh | None = None, prompt_group_size: int = 1,
               decode_weights: str = "auto"):
    self.graphdef, self.task, self.tokenizer, self.cfg, self.mesh = graphdef, task, tokenizer, rollout, mesh
    self.decode_weights = decode_weights
    self.with_reference = loss.kl_coef > 0 or track_kl
    n_new, temperature = rollout.max_new_tokens, rollout.temperature
    self._reference_logprobs = jax.jit(lambda ref_params, tokens, mask: learner.completion_logprobs(
        graphdef, ref_params, tokens, mask, n_new, temperature=temperature, prompt_group_size=prompt_group_size)[0])
    self.filtering = rollout.top_k > 0 or rollout.top_p < 1.0
    self._filtered_log_mass = jax.jit(lambda params, tokens, mask: filtered_log_mass(
        graphdef, params, tokens, mask, n_new, temperature=temperature, top_k=rollout.top_k, top_p=rollout.top_p,
        prompt_group_size=prompt_group_size))
    estimator, group_size = loss.advantage_estimator, rollout.group_size
    self._advantages = jax.jit(lambda r: adv_lib.compute_advantages(r, group_size, estimator))

  def __call__(self, params, ref_params, problems: Sequence[Any], key: jax.Array) -> RolloutResult:
    cfg, tok = self.cfg, self.tokenizer
    t0 = time.time()
    prompts = sequences.encode_prompts(tok, [p.prompt for p in problems])
    p_tokens, p_mask = pad_prompts(prompts, pad_id=tok.pad_token_id, max_length=cfg.max_prompt_length)
    out = sample(self.graphdef, params, p_tokens, p_mask, key, max_new_tokens=cfg.max_new_tokens,
                 num_samples=cfg.group_size, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                 stop_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, mesh=self.mesh, weights=self.decode_weights)
    completion_mask = sharding.to_host(out.completion_mask)
    num_rows = len(completion_mask)
    # This process's rows: every row on one process; with several, each scores its own (whole groups).
    rows = slice(0, num_rows) if self.mesh is None else sharding.process_rows(self.mesh, num_rows)
    texts = decode(tok, sharding.to_host(out.completion_tokens)[rows], completion_mask[rows])
    targets = [p for p in problems for _ in range(cfg.group_size)][rows]
    rewards = np.asarray(self.task.score(texts, targets), np.float32)
    if rewards.shape != (len(texts),):
      raise ValueError(f"{type(self.task).__name__}.score returned shape {rewards.shape} for {len(texts)} "
                       "completions; it must return one float per completion.")
    if not np.all(np.isfinite(rewards)):
      raise ValueError(f"{type(self.task).__name__}.score returned {int(np.sum(~np.isfinite(rewards)))} non-finite "
                       "reward(s); a task's reward must be a finite float for every completion.")
    rewards = sharding.gather_rows(rewards, rows, num_rows)
    advantages = self._advantages(jnp.asarray(rewards))
    if self.mesh is not None:
      advantages = np.asarray(advantages)  # placed on the mesh with the rest of the batch by the learner step
    row_weight = (keep_informative_groups(rewards, cfg.group_size) if cfg.dynamic_sampling
                  else np.ones(len(rewards), np.float32))
    tokens = jnp.concatenate([out.prompt_tokens, out.completion_tokens], axis=1)
    attention = jnp.concatenate([out.prompt_mask, out.completion_mask], axis=1)
    ref_lp = (self._reference_logprobs(ref_params, tokens, attention) if self.with_reference
              else jnp.zeros_like(out.logprobs))
    behaviour_lp = out.logprobs
    if self.filtering:
      log_mass = self._filtered_log_mass(params, tokens, attention)
      behaviour_lp = jnp.where(out.completion_mask > 0, out.logprobs - log_mass, out.logprobs)
    batch = learner.SequenceBatch(tokens, attention, out.completion_mask, advantages, behaviour_lp, ref_lp,
                                  jnp.asarray(row_weight))
    return RolloutResult(batch, rewards, texts, row_weight, int(completion_mask.sum()), time.time() - t0)
