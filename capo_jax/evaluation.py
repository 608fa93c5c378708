"""Held-out evaluation of a policy on any Task, as the paper evaluates: sampled pass@1 (avg@k), pass@k and greedy.

``Evaluator`` samples ``k`` completions of each held-out problem at the evaluation temperature/top-p, scores them with
the task's reward, and reports the mean correctness (pass@1 estimated from k samples), pass@k and, optionally, the
greedy (temperature 0) accuracy on the same problems, plus per-group breakdowns when the problems carry metadata
(level, subject).

Two functions serve both the in-training ``Evaluator`` and the stand-alone ``python -m experiments.eval``:
``sample_completions`` (prompts → n decoded completions each) and ``evaluate_samples`` (a [P, n] correctness matrix →
pass@k, mean@k, maj@k and their per-group breakdown).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from capo_jax import sequences
from capo_jax import sharding
from capo_jax.config import EvalConfig
from capo_jax.eval_metrics import breakdown, maj_at_k, mean_at_k, pass_at_k
from capo_jax.sampling.sampler import pad_prompts, sample
from capo_jax.tasks.base import problem_metadata


def decode(tokenizer, tokens_rn, mask_rn) -> list[str]:
  """Completion texts of ``[R, N]`` token ids (positions outside the mask become padding, dropped as special)."""
  mask = sharding.to_host(mask_rn)
  tokens = sharding.to_host(tokens_rn) * mask + tokenizer.pad_token_id * (1 - mask)
  return tokenizer.batch_decode(tokens, skip_special_tokens=True)


def sample_completions(graphdef, params, tokenizer, tokens_pl, mask_pl, key: jax.Array, *, num_samples: int,
                       temperature: float, top_p: float, max_new_tokens: int,
                       stop_ids: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None,
                       decode_weights: str = "auto") -> list[str]:
  """The P·n decoded completions of P left-padded prompts, prompt-major (text ``p·n + j`` is sample j of prompt p).

  Args:
    graphdef, params: ``nnx.split`` of the policy.
    tokenizer: decodes the completions (special tokens dropped); its ``pad_token_id`` pads after a stop.
    tokens_pl, mask_pl: [P, L] left-padded prompt ids and their 0/1 mask (``capo_jax.sampling.pad_prompts``).
    key: PRNG key; the completions are a deterministic function of it.
    num_samples: n completions per prompt.
    temperature, top_p: the sampling distribution (temperature 0: greedy).
    max_new_tokens: the completion budget N.
    stop_ids: the ids that end a completion; default the tokenizer's eos.
    mesh: sample on this mesh (``capo_jax.sampling.sample``); every process gets every completion.
    decode_weights: the parameters' layout on ``mesh`` while decoding (``capo_jax.sampling.sample``'s ``weights``).
  """
  stop_ids = [tokenizer.eos_token_id] if stop_ids is None else list(stop_ids)
  out = sample(graphdef, params, tokens_pl, mask_pl, key, max_new_tokens=max_new_tokens, num_samples=num_samples,
               temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, mesh=mesh,
               weights=decode_weights)
  return decode(tokenizer, out.completion_tokens, out.completion_mask)


def evaluate_samples(correct_pn, ks: Sequence[int], *, answers_pn: Sequence[Sequence[Hashable | None]] | None = None,
                     groups: Mapping[str, Sequence[Hashable | None]] | None = None) -> dict[str, Any]:
  """Sampling metrics of a [P, n] correctness matrix, overall and per group (level, subject, …).

  For every k in ``ks`` (``capo_jax.eval_metrics``, each the mean over problems of a per-problem value):

    pass@k  = 1 − C(n − c, k) / C(n, k)   (unbiased, Chen et al. 2021; pass@1 = c / n, the mean of all n samples)
    mean@k  = (1/k) Σ_{j<k} correct[p, j]   (the first k samples)
    maj@k   = 1 iff the most frequent answer of the first k samples is correct   (only with ``answers_pn``)

  Args:
    correct_pn: [P, n] bool or 0/1 correctness of n samples of each of P problems.
    ks: the k's, each 1 <= k <= n.
    answers_pn: P rows of n answer keys (None: no answer) for maj@k, e.g. ``MathRewardDetails.answer_keys_b``
      reshaped to [P, n]; omitted: no maj@k.
    groups: {field: P labels}, e.g. ``{"level": ["1", "3", None, …]}``; each field's problems are split by label
      (a None label puts the problem in no group of that field).

  Returns:
    ``{"num_problems": P, "num_samples": n, "pass@k": …, "mean@k": …, "maj@k": …, "breakdown": {field: {label:
    {"num_problems": P_g, "pass@k": …, …}}}}``: the metrics in that order (pass@k for every k, then mean@k, then
    maj@k), floats in [0, 1]; labels are strings, in sorted order.

  Raises:
    ValueError: an empty ``ks``, a k outside [1, n], a matrix that is not [P, n] of 0/1, misaligned answers or labels.
  """
  correct_pn = np.asarray(correct_pn)
  if correct_pn.ndim != 2 or correct_pn.shape[0] == 0:
    raise ValueError(f"evaluate_samples needs a [num_problems, n] correctness matrix with at least one problem, got "
                     f"shape {correct_pn.shape}.")
  if not ks:
    raise ValueError("evaluate_samples needs at least one k, e.g. ks=(1,).")
  num_problems, n = correct_pn.shape
  ks = sorted(set(ks))
  per_problem: dict[str, np.ndarray] = {f"pass@{k}": pass_at_k(correct_pn, k) for k in ks}
  per_problem.update({f"mean@{k}": mean_at_k(correct_pn, k) for k in ks})
  if answers_pn is not None:
    per_problem.update({f"maj@{k}": maj_at_k(answers_pn, correct_pn, k) for k in ks})
  result: dict[str, Any] = {"num_problems": num_problems, "num_samples": n}
  result.update({name: float(values_p.mean()) for name, values_p in per_problem.items()})
  result["breakdown"] = {}
  for field, labels_p in (groups or {}).items():
    if isinstance(labels_p, str) or len(labels_p) != num_problems:
      raise ValueError(f"evaluate_samples: groups[{field!r}] needs one label per problem ({num_problems}), got "
                       f"{'a string' if isinstance(labels_p, str) else len(labels_p)}.")
    members = [p for p, label in enumerate(labels_p) if label is not None]
    if not members:
      continue
    labels = [str(labels_p[p]) for p in members]
    table: dict[str, dict[str, Any]] = {}
    for name, values_p in per_problem.items():
      for label, group in breakdown(values_p[members], labels).items():
        table.setdefault(label, {"num_problems": group.count})[name] = group.mean
    result["breakdown"][field] = table
  return result


class Evaluator:
  """Evaluates a policy on ``task.eval_problems(cfg.num_problems)``.

  With ``mesh`` the completions are sampled on it, and every process scores all of them (the same metrics
  everywhere). Metrics: ``eval_accuracy`` (mean correctness of k samples per problem = pass@1), ``eval_pass_at_{k}``,
  ``eval_greedy_accuracy`` (with ``cfg.greedy``), ``eval_accuracy/<field>=<value>`` per metadata group, ``eval_s``.
  """

  def __init__(self, task: Any, tokenizer, cfg: EvalConfig, *, max_prompt_length: int, max_new_tokens: int,
               mesh: jax.sharding.Mesh | None = None, decode_weights: str = "auto"):
    self.task, self.tokenizer, self.cfg, self.mesh = task, tokenizer, cfg, mesh
    self.decode_weights = decode_weights
    self.max_new_tokens = max_new_tokens
    self.problems = list(task.eval_problems(cfg.num_problems))
    if not self.problems:
      raise ValueError(f"{type(task).__name__}.eval_problems({cfg.num_problems}) returned no problem.")
    prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in self.problems])
    self.tokens, self.mask = pad_prompts(prompts, pad_id=tokenizer.pad_token_id, max_length=max_prompt_length)

  def score(self, graphdef, params, key, num_samples: int, temperature: float, top_p: float) -> np.ndarray:
    """``[num_problems, num_samples]`` rewards of sampled completions."""
    texts = sample_completions(graphdef, params, self.tokenizer, self.tokens, self.mask, key, num_samples=num_samples,
                               temperature=temperature, top_p=top_p, max_new_tokens=self.max_new_tokens,
                               mesh=self.mesh, decode_weights=self.decode_weights)
    problems = [p for p in self.problems for _ in range(num_samples)]
    rewards = np.asarray(self.task.score(texts, problems), np.float64)
    return rewards.reshape(len(self.problems), num_samples)

  def __call__(self, graphdef, params, key: jax.Array) -> dict[str, float]:
    cfg = self.cfg
    t0 = time.time()
    sampled = self.score(graphdef, params, key, cfg.k, cfg.temperature, cfg.top_p)
    correct = sampled > 0.5
    metrics = {"eval_accuracy": float(sampled.mean()),
               f"eval_pass_at_{cfg.k}": evaluate_samples(correct, (cfg.k,))[f"pass@{cfg.k}"]}
    if cfg.greedy:
      metrics["eval_greedy_accuracy"] = float(self.score(graphdef, params, key, 1, 0.0, 1.0).mean())
    per_problem = sampled.mean(axis=1)
    for field in sorted({f for p in self.problems for f in problem_metadata(p)}):
      values = [problem_metadata(p).get(field) for p in self.problems]
      for value, group in breakdown(per_problem, values).items():
        if value is not None:
          metrics[f"eval_accuracy/{field}={value}"] = float(group.mean)
    metrics["eval_s"] = time.time() - t0
    return metrics
