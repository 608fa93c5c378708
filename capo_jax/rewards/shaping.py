"""Reward shaping terms added to the verifiable reward on the host."""

from __future__ import annotations

import numpy as np

__all__ = ["overlong_penalty"]


def overlong_penalty(completion_lengths, max_len: int, buffer: int) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, "Overlong Reward Shaping"), in tokens.

  With L a completion's length in tokens, L_max = `max_len` and L_cache = `buffer`:

    R_length(L) = 0                              if L ≤ L_max − L_cache
                = ((L_max − L_cache) − L) / L_cache  if L_max − L_cache < L ≤ L_max
                = −1                             if L > L_max

  i.e. R_length(L) = clip(((L_max − L_cache) − L) / L_cache, −1, 0): zero up to the buffer, then a linear ramp
  reaching −1 at L_max (a completion truncated at the generation limit gets the full −1). It is added to the
  correctness reward before advantages are computed. Lengths must count generated tokens (not characters, not the
  prompt), since the penalty exists to keep rollouts below the token budget.

  Args:
    completion_lengths: non-negative integer lengths in tokens, any shape (e.g. [B]).
    max_len: L_max, the length at which the penalty reaches −1 (normally the generation limit).
    buffer: L_cache, the width of the ramp, 1 ≤ buffer ≤ max_len.

  Returns:
    float32 array of the shape of `completion_lengths`, values in [−1, 0].
  """
  lengths = np.asarray(completion_lengths)
  if lengths.dtype == bool or not np.issubdtype(lengths.dtype, np.integer):
    raise TypeError(f"completion_lengths must be integer token counts, got dtype {lengths.dtype}; pass e.g. "
                    "completion_mask.sum(-1).")
  if lengths.size and lengths.min() < 0:
    raise ValueError(f"completion_lengths must be >= 0, got a minimum of {lengths.min()}.")
  for name, value in (("max_len", max_len), ("buffer", buffer)):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be an int number of tokens, got {value!r}.")
  if not 1 <= buffer <= max_len:
    raise ValueError(f"buffer must satisfy 1 <= buffer <= max_len, got buffer={buffer}, max_len={max_len}; the "
                     "penalty ramps from 0 at max_len - buffer to -1 at max_len.")
  ramp = ((max_len - buffer) - lengths.astype(np.float64)) / buffer
  return np.clip(ramp, -1.0, 0.0).astype(np.float32)
