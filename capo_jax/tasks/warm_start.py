"""The supervised warm start of a fresh policy on a task's worked solutions, cached as an HF folder.

A task whose problems carry a ``solution`` (ending in ``\\boxed{answer}``) can start RL from a small model trained
here by next-token likelihood of those solutions. The result is saved as an HF folder (config, safetensors,
tokenizer) under ``cache_dir/warmstart-<hash>``, the hash covering everything that determines it (the task, the
architecture, the warm-start settings, the sequence lengths, the seed), so reruns load it instead of training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import optax
from flax import nnx

from capo_jax import learner
from capo_jax import sequences
from capo_jax.config import PolicyConfig, RolloutConfig, WarmStartConfig
from capo_jax.models import CausalLM
from capo_jax.models.hf import load_hf, save_hf

# Supervised problems come from far along the training stream, away from the problems RL sees first.
WARM_START_OFFSET = 10**9


def warm_start_key(task: Any, policy: PolicyConfig, warm: WarmStartConfig, rollout: RolloutConfig, seed: int,
                   vocab_size: int) -> str:
  """The cache key: a hash of everything the warm-started weights depend on."""
  # The precision and remat fields enter only when not at their defaults, so that the keys of warm starts cached
  # before those fields existed stay valid.
  defaults = {f.name: f.default for f in dataclasses.fields(PolicyConfig)
              if f.name in ("dtype", "param_dtype", "remat")}
  policy_fields = {k: v for k, v in dataclasses.asdict(policy).items() if k not in defaults or v != defaults[k]}
  fields = {"task": repr(task), "policy": policy_fields, "warm_start": dataclasses.asdict(warm),
            "max_prompt_length": rollout.max_prompt_length, "max_new_tokens": rollout.max_new_tokens,
            "seed": seed, "vocab_size": vocab_size}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def atomic_dir(final: str) -> str:
  """A fresh temporary folder beside ``final``, to be renamed onto it once complete."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  return tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final))


def warm_start(task: Any, tokenizer, policy: PolicyConfig, warm: WarmStartConfig, rollout: RolloutConfig, *,
               seed: int, cache_dir: str, log: Callable[[str], None] = print) -> tuple[CausalLM, str]:
  """Trains (or loads from ``cache_dir``) a fresh ``policy`` on ``task``'s worked solutions; returns
  ``(model, folder)``. ``warm.steps = 0`` gives the random initialisation."""
  path = os.path.join(cache_dir, f"warmstart-{warm_start_key(task, policy, warm, rollout, seed, len(tokenizer))}")
  if os.path.exists(os.path.join(path, "model.safetensors")):
    log(f"warm start: cached {path}")
    return load_hf(path, dtype=policy.dtype, param_dtype=policy.param_dtype, remat=policy.remat), path
  log(f"warm start: {warm.steps} supervised steps → {path}")
  model = CausalLM(policy.architecture(len(tokenizer)), rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  steps = warm.steps
  if steps:
    schedule = optax.warmup_cosine_decay_schedule(0.0, warm.learning_rate, max(1, steps // 10), max(steps, 2),
                                                  warm.learning_rate * 0.1)
    opt = optax.adamw(schedule, weight_decay=0.0)
    opt_state = opt.init(params)
    sft_step = learner.make_sft_step(graphdef, opt, rollout.max_new_tokens)
    t0 = time.time()
    for i in range(steps):
      problems = task.train_problems(WARM_START_OFFSET + i * warm.batch_size, warm.batch_size)
      if not all(getattr(p, "solution", "") for p in problems):
        raise ValueError(f"{type(task).__name__} has problems without a worked `solution`, so it cannot warm-start a "
                         "fresh policy: set PolicyConfig.init_from to a trained model folder.")
      prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in problems])
      targets = sequences.encode_targets(tokenizer, [p.solution for p in problems])
      tokens, mask, target_mask = sequences.prompt_target_batch(prompts, targets, rollout.max_prompt_length,
                                                                rollout.max_new_tokens, tokenizer.pad_token_id)
      params, opt_state, nll = sft_step(params, opt_state, tokens, mask, target_mask)
      if i % 100 == 0 or i == steps - 1:
        log(f"warm start step {i}: nll {float(nll):.4f} ({time.time() - t0:.0f}s)")
  model = nnx.merge(graphdef, params)
  tmp = atomic_dir(path)
  save_hf(model, tmp, tokenizer=tokenizer, overwrite=True)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return model, path
