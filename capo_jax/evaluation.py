"""Held-out evaluation of a policy on any Task, as the paper evaluates: sampled pass@1 (avg@k), pass@k and greedy.

``Evaluator`` samples ``k`` completions of each held-out problem at the evaluation temperature/top-p, scores them with
the task's reward, and reports the mean correctness (pass@1 estimated from k samples), pass@k and, optionally, the
greedy (temperature 0) accuracy on the same problems, plus per-group breakdowns when the problems carry metadata
(level, subject).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from capo_jax import sequences
from capo_jax.config import EvalConfig
from capo_jax.eval_metrics import breakdown, pass_at_k
from capo_jax.sampling.sampler import pad_prompts, sample
from capo_jax.tasks.base import problem_metadata


def decode(tokenizer, tokens_rn, mask_rn) -> list[str]:
  """Completion texts of ``[R, N]`` token ids (positions outside the mask become padding, dropped as special)."""
  mask = np.asarray(mask_rn)
  tokens = np.asarray(tokens_rn) * mask + tokenizer.pad_token_id * (1 - mask)
  return tokenizer.batch_decode(tokens, skip_special_tokens=True)


class Evaluator:
  """Evaluates a policy on ``task.eval_problems(cfg.num_problems)``.

  Metrics: ``eval_accuracy`` (mean correctness of k samples per problem = pass@1), ``eval_pass_at_{k}``,
  ``eval_greedy_accuracy`` (with ``cfg.greedy``), ``eval_accuracy/<field>=<value>`` per metadata group, ``eval_s``.
  """

  def __init__(self, task: Any, tokenizer, cfg: EvalConfig, *, max_prompt_length: int, max_new_tokens: int):
    self.task, self.tokenizer, self.cfg = task, tokenizer, cfg
    self.max_new_tokens = max_new_tokens
    self.problems = list(task.eval_problems(cfg.num_problems))
    if not self.problems:
      raise ValueError(f"{type(task).__name__}.eval_problems({cfg.num_problems}) returned no problem.")
    prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in self.problems])
    self.tokens, self.mask = pad_prompts(prompts, pad_id=tokenizer.pad_token_id, max_length=max_prompt_length)

  def score(self, graphdef, params, key, num_samples: int, temperature: float, top_p: float) -> np.ndarray:
    """``[num_problems, num_samples]`` rewards of sampled completions."""
    tok = self.tokenizer
    out = sample(graphdef, params, self.tokens, self.mask, key, max_new_tokens=self.max_new_tokens,
                 num_samples=num_samples, temperature=temperature, top_p=top_p, stop_ids=[tok.eos_token_id],
                 pad_id=tok.pad_token_id)
    texts = decode(tok, out.completion_tokens, out.completion_mask)
    problems = [p for p in self.problems for _ in range(num_samples)]
    rewards = np.asarray(self.task.score(texts, problems), np.float64)
    return rewards.reshape(len(self.problems), num_samples)

  def __call__(self, graphdef, params, key: jax.Array) -> dict[str, float]:
    cfg = self.cfg
    t0 = time.time()
    sampled = self.score(graphdef, params, key, cfg.k, cfg.temperature, cfg.top_p)
    correct = sampled > 0.5
    metrics = {"eval_accuracy": float(sampled.mean()),
               f"eval_pass_at_{cfg.k}": float(np.mean(pass_at_k(correct, cfg.k)))}
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
