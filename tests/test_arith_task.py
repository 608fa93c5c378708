"""Tests for the embedded arithmetic task (capo_jax.tasks.arith) and its BPE tokenizer (capo_jax.tasks.tokenizer)."""

import collections
import os
import re
import subprocess
import sys

import pytest

from capo_jax.rewards import integer_reward
from capo_jax.tasks import (
    DIFFICULTIES,
    INSTRUCTION,
    ArithTask,
    Difficulty,
    build_arith_tokenizer,
    load_arith_tokenizer,
    solve_expression,
)

_STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


# -- problems and solutions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_solutions_are_arithmetically_correct(difficulty):
  task = ArithTask(seed=11, difficulty=difficulty)
  spec = DIFFICULTIES[difficulty]
  problems = task.train_problems(0, 300) + task.heldout(100)
  for p in problems:
    assert p.answer == eval(p.expression)  # noqa: S307 — Python's own precedence is the reference.
    assert p.question == f"What is {p.expression}?"
    assert p.prompt == f"{INSTRUCTION}\n{p.question}\n"
    assert p.text == p.prompt + p.solution
    num_ops = len(p.expression.split()) // 2
    assert spec.min_ops <= num_ops <= spec.max_ops
    *steps, box = p.solution.split(" ")
    assert box == f"\\boxed{{{p.answer}}}"
    assert len(steps) == num_ops
    for step in steps:  # Every written step is itself true arithmetic.
      a, op, b, result = _STEP.match(step.rstrip(".")).groups()
      assert eval(f"{a}{op}{b}") == int(result), step  # noqa: S307
      assert int(result) >= 0  # allow_negative=False
    assert steps[-1].rstrip(".").endswith(f"={p.answer}")
    lo = min(spec.add_range[0], spec.mul_range[0])
    hi = max(spec.add_range[1], spec.mul_range[1])
    assert all(lo <= int(x) <= hi for x in p.expression.split()[::2])


def test_solve_expression_order_of_operations():
  steps, value = solve_expression([37, 8, 6, 12], ["+", "*", "-"])
  assert steps == ["8*6=48", "37+48=85", "85-12=73"] and value == 73
  steps, value = solve_expression([2, 3, 4, 5], ["*", "-", "*"])  # 2*3 - 4*5 = -14
  assert steps == ["2*3=6", "4*5=20", "6-20=-14"] and value == -14
  with pytest.raises(ValueError, match="operator"):
    solve_expression([1, 2], ["/"])


def test_allow_negative_produces_negative_answers_with_correct_steps():
  task = ArithTask(seed=0, difficulty=1, allow_negative=True)
  problems = task.train_problems(0, 300)
  negatives = [p for p in problems if p.answer < 0]
  assert len(negatives) > 20  # 'a - b*c' with products up to 81 is negative often
  for p in negatives:
    assert p.answer == eval(p.expression)  # noqa: S307
    assert integer_reward(p.solution, p.answer) == 1.0


def test_splits_are_disjoint_for_any_seed():
  heldout_questions = {p.question for p in ArithTask(seed=0, difficulty=1).heldout(300)}
  assert len(heldout_questions) == 300  # held-out problems are distinct
  for seed in (0, 1):
    task = ArithTask(seed=seed, difficulty=1)
    train_questions = [p.question for p in task.train_problems(0, 4000)]
    assert not heldout_questions & set(train_questions)
    assert not any(task.is_heldout(q) for q in train_questions)
  # The held-out bucket holds about heldout_fraction of the problem space: half the draws of a 50/50 split come from
  # each side, so together they sample the space evenly; 10% of them should hash into the 10% bucket.
  half = ArithTask(seed=5, difficulty=1, heldout_fraction=0.5)
  questions = [p.question for p in half.train_problems(0, 500)] + [p.question for p in half.heldout(500)]
  frac = sum(ArithTask(seed=5, difficulty=1, heldout_fraction=0.1).is_heldout(q) for q in questions) / len(questions)
  assert 0.05 < frac < 0.15, frac


def test_generation_is_deterministic_and_batch_is_a_pure_function_of_step():
  a, b = ArithTask(seed=3, difficulty=2), ArithTask(seed=3, difficulty=2)
  assert a.batch(7, 16) == b.batch(7, 16)
  assert a.heldout(50) == b.heldout(50)
  # A resumed run asking for step 1 directly sees the same prompts as one that walked through step 0.
  assert a.batch(0, 8) + a.batch(1, 8) == b.train_problems(0, 16)
  assert a.batch(1, 8) != a.batch(2, 8)
  assert ArithTask(seed=4, difficulty=2).batch(7, 16) != a.batch(7, 16)
  assert ArithTask(seed=3, difficulty=1).batch(7, 16) != a.batch(7, 16)


def test_generation_is_identical_in_a_fresh_process():
  """The split hash and the streams must not depend on per-process state (e.g. Python's salted hash())."""
  code = ("from capo_jax.tasks.arith import ArithTask; t = ArithTask(seed=9, difficulty=2); "
          "print('|'.join(p.solution for p in t.batch(5, 4) + t.heldout(4)))")
  env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  task = ArithTask(seed=9, difficulty=2)
  assert out.stdout.strip() == "|".join(p.solution for p in task.batch(5, 4) + task.heldout(4))


def test_reference_solution_scores_one_and_wrong_answers_zero():
  task = ArithTask(seed=1, difficulty=2)
  for p in task.batch(0, 64):
    assert task.reward(p.solution, p) == 1.0
    wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
    assert task.reward(wrong, p) == 0.0
    assert task.reward(p.solution.rsplit(" ", 1)[0], p) == 0.0  # steps right, no box


def test_solve_expression_with_a_wrong_step_propagates_it():
  steps, value = solve_expression([37, 8, 6, 12], ["+", "*", "-"], errors={0: 1})
  assert steps == ["8*6=49", "37+49=86", "86-12=74"] and value == 74
  steps, value = solve_expression([3, 3, 9], ["*", "*"], errors={0: -2})  # the offset is multiplied on
  assert steps == ["3*3=7", "7*9=63"] and value == 63
  steps, value = solve_expression([37, 8, 6, 12], ["+", "*", "-"], errors={2: 2})
  assert steps == ["8*6=48", "37+48=85", "85-12=75"] and value == 75
  with pytest.raises(ValueError, match="step indices"):
    solve_expression([1, 2], ["+"], errors={1: 1})


def _wrong_steps(problem):
  """Indices of the written steps whose result is not the arithmetic of their own operands."""
  *steps, _ = problem.solution.split(" ")
  wrong = []
  for k, step in enumerate(steps):
    a, op, b, result = _STEP.match(step.rstrip(".")).groups()
    if eval(f"{a}{op}{b}") != int(result):  # noqa: S307
      wrong.append((k, int(result) - eval(f"{a}{op}{b}")))  # noqa: S307
  return wrong


@pytest.mark.parametrize("difficulty", [0, 3])
def test_wrong_step_fraction_corrupts_that_share_of_train_solutions_only(difficulty):
  clean = ArithTask(seed=4, difficulty=difficulty)
  task = ArithTask(seed=4, difficulty=difficulty, wrong_step_fraction=0.3)
  n = 2000
  corrupted = 0
  for p, q in zip(task.train_problems(10**9, n), clean.train_problems(10**9, n)):
    # Same problem stream and answers; only the worked solution may differ.
    assert (p.expression, p.question, p.prompt, p.answer) == (q.expression, q.question, q.prompt, q.answer)
    if p.solution == q.solution:
      continue
    corrupted += 1
    wrong = _wrong_steps(p)
    assert len(wrong) == 1 and wrong[0][1] in (-2, -1, 1, 2), p.solution  # exactly one wrong step, off by ≤ 2
    box = p.solution.split(" ")[-1]
    last_result = p.solution.split(" ")[-2].rstrip(".").split("=")[1]
    assert box == f"\\boxed{{{last_result}}}" and int(last_result) != p.answer  # the chain ends in a wrong answer
    assert all(int(x.rstrip(".").split("=")[1]) >= 0 for x in p.solution.split(" ")[:-1])  # allow_negative=False
    assert task.reward(p.solution, p) == 0.0 and task.reward(q.solution, p) == 1.0
  # Binomial(2000, 0.3): SD ≈ 20.5; allow ±4 SD (a few draws can find no non-negative offset and stay correct).
  assert abs(corrupted - 0.3 * n) < 82, corrupted
  assert task.heldout(200) == clean.heldout(200)  # evaluation never sees a corrupted solution


def test_wrong_step_sets_are_nested_and_the_position_option_is_obeyed():
  low = ArithTask(seed=1, difficulty=0, wrong_step_fraction=0.2).train_problems(0, 500)
  high = ArithTask(seed=1, difficulty=0, wrong_step_fraction=0.6).train_problems(0, 500)
  clean = ArithTask(seed=1, difficulty=0).train_problems(0, 500)
  low_set = {i for i, (p, q) in enumerate(zip(low, clean)) if p.solution != q.solution}
  high_set = {i for i, (p, q) in enumerate(zip(high, clean)) if p.solution != q.solution}
  assert low_set < high_set and 60 < len(low_set) < 140 and 240 < len(high_set) < 360
  assert all(low[i] == high[i] for i in low_set)  # corrupted the same way at both fractions
  for where, expected in (("first", {0}), ("last", {1}), ("any", {0, 1})):
    task = ArithTask(seed=1, difficulty=0, wrong_step_fraction=0.5, wrong_step_position=where)
    seen = {_wrong_steps(p)[0][0] for p, q in zip(task.train_problems(0, 300), clean[:300])
            if p.solution != q.solution}
    assert seen == expected, (where, seen)


def test_early_box_stops_one_step_early_and_boxes_the_previous_result():
  clean = ArithTask(seed=2, difficulty=3).train_problems(0, 400)
  task = ArithTask(seed=2, difficulty=3, wrong_step_fraction=0.5, wrong_step_kind="early_box")
  changed = 0
  for p, q in zip(task.train_problems(0, 400), clean):
    assert (p.expression, p.answer) == (q.expression, q.answer)
    if p.solution == q.solution:
      continue
    changed += 1
    *steps, box = p.solution.split(" ")
    *clean_steps, _ = q.solution.split(" ")
    assert steps == clean_steps[:-1] and len(clean_steps) >= 2  # the last step is left out, the others are right
    assert box == f"\\boxed{{{steps[-1].rstrip('.').split('=')[1]}}}" and task.reward(p.solution, p) == 0.0
  assert 160 < changed < 240, changed  # Binomial(400, 0.5) ± 4 SD; difficulty 3 always has ≥ 2 operators


def test_bad_task_input():
  with pytest.raises(ValueError, match="difficulty must be one of"):
    ArithTask(difficulty=7)
  with pytest.raises(ValueError, match="seed"):
    ArithTask(seed=-1)
  with pytest.raises(ValueError, match="heldout_fraction"):
    ArithTask(heldout_fraction=1.0)
  with pytest.raises(ValueError, match="min_ops"):
    ArithTask(difficulty=Difficulty(3, 2, (0, 9), (2, 9)))
  with pytest.raises(ValueError, match="step"):
    ArithTask().batch(-1, 4)
  with pytest.raises(ValueError, match="wrong_step_fraction must lie in"):
    ArithTask(wrong_step_fraction=1.0)
  with pytest.raises(ValueError, match="wrong_step_position must be one of"):
    ArithTask(wrong_step_position="middle")
  with pytest.raises(ValueError, match="wrong_step_kind must be one of"):
    ArithTask(wrong_step_kind="swap")
  with pytest.raises(ValueError, match="num_prompts"):
    ArithTask().batch(0, 0)
  # A 16-problem space split in half cannot supply 50 distinct held-out problems.
  tiny = ArithTask(difficulty=Difficulty(1, 1, (0, 3), (2, 2), ops="+"), heldout_fraction=0.5)
  with pytest.raises(ValueError, match="fewer than 50 distinct"):
    tiny.heldout(50)


# -- tokenizer -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("arith_tokenizer")
  build_arith_tokenizer(path)
  return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return load_arith_tokenizer(tokenizer_dir)


def _task_texts(n_per_difficulty=250):
  texts = []
  for difficulty in sorted(DIFFICULTIES):
    task = ArithTask(seed=123, difficulty=difficulty)
    texts += [p.text for p in task.train_problems(0, n_per_difficulty // 2)]
    texts += [p.text for p in task.heldout(n_per_difficulty - n_per_difficulty // 2)]
  return texts


def test_tokenizer_vocabulary_and_special_tokens(tokenizer):
  assert 512 <= len(tokenizer) <= 1024 and len(tokenizer) > 50
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
  assert tokenizer.padding_side == "left"
  ids = tokenizer("What is 3 + 4?")["input_ids"]
  assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
  # Digits are single tokens, as in Qwen2.
  assert tokenizer.tokenize("1980") == ["1", "9", "8", "0"]


def test_tokenizer_round_trips_task_texts_exactly(tokenizer):
  texts = _task_texts()
  assert len(texts) == 250 * len(DIFFICULTIES)
  texts += ["  two  spaces\tand a tab\n\nnewlines", "Ünïcödé → ∑ 数学 🙂", "\\boxed{\\frac{1}{2}}", "x" * 300, ""]
  for text in texts:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos == [tokenizer.bos_token_id] + ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text


def test_prompt_and_solution_tokenize_independently(tokenizer):
  """The prompt/completion boundary is a pre-token boundary: tokenizing them apart gives the joint tokens, so the
  warm start can mask the prompt and RL can append sampled completions to prompt ids."""
  for p in ArithTask(seed=2, difficulty=2).batch(0, 50):
    joint = tokenizer.encode(p.text, add_special_tokens=False)
    apart = tokenizer.encode(p.prompt, add_special_tokens=False) + tokenizer.encode(p.solution, add_special_tokens=False)
    assert joint == apart


def test_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
  build_arith_tokenizer(tmp_path)
  with open(tokenizer_dir / "tokenizer.json", "rb") as f1, open(tmp_path / "tokenizer.json", "rb") as f2:
    assert f1.read() == f2.read()


def test_token_frequencies_have_a_long_tail(tokenizer):
  counts = collections.Counter()
  for text in _task_texts():
    counts.update(tokenizer.encode(text, add_special_tokens=False))
  vocab = len(tokenizer)
  used = len(counts)
  total = sum(counts.values())
  never = [i for i in range(vocab) if i not in counts and i > tokenizer.eos_token_id]
  # Learned merges (multi-character English/number-word sub-words), not merely the unused raw bytes.
  never_subwords = [i for i in never if len(tokenizer.convert_ids_to_tokens(i)) > 1]
  head, tail_used = counts.most_common()[0][1], counts.most_common()[-1][1]
  print(f"\ntask text (1000 texts, {total} tokens) uses {used}/{vocab} tokens; {len(never)} never appear, "
        f"{len(never_subwords)} of them learned sub-words; most/least used token counts {head}/{tail_used}")
  # The task needs fewer than K = 50 tokens, so the policy's top-50 can hold all of them, while the softmax spreads
  # over ~990 tokens the task never uses: top-K truncation cuts a real tail, as in an LLM.
  assert 20 < used < 50
  assert len(never) > 900
  assert len(never_subwords) > 600
  assert head > 5 * tail_used  # frequencies are skewed even inside the task's head
