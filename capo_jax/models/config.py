"""`ModelConfig`: the hyper-parameters of a Qwen2/Llama-family decoder, and its mapping to/from HF `config.json`.

The HF side is read and written as a plain dict so that importing this module never imports transformers (or torch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
DTYPES = ("float32", "bfloat16", "float16")
# Names of the `jax.checkpoint` policies `ModelConfig.remat` accepts (mapped in capo_jax.models.decoder).
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a pre-norm decoder-only transformer (Qwen2/Qwen2.5 and Llama styles).

  Attributes:
    vocab_size: rows V of the embedding (and of the unembedding).
    hidden_size: model width H.
    intermediate_size: SwiGLU width F.
    num_layers: decoder blocks L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (grouped-query attention; N % K == 0).
    head_dim: per-head width D; None means H // N.
    rope_theta: RoPE base θ; inverse frequencies θ^(-2i/D), i < D/2.
    rms_norm_eps: ε in RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + ε).
    tie_word_embeddings: unembedding is the embedding table when True, else a separate [V,H] `lm_head.weight`.
    attention_bias: bias on the q/k/v projections (Qwen2: True; Llama: `attention_bias`).
    attention_out_bias: bias on the output projection (Qwen2: False; Llama: equal to `attention_bias`).
    mlp_bias: bias on the gate/up/down projections (Llama `mlp_bias`; Qwen2: False).
    dtype: compute dtype of activations ("float32" | "bfloat16" | "float16"). RMSNorm, RoPE and the attention softmax
      run in float32 whatever it is, and logits are always float32 (the unembedding matmul accumulates in float32).
      bfloat16 keeps 8 mantissa bits (~0.4% per rounding), so expect agreement with float32 to that order, not
      bitwise: with dtype = param_dtype = "bfloat16" the tested tolerance is 0.1 absolute on logits of scale ~1 and
      5% relative L2 error on each parameter's gradient (tests/test_model.py), the KV cache of the sampler 0.05 on
      log-probs (tests/test_sampling.py).
    param_dtype: storage dtype of parameters.
    remat: what the backward pass keeps of each (scanned) decoder block, as a `jax.checkpoint` policy: "none" (no
      checkpoint: keep every intermediate), "full" (keep only the block's input, recompute the rest), "dots_saveable"
      (keep matmul outputs), "dots_with_no_batch_dims_saveable" (keep the weight matmuls, recompute attention). Values
      and gradients are the same for every policy up to float rounding; memory and recompute differ. True/False mean
      "full"/"none". The default keeps the weight matmuls' outputs: on CPU it is also the fastest (less memory
      traffic than keeping every intermediate; docs/PERFORMANCE.md, "Notes: predictions and outcomes"); "full" holds
      the least memory for long sequences and wide models (the paper configs use it).
    model_type: "qwen2" or "llama"; decides the HF names and `architectures` written by `save_hf`.
    initializer_range: std of the normal init of random weights.
    max_position_embeddings: the context length the checkpoint was trained for (metadata; RoPE does not need it).
    attention_implementation: passed to `jax.nn.dot_product_attention` (None lets JAX choose; "cudnn" forces
      cuDNN flash attention on GPU).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = True
  attention_out_bias: bool = False
  mlp_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "dots_with_no_batch_dims_saveable"
  model_type: str = "qwen2"
  initializer_range: float = 0.02
  max_position_embeddings: int = 32768
  attention_implementation: str | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}).")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"ModelConfig.hidden_size ({self.hidden_size}) is not divisible by num_heads "
                       f"({self.num_heads}); set head_dim explicitly.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}.")
    if isinstance(self.remat, bool):
      object.__setattr__(self, "remat", "full" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}.")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"ModelConfig.model_type {self.model_type!r} is not supported; "
                       f"supported: {SUPPORTED_MODEL_TYPES}.")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ----------------------------------------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from the dict of an HF `config.json` (Qwen2/Qwen2.5 or Llama).

    RoPE θ is read from the transformers-v5 `rope_parameters` dict, else the older top-level `rope_theta`. Only the
    plain ("default") RoPE is implemented; scaled variants (yarn, llama3, ...) raise.

    Raises:
      ValueError: naming the field, for an unsupported `model_type`, activation, RoPE type or sliding window, or a
        missing required field.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"config.json: model_type {model_type!r} is not supported; supported: "
                       f"{SUPPORTED_MODEL_TYPES} (Qwen2/Qwen2.5 and Llama-style decoders).")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu', i.e. SwiGLU).")
    if hf.get("use_sliding_window", False):
      raise ValueError("config.json: use_sliding_window=true is not supported; set it to false.")
    layer_types = set(hf.get("layer_types") or ())
    if layer_types - {"full_attention"}:
      raise ValueError(f"config.json: layer_types {sorted(layer_types)} are not supported (only 'full_attention').")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only 'default' RoPE).")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta"))
    if rope_theta is None:
      raise ValueError("config.json: no RoPE base found; expected rope_parameters.rope_theta or rope_theta.")

    def required(name):
      if name not in hf:
        raise ValueError(f"config.json: required field {name!r} is missing.")
      return hf[name]

    num_heads = required("num_attention_heads")
    if model_type == "qwen2":
      qkv_bias, out_bias, mlp_bias = True, False, False
    else:
      qkv_bias = out_bias = bool(hf.get("attention_bias", False))
      mlp_bias = bool(hf.get("mlp_bias", False))
    kwargs = dict(
        vocab_size=required("vocab_size"),
        hidden_size=required("hidden_size"),
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=mlp_bias,
        model_type=model_type,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """The `config.json` dict that transformers' AutoConfig / Qwen2ForCausalLM / LlamaForCausalLM load."""
    if self.model_type == "qwen2" and (not self.attention_bias or self.attention_out_bias or self.mlp_bias):
      raise ValueError("ModelConfig: a qwen2 checkpoint has q/k/v bias and no o_proj/MLP bias; set "
                       "attention_bias=True, attention_out_bias=False, mlp_bias=False or use model_type='llama'.")
    if self.model_type == "llama" and self.attention_bias != self.attention_out_bias:
      raise ValueError("ModelConfig: llama uses one attention_bias for q/k/v/o; set attention_out_bias equal to "
                       "attention_bias or use model_type='qwen2'.")
    hf = {
        "architectures": [_HF_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        # Both spellings: transformers v5 reads rope_parameters, older versions the top-level rope_theta.
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "tie_word_embeddings": self.tie_word_embeddings,
        "initializer_range": self.initializer_range,
        "max_position_embeddings": self.max_position_embeddings,
        "use_cache": True,
        "dtype": self.param_dtype,
    }
    if self.model_type == "qwen2":
      hf.update(use_sliding_window=False, attention_dropout=0.0)
    else:
      hf.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, attention_dropout=0.0)
    return hf
