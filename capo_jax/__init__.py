"""capo_jax: functional JAX/Flax RL post-training of LLMs on verifiable reasoning, built around CAPO.

The public API is re-exported here flatly; each stage of the RL step lives in one module:

- ``capo_jax.advantages``  rewards → advantages (GRPO, Dr.GRPO, RLOO, REINFORCE)
- ``capo_jax.logprobs``    logits/hidden states → per-token log-probs and entropies (float32, chunked)
- ``capo_jax.losses``      surrogates (clip, GSPO, CISPO), aggregation, KL, entropy bonus
"""

from capo_jax.advantages import (
    batch_normalize_advantages,
    compute_advantages,
    drgrpo_advantages,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
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

__version__ = "0.1.0"
