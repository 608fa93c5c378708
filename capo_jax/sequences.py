"""Host-side token bookkeeping: encoding prompts/targets and padding them into fixed-shape arrays.

Prompts are **left**-padded (``capo_jax.sampling.pad_prompts``: the sampler and the learner see the prompt's last
token at column ``P − 1`` and the completion from column ``P``); supervised targets are appended right after the
prompt and right-padded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from capo_jax.sampling.sampler import pad_prompts


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
  """Token ids of each prompt, with the tokenizer's special tokens (BOS) as the model was trained."""
  return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def encode_targets(tokenizer, targets: Sequence[str]) -> list[list[int]]:
  """Token ids of each target text followed by EOS (no BOS: it continues a prompt)."""
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos_token; set one (e.g. '<eos>') so completions can end.")
  return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] for t in targets]


def prompt_target_batch(
    prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], prompt_length: int, target_length: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded prompts followed by right-padded targets.

  Returns ``(tokens [B, P+N], attention_mask [B, P+N], target_mask [B, N])``; targets longer than N are cut (their
  EOS is lost, so keep N above the longest target).
  """
  p_tokens, p_mask = pad_prompts(prompts, pad_id=pad_id, max_length=prompt_length)
  t_tokens = np.full((len(targets), target_length), pad_id, np.int32)
  t_mask = np.zeros((len(targets), target_length), np.int32)
  for i, t in enumerate(targets):
    t = list(t)[:target_length]
    t_tokens[i, :len(t)] = t
    t_mask[i, :len(t)] = 1
  return (np.concatenate([p_tokens, t_tokens], 1), np.concatenate([p_mask, t_mask], 1), t_mask)
