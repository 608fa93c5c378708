"""Policy model: a Flax NNX Qwen2/Llama-family decoder, its KV cache, and HF safetensors interop.

`import capo_jax.models` imports neither torch nor tensorflow: transformers is only touched lazily by the tokenizer
helpers (capo_jax.tokenization) and never by the checkpoint code, which reads/writes safetensors directly.
"""

from capo_jax.models.config import REMAT_POLICIES, SUPPORTED_MODEL_TYPES, ModelConfig
from capo_jax.models.decoder import (CausalLM, CausalLMOutput, KVCache, apply, apply_rope, init_cache, rms_norm,
                                     rope_cos_sin)
from capo_jax.models.hf import hf_name, load_hf, save_hf

__all__ = [
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CausalLMOutput",
    "KVCache",
    "ModelConfig",
    "apply",
    "apply_rope",
    "hf_name",
    "init_cache",
    "load_hf",
    "rms_norm",
    "rope_cos_sin",
    "save_hf",
]
