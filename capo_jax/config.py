"""Typed run configuration: one frozen, gin-configurable, validated dataclass per concern, composed by ``TrainConfig``.

Each sub-config is bound on its own in gin (``OptimizerConfig.learning_rate = 1e-4``, ``CurvatureConfig.mode =
'last_layer'``) and validated when it is built, so a bad value fails before anything is loaded or written. The
config a run writes (its ``config.gin``) is gin's operative config: every field of every sub-config, with its value.

Algorithm names (grpo, drgrpo, reinforce, rloo, capo, drcapo, reincapo) are not a field: they are presets, gin files
in ``experiments/configs/algorithms/`` that bind the independent fields (advantage estimator, aggregation, curvature
mode and τ's). ``CurvatureConfig.from_preset`` gives the same τ's in Python (``capo_jax.curvature.PRESETS``).

Resume rule (``config_fingerprint``): two runs are the same experiment iff their explicit bindings (after includes)
and ``CONFIG_VERSION`` agree. A field added with a default keeps old runs resumable; a change of any default's
meaning must bump ``CONFIG_VERSION``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from typing import Any

import gin
import optax

from capo_jax import advantages as adv_lib
from capo_jax import curvature
from capo_jax import losses
from capo_jax.models import ModelConfig
from capo_jax.models.config import DTYPES, REMAT_POLICIES

# Bump when a default changes meaning: runs fingerprinted under another version are not resumed.
CONFIG_VERSION = 2

CURVATURE_MODES = ("none", "last_layer", "full_network", "subset")
STEP_CONTROLS = ("none", "trust_region", "kl_target")
SURROGATES = ("clip", "gspo", "cispo")
LR_SCHEDULES = ("constant", "cosine")
KL_ESTIMATORS = ("k1", "k2", "k3")


class ConfigError(ValueError):
  """A config field has a bad type or value; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# Field checks (one message shape for every field).


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
  if not _is_int(value) or value < minimum:
    raise ConfigError(f"{owner}.{name} must be an integer ≥ {minimum}, got {value!r}.")


def check_number(owner: str, name: str, value: Any, *, minimum: float | None = None, positive: bool = False,
                 maximum: float | None = None, allow_inf: bool = False, allow_none: bool = False) -> None:
  """A finite (or, with ``allow_inf``, +∞) real number within the bounds; None only with ``allow_none``."""
  if value is None and allow_none:
    return
  ok = _is_number(value) and not math.isnan(value) and (math.isfinite(value) or (allow_inf and value > 0))
  if ok and positive:
    ok = value > 0
  if ok and minimum is not None:
    ok = value >= minimum
  if ok and maximum is not None:
    ok = value <= maximum
  if not ok:
    bounds = []
    if positive:
      bounds.append("> 0")
    if minimum is not None:
      bounds.append(f"≥ {minimum}")
    if maximum is not None:
      bounds.append(f"≤ {maximum}")
    kind = "a number" + (" (inf allowed)" if allow_inf else ", finite") + (" or None" if allow_none else "")
    raise ConfigError(f"{owner}.{name} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}.")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
  if value not in choices:
    raise ConfigError(f"{owner}.{name} must be one of {list(choices)}, got {value!r}.")


def check_bool(owner: str, name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{owner}.{name} must be True or False, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Sub-configs.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """The policy model: an HF folder to start from (``init_from``), or the architecture of a fresh Qwen2-family model
  (then warm-started with ``WarmStartConfig`` on the task's worked solutions)."""
  init_from: str | None = None  # an HF folder: config.json, *.safetensors, tokenizer.json
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 384
  tie_word_embeddings: bool = False
  rope_theta: float = 10000.0
  # Precision of the policy (an init_from folder is cast on load): the compute dtype of activations and the storage
  # dtype of parameters. dtype = 'bfloat16' with param_dtype = 'float32' is mixed precision: bf16 matmuls and KV
  # cache, float32 weights and Adam moments; logits, log-softmax and curvature statistics are float32 in every case.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # What the backward pass keeps of each decoder layer (ModelConfig.remat): the default keeps the weight matmuls'
  # outputs; "full" keeps only each layer's input (least memory, one more forward), "none" keeps everything.
  remat: str = ModelConfig.remat

  def __post_init__(self):
    if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
      raise ConfigError(f"PolicyConfig.init_from must be a folder path or None, got {self.init_from!r}.")
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
      check_int("PolicyConfig", name, getattr(self, name))
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"PolicyConfig.hidden_size={self.hidden_size} must be a multiple of num_heads="
                        f"{self.num_heads}.")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"PolicyConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads="
                        f"{self.num_kv_heads}.")
    check_bool("PolicyConfig", "tie_word_embeddings", self.tie_word_embeddings)
    check_number("PolicyConfig", "rope_theta", self.rope_theta, positive=True)
    for name in ("dtype", "param_dtype"):
      check_choice("PolicyConfig", name, getattr(self, name), DTYPES)
    check_choice("PolicyConfig", "remat", self.remat, REMAT_POLICIES)

  def architecture(self, vocab_size: int) -> ModelConfig:
    """The ``ModelConfig`` of a fresh model with this shape over ``vocab_size`` tokens."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       tie_word_embeddings=self.tie_word_embeddings, rope_theta=self.rope_theta,
                       attention_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
  """Supervised warm start of a fresh policy on the task's worked solutions (cached; skipped with ``init_from``)."""
  steps: int = 600
  batch_size: int = 64
  learning_rate: float = 3e-3

  def __post_init__(self):
    check_int("WarmStartConfig", "steps", self.steps, minimum=0)
    check_int("WarmStartConfig", "batch_size", self.batch_size)
    check_number("WarmStartConfig", "learning_rate", self.learning_rate, positive=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """What one RL step samples: ``prompts_per_step`` prompts × ``group_size`` completions."""
  prompts_per_step: int = 16
  group_size: int = 8
  max_prompt_length: int = 32
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0
  dynamic_sampling: bool = False  # drop groups whose rewards are all equal (zero advantage), keeping shapes fixed

  def __post_init__(self):
    check_int("RolloutConfig", "prompts_per_step", self.prompts_per_step)
    check_int("RolloutConfig", "group_size", self.group_size, minimum=2)
    check_int("RolloutConfig", "max_prompt_length", self.max_prompt_length)
    check_int("RolloutConfig", "max_new_tokens", self.max_new_tokens)
    check_number("RolloutConfig", "temperature", self.temperature, positive=True)
    check_int("RolloutConfig", "top_k", self.top_k, minimum=0)
    check_number("RolloutConfig", "top_p", self.top_p, positive=True, maximum=1.0)
    check_bool("RolloutConfig", "dynamic_sampling", self.dynamic_sampling)

  @property
  def batch_size(self) -> int:
    return self.prompts_per_step * self.group_size


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping, a learning-rate schedule, and how a batch is consumed (passes × minibatches)."""
  learning_rate: float = 1e-4
  schedule: str = "constant"  # or "cosine" (linear warm-up over warmup_fraction of the updates, then cosine to 0)
  warmup_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  num_iterations: int = 1  # passes over each batch (importance ratios ≠ 1 when > 1)
  num_minibatches: int = 1
  # Gradient accumulation: each optimizer step's rows in this many slices, one at a time (the same update; the
  # activations of rows / micro_batches rows alive at once). Must divide the rows of a minibatch.
  micro_batches: int = 1
  # The learner runs each prompt's columns once per group of its group_size completions instead of once per row
  # (the same values; fewer tokens through the model: CausalLM.shared_prefix_hidden). False: every row runs whole.
  shared_prompts: bool = True

  def __post_init__(self):
    check_number("OptimizerConfig", "learning_rate", self.learning_rate, positive=True, maximum=1.0)
    check_choice("OptimizerConfig", "schedule", self.schedule, LR_SCHEDULES)
    check_number("OptimizerConfig", "warmup_fraction", self.warmup_fraction, minimum=0.0, maximum=1.0)
    check_number("OptimizerConfig", "b1", self.b1, minimum=0.0, maximum=1.0)
    check_number("OptimizerConfig", "b2", self.b2, minimum=0.0, maximum=1.0)
    for name in ("b1", "b2"):  # Adam's bias correction divides by 1 − β^t: β = 1 gives 0/0 = NaN at every step
      if getattr(self, name) == 1.0:
        raise ConfigError(f"OptimizerConfig.{name} must be < 1 (Adam divides by 1 − {name}^t), got 1.0; e.g. "
                          f"{name}={0.9 if name == 'b1' else 0.999}.")
    check_number("OptimizerConfig", "eps", self.eps, positive=True)
    check_number("OptimizerConfig", "weight_decay", self.weight_decay, minimum=0.0)
    check_number("OptimizerConfig", "max_grad_norm", self.max_grad_norm, positive=True, allow_none=True)
    check_int("OptimizerConfig", "num_iterations", self.num_iterations)
    check_int("OptimizerConfig", "num_minibatches", self.num_minibatches)
    check_int("OptimizerConfig", "micro_batches", self.micro_batches)
    check_bool("OptimizerConfig", "shared_prompts", self.shared_prompts)

  @property
  def single_pass(self) -> bool:
    """One gradient step per batch: the importance ratio is identically 1."""
    return self.num_iterations == 1 and self.num_minibatches == 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The policy-gradient objective, each choice independent (docs/MATH.md §1)."""
  advantage_estimator: str = "grpo"  # grpo | drgrpo | rloo | reinforce
  aggregation: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum(-norm)
  surrogate: str = "clip"  # clip | gspo | cispo
  eps_low: float = 0.2
  eps_high: float | None = None  # None: = eps_low
  dual_clip: float | None = None
  kl_coef: float = 0.0
  kl_estimator: str = "k3"
  # Log KL(start), the KL to the reference policy, every step even when kl_coef = 0. False (with kl_coef = 0) skips
  # the rollout's forward pass of the reference policy; the rows then hold no "kl".
  track_kl: bool = True
  entropy_coef: float = 0.0
  # Rollout/learner mismatch corrections (capo_jax.learner.mismatch_correction), composed with CAPO's mask:
  tis_cap: float | None = None  # C: weight each token's surrogate by min(π_learner/π_sampler, C); None: off
  seq_mask_max_logprob_diff: float | None = None  # drop rows whose mean |logπ_learner − logπ_sampler| exceeds it

  def __post_init__(self):
    check_choice("LossConfig", "advantage_estimator", self.advantage_estimator, sorted(adv_lib.ESTIMATORS))
    check_choice("LossConfig", "aggregation", self.aggregation, losses.AGGREGATIONS)
    check_choice("LossConfig", "surrogate", self.surrogate, SURROGATES)
    check_number("LossConfig", "eps_low", self.eps_low, positive=True)
    check_number("LossConfig", "eps_high", self.eps_high, positive=True, allow_none=True)
    check_number("LossConfig", "dual_clip", self.dual_clip, minimum=1.0, allow_none=True)
    if self.dual_clip == 1.0:
      raise ConfigError("LossConfig.dual_clip must be > 1 (it bounds ρ·A at c·A for A < 0), got 1.0; e.g. 3.0.")
    check_number("LossConfig", "kl_coef", self.kl_coef, minimum=0.0)
    check_choice("LossConfig", "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
    if not isinstance(self.track_kl, bool):
      raise ConfigError(f"LossConfig.track_kl must be True or False, got {self.track_kl!r}.")
    check_number("LossConfig", "entropy_coef", self.entropy_coef, minimum=0.0)
    check_number("LossConfig", "tis_cap", self.tis_cap, positive=True, allow_none=True)
    check_number("LossConfig", "seq_mask_max_logprob_diff", self.seq_mask_max_logprob_diff, positive=True,
                 allow_none=True)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CurvatureConfig:
  """How curvature acts on the step (docs/MATH.md §2–§5).

  ``mode`` picks what the curvature model removes from the step:

  - ``"none"``: nothing (GRPO and its family).
  - ``"last_layer"``: CAPO's released token mask (§2): ``masked_transform`` around AdamW, keep t iff
    m_F(t) < τ_F and the Hessian rule holds for m_H(t).
  - ``"full_network"``: the same rule on the full-network directional model along the optimizer's own proposal (§4).
  - ``"subset"``: Theorem 5.1 acceptance of the step's prompt groups: m_H(Δθ_i) ≥ δ_H and m_F(Δθ_i) ≤ δ_F (§3).

  ``step_control`` scales the whole step: ``"trust_region"`` shrinks it so that its predicted mean KL ≤ ``max_kl``
  (§5); ``"kl_target"`` scales it by s = clip(√(max_kl / KL̂), ``min_scale``, ``max_scale``) so its predicted mean KL
  meets ``max_kl`` — shrinking or growing it (§7). ``monitor`` logs the last-layer m_H/m_F quantiles in every mode
  (a last-layer pass with τ = ∞ where the mode does not mask with it).
  """
  mode: str = "none"
  tau_fisher: float = math.inf
  tau_hessian: float = math.inf
  hessian_rule: str = "symmetric"
  top_k: int = 50  # K of the top-K policy of the last-layer model
  moments: str = "real"  # real | shadow: where the Adam direction model reads its moments
  monitor: bool = False
  second_order: bool = True  # full_network: m_H by jvp∘jvp (both rules); False: one jvp, Fisher rule only
  fisher: str = "sampled"  # full_network: sampled-action or expected Fisher form of m_F
  subset_delta_h: float = 0.0  # δ_H = ω + ½Mr² ≥ 0
  subset_delta_f: float | None = None  # δ_F > 0, or None: no KL condition
  step_control: str = "none"
  max_kl: float | None = None  # δ on the predicted mean KL per step: trust_region's ceiling, kl_target's target
  max_scale: float | None = None  # kl_target: the cap s_max on the step scale
  min_scale: float = 0.0  # kl_target: the floor s_min on the step scale

  def __post_init__(self):
    owner = "CurvatureConfig"
    check_choice(owner, "mode", self.mode, CURVATURE_MODES)
    check_number(owner, "tau_fisher", self.tau_fisher, positive=True, allow_inf=True)
    check_number(owner, "tau_hessian", self.tau_hessian, positive=True, allow_inf=True)
    check_choice(owner, "hessian_rule", self.hessian_rule, ("symmetric", "nonsymmetric"))
    check_int(owner, "top_k", self.top_k)
    check_choice(owner, "moments", self.moments, ("real", "shadow"))
    check_bool(owner, "monitor", self.monitor)
    check_bool(owner, "second_order", self.second_order)
    check_choice(owner, "fisher", self.fisher, ("sampled", "expected"))
    check_number(owner, "subset_delta_h", self.subset_delta_h, minimum=0.0)
    check_number(owner, "subset_delta_f", self.subset_delta_f, positive=True, allow_none=True)
    check_choice(owner, "step_control", self.step_control, STEP_CONTROLS)
    check_number(owner, "max_kl", self.max_kl, positive=True, allow_none=True)
    if self.step_control == "trust_region" and self.max_kl is None:
      raise ConfigError("CurvatureConfig.step_control='trust_region' needs CurvatureConfig.max_kl (e.g. 2e-3).")
    if self.step_control == "none" and self.max_kl is not None:
      raise ConfigError("CurvatureConfig.max_kl is set but step_control='none': set step_control='trust_region' or "
                        "drop max_kl.")
    check_number(owner, "max_scale", self.max_scale, positive=True, allow_none=True)
    check_number(owner, "min_scale", self.min_scale, minimum=0.0)
    if self.step_control == "kl_target":
      if self.max_kl is None or self.max_scale is None:
        raise ConfigError("CurvatureConfig.step_control='kl_target' needs CurvatureConfig.max_kl (the target δ, e.g. "
                          "5e-4) and CurvatureConfig.max_scale (the cap on the step scale, e.g. 4.0).")
      if self.min_scale > self.max_scale:
        raise ConfigError(f"CurvatureConfig.min_scale ({self.min_scale}) must be ≤ max_scale ({self.max_scale}).")
    elif self.max_scale is not None or self.min_scale != 0.0:
      raise ConfigError("CurvatureConfig.max_scale / min_scale bound the kl_target step scale: set "
                        "step_control='kl_target' or drop them.")
    if self.mode == "full_network" and not math.isfinite(self.tau_fisher):
      raise ConfigError("CurvatureConfig.mode='full_network' masks with τ_F: set a finite tau_fisher (a CAPO "
                        "preset: include 'algorithms/capo.gin').")
    if self.mode == "subset" and self.step_control != "none":
      raise ConfigError(f"CurvatureConfig.mode='subset' with step_control={self.step_control!r} is not supported "
                        "(each group's proposal would need its own curvature pass).")

  @classmethod
  def from_preset(cls, name: str, **overrides) -> "CurvatureConfig":
    """The last-layer mask with a released preset's τ's (``curvature.PRESETS``: CAPO, DrCAPO, ReinCAPO)."""
    p = curvature.preset(name)
    fields = dict(mode="last_layer", tau_fisher=p.tau_fisher, tau_hessian=p.tau_hessian, top_k=p.top_k,
                  hessian_rule=p.hessian_rule)
    fields.update(overrides)
    return cls(**fields)

  @property
  def masks_last_layer(self) -> bool:
    return self.mode == "last_layer"

  @property
  def needs_last_layer_pass(self) -> bool:
    """A ``masked_transform`` sits in the optax chain: the last-layer mask, or the τ = ∞ monitor."""
    return self.mode == "last_layer" or self.monitor


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation: pass@1 from ``k`` samples per problem (avg@k), pass@k, and greedy accuracy."""
  every: int = 20  # steps between evaluations (and at the start and the end)
  num_problems: int = 256
  k: int = 4
  temperature: float = 0.6
  top_p: float = 0.95
  greedy: bool = True

  def __post_init__(self):
    check_int("EvalConfig", "every", self.every)
    check_int("EvalConfig", "num_problems", self.num_problems)
    check_int("EvalConfig", "k", self.k)
    check_number("EvalConfig", "temperature", self.temperature, minimum=0.0)
    check_number("EvalConfig", "top_p", self.top_p, positive=True, maximum=1.0)
    check_bool("EvalConfig", "greedy", self.greedy)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 10
  max_to_keep: int = 2

  def __post_init__(self):
    check_int("CheckpointConfig", "every", self.every)
    check_int("CheckpointConfig", "max_to_keep", self.max_to_keep)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ReliabilityConfig:
  """What the loop does about a non-finite step (docs/RELIABILITY.md): every learner update whose loss, gradient or
  update is not finite is skipped (parameters and optimizer state unchanged); after ``max_consecutive_skips`` RL
  steps in a row with a skipped update the run stops (``trainer.DivergedError``), its last checkpoint intact."""
  max_consecutive_skips: int = 3

  def __post_init__(self):
    check_int("ReliabilityConfig", "max_consecutive_skips", self.max_consecutive_skips)


MESH_AXES = ("data", "fsdp", "tensor")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh (``capo_jax.sharding.make_mesh``, docs/SCALING.md): sizes of the axes ``data`` (replicas: batch
  rows, parameters replicated), ``fsdp`` (batch rows, parameters and optimizer state sharded) and ``tensor`` (heads,
  MLP width and vocabulary sharded). One axis may be -1: the devices left over. The default puts every device on
  ``data``.

  ``decode_weights``: the parameters' layout while the sampler decodes (rollouts and evaluation;
  ``capo_jax.sampling.sample``'s ``weights``): "gathered" (split over ``tensor`` only, the ``fsdp`` shards gathered
  once per call), "sharded" (the learner's layout, every weight gathered again at each decode step) or "auto"
  (gathered when it takes at most a quarter of a device's memory)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  decode_weights: str = "auto"

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if not _is_int(value) or (value < 1 and value != -1):
        raise ConfigError(f"MeshConfig.{name} must be an integer ≥ 1 or -1 (the devices left over), got {value!r}.")
    check_choice("MeshConfig", "decode_weights", self.decode_weights, ("auto", "gathered", "sharded"))
    if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
      raise ConfigError(f"MeshConfig: at most one axis may be -1, got data={self.data}, fsdp={self.fsdp}, "
                        f"tensor={self.tensor}; give the others explicit sizes.")

  def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with -1 resolved; their product must be ``num_devices``."""
    sizes = [getattr(self, name) for name in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(f"MeshConfig: {num_devices} devices do not split into data={self.data}, fsdp={self.fsdp}, "
                          f"tensor={self.tensor} (the fixed axes' product {known} must divide the device count).")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ConfigError(f"MeshConfig: data × fsdp × tensor = {math.prod(sizes)} but there are {num_devices} devices; "
                        "make the product equal the device count, or set one axis to -1.")
    return tuple(sizes)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A whole run: the task (a ``capo_jax.tasks.Task`` built from gin) and one sub-config per concern."""
  task: Any = None
  name: str = "run"  # a label for plots and the console (the preset's name in experiments/configs)
  seed: int = 0
  num_steps: int = 60
  policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
  warm_start: WarmStartConfig = dataclasses.field(default_factory=WarmStartConfig)
  rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  curvature: CurvatureConfig = dataclasses.field(default_factory=CurvatureConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  reliability: ReliabilityConfig = dataclasses.field(default_factory=ReliabilityConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    if self.task is None:
      raise ConfigError("TrainConfig.task is not set: bind a task, e.g. `TrainConfig.task = @ArithTask()` "
                        "(experiments/configs/arith_base.gin) or `TrainConfig.task = @DatasetTask()`.")
    from capo_jax.tasks.base import check_task  # pylint: disable=g-import-not-at-top
    try:
      check_task(self.task)
    except TypeError as e:
      raise ConfigError(f"TrainConfig.task: {e}") from None
    check_int("TrainConfig", "seed", self.seed, minimum=0)
    check_int("TrainConfig", "num_steps", self.num_steps)
    for name, kind in (("policy", PolicyConfig), ("warm_start", WarmStartConfig), ("rollout", RolloutConfig),
                       ("optimizer", OptimizerConfig), ("loss", LossConfig), ("curvature", CurvatureConfig),
                       ("eval", EvalConfig), ("checkpoint", CheckpointConfig), ("reliability", ReliabilityConfig),
                       ("mesh", MeshConfig)):
      if not isinstance(getattr(self, name), kind):
        raise ConfigError(f"TrainConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}.")
    if self.rollout.batch_size % self.optimizer.num_minibatches:
      raise ConfigError(f"OptimizerConfig.num_minibatches={self.optimizer.num_minibatches} must divide "
                        f"prompts_per_step × group_size = {self.rollout.batch_size}.")
    rows = self.rollout.batch_size // self.optimizer.num_minibatches
    if rows % self.optimizer.micro_batches:
      raise ConfigError(f"OptimizerConfig.micro_batches={self.optimizer.micro_batches} must divide the "
                        f"{rows} rows of each optimizer step (prompts_per_step × group_size / num_minibatches).")
    if self.curvature.mode in ("full_network", "subset") and self.optimizer.micro_batches > 1:
      raise ConfigError(f"CurvatureConfig.mode={self.curvature.mode!r} needs the whole batch in one pass: set "
                        "OptimizerConfig.micro_batches = 1 (gradient accumulation serves modes none and last_layer).")
    if self.curvature.mode in ("full_network", "subset") and not self.optimizer.single_pass:
      raise ConfigError(f"CurvatureConfig.mode={self.curvature.mode!r} needs one gradient step per batch: set "
                        "OptimizerConfig.num_iterations = num_minibatches = 1.")
    if self.loss.tis_cap is not None and not self.optimizer.single_pass:
      raise ConfigError("LossConfig.tis_cap weights the single-pass surrogate (ρ ≡ 1); with num_iterations or "
                        "num_minibatches > 1 the clipped ratio already divides by the sampler's log-probs: drop "
                        "tis_cap or set OptimizerConfig.num_iterations = num_minibatches = 1.")


# ---------------------------------------------------------------------------------------------------------------
# Derived objects.


def learning_rate_schedule(cfg: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """The schedule over optimizer updates (``num_steps × num_iterations × num_minibatches`` of them)."""
  if cfg.schedule == "constant":
    return optax.constant_schedule(cfg.learning_rate)
  total = num_steps * cfg.num_iterations * cfg.num_minibatches
  warmup = int(cfg.warmup_fraction * total)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 1), max(total, warmup + 1), 0.0)


def config_fingerprint(explicit_bindings: str) -> str:
  """The resume identity of a run: a hash of ``CONFIG_VERSION`` and the explicit gin bindings (``gin.config_str()``,
  includes expanded; comment and blank lines ignored). ``MeshConfig`` bindings are left out: the mesh says where the
  run computes, not what (a run resumes on another mesh, docs/SCALING.md)."""
  lines = [line.strip() for line in explicit_bindings.splitlines()]
  body = "\n".join(line for line in lines if line and not line.startswith(("#", "MeshConfig.")))
  return hashlib.sha256(f"version {CONFIG_VERSION}\n{body}".encode()).hexdigest()[:16]
