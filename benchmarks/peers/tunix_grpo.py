"""Tunix's GRPO on the peers benchmark's model and prompts, timed per step; run by ``benchmarks.peers`` in Tunix's
scratch environment (docs/PERFORMANCE.md, "Peers").

    python tunix_grpo.py --model DIR --prompts FILE.jsonl --steps N --out FILE.json

The Qwen2 weights are read by Tunix's own loader (``tunix.models.qwen2.params.create_model_from_safe_tensors``) into
its ``Qwen2`` module; ``tunix.rl.grpo.grpo_learner.GRPOLearner`` trains it through an ``RLCluster`` whose actor,
rollout and reference roles share one single-device mesh (so the rollout model is the actor itself) with the vanilla
rollout engine. One step is one batch of prompts_per_step prompts × num_generations completions and one optimizer
update. Generation is the learner's ``_generate_and_compute_advantage`` (sampling, decoding, rewards, advantages) and
training is ``RLCluster.update_actor``; both are wrapped with a timer that waits for their arrays.
"""

import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import AutoTokenizer

import tunix
from tunix.models.qwen2 import model as qwen2_model
from tunix.models.qwen2 import params as qwen2_params
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

import common  # benchmarks/peers/common.py, beside this script
import reward  # benchmarks/peers/reward.py, beside this script


def qwen2_config(folder: str) -> qwen2_model.ModelConfig:
  """Tunix's Qwen2 config of an HF config.json."""
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  return qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=head_dim,
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"],
      use_tied_embedding=hf["tie_word_embeddings"])


def main():
  args, records = common.args_and_records(("--max-prompt-length", 32))
  # Batches as arrays, as Tunix's data pipelines give them (the learner repeats each leaf num_generations times).
  batches = [{"prompts": np.array([r["prompt"] for r in records[i:i + args.prompts_per_step]]),
              "answer": np.array([int(r["answer"]) for r in records[i:i + args.prompts_per_step]])}
             for i in range(0, len(records), args.prompts_per_step)]

  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = qwen2_params.create_model_from_safe_tensors(args.model, qwen2_config(args.model), mesh=mesh,
                                                      dtype=jnp.float32)
  tokenizer = AutoTokenizer.from_pretrained(args.model)

  batch_size = args.prompts_per_step * args.num_generations
  training = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-6)),
      eval_every_n_steps=10**9, max_steps=args.steps, mini_batch_size=args.prompts_per_step,
      train_micro_batch_size=args.prompts_per_step)
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
      kv_cache_size=args.max_prompt_length + args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=None)
  roles = rl_cluster_lib.Role
  cluster = rl_cluster_lib.RLCluster(
      actor=model, reference=None, tokenizer=tokenizer,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh}, rollout_engine="vanilla",
          offload_to_cpu=False, training_config=training, rollout_config=rollout))
  # The same-weights check: the last position's logits of the first prompt, tokenized as Tunix's sampler does.
  ids = [int(i) for i in cluster.rollout._sampler.tokenize(records[0]["prompt"])]  # pylint: disable=protected-access
  length = len(ids)
  logits, _ = model(jnp.asarray([ids]), jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool)))
  check = {"ids": ids, "logits": [float(x) for x in logits[0, -1]]}
  config = grpo_learner.GRPOConfig(num_generations=args.num_generations, num_iterations=1, beta=0.0, epsilon=0.2,
                                   loss_agg_mode="sequence-mean-token-mean")

  def arith_reward(prompts, completions, answer, **kwargs):
    return reward.scores([str(c) for c in completions], [int(a) for a in answer])

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=config, reward_fns=[arith_reward])
  rows, pending = [], {}
  generate, update = learner._generate_and_compute_advantage, cluster.update_actor  # pylint: disable=protected-access

  def timed_generate(*a, **kw):
    t0 = time.perf_counter()
    example = jax.block_until_ready(generate(*a, **kw))
    pending["generation_s"] = time.perf_counter() - t0
    pending["completion_tokens_mean"] = float(np.asarray(example.completion_mask).sum(axis=-1).mean())
    return example

  def timed_update(*a, **kw):
    t0 = time.perf_counter()
    out = update(*a, **kw)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    training_s = time.perf_counter() - t0
    generation_s = pending.pop("generation_s")
    rows.append({"step": len(rows) + 1, "generation_s": generation_s, "training_s": training_s,
                 "step_s": generation_s + training_s, "completion_tokens_mean": pending.pop("completion_tokens_mean")})
    return out

  learner._generate_and_compute_advantage = timed_generate  # pylint: disable=protected-access
  cluster.update_actor = timed_update
  learner.train(batches)

  info = {"framework": "tunix", "versions": {"tunix": tunix.__version__, "jax": jax.__version__,
                                             "flax": flax.__version__},
          "devices": [str(d) for d in jax.devices()], "updates": int(cluster.actor_trainer.train_steps),
          "check": check, "rows": rows}
  with open(args.out, "w") as f:
    json.dump(info, f)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()
