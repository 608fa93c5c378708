"""Prompt text for a math question: the tokenizer's chat template when it has one, else a plain format.

With a chat template (Qwen2.5-Math, Llama-3 instruct, …) the prompt is

  tokenizer.apply_chat_template([{"role": "system", "content": instruction},
                                 {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)

(``system_role=False`` puts ``question + "\\n" + instruction`` in the user message instead, for templates without a
system role). Without one it is ``f"{question}\\n{instruction}\\n"``. The default instruction, ``SYSTEM_PROMPT``, is the
system prompt of the Qwen2.5-Math evaluation (the paper trains and evaluates Qwen2.5-Math models).

A prompt's length is counted as the trainer encodes it: ``tokenizer(prompt, add_special_tokens=True)`` (see
``capo_jax.sequences.encode_prompts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SYSTEM_PROMPT", "build_prompt", "has_chat_template", "prompt_lengths"]

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def has_chat_template(tokenizer) -> bool:
  """Whether ``tokenizer`` carries a (non-empty) chat template."""
  return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(question: str, tokenizer=None, *, instruction: str = SYSTEM_PROMPT, system_role: bool = True) -> str:
  """The prompt text for ``question``; see the module docstring for the two formats.

  Args:
    question: the problem statement.
    tokenizer: a transformers tokenizer, or None for the plain format.
    instruction: the instruction (system prompt).
    system_role: with a chat template, whether the instruction goes in a system message (else after the question in
      the user message).
  """
  if not has_chat_template(tokenizer):
    return f"{question}\n{instruction}\n"
  if system_role:
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
  else:
    messages = [{"role": "user", "content": f"{question}\n{instruction}"}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_lengths(tokenizer, prompts: Sequence[str]) -> np.ndarray:
  """``int64 [len(prompts)]``: the token count of each prompt as the trainer encodes it (special tokens added)."""
  if not prompts:
    return np.zeros(0, dtype=np.int64)
  ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
  return np.asarray([len(row) for row in ids], dtype=np.int64)
