"""`python -m experiments.eval`, `capo_jax.evaluation.evaluate_samples` and `capo_jax.models.export.export_hf`.

The policy under test is a tiny Qwen2 checkpoint written with transformers whose completion of any chat prompt is
`\\boxed{2}` or `\\boxed{5}` (drawn 50/50) and then eos (`write_boxed_answer_checkpoint`), so the sampled answers, the
reward and every metric have values that can be checked against the problems' gold answers. pass@k, mean@k and maj@k
are checked against brute-force references on synthetic correctness matrices; a run trained for one step with the
trainer is restored from its Orbax checkpoint, evaluated, exported, and loaded by transformers with equal logits.
"""

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from capo_jax.evaluation import evaluate_samples
from experiments import eval as eval_cli
from tests.hf_fixtures import build_tiny_tokenizer, load_torch_model, tiny_hf_config, write_tiny_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
# What the stand-in policy writes after the chat template's final "\n": each character determines the next.
BOXED_PREFIX = "\\boxed{"
STAND_IN_ANSWERS = ("2", "5")


def write_boxed_answer_checkpoint(path, *, scale: float = 5.0) -> pathlib.Path:
  """A tiny Qwen2 HF checkpoint (2 layers, hidden 32, the 99-token character tokenizer with a ChatML template, in
  the same folder) that completes any chat prompt with `\\boxed{a}<|endoftext|>`, a ∈ {2, 5} uniformly.

  A bigram model: o_proj and down_proj are zero, so every block passes its input through and the final hidden state
  is RMSNorm(embedding of the current token); chain character c embeds as the basis vector e_c (others as 0), and
  lm_head row n is scale·Σ e_c over the transitions c → n of "\\n" → "\\" → "b" … "{" → {"2", "5"} → "}" → eos. The
  next-token logit is then scale·√32 ≈ 28 on the chain's successor(s) and 0 elsewhere.
  """
  import torch
  import transformers

  tokenizer = build_tiny_tokenizer()
  token = tokenizer.convert_tokens_to_ids
  chain = ["\n", *BOXED_PREFIX]
  transitions = [(a, b) for a, b in zip(chain, chain[1:])]
  transitions += [("{", answer) for answer in STAND_IN_ANSWERS] + [(answer, "}") for answer in STAND_IN_ANSWERS]
  transitions += [("}", tokenizer.eos_token)]
  characters = sorted({c for pair in transitions for c in pair} - {tokenizer.eos_token})
  config = tiny_hf_config("qwen2", vocab_size=128, hidden_size=32, num_layers=2)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight.zero_()
      layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.zero_()
    model.lm_head.weight.zero_()
    model.model.norm.weight.fill_(1.0)
    basis = {c: i for i, c in enumerate(characters)}
    for c, i in basis.items():
      model.model.embed_tokens.weight[token(c), i] = 1.0
    for before, after in transitions:
      model.lm_head.weight[token(after), basis[before]] = scale
  folder = pathlib.Path(path)
  model.save_pretrained(folder)
  write_tiny_tokenizer(folder)
  return folder


def math500_records(answers, first: int = 0):
  """MATH500-style records whose gold answers are `answers` (questions numbered from `first`), with levels and
  subjects to break down by."""
  subjects = ("Algebra", "Prealgebra")
  return [{"problem": f"Problem {first + i}: what is the answer?", "solution": f"$\\boxed{{{a}}}$", "answer": a,
           "subject": subjects[i % 2], "level": 1 + i % 3, "unique_id": f"test/{i}.json"}
          for i, a in enumerate(answers)]


def write_jsonl(path, records) -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
  return write_boxed_answer_checkpoint(tmp_path_factory.mktemp("stand-in") / "model")


# ---------------------------------------------------------------------------------------------------------------
# The metrics against brute force.


def brute_pass_at_k(row, k):
  """The fraction of k-subsets of the n samples that hold a correct one."""
  subsets = list(itertools.combinations(range(len(row)), k))
  return sum(any(row[j] for j in s) for s in subsets) / len(subsets)


def brute_maj_at_k(answers, correct, k):
  """1 iff the answer voted most often among the first k (ties: the one seen first) was marked correct there."""
  votes = [a for a in answers[:k] if a is not None]
  if not votes:
    return 0.0
  best = max(votes.count(a) for a in votes)
  winner = next(a for a in votes if votes.count(a) == best)
  return float(any(answers[j] == winner and correct[j] for j in range(k)))


def test_pass_at_k_by_hand():
  # n = 4 samples, c = 2 correct: pass@1 = 1/2, pass@2 = 1 − C(2,2)/C(4,2) = 5/6, pass@3 = pass@4 = 1.
  out = evaluate_samples(np.array([[1, 0, 1, 0]]), (1, 2, 3, 4))
  assert out["pass@1"] == 0.5 and out["pass@2"] == pytest.approx(5 / 6, abs=1e-15)
  assert out["pass@3"] == out["pass@4"] == 1.0
  assert (out["mean@1"], out["mean@2"], out["mean@3"]) == (1.0, 0.5, pytest.approx(2 / 3))
  assert "maj@1" not in out and out["breakdown"] == {}


@pytest.mark.parametrize("num_problems,n,seed", [(7, 4, 0), (5, 6, 1), (12, 3, 2), (3, 8, 3)])
def test_evaluate_samples_equals_brute_force(num_problems, n, seed):
  rng = np.random.default_rng(seed)
  correct_pn = rng.random((num_problems, n)) < rng.random((num_problems, 1))
  pool = ["1", "2", "3", None]
  answers_pn = [[pool[rng.integers(len(pool))] for _ in range(n)] for _ in range(num_problems)]
  levels = [str(rng.integers(1, 4)) if rng.random() < 0.8 else None for _ in range(num_problems)]
  subjects = [("Algebra", "Geometry")[p % 2] for p in range(num_problems)]
  ks = tuple(range(1, n + 1))
  out = evaluate_samples(correct_pn, ks, answers_pn=answers_pn, groups={"level": levels, "subject": subjects})

  reference = {}
  for k in ks:
    reference[f"pass@{k}"] = [brute_pass_at_k(row, k) for row in correct_pn]
    reference[f"mean@{k}"] = [row[:k].mean() for row in correct_pn]
    reference[f"maj@{k}"] = [brute_maj_at_k(a, c, k) for a, c in zip(answers_pn, correct_pn)]
  assert [name for name in out if "@" in name] == ([f"pass@{k}" for k in ks] + [f"mean@{k}" for k in ks]
                                                   + [f"maj@{k}" for k in ks])
  assert (out["num_problems"], out["num_samples"]) == (num_problems, n)
  for name, per_problem in reference.items():
    assert out[name] == pytest.approx(np.mean(per_problem), abs=1e-12), name
  for field, labels in (("level", levels), ("subject", subjects)):
    table = out["breakdown"][field]
    assert list(table) == sorted({l for l in labels if l is not None})
    for label, group in table.items():
      members = [p for p, l in enumerate(labels) if l == label]
      assert group["num_problems"] == len(members)
      for name, per_problem in reference.items():
        assert group[name] == pytest.approx(np.mean([per_problem[p] for p in members]), abs=1e-12)


def test_evaluate_samples_refuses_k_above_n_and_misaligned_labels():
  with pytest.raises(ValueError, match="k=5 exceeds the n=4 samples"):
    evaluate_samples(np.ones((2, 4), bool), (1, 5))
  with pytest.raises(ValueError, match=r"groups\['level'\] needs one label per problem \(2\), got 3"):
    evaluate_samples(np.ones((2, 4), bool), (1,), groups={"level": ["1", "2", "3"]})


def test_default_and_explicit_ks():
  assert eval_cli.parse_ks(None, 4) == [1, 4]
  assert eval_cli.parse_ks(None, 8) == [1, 4, 8]
  assert eval_cli.parse_ks(None, 2) == [1, 2]
  assert eval_cli.parse_ks("4,1,2", 4) == [1, 2, 4]
  with pytest.raises(eval_cli.UsageError, match="--k=8 exceeds --num_samples=4"):
    eval_cli.parse_ks("1,8", 4)


# ---------------------------------------------------------------------------------------------------------------
# The command on an HF folder.


def check_results_against_the_samples(results, golds, ks):
  """Each sample's correctness is its answer == the gold, and every metric is the brute force of that matrix."""
  problems = results["problems"]
  assert [p["answer"] for p in problems] == golds
  for p in problems:
    assert set(p["answers"]) <= set(STAND_IN_ANSWERS)
    assert p["correct"] == [a == p["answer"] for a in p["answers"]]
  correct = np.array([p["correct"] for p in problems])
  answers = [p["answers"] for p in problems]
  for k in ks:
    assert results["metrics"][f"pass@{k}"] == pytest.approx(np.mean([brute_pass_at_k(r, k) for r in correct]))
    assert results["metrics"][f"maj@{k}"] == pytest.approx(
        np.mean([brute_maj_at_k(a, c, k) for a, c in zip(answers, correct)]))
  return correct


def test_cli_on_an_hf_folder_writes_the_metrics_and_prints_the_table(stand_in, tmp_path):
  golds = ["2", "5", "7", "2", "5"]  # "7" is never sampled: that problem scores 0 at every k
  data = write_jsonl(tmp_path / "math500.jsonl", math500_records(golds))
  out = tmp_path / "results" / "eval.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.eval", f"--checkpoint={stand_in}", f"--data={data}", "--num_samples=4",
       "--k=1,2,4", "--max_new_tokens=16", "--batch_size=2", f"--out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(out.read_text())
  assert results["checkpoint"] == {"kind": "hf", "path": str(stand_in), "step": None}
  assert (results["num_problems"], results["num_samples"], results["ks"]) == (5, 4, [1, 2, 4])
  assert results["sampling"] == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 16, "seed": 0,
                                 "stop_ids": [0]}
  correct = check_results_against_the_samples(results, golds, (1, 2, 4))
  assert 0 < correct.sum() < correct.size  # both answers were drawn
  assert not correct[2].any() and results["reasons"]["exact"] == correct.sum()
  assert results["reasons"]["mismatch"] == correct.size - correct.sum()
  # Per level (1 + i % 3) and subject (i % 2), from the per-problem pass@1 = c/n.
  pass1 = correct.mean(axis=1)
  assert results["breakdown"]["level"]["1"]["pass@1"] == pytest.approx(pass1[[0, 3]].mean())
  assert results["breakdown"]["subject"]["Prealgebra"]["pass@1"] == pytest.approx(pass1[[1, 3]].mean())
  assert results["breakdown"]["level"]["3"] == {"num_problems": 1, **{
      name: 0.0 for name in results["metrics"]}}  # problem 2, gold "7"
  header, *rows = result.stdout.strip().splitlines()
  assert header.split() == ["group", "problems", "pass@1", "pass@2", "pass@4", "mean@1", "mean@2", "mean@4",
                            "maj@1", "maj@2", "maj@4"]
  assert rows[0].split()[:3] == ["all", "5", f"{results['metrics']['pass@1']:.4f}"]
  assert [r.split()[0] for r in rows[1:]] == ["level=1", "level=2", "level=3", "subject=Algebra",
                                              "subject=Prealgebra"]


def test_cli_on_a_mesh_samples_the_one_device_completions(stand_in, tmp_path):
  # Four host devices in a subprocess; --mesh=2,2,1 splits the rows over data × fsdp and gathers the weights once.
  golds = ["2", "5", "7", "2", "5"]
  data = write_jsonl(tmp_path / "math500.jsonl", math500_records(golds))
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=flags)
  results = {}
  for name, extra in (("one_device", []), ("mesh", ["--mesh=2,2,1"])):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.eval", f"--checkpoint={stand_in}", f"--data={data}", "--num_samples=4",
         "--k=1,2,4", "--max_new_tokens=16", "--batch_size=2", "--save_completions", f"--out={out}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results[name] = json.loads(out.read_text())
  assert results["one_device"].pop("mesh") is None
  assert results["mesh"].pop("mesh") == {"data": 2, "fsdp": 2, "tensor": 1}
  assert results["mesh"] == results["one_device"]  # every completion's text, answer and score, and the metrics
  correct = check_results_against_the_samples(results["mesh"], golds, (1, 2, 4))
  assert 0 < correct.sum() < correct.size


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.fixture
def good_data(tmp_path):
  return write_jsonl(tmp_path / "math500.jsonl", math500_records(["2", "5"]))


@pytest.mark.parametrize("case,message", [
    ("missing_checkpoint", "--checkpoint=.*does not exist"),
    ("not_a_checkpoint", "is neither an HF folder .* nor a run"),
    ("unknown_format", "data: cannot tell the format of .*math500.csv"),
    ("missing_data", "data: .* does not exist"),
    ("k_above_n", "--k=8 exceeds --num_samples=4"),
    ("bad_flag", "unrecognized arguments: --samples=3"),
    ("bad_top_p", "--top_p must be in \\(0, 1\\]"),
    ("no_data", "--data is required"),
    ("bad_mesh", "--mesh takes three comma-separated integers data,fsdp,tensor .* got '2,2'"),
    ("mesh_too_big", "--mesh=2,1,1: MeshConfig: data × fsdp × tensor = 2 but there are 1 devices"),
])
def test_bad_input_gives_one_line_and_exit_2(case, message, stand_in, good_data, tmp_path, capsys):
  bad_format = tmp_path / "math500.csv"
  bad_format.write_text("problem,answer\n1+1,2\n")
  args = {"missing_checkpoint": [f"--checkpoint={tmp_path / 'nowhere'}", f"--data={good_data}"],
          "not_a_checkpoint": [f"--checkpoint={tmp_path}", f"--data={good_data}"],
          "unknown_format": [f"--checkpoint={stand_in}", f"--data={bad_format}"],
          "missing_data": [f"--checkpoint={stand_in}", f"--data={tmp_path / 'absent.jsonl'}"],
          "k_above_n": [f"--checkpoint={stand_in}", f"--data={good_data}", "--k=1,8"],
          "bad_flag": [f"--checkpoint={stand_in}", f"--data={good_data}", "--samples=3"],
          "bad_top_p": [f"--checkpoint={stand_in}", f"--data={good_data}", "--top_p=0"],
          "no_data": [f"--checkpoint={stand_in}"],
          "bad_mesh": [f"--checkpoint={stand_in}", f"--data={good_data}", "--mesh=2,2"],
          "mesh_too_big": [f"--checkpoint={stand_in}", f"--data={good_data}", "--mesh=2,1,1"]}[case]
  assert eval_cli.main(args) == 2
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  assert re.search(message, lines[0]), lines[0]
  assert captured.out == ""


def test_bad_input_exits_2_from_the_shell(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-m", "experiments.eval", f"--checkpoint={tmp_path / 'nowhere'}",
                           f"--data={tmp_path / 'd.jsonl'}", "--num_samples=2", "--k=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip() == "error: --k=4 exceeds --num_samples=2: pass@k needs at least k samples per " \
                                  "problem; raise --num_samples to 4 or lower --k."


def test_a_run_whose_model_or_tokenizer_cannot_be_found_names_the_flag(stand_in, good_data, tmp_path, capsys):
  """The tokenizer rule of experiments/eval.py on run workdirs (config.gin + checkpoints/), before any restore."""
  data_lines = f"import capo_jax.data\nTrainConfig.task = @DatasetTask()\nDatasetTask.train_files = '{good_data}'\n" \
               f"DatasetTask.eval_files = '{good_data}'\nDatasetTask.drop_eval_overlap = False\n"
  cases = {
      "no-model": ("", r"the run's task \(DatasetTask\) brings no tokenizer .* pass --tokenizer="),
      "moved-model": ("PolicyConfig.init_from = '/moved/Qwen'\n",
                      r"PolicyConfig.init_from='/moved/Qwen'.*no config.json here.*--gin_param="),
      "no-checkpoint": (f"PolicyConfig.init_from = '{stand_in}'\n", r"checkpoints holds no checkpoint yet"),
  }
  for name, (extra, message) in cases.items():
    workdir = tmp_path / name
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.gin").write_text(f"# fingerprint: 0123456789abcdef\n{data_lines}{extra}")
    assert eval_cli.main([f"--checkpoint={workdir}", f"--data={good_data}"]) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), (name, err)
  # A moved model folder is found again through --gin_param (then the missing checkpoint is what stops it).
  assert eval_cli.main([f"--checkpoint={tmp_path / 'moved-model'}", f"--data={good_data}",
                        f"--gin_param=PolicyConfig.init_from='{stand_in}'"]) == 2
  assert "holds no checkpoint yet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# A trained run: restore, evaluate, export, load in transformers.

RUN_GIN = """
import capo_jax.data
include 'algorithms/grpo.gin'
TrainConfig.task = @DatasetTask()
DatasetTask.train_files = '{train}'
DatasetTask.eval_files = '{eval}'
PolicyConfig.init_from = '{model}'
TrainConfig.num_steps = 1
RolloutConfig.prompts_per_step = 2
RolloutConfig.group_size = 4
RolloutConfig.max_prompt_length = 160
RolloutConfig.max_new_tokens = 16
OptimizerConfig.learning_rate = 1e-3
EvalConfig.num_problems = 2
EvalConfig.k = 2
EvalConfig.greedy = False
CheckpointConfig.every = 1
"""


def test_a_trained_run_is_evaluated_and_exported_with_equal_logits_in_transformers(stand_in, tmp_path):
  import gin
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  import torch
  import transformers
  from flax import nnx

  from capo_jax import trainer
  from capo_jax.models import load_hf
  from experiments import run

  train = write_jsonl(tmp_path / "train.jsonl", math500_records(["2", "5", "5", "2", "2", "5"]))
  held_out = write_jsonl(tmp_path / "test.jsonl", math500_records(["2", "5"], first=100))
  gin_file = tmp_path / "run.gin"
  gin_file.write_text(RUN_GIN.format(train=train, eval=held_out, model=stand_in))
  cfg, text, fingerprint = run.parse_config([str(gin_file)], [])
  workdir = tmp_path / "run"
  rows = trainer.train(cfg, str(workdir), config_text=text, fingerprint=fingerprint, log=lambda _: None)
  step_row = next(r for r in rows if "reward_mean" in r)
  assert 0 < step_row["reward_mean"] < 1 and step_row["grad_norm"] > 0  # a real update happened
  gin.clear_config()

  # The command restores the run's params from <workdir>/checkpoints/1, evaluates and exports them.
  exported = tmp_path / "export"
  out = tmp_path / "eval.json"
  assert eval_cli.main([f"--checkpoint={workdir / 'checkpoints' / '1'}", f"--data={held_out}", "--num_samples=2",
                        "--max_new_tokens=16", f"--export_hf={exported}", f"--out={out}"]) == 0
  results = json.loads(out.read_text())
  assert results["checkpoint"] == {"kind": "run", "path": str(workdir), "step": 1, "init_from": str(stand_in)}
  assert eval_cli.main([f"--checkpoint={workdir}", f"--data={held_out}", "--step=7"]) == 2  # no such step
  check_results_against_the_samples(results, ["2", "5"], (1, 2))

  # Restored = the arrays Orbax stored under TrainState.params, and not the starting weights.
  policy = eval_cli.load_policy(str(workdir))
  raw = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "1" / "state")["params"]
  stored = {path[:-1]: np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
  stored = {tuple(k.key for k in path): v for path, v in stored.items()}
  ours = {tuple(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(policy.model))}
  assert ours.keys() == stored.keys()
  for path, value in ours.items():
    np.testing.assert_array_equal(value, stored[path], err_msg=str(path))
  start = {tuple(str(k) for k in path): np.asarray(v[...])
           for path, v in nnx.to_flat_state(nnx.state(load_hf(stand_in)))}
  assert max(np.abs(ours[p] - start[p]).max() for p in ours) > 5e-4

  # transformers loads the export with our logits, its generation defaults, and the tokenizer with its template.
  files = {f.name for f in exported.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= files
  tokens = np.array([[0, 0, 1, 3 + 24, 3 + 30, 98, 1, 3 + 10, 98, 63]])  # left-padded, chat-like ids
  mask = (np.arange(tokens.shape[1]) >= 2).astype(np.int64)[None]
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    ref = load_torch_model(exported)(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(positions)).logits.numpy()
  logits = np.asarray(policy.model(jnp.asarray(tokens, jnp.int32), attention_mask_bt=jnp.asarray(mask, jnp.int32))
                      .logits)
  real = mask[0].astype(bool)
  assert np.abs(ref[0, real]).max() > 1.0
  np.testing.assert_allclose(logits[0, real], ref[0, real], atol=1e-4, rtol=0)

  generation = transformers.GenerationConfig.from_pretrained(str(exported))
  assert (generation.eos_token_id, generation.pad_token_id, generation.do_sample) == (0, 0, True)
  assert (generation.temperature, generation.top_p, generation.top_k) == (0.6, 0.95, 0)
  tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
  assert tokenizer_config["chat_template"] == build_tiny_tokenizer().chat_template
  served = transformers.PreTrainedTokenizerFast.from_pretrained(str(exported))
  messages = [{"role": "user", "content": "What is 2+3?"}]
  assert served.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
      "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
  assert served.encode("x = \\boxed{5}") == policy.tokenizer.encode("x = \\boxed{5}")
  hf_config = json.loads((exported / "config.json").read_text())
  assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (0, 0)


def test_generation_config_greedy_and_missing_eos():
  from capo_jax.models.export import generation_config

  tokenizer = build_tiny_tokenizer()
  assert generation_config(tokenizer, stop_ids=[2, 0], temperature=0.0, top_p=0.95) == {
      "eos_token_id": [0, 2], "pad_token_id": 0, "do_sample": False}
  assert generation_config(tokenizer, temperature=1.0, top_k=50, max_new_tokens=8) == {
      "eos_token_id": 0, "pad_token_id": 0, "do_sample": True, "temperature": 1.0, "top_k": 50,
      "max_new_tokens": 8}
  tokenizer.eos_token = None
  with pytest.raises(ValueError, match="no eos_token and no stop_ids"):
    generation_config(tokenizer)
