"""capo_jax's GRPO step beside TRL's and Tunix's, on one CPU shape, in one run (docs/PERFORMANCE.md, "Peers").

    python -m benchmarks.peers [--steps 12] [--skip-trl] [--skip-tunix] [--env-dir DIR] [--workdir DIR]

The shape: a random-init Qwen2 model of 657,536 parameters (vocabulary 512, hidden 128, 4 layers, 4 heads, 2 KV
heads, head dim 32, MLP 256, tied embeddings, float32), written once as an HF folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) by ``capo_jax.models.export.export_hf`` with the
embedded task's BPE tokenizer (``build_arith_tokenizer(vocab_size=512)``). Every framework trains GRPO from that
folder on the same prompts, in the same order: ``ArithTask(difficulty=0, seed=0).train_problems(0, 16 · steps)``,
16 prompts per step, 8 completions each, at most 32 generated tokens, temperature 1 (no top-k / top-p), no KL term, Adam
(lr 1e-6, global-norm clip 1.0), one optimizer step per batch, the seq-mean-token-mean loss with the 0.2 clip, on
the CPU. The reward is the task's: ``ArithTask.score`` for capo_jax, and for the peers ``benchmarks/peers/reward.py``,
the same rule in plain Python, checked here against ``ArithTask.score`` on generated strings before anything runs.

- capo_jax: ``capo_jax.trainer.train`` (the project's entry point) on a ``TrainConfig`` from the gin presets
  ``algorithms/grpo.gin`` and ``algorithms/capo.gin`` with ``PolicyConfig.init_from`` = the folder; generation is the
  ``rollout_s`` of each ``metrics.jsonl`` row and training its ``learner_s`` (evaluation rows are left out; the
  evaluations run outside the timed steps).
- TRL: ``benchmarks/peers/trl_grpo.py`` (``trl.GRPOTrainer``) in a scratch virtualenv ``<env-dir>/trl``.
- Tunix: ``benchmarks/peers/tunix_grpo.py`` (``GRPOLearner`` over an ``RLCluster``) in ``<env-dir>/tunix``.

Each scratch env is created on first use (``python -m venv``, then pip) and reused while its requirement list is
unchanged. The peers run one after the other, each in its own process. Reported per framework: the medians over
steps 3 … ``--steps`` (steps 1–2 hold compilation and warm-up) of generation, training and their per-step sum. The
last line is ``grpo_step_over_best_peer=<capo_jax GRPO step / the faster peer's step>``; the exit status is 1 only
when a peer was asked for and none could be measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

# The comparison is a CPU one: every side runs on the host CPU whatever accelerators the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parent.parent
PEERS_DIR = pathlib.Path(__file__).resolve().parent / "peers"
DEFAULT_ENV_DIR = os.path.join(os.path.expanduser("~"), ".cache", "capo_jax", "bench-envs")
DEFAULT_WORKDIR = os.path.join("runs", "peers")

# Each peer runs in a scratch virtualenv of its own, never in the project's environment. Tunix leaves jax and flax
# open; they are pinned to the project's versions so both JAX sides run the same XLA.
PEER_REQUIREMENTS = {
    "trl": ("torch==2.13.0", "trl==1.16.0", "transformers==5.24.0"),
    "tunix": ("google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8"),
}
PEER_SCRIPTS = {"trl": "trl_grpo.py", "tunix": "tunix_grpo.py"}
PEER_LABELS = {"trl": "TRL", "tunix": "Tunix"}
_MARKER = ".capo-bench-installed"

# The shape (module docstring).
VOCAB_SIZE = 512
ARCHITECTURE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                    tie_word_embeddings=True)
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, MAX_PROMPT_LENGTH = 16, 8, 32, 32
LEARNING_RATE = 1e-6
FIRST_TIMED_STEP = 3
PEER_TIMEOUT_S = 3600
# Largest |logit difference| between two frameworks' forward passes of the same weights that counts as the same.
LOGIT_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Scratch environments.


def peer_env(name: str, env_dir: str, log=print) -> tuple[str | None, str]:
  """``(python of the peer's scratch env, "")``, creating and pip-installing it on first use; ``(None, reason)``
  when it cannot be made."""
  folder = pathlib.Path(env_dir).expanduser().resolve() / name
  python = folder / "bin" / "python"
  wanted = "\n".join(PEER_REQUIREMENTS[name]) + "\n"
  marker = folder / _MARKER
  if python.exists() and marker.exists() and marker.read_text() == wanted:
    return str(python), ""
  log(f"{name}: creating the env {folder}: python -m venv, then pip install {' '.join(PEER_REQUIREMENTS[name])}")
  t0 = time.time()
  folder.parent.mkdir(parents=True, exist_ok=True)
  install_log = folder.parent / f"{name}-install.log"
  with open(install_log, "w") as out:
    steps = [[sys.executable, "-m", "venv", "--clear", str(folder)],
             [str(python), "-m", "pip", "install", "--upgrade", "pip"],
             [str(python), "-m", "pip", "install", *PEER_REQUIREMENTS[name]]]
    for command in steps:
      out.write("$ " + " ".join(command) + "\n")
      out.flush()
      if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
        return None, f"env install failed at `{' '.join(command[2:])}` (log: {install_log})"
  marker.write_text(wanted)
  log(f"{name}: env ready in {time.time() - t0:.0f} s (log: {install_log})")
  return str(python), ""


# ---------------------------------------------------------------------------------------------------------------
# The shared inputs: the model folder, the prompts, the reward.


def machine() -> str:
  """The machine in one line: platform, logical CPUs, CPU model."""
  model = ""
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  return f"{platform.platform()}, {os.cpu_count()} logical CPUs, {model or platform.processor() or 'unknown CPU'}"


def load_average() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def arith_task():
  from capo_jax.tasks import ArithTask  # pylint: disable=import-outside-toplevel
  return ArithTask(difficulty=0, seed=0, tokenizer_vocab_size=VOCAB_SIZE)


def write_inputs(workdir: pathlib.Path, steps: int) -> tuple[pathlib.Path, pathlib.Path, int]:
  """Writes the random-init model as an HF folder and the prompts (with answers) as JSONL; ``(folder, jsonl, number
  of parameters)``."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from capo_jax.config import PolicyConfig  # pylint: disable=import-outside-toplevel
  from capo_jax.models import CausalLM  # pylint: disable=import-outside-toplevel
  from capo_jax.models.export import export_hf  # pylint: disable=import-outside-toplevel
  from capo_jax.tasks import build_arith_tokenizer  # pylint: disable=import-outside-toplevel

  tokenizer = build_arith_tokenizer(vocab_size=VOCAB_SIZE)
  model = CausalLM(PolicyConfig(**ARCHITECTURE).architecture(len(tokenizer)), rngs=nnx.Rngs(0))
  folder = export_hf(model, workdir / "model", tokenizer, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS,
                     overwrite=True)
  prompts = workdir / "prompts.jsonl"
  with open(prompts, "w") as f:
    for problem in arith_task().train_problems(0, steps * PROMPTS_PER_STEP):
      f.write(json.dumps({"prompt": problem.prompt, "answer": problem.answer}) + "\n")
  size = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return folder, prompts, size


def peer_reward_module():
  spec = importlib.util.spec_from_file_location("peers_reward", PEERS_DIR / "reward.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reward_probe_strings(problems, tokenizer, seed: int = 0) -> list[tuple[str, object]]:
  """(completion, problem) pairs that exercise the boxed-answer rule: solutions, wrong and malformed boxes, nested
  and unbalanced braces, and decoded random tokens with and without a box."""
  rng = random.Random(seed)
  pairs = []
  for p in problems:
    a = p.answer
    texts = [p.solution, p.solution.replace(f"{{{a}}}", f"{{{a + 1}}}"), f"\\boxed{{ {a} }}", f"\\boxed{{+{a}}}",
             f"\\boxed{{0{a}}}", f"\\fbox{{{a}}}", f"\\boxed {{{a}}}", f"\\boxed{{{a}", f"\\boxed{{{a}}} \\boxed{{7}}",
             f"\\boxed{{7}} \\boxed{{{a}}}", f"\\boxed{{\\boxed{{{a}}}}}", f"\\boxed{{{a}.0}}", f"\\boxed{{-{a}}}",
             f"\\boxed{{1\\}}{a}}}", f"#### {a}", f"{a}", f"\\boxed{{{a}}}}}", f"\\boxed{{}}", "\\boxed{-0}"]
    pairs += [(t, p) for t in texts]
    for _ in range(4):
      text = tokenizer.decode([rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(1, 33))])
      pairs.append((text, p))
      pairs.append((text + f" \\boxed{{{a}}}", p))
  return pairs


def check_reward(tokenizer) -> int:
  """Checks the peers' reward against ``ArithTask.score``; the number of strings compared (raises on a mismatch)."""
  task = arith_task()
  pairs = reward_probe_strings(task.train_problems(0, 16), tokenizer)
  ours = task.score([t for t, _ in pairs], [p for _, p in pairs])
  peer = peer_reward_module().scores([t for t, _ in pairs], [p.answer for _, p in pairs])
  bad = [(t, p.answer, float(o), q) for (t, p), o, q in zip(pairs, ours, peer) if float(o) != q]
  if bad:
    raise SystemExit(f"benchmarks/peers/reward.py disagrees with ArithTask.score on {len(bad)} of {len(pairs)} "
                     f"strings, e.g. {bad[0]!r}")
  return len(pairs)


def our_check(folder: pathlib.Path, prompt: str) -> dict:
  """Our tokenization of ``prompt`` and our last-position logits from the folder's weights."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from capo_jax import sequences  # pylint: disable=import-outside-toplevel
  from capo_jax.models import load_hf  # pylint: disable=import-outside-toplevel
  from capo_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel

  ids = sequences.encode_prompts(load_tokenizer(str(folder)), [prompt])[0]
  logits = load_hf(str(folder))(np.asarray([ids], np.int32)).logits
  return {"ids": [int(i) for i in ids], "logits": [float(x) for x in np.asarray(logits)[0, -1]]}


# ---------------------------------------------------------------------------------------------------------------
# The runs.


def timed_medians(rows: list[dict], keys: tuple[str, str]) -> dict | None:
  """Medians over steps FIRST_TIMED_STEP… of generation, training and their per-step sum (all steps when fewer)."""
  rows = sorted(rows, key=lambda r: r["step"])
  timed = [r for r in rows if r["step"] >= FIRST_TIMED_STEP] or rows
  if not timed:
    return None
  gen, train = keys
  tokens = [r["tokens"] for r in timed if r.get("tokens") is not None]
  return {"generation_s": statistics.median(r[gen] for r in timed),
          "training_s": statistics.median(r[train] for r in timed),
          "step_s": statistics.median(r[gen] + r[train] for r in timed),
          "tokens": statistics.mean(tokens) if tokens else None,
          "steps": f"{timed[0]['step']}-{timed[-1]['step']}"}


def run_ours(algorithm: str, folder: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
  """capo_jax's trainer on the folder with the ``algorithms/<algorithm>.gin`` preset; medians of its rows."""
  import gin  # pylint: disable=import-outside-toplevel
  from capo_jax import trainer  # pylint: disable=import-outside-toplevel
  from experiments import run  # pylint: disable=import-outside-toplevel

  bindings = [
      "TrainConfig.task = @ArithTask()", "ArithTask.difficulty = 0", "ArithTask.seed = 0",
      f"ArithTask.tokenizer_vocab_size = {VOCAB_SIZE}", f"PolicyConfig.init_from = '{folder}'",
      "TrainConfig.seed = 0", f"TrainConfig.num_steps = {steps}",
      f"RolloutConfig.prompts_per_step = {PROMPTS_PER_STEP}", f"RolloutConfig.group_size = {GROUP_SIZE}",
      f"RolloutConfig.max_prompt_length = {MAX_PROMPT_LENGTH}", f"RolloutConfig.max_new_tokens = {MAX_NEW_TOKENS}",
      "RolloutConfig.temperature = 1.0", f"OptimizerConfig.learning_rate = {LEARNING_RATE}",
      # Evaluation only at the start and the end (outside the timed steps), on a few problems; no checkpoint
      # until the end.
      "EvalConfig.every = 1000000", "EvalConfig.num_problems = 16", "EvalConfig.k = 1",
      "CheckpointConfig.every = 1000000",
      # At kl_coef = 0 neither peer loads a reference policy: no reference forward pass here either.
      "LossConfig.track_kl = False",
  ]
  run_dir = workdir / f"capo_jax-{algorithm}"
  if run_dir.exists():
    shutil.rmtree(run_dir)  # a fresh run, never a resumed one
  gin.clear_config()
  cfg, text, fingerprint = run.parse_config([f"algorithms/{algorithm}.gin"], bindings)
  rows = trainer.train(cfg, str(run_dir), config_text=text, fingerprint=fingerprint,
                       cache_dir=str(workdir / "cache"), log=lambda _: None)
  steps_rows = [dict(r, tokens=r.get("completion_tokens_mean")) for r in rows if "rollout_s" in r]
  return timed_medians(steps_rows, ("rollout_s", "learner_s"))


def run_peer(name: str, python: str, folder: pathlib.Path, prompts: pathlib.Path, workdir: pathlib.Path,
             steps: int) -> tuple[dict | None, dict | None, str]:
  """Runs a peer's script in its env; ``(medians, its output, "")`` or ``(None, None, reason)``."""
  out, log_file = workdir / f"{name}.json", workdir / f"{name}.log"
  out.unlink(missing_ok=True)
  command = [python, str(PEERS_DIR / PEER_SCRIPTS[name]), "--model", str(folder), "--prompts", str(prompts),
             "--steps", str(steps), "--out", str(out)]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the project's env leaks in
  env["JAX_PLATFORMS"] = "cpu"
  try:
    with open(log_file, "w") as f:
      code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=PEER_TIMEOUT_S,
                            check=False).returncode
  except subprocess.TimeoutExpired:
    return None, None, f"timed out after {PEER_TIMEOUT_S} s (log: {log_file})"
  if code or not out.exists():
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    return None, None, f"exit {code}: {lines[-1][:200] if lines else 'no output'} (log: {log_file})"
  info = json.loads(out.read_text())
  rows = [dict(r, tokens=r.get("completion_tokens_mean")) for r in info["rows"]]
  return timed_medians(rows, ("generation_s", "training_s")), info, ""


def same_model(ours: dict, theirs: dict) -> str:
  """One line: whether a peer tokenized the first prompt as we do and computed the same logits from the folder."""
  if theirs is None:
    return "no check"
  ids = "same prompt ids" if theirs["ids"] == ours["ids"] else f"DIFFERENT prompt ids {theirs['ids']}"
  if theirs["ids"] != ours["ids"] or len(theirs["logits"]) != len(ours["logits"]):
    return ids
  diff = max(abs(a - b) for a, b in zip(theirs["logits"], ours["logits"]))
  verdict = "same weights" if diff <= LOGIT_TOLERANCE else "DIFFERENT logits"
  return f"{ids}, {verdict} (max |Δlogit| {diff:.1e} at the last prompt position)"


# ---------------------------------------------------------------------------------------------------------------
# Report.


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
  return f"{a[key] / b[key]:.2f}" if a and b and b[key] > 0 else "n/a"


def _ratios(a: dict | None, b: dict | None) -> str:
  if not (a and b):
    return "not measured"
  return (f"step {_ratio(a, b, 'step_s')} (generation {_ratio(a, b, 'generation_s')}, training "
          f"{_ratio(a, b, 'training_s')})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=12, help="RL steps per framework; medians over steps 3…steps")
  parser.add_argument("--skip-trl", action="store_true", help="do not run TRL")
  parser.add_argument("--skip-tunix", action="store_true", help="do not run Tunix")
  parser.add_argument("--env-dir", default=DEFAULT_ENV_DIR, help="where the peers' scratch virtualenvs are cached")
  parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="the model folder, prompts, runs and logs")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  peers = [name for name in ("trl", "tunix") if not getattr(args, f"skip_{name}")]
  workdir = pathlib.Path(args.workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)

  load_start = load_average()
  print(f"machine: {machine()}", flush=True)
  print(f"load average (1, 5, 15 min) at start: {load_start}", flush=True)

  pythons, reasons = {}, {}
  for name in peers:
    pythons[name], reason = peer_env(name, args.env_dir, log=lambda m: print(m, flush=True))
    if pythons[name] is None:
      reasons[PEER_LABELS[name]] = reason
      print(f"{name}: {reason}", flush=True)

  t0 = time.time()
  folder, prompts, size = write_inputs(workdir, args.steps)
  from capo_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  compared = check_reward(load_tokenizer(str(folder)))
  print(f"inputs: {folder} ({size:,} parameters), {prompts}; peers' reward agrees with ArithTask.score on "
        f"{compared} strings", flush=True)
  reference = our_check(folder, json.loads(prompts.read_text().splitlines()[0])["prompt"])

  results: dict[str, dict | None] = {}
  for algorithm in ("grpo", "capo"):
    start = time.time()
    results[f"capo_jax {algorithm.upper()}"] = run_ours(algorithm, folder, workdir, args.steps)
    print(f"capo_jax {algorithm.upper()}: {args.steps} steps in {time.time() - start:.0f} s", flush=True)
  checks, versions = {}, {}
  for name in peers:
    label = PEER_LABELS[name]
    if pythons[name] is None:
      results[label] = None
      continue
    start = time.time()
    results[label], info, reason = run_peer(name, pythons[name], folder, prompts, workdir, args.steps)
    if results[label] is None:
      reasons[label] = reason
      print(f"{label}: not measured: {reason}", flush=True)
      continue
    checks[label] = same_model(reference, info.get("check"))
    versions[label] = " ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    updates = info.get("updates", len(info["rows"]))
    print(f"{label} ({versions[label]}): {args.steps} steps, {updates} optimizer updates, in "
          f"{time.time() - start:.0f} s; {checks[label]}", flush=True)
  load_end = load_average()

  first = FIRST_TIMED_STEP if args.steps >= FIRST_TIMED_STEP else 1
  print()
  print(f"GRPO step on CPU: {PROMPTS_PER_STEP} prompts x {GROUP_SIZE} completions, {MAX_NEW_TOKENS} generated tokens, "
        f"T=1, random-init Qwen2 of {size:,} parameters; medians over steps {first}-{args.steps}")
  print(f"{'framework':<16}{'generation s':>14}{'training s':>12}{'step s':>10}{'tokens/completion':>19}")
  for label, medians in results.items():
    if medians is None:
      print(f"{label:<16}  not measured: {reasons.get(label) or 'no timed steps'}")
      continue
    tokens = f"{medians['tokens']:.1f}" if medians["tokens"] is not None else "n/a"
    print(f"{label:<16}{medians['generation_s']:>14.3f}{medians['training_s']:>12.3f}{medians['step_s']:>10.3f}"
          f"{tokens:>19}")
  print(f"machine: {machine()}")
  print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}; run {time.time() - t0:.0f} s "
        "(env creation excluded)")
  ours = results["capo_jax GRPO"]
  print(f"ours/TRL: {_ratios(ours, results.get('TRL')) if 'trl' in peers else 'skipped'}")
  print(f"ours/Tunix: {_ratios(ours, results.get('Tunix')) if 'tunix' in peers else 'skipped'}")
  print(f"CAPO/GRPO (ours): {_ratios(results['capo_jax CAPO'], ours)}")
  measured = [results[PEER_LABELS[n]] for n in peers if results.get(PEER_LABELS[n])]
  headline = ours["step_s"] / min(m["step_s"] for m in measured) if measured and ours else float("nan")
  summary = {"machine": machine(), "load_average_start": load_start, "load_average_end": load_end,
             "steps": args.steps, "timed_steps": f"{first}-{args.steps}", "results": results,
             "not_measured": reasons, "checks": checks, "versions": versions,
             "grpo_step_over_best_peer": headline}
  (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(f"results: {workdir / 'results.json'}")
  print(f"grpo_step_over_best_peer={headline:.3f}")
  return 1 if peers and not measured else 0


if __name__ == "__main__":
  sys.exit(main())
