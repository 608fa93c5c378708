"""TRL's GRPO on the peers benchmark's model and prompts, timed per step; run by ``benchmarks.peers`` in TRL's
scratch environment (docs/PERFORMANCE.md, "Peers").

    python trl_grpo.py --model DIR --prompts FILE.jsonl --steps N --out FILE.json

One ``trl.GRPOTrainer`` step is one generation batch (prompts_per_step × num_generations completions) and one
optimizer step on it, in float32 on the CPU, without gradient checkpointing (TRL's configs turn it on by default; the
other frameworks keep activations). Generation is ``_generate_and_score_completions`` (sampling, decoding, rewards,
advantages), timed by wrapping that method; the step runs from the callback's ``on_step_begin`` to its
``on_step_end`` (after the optimizer step); training is the difference.
"""

import json
import os
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import common  # benchmarks/peers/common.py, beside this script
import reward  # benchmarks/peers/reward.py, beside this script


class StepTimer(TrainerCallback):
  """Per-step wall time and the generation share of it."""

  def __init__(self):
    self.rows, self.generation_s, self.t0, self.completion_tokens_mean = [], 0.0, None, None

  def on_step_begin(self, args, state, control, **kwargs):
    self.generation_s, self.t0 = 0.0, time.perf_counter()

  def on_step_end(self, args, state, control, **kwargs):
    step_s = time.perf_counter() - self.t0
    self.rows.append({"step": state.global_step, "generation_s": self.generation_s,
                      "training_s": step_s - self.generation_s, "step_s": step_s,
                      "completion_tokens_mean": self.completion_tokens_mean})


def main():
  args, records = common.args_and_records()
  dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": int(r["answer"])} for r in records])
  tokenizer = AutoTokenizer.from_pretrained(args.model)
  model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

  # The same-weights check: the last position's logits of the first prompt, as this framework tokenizes it.
  ids = tokenizer(records[0]["prompt"])["input_ids"]
  with torch.no_grad():
    check = {"ids": list(ids), "logits": model(input_ids=torch.tensor([ids])).logits[0, -1].tolist()}

  def arith_reward(prompts, completions, answer, **kwargs):
    return reward.scores(completions, answer)

  with tempfile.TemporaryDirectory() as output_dir:
    config = trl.GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, seed=0,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.steps, shuffle_dataset=False, dataloader_num_workers=0,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, gradient_checkpointing=False)
    timer = StepTimer()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=arith_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
    generate = trainer._generate_and_score_completions  # pylint: disable=protected-access

    def timed_generate(*a, **kw):
      t0 = time.perf_counter()
      out = generate(*a, **kw)
      timer.generation_s += time.perf_counter() - t0
      timer.completion_tokens_mean = float(out["completion_mask"].sum(dim=1).float().mean())
      return out

    trainer._generate_and_score_completions = timed_generate  # pylint: disable=protected-access
    trainer.train()

  info = {"framework": "trl", "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                           "torch": torch.__version__},
          "torch_threads": torch.get_num_threads(), "check": check, "rows": timer.rows}
  with open(args.out, "w") as f:
    json.dump(info, f)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()
