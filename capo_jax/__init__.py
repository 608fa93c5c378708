"""capo_jax: functional JAX/Flax RL post-training of LLMs on verifiable reasoning, built around CAPO.

The public API is re-exported here flatly; each stage of the RL step lives in one module:

- ``capo_jax.config``           typed, validated, gin-configurable run configuration (one dataclass per concern)
- ``capo_jax.tasks``            the Task interface, the embedded arithmetic task, the supervised warm start
- ``capo_jax.data``             data-set tasks from local JSONL / JSON / parquet / TFDS files (MATH, GSM8K, …)
- ``capo_jax.models``           Flax NNX Qwen2/Llama decoder, KV cache, HF safetensors in/out
- ``capo_jax.tokenization``     tokenizers from ``tokenizer.json`` (+ chat templates)
- ``capo_jax.sampling``         jitted prefill + ``while_loop`` decode (temperature, top-k, top-p, stops)
- ``capo_jax.rewards``          ``\\boxed{}`` extraction, ``math_reward`` (math-verify in worker processes), shaping
- ``capo_jax.rollout``          prompts → samples → rewards → advantages → the learner batch
- ``capo_jax.advantages``       rewards → advantages (GRPO, Dr.GRPO, RLOO, REINFORCE)
- ``capo_jax.logprobs``         logits/hidden states → per-token log-probs and entropies (float32, chunked)
- ``capo_jax.losses``           surrogates (clip, GSPO, CISPO), aggregation, KL, entropy bonus
- ``capo_jax.curvature``        CAPO's last-layer curvature model, mask rules, presets
- ``capo_jax.masked_transform`` CAPO's token mask as an optax transformation
- ``capo_jax.curvature_full``   full-network directional model, Theorem-5.1 subset acceptance
- ``capo_jax.trust_region``     curvature trust region on the step (optax transformation)
- ``capo_jax.step_size``        curvature-controlled step size: meet a predicted-KL target (optax transformation)
- ``capo_jax.ops``              shared kernels: the exact top-K for XLA:CPU, time chunking; ``capo_jax.validation``
- ``capo_jax.learner``          jitted SFT / RL learner steps
- ``capo_jax.components``       configs → the optax chain and the learner step
- ``capo_jax.evaluation``       held-out pass@1 / pass@k / greedy of any task; ``capo_jax.eval_metrics`` estimators
- ``capo_jax.trainer``          the RL host loop (rollouts, rewards, evals, Orbax checkpoints, metrics)
"""

from capo_jax.advantages import (
    batch_normalize_advantages,
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)
from capo_jax.curvature import (
    PRESETS,
    AdamDirection,
    CurvatureMaskConfig,
    CurvatureStatistics,
    LastLayerStats,
    SGDDirection,
    adam_direction,
    curvature_mask,
    curvature_penalty,
    curvature_statistics,
    curvature_statistics_from_hidden,
    fisher_keep,
    hessian_keep,
    last_layer_token_stats,
    mask_metrics,
    preset,
    top_k,
    top_k_policy,
    top_k_policy_from_hidden,
    top_k_set,
    unembedding_gradient,
)
from capo_jax.curvature_full import (
    FullNetworkTokenStats,
    SubsetAcceptanceStats,
    expected_fisher_form,
    fisher_vector_product,
    full_network_token_mask,
    full_network_token_stats,
    hessian_vector_product,
    optimizer_proposal,
    predicted_mean_kl,
    sgd_proposal,
    split_into_subsets,
    subset_acceptance,
)
from capo_jax.logprobs import token_logprobs, token_logprobs_from_hidden
from capo_jax.losses import (
    aggregate_token_losses,
    cispo_token_losses,
    clipped_surrogate_token_losses,
    gspo_token_losses,
    kl_divergence,
    policy_loss,
)
from capo_jax.masked_transform import (
    CapoAux,
    MaskedTransformation,
    MaskedTransformState,
    find_unembedding,
    masked_transform,
)
from capo_jax.models import CausalLM, CausalLMOutput, KVCache, ModelConfig, apply
from capo_jax.models.export import export_hf
from capo_jax.models.hf import load_hf, save_hf
from capo_jax.config import (
    CheckpointConfig,
    ConfigError,
    CurvatureConfig,
    EvalConfig,
    LossConfig,
    MeshConfig,
    OptimizerConfig,
    PolicyConfig,
    ReliabilityConfig,
    RolloutConfig,
    TrainConfig,
    WarmStartConfig,
)
from capo_jax.data import DatasetTask
from capo_jax.eval_metrics import breakdown, maj_at_k, mean_at_k, pass_at_k
from capo_jax.evaluation import Evaluator, evaluate_samples, sample_completions
from capo_jax.rewards import (
    MathRewardStats,
    MathVerifyPool,
    extract_boxed,
    format_reward,
    integer_reward,
    integer_rewards,
    math_reward,
    math_reward_details,
    overlong_penalty,
)
from capo_jax.tasks import ArithTask, Problem, Task
from capo_jax.sampling import Sampler, SampleOutput, SamplingParams, pad_prompts, sample
from capo_jax.tokenization import check_tokenizer_fits, load_tokenizer
from capo_jax.checkpointing import CheckpointCorruptError, CheckpointError, NonFiniteStateError
from capo_jax.step_size import kl_target_transform
from capo_jax.trust_region import TrustRegionState, trust_region_scale, trust_region_step, trust_region_transform

__version__ = "0.1.0"
