"""Evaluate a policy on a math data set: pass@k, mean@k, maj@k, per-level and per-subject breakdowns.

    python -m experiments.eval --checkpoint=<folder> --data=<file> [--num_samples=4] [--k=1,4] [--temperature=0.6]
        [--top_p=0.95] [--max_new_tokens=1024] [--out=eval.json] [--export_hf=<folder>] [--gin_param=...]
        [--mesh=-1,1,1]

``--checkpoint`` is one of

- an HF folder (config.json, safetensors, tokenizer.json), e.g. Qwen2.5-Math-7B or an ``--export_hf`` of a run;
- a run workdir of ``experiments.run`` (config.gin + checkpoints/): its latest checkpoint, or ``--step``;
- a checkpoint folder ``<workdir>/checkpoints/<step>``.

A run's parameters are ``TrainState.params`` of its Orbax checkpoint, restored onto the structure the run's
``config.gin`` rebuilds (the model, and the optimizer state the checkpoint also holds). The architecture and tokenizer
follow the rule the trainer started from (``capo_jax.trainer.load_policy``):

1. ``--tokenizer=<folder>``, when given, is the tokenizer;
2. else, with ``PolicyConfig.init_from`` set, that model folder gives the tokenizer (and always the architecture, from
   its config.json) — if it has moved since training, point to it with
   ``--gin_param="PolicyConfig.init_from='<folder>'"`` (or the config's macro, e.g. ``--gin_param="MODEL='<folder>'"``);
3. else the run's task brings its own tokenizer (the embedded arithmetic task), and the architecture is
   ``PolicyConfig``'s shape over that tokenizer's vocabulary;
4. else the command stops and asks for ``--tokenizer``.

``--gin_param`` bindings apply on top of the run's config.gin (run checkpoints only).

``--data`` is one or more files (or globs, or prepared TFDS folders) in any format and schema ``capo_jax.data`` reads
(MATH, MATH500, GSM8K, DeepScaleR, DeepMath; JSONL, JSON, parquet, TFDS). Each problem's prompt is built as in
training (``capo_jax.data.build_prompt``: the tokenizer's chat template when it has one), n completions are sampled
at ``--temperature`` / ``--top_p`` (``capo_jax.evaluation.sample_completions``), scored by
``capo_jax.rewards.math_reward_details`` (whose answer keys are the votes of maj@k), and summarised by
``capo_jax.evaluation.evaluate_samples``, the code the in-training evaluation runs. Completions stop at the tokenizer's
eos and at the eos ids of the model folder's generation_config.json.

The k's (``--k``, default 1 and 4 and n, those <= n) give pass@k (the unbiased estimator; pass@1 averages all n
samples), mean@k (the first k samples) and maj@k. The JSON (``--out``) holds the settings, the metrics, the breakdown
by ``--breakdown`` fields, the reward's reason counts and, per problem, its samples' correctness and answers
(and texts with ``--save_completions``). A table goes to stdout, progress to stderr.

``--mesh=data,fsdp,tensor`` samples on a mesh of this process's devices (``capo_jax.sharding.make_mesh``; e.g.
``-1,1,1``: every GPU of the host samples its share of the rows; ``1,1,8``: a model split over 8 devices), the same
completions as on one device for the same seed.

``--export_hf=<folder>`` also writes the policy as a serving-ready HF folder (``capo_jax.models.export.export_hf``,
with the sampling settings as its generation defaults); without ``--data`` it only exports.

Bad input (a missing checkpoint, an unreadable data file, k > n, a bad flag) stops before any sampling with one line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

# transformers (tokenizers only here) warns at import that PyTorch is absent; that is expected, not a problem.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_KS = (1, 4)


class UsageError(Exception):
  """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UsageError(f"{message} (see python -m experiments.eval --help)")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m experiments.eval", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="HF folder, run workdir, or <workdir>/checkpoints/<step>.")
  p.add_argument("--data", action="append", default=[], help="Data file(s), globs or TFDS folders (repeatable).")
  p.add_argument("--format", default=None, help="File format for every data file (jsonl|json|parquet|tfds); "
                 "default: from each path.")
  p.add_argument("--schema", default=None, help="Record schema for every file (default: detected from the keys).")
  p.add_argument("--split", default="test", help="TFDS split read from TFDS folders.")
  p.add_argument("--num_samples", type=int, default=4, help="n: completions sampled per problem.")
  p.add_argument("--k", default=None, help="Comma-separated k's (each <= n); default 1,4,n (those <= n).")
  p.add_argument("--temperature", type=float, default=0.6)
  p.add_argument("--top_p", type=float, default=0.95)
  p.add_argument("--max_new_tokens", type=int, default=1024)
  p.add_argument("--max_prompt_tokens", type=int, default=None, help="Drop problems whose prompt is longer.")
  p.add_argument("--num_problems", type=int, default=None, help="Evaluate only the first N problems.")
  p.add_argument("--batch_size", type=int, default=64, help="Prompts per sampler call (× n completions).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--breakdown", default="level,subject", help="Comma-separated metadata fields to break down by.")
  p.add_argument("--out", default=None, help="Write the results as JSON here.")
  p.add_argument("--save_completions", action="store_true", help="Also write every completion's text to --out.")
  p.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: see the checkpoint rule).")
  p.add_argument("--step", type=int, default=None, help="Run checkpoints: the step to restore (default latest).")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="Parameter and compute dtype.")
  p.add_argument("--gin_param", action="append", default=[], help="Binding applied on top of a run's config.gin.")
  p.add_argument("--export_hf", default=None, help="Also export the policy as an HF folder here.")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor: sample on a mesh of this process's devices (one axis "
                 "may be -1: the devices left over; e.g. -1,1,1 puts every device on data). Default: one device.")
  p.add_argument("--reward_timeout_s", type=float, default=5.0, help="Per-answer limit of the math verifier.")
  return p


def parse_ks(text: str | None, num_samples: int) -> list[int]:
  """The k's of ``--k`` (checked against n), or the default {1, 4, n} ∩ [1, n]."""
  if text is None:
    return sorted({k for k in (*DEFAULT_KS, num_samples) if k <= num_samples})
  try:
    ks = sorted({int(part) for part in text.split(",") if part.strip()})
  except ValueError:
    raise UsageError(f"--k must be comma-separated integers, e.g. --k=1,4; got {text!r}.") from None
  if not ks or ks[0] < 1:
    raise UsageError(f"--k needs integers >= 1, got {text!r}.")
  if ks[-1] > num_samples:
    raise UsageError(f"--k={ks[-1]} exceeds --num_samples={num_samples}: pass@k needs at least k samples per "
                     f"problem; raise --num_samples to {ks[-1]} or lower --k.")
  return ks


def parse_mesh(text: str | None):
  """The ``jax.sharding.Mesh`` of ``--mesh`` over this process's devices, or None without the flag."""
  if text is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from capo_jax import sharding  # pylint: disable=g-import-not-at-top
  from capo_jax.config import ConfigError, MeshConfig  # pylint: disable=g-import-not-at-top
  try:
    sizes = [int(part) for part in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise UsageError(f"--mesh takes three comma-separated integers data,fsdp,tensor (e.g. --mesh=-1,1,1), got "
                     f"{text!r}.")
  try:
    return sharding.make_mesh(MeshConfig(*sizes), devices=jax.local_devices())
  except ConfigError as e:
    raise UsageError(f"--mesh={text}: {e}") from None


def check_args(args) -> None:
  """Flag values that need no file: raise UsageError naming the flag."""
  if not args.data and not args.export_hf:
    raise UsageError("--data is required (a data file to evaluate on), unless --export_hf only exports.")
  for name, minimum in (("num_samples", 1), ("max_new_tokens", 1), ("batch_size", 1), ("max_prompt_tokens", 1),
                        ("num_problems", 1), ("seed", 0)):
    value = getattr(args, name)
    if value is not None and value < minimum:
      raise UsageError(f"--{name} must be >= {minimum}, got {value}.")
  if not args.temperature >= 0.0:
    raise UsageError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}.")
  if not 0.0 < args.top_p <= 1.0:
    raise UsageError(f"--top_p must be in (0, 1], got {args.top_p}.")
  if not args.reward_timeout_s > 0:
    raise UsageError(f"--reward_timeout_s must be > 0, got {args.reward_timeout_s}.")
  if args.out:
    if os.path.isdir(args.out):
      raise UsageError(f"--out={args.out} is a folder; pass a file path such as "
                       f"{os.path.join(args.out, 'eval.json')}.")
    parent = os.path.dirname(os.path.abspath(args.out))
    try:
      os.makedirs(parent, exist_ok=True)
    except OSError as e:
      raise UsageError(f"--out={args.out}: cannot create {parent} ({e.strerror}).") from None
    if not os.access(parent, os.W_OK):
      raise UsageError(f"--out={args.out}: {parent} is not writable.")


# ---------------------------------------------------------------------------------------------------------------
# The policy.


class Policy(NamedTuple):
  """A loaded policy: the model, its tokenizer, the ids that end a completion, and where it came from."""
  model: Any
  tokenizer: Any
  stop_ids: tuple[int, ...]
  source: dict[str, Any]


def _stop_ids(tokenizer, model_folder: str | os.PathLike | None) -> tuple[int, ...]:
  """The tokenizer's eos, then the eos ids of ``model_folder/generation_config.json`` (if any)."""
  ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
  path = None if model_folder is None else pathlib.Path(model_folder) / "generation_config.json"
  if path is not None and path.exists():
    eos = json.loads(path.read_text()).get("eos_token_id")
    for i in ([] if eos is None else eos if isinstance(eos, list) else [eos]):
      if int(i) not in ids:
        ids.append(int(i))
  if not ids:
    raise UsageError("the tokenizer has no eos_token and the model folder lists no eos_token_id: completions could "
                     "never stop; use the tokenizer the model was trained with.")
  return tuple(ids)


def _load_tokenizer(folder) -> Any:
  from capo_jax.tokenization import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(folder)


def load_hf_policy(folder: pathlib.Path, tokenizer_folder: str | None, dtype: str) -> Policy:
  """An HF folder: ``capo_jax.models.load_hf`` and the folder's (or ``tokenizer_folder``'s) tokenizer."""
  from capo_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  from capo_jax.tokenization import check_tokenizer_fits  # pylint: disable=g-import-not-at-top
  tokenizer_folder = tokenizer_folder or folder
  if not (pathlib.Path(tokenizer_folder) / "tokenizer.json").exists():
    raise UsageError(f"{tokenizer_folder} has no tokenizer.json; pass --tokenizer=<folder with tokenizer.json>.")
  tokenizer = _load_tokenizer(tokenizer_folder)
  model = load_hf(folder, dtype=dtype)
  check_tokenizer_fits(tokenizer, model)
  return Policy(model, tokenizer, _stop_ids(tokenizer, folder), {"kind": "hf", "path": str(folder), "step": None})


def find_run(path: pathlib.Path, step: int | None) -> tuple[pathlib.Path, int | None] | None:
  """``(workdir, step)`` of a run workdir, its checkpoints/ folder or one ``checkpoints/<step>`` folder; None: not a
  run checkpoint."""
  if (path / "config.gin").exists() and (path / "checkpoints").is_dir():
    return path, step
  if path.name == "checkpoints" and (path.parent / "config.gin").exists():
    return path.parent, step
  if path.name.isdigit() and path.parent.name == "checkpoints" and (path.parent.parent / "config.gin").exists():
    if step is not None and step != int(path.name):
      raise UsageError(f"--step={step} contradicts the checkpoint folder {path} (step {path.name}); drop --step.")
    return path.parent.parent, int(path.name)
  return None


class _NoTask:
  """Stands in for a run's task when only the shapes of its state are needed (no data is read)."""

  def train_problems(self, position, count):
    raise NotImplementedError

  def eval_problems(self, count):
    raise NotImplementedError

  def score(self, completions, problems):
    raise NotImplementedError


def _parse_run_config(workdir: pathlib.Path, gin_params: Sequence[str]) -> tuple[str, Any]:
  """Parses the run's config.gin (+ ``gin_params``); returns ``(fingerprint, PolicyConfig)``."""
  import gin  # pylint: disable=g-import-not-at-top
  import capo_jax.data  # pylint: disable=g-import-not-at-top,unused-import  (registers DatasetTask)
  import capo_jax.tasks  # pylint: disable=g-import-not-at-top,unused-import  (registers the built-in tasks)
  from capo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  text = (workdir / "config.gin").read_text()
  first = text.split("\n", 1)[0]
  if not first.startswith("# fingerprint:"):
    raise UsageError(f"{workdir / 'config.gin'} has no '# fingerprint:' first line; is it a config.gin written by "
                     "experiments.run?")
  gin.clear_config()
  try:
    gin.parse_config(text)
    gin.parse_config(list(gin_params))
    policy = config_lib.PolicyConfig()
  except (ValueError, TypeError, KeyError, SyntaxError, ImportError) as e:
    raise UsageError(f"cannot rebuild the run from {workdir / 'config.gin'}: {e}") from None
  return first.split(":", 1)[1].strip(), policy


def load_run_policy(workdir: pathlib.Path, step: int | None, tokenizer_folder: str | None,
                    gin_params: Sequence[str], dtype: str) -> Policy:
  """The policy of a run checkpoint: ``TrainState.params`` restored with ``capo_jax.checkpointing.Checkpointer``
  onto the state the run's config rebuilds (module docstring for the tokenizer and architecture rule)."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from capo_jax import components  # pylint: disable=g-import-not-at-top
  from capo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from capo_jax.checkpointing import CheckpointError, Checkpointer  # pylint: disable=g-import-not-at-top
  from capo_jax.models import CausalLM, ModelConfig  # pylint: disable=g-import-not-at-top
  from capo_jax.tasks.base import task_tokenizer  # pylint: disable=g-import-not-at-top
  from capo_jax.tokenization import check_tokenizer_fits  # pylint: disable=g-import-not-at-top
  from capo_jax.trainer import TrainState  # pylint: disable=g-import-not-at-top

  fingerprint, policy = _parse_run_config(workdir, gin_params)
  init_from = policy.init_from
  if init_from is not None and not (pathlib.Path(init_from) / "config.json").exists():
    raise UsageError(f"the run started from PolicyConfig.init_from={init_from!r}, which has no config.json here (it "
                     "gives the architecture); pass --gin_param=\"PolicyConfig.init_from='<that model folder>'\".")
  task = _NoTask()
  if tokenizer_folder is not None:
    tokenizer = _load_tokenizer(tokenizer_folder)
  elif init_from is not None:
    tokenizer = _load_tokenizer(init_from)
  else:
    try:
      config = config_lib.TrainConfig()
    except (ValueError, TypeError, OSError) as e:
      raise UsageError(f"cannot build the run's task to get its tokenizer ({e}); pass --tokenizer=<folder>.") from None
    task, tokenizer = config.task, task_tokenizer(config.task)
    if tokenizer is None:
      raise UsageError(f"the run's task ({type(task).__name__}) brings no tokenizer and the run has no "
                       "PolicyConfig.init_from; pass --tokenizer=<folder with tokenizer.json>.")
  gin.parse_config("TrainConfig.task = None")  # the state's shapes need no data
  config = config_lib.TrainConfig(task=task)
  # The trainer's policy is float32 (load_hf's default, or a fresh CausalLM); the checkpoint is restored and verified
  # as saved, then cast to --dtype.
  if init_from is not None:
    architecture = ModelConfig.from_hf_dict(json.loads((pathlib.Path(init_from) / "config.json").read_text()),
                                            dtype="float32", param_dtype="float32")
  else:
    architecture = policy.architecture(len(tokenizer))
  check_tokenizer_fits(tokenizer, architecture)

  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: CausalLM(architecture, rngs=nnx.Rngs(0))))
  optimizer, _ = components.build_optimizer(config, logits_fn=lambda params, batch: None)  # init never calls it
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), TrainState(
      abstract_params, jax.eval_shape(optimizer.init, abstract_params), jax.eval_shape(lambda: jax.random.PRNGKey(0)),
      jax.ShapeDtypeStruct((), jnp.int32)))
  checkpointer = Checkpointer(str(workdir / "checkpoints"), fingerprint, log=lambda _: None)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise UsageError(f"{workdir / 'checkpoints'} holds no checkpoint yet.")
    if step is not None and step not in steps:
      raise UsageError(f"{workdir / 'checkpoints'} has no step {step}; it has steps {steps}.")
    state, meta = checkpointer.verify(abstract, steps[-1] if step is None else step, params_of=lambda s: s.params)
  except CheckpointError as e:
    raise UsageError(str(e)) from None
  finally:
    checkpointer.close()
  params = state.params
  if dtype != architecture.param_dtype:
    graphdef, cast_to = nnx.split(nnx.eval_shape(
        lambda: CausalLM(architecture.replace(dtype=dtype, param_dtype=dtype), rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda x, target: x.astype(target.dtype), params, cast_to)
  model = nnx.merge(graphdef, params)
  source = {"kind": "run", "path": str(workdir), "step": int(meta["step"]), "init_from": init_from}
  return Policy(model, tokenizer, _stop_ids(tokenizer, init_from), source)


def load_policy(path: str, *, tokenizer_folder: str | None = None, step: int | None = None,
                gin_params: Sequence[str] = (), dtype: str = "float32") -> Policy:
  """The policy of ``--checkpoint``: an HF folder or a run checkpoint (module docstring)."""
  folder = pathlib.Path(path)
  if not folder.exists():
    raise UsageError(f"--checkpoint={path} does not exist; pass an HF model folder or a run workdir.")
  if tokenizer_folder is not None and not (pathlib.Path(tokenizer_folder) / "tokenizer.json").exists():
    raise UsageError(f"--tokenizer={tokenizer_folder} has no tokenizer.json.")
  if (folder / "config.json").exists():
    if gin_params:
      raise UsageError("--gin_param applies to run checkpoints (it rebinds their config.gin); an HF folder has none.")
    return load_hf_policy(folder, tokenizer_folder, dtype)
  run = find_run(folder, step)
  if run is None:
    raise UsageError(f"--checkpoint={path} is neither an HF folder (config.json + safetensors) nor a run "
                     "(a workdir with config.gin and checkpoints/, or <workdir>/checkpoints/<step>).")
  return load_run_policy(run[0], run[1], tokenizer_folder, gin_params, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The problems.


def read_fields(paths: Sequence[str], *, file_format: str | None, schema: str | None, split: str) -> list[Any]:
  """The ``capo_jax.data.ProblemFields`` of every record of the data files, in file order."""
  from capo_jax.data import expand_paths, read_records, records_to_fields  # pylint: disable=g-import-not-at-top
  fields = []
  for path in expand_paths(list(paths)):
    fields.extend(records_to_fields(read_records(path, file_format, split=split), schema)[1])
  if not fields:
    raise UsageError(f"no record in {', '.join(paths)}.")
  return fields


def build_problems(fields: Sequence[Any], tokenizer, *, max_prompt_tokens: int | None,
                   num_problems: int | None) -> tuple[list[Any], int]:
  """Problems with prompts built for ``tokenizer`` as in training; ``(problems, number dropped as too long)``."""
  from capo_jax.data import build_prompt, prompt_lengths  # pylint: disable=g-import-not-at-top
  from capo_jax.tasks.base import Problem  # pylint: disable=g-import-not-at-top
  problems = [Problem(prompt=build_prompt(f.question, tokenizer), answer=f.answer, solution=f.solution,
                      metadata=dict(f.metadata)) for f in fields]
  dropped = 0
  if max_prompt_tokens is not None:
    lengths_n = prompt_lengths(tokenizer, [p.prompt for p in problems])
    kept = [p for p, length in zip(problems, lengths_n) if length <= max_prompt_tokens]
    dropped = len(problems) - len(kept)
    problems = kept
  if not problems:
    raise UsageError(f"every prompt is longer than --max_prompt_tokens={max_prompt_tokens}; raise it.")
  if num_problems is not None:
    problems = problems[:num_problems]
  return problems, dropped


# ---------------------------------------------------------------------------------------------------------------
# Sampling, scoring, metrics.


class Samples(NamedTuple):
  """n scored completions of each of P problems."""
  correct_pn: Any  # [P, n] bool
  answers_pn: list[list[str | None]]
  texts_pn: list[list[str]]
  reasons: dict[str, int]


def sample_and_score(policy: Policy, problems: Sequence[Any], *, num_samples: int, temperature: float, top_p: float,
                     max_new_tokens: int, batch_size: int, seed: int, reward_timeout_s: float,
                     mesh=None, log=lambda _: None) -> Samples:
  """Samples ``num_samples`` completions per problem in batches of ``batch_size`` prompts and scores them.

  Every batch has ``min(batch_size, P)`` prompts (the last one is filled up with copies of its final prompt, whose
  completions are dropped), so the sampler compiles once per prompt-length bucket. Batch b samples with
  ``fold_in(PRNGKey(seed), b)``. With ``mesh`` the weights are placed on it once, in the sampler's decoding layout
  (``capo_jax.sampling.decoding_shardings``), and every batch is sampled on it: the same completions as on one device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from capo_jax import sequences  # pylint: disable=g-import-not-at-top
  from capo_jax.evaluation import sample_completions  # pylint: disable=g-import-not-at-top
  from capo_jax import rewards  # pylint: disable=g-import-not-at-top
  from capo_jax.sampling import pad_prompts  # pylint: disable=g-import-not-at-top

  tokenizer = policy.tokenizer
  graphdef, params = nnx.split(policy.model)
  if mesh is not None:
    from capo_jax.sampling import decoding_shardings  # pylint: disable=g-import-not-at-top
    params = jax.device_put(params, decoding_shardings(params, mesh))
  prompts = sequences.encode_prompts(tokenizer, [p.prompt for p in problems])
  size = min(batch_size, len(problems))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else policy.stop_ids[0]
  reward_chunks, answers, texts, stats = [], [], [], rewards.MathRewardStats()
  pool = rewards.MathVerifyPool(timeout_s=reward_timeout_s)
  t0 = time.time()
  try:
    for b, start in enumerate(range(0, len(problems), size)):
      chunk = prompts[start:start + size]
      real = len(chunk)
      tokens, mask = pad_prompts(chunk + [chunk[-1]] * (size - real), pad_id=pad_id, multiple=64)
      batch_texts = sample_completions(graphdef, params, tokenizer, tokens, mask,
                                       jax.random.fold_in(jax.random.PRNGKey(seed), b), num_samples=num_samples,
                                       temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       stop_ids=policy.stop_ids, mesh=mesh)[:real * num_samples]
      golds = [p.answer for p in problems[start:start + real] for _ in range(num_samples)]
      details = rewards.math_reward_details(batch_texts, golds, pool=pool)
      reward_chunks.append(details.rewards_b)
      answers.extend(details.answer_keys_b)
      texts.extend(batch_texts)
      stats = stats + details.stats
      log(f"sampled {start + real}/{len(problems)} problems × {num_samples} ({time.time() - t0:.0f}s)")
  finally:
    pool.close()
  rewards_pn = np.concatenate(reward_chunks).reshape(len(problems), num_samples)
  rows = lambda flat: [list(flat[p * num_samples:(p + 1) * num_samples]) for p in range(len(problems))]
  return Samples(rewards_pn >= 0.5, rows(answers), rows(texts), stats.as_dict())


def breakdown_groups(problems: Sequence[Any], fields: Sequence[str]) -> dict[str, list[str | None]]:
  """``{field: one label per problem}`` for the fields some problem's metadata has."""
  from capo_jax.tasks.base import problem_metadata  # pylint: disable=g-import-not-at-top
  groups = {field: [problem_metadata(p).get(field) for p in problems] for field in fields}
  return {field: labels for field, labels in groups.items() if any(label is not None for label in labels)}


def metric_names(metrics: dict[str, Any]) -> list[str]:
  """The metric keys of an ``evaluate_samples`` result, in its order (pass@k, mean@k, maj@k)."""
  return [name for name in metrics if "@" in name]


def format_table(metrics: dict[str, Any]) -> str:
  """The metrics of ``evaluate_samples`` as a text table: one row for all problems, one per breakdown group."""
  names = metric_names(metrics)
  rows = [("all", metrics["num_problems"], [metrics[n] for n in names])]
  for field, table in metrics["breakdown"].items():
    for label, group in table.items():
      rows.append((f"{field}={label}", group["num_problems"], [group[n] for n in names]))
  width = max(12, *(len(r[0]) for r in rows))
  lines = [f"{'group':<{width}} {'problems':>8} " + " ".join(f"{n:>8}" for n in names)]
  for label, count, values in rows:
    lines.append(f"{label:<{width}} {count:>8} " + " ".join(f"{v:>8.4f}" for v in values))
  return "\n".join(lines)


def evaluate(args, log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict[str, Any]:
  """Runs the command on parsed arguments; returns the results written to ``--out``."""
  from capo_jax.data import DataError  # pylint: disable=g-import-not-at-top
  from capo_jax.evaluation import evaluate_samples  # pylint: disable=g-import-not-at-top

  check_args(args)
  ks = parse_ks(args.k, args.num_samples)
  mesh = parse_mesh(args.mesh)
  group_fields = [f.strip() for f in args.breakdown.split(",") if f.strip()]
  try:
    fields = read_fields(args.data, file_format=args.format, schema=args.schema, split=args.split) if args.data else []
    policy = load_policy(args.checkpoint, tokenizer_folder=args.tokenizer, step=args.step, gin_params=args.gin_param,
                         dtype=args.dtype)
    log(f"policy: {policy.source['kind']} {policy.source['path']}"
        + (f" step {policy.source['step']}" if policy.source["step"] is not None else ""))
    problems = dropped = None
    if fields:
      problems, dropped = build_problems(fields, policy.tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                                         num_problems=args.num_problems)
  except (DataError, ValueError, OSError) as e:
    raise UsageError(str(e)) from None
  if args.export_hf:
    from capo_jax.models.export import export_hf  # pylint: disable=g-import-not-at-top
    try:
      folder = export_hf(policy.model, args.export_hf, policy.tokenizer, stop_ids=policy.stop_ids,
                         temperature=args.temperature, top_p=args.top_p)
    except ValueError as e:
      raise UsageError(str(e)) from None
    log(f"exported the policy to {folder}")
  if problems is None:
    return {}

  log(f"evaluating {len(problems)} problems × {args.num_samples} samples (T={args.temperature:g}, "
      f"top_p={args.top_p:g}, max_new_tokens={args.max_new_tokens})")
  samples = sample_and_score(policy, problems, num_samples=args.num_samples, temperature=args.temperature,
                             top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             seed=args.seed, reward_timeout_s=args.reward_timeout_s, mesh=mesh, log=log)
  metrics = evaluate_samples(samples.correct_pn, ks, answers_pn=samples.answers_pn,
                             groups=breakdown_groups(problems, group_fields))
  results = {
      "checkpoint": policy.source,
      "data": list(args.data),
      "num_problems": len(problems),
      "dropped_too_long": dropped,
      "num_samples": args.num_samples,
      "ks": ks,
      "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                   "seed": args.seed, "stop_ids": list(policy.stop_ids)},
      "mesh": None if mesh is None else dict(mesh.shape),
      "metrics": {name: metrics[name] for name in metric_names(metrics)},
      "breakdown": metrics["breakdown"],
      "reasons": samples.reasons,
      "problems": [
          {"index": p, "answer": problem.answer, "metadata": dict(problem.metadata),
           "correct": [bool(c) for c in samples.correct_pn[p]], "answers": samples.answers_pn[p],
           **({"completions": samples.texts_pn[p]} if args.save_completions else {})}
          for p, problem in enumerate(problems)],
  }
  print(format_table(metrics), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    log(f"wrote {args.out}")
  return results


def main(argv: Sequence[str] | None = None) -> int:
  try:
    args = build_parser().parse_args(argv)
    evaluate(args)
  except UsageError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
