"""Rollout sampling: logits processing (temperature, top-k, top-p) and the jitted KV-cache sampler."""

from capo_jax.sampling.logits_processing import (
    GREEDY_BELOW_TEMPERATURE,
    process_logits,
    sample_tokens,
    scale_logits,
    token_logprobs_at_temperature,
)
from capo_jax.sampling.sampler import (
    SampleOutput,
    Sampler,
    SamplingParams,
    bucket_length,
    decoding_shardings,
    pad_prompts,
    sample,
)

__all__ = [
    "GREEDY_BELOW_TEMPERATURE",
    "SampleOutput",
    "Sampler",
    "SamplingParams",
    "bucket_length",
    "decoding_shardings",
    "pad_prompts",
    "process_logits",
    "sample",
    "sample_tokens",
    "scale_logits",
    "token_logprobs_at_temperature",
]
