"""capo_jax.data: readers, schemas, the shuffled / sharded / resumable stream, prompts, length filtering, errors.

Every data set is written by the test (tests/data_fixtures.py) into a temporary folder: JSONL, JSON, parquet and a
TFDS array_record dataset prepared by a GeneratorBasedBuilder and read back without TensorFlow.
"""

import json
import logging
import re
import subprocess
import sys
from collections import Counter

import gin
import numpy as np
import pytest

from capo_jax.data import (
    SYSTEM_PROMPT,
    DataError,
    DatasetTask,
    build_prompt,
    epoch_permutation,
    gsm8k_answer,
    math_answer,
    read_records,
)
from capo_jax.tasks.base import Problem, check_task
from tests import data_fixtures as fx

FORMATS = ("jsonl", "json", "parquet", "tfds")
SCHEMAS = tuple(fx.RAW)


def plain_prompt(question: str) -> str:
  return f"{question}\n{SYSTEM_PROMPT}\n"


def make_task(train, evals, **kwargs) -> DatasetTask:
  kwargs.setdefault("num_processes", 1)
  kwargs.setdefault("process_index", 0)
  return DatasetTask(train_files=str(train), eval_files=str(evals), **kwargs)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """(schema, format) -> (train path, eval path), written once for the module."""
  root = tmp_path_factory.mktemp("datasets")
  return {(schema, fmt): fx.write_dataset(root / fmt, schema, fmt) for schema in SCHEMAS for fmt in FORMATS}


@pytest.fixture(scope="module")
def math_jsonl(datasets):
  return datasets[("math", "jsonl")]


# -- schemas x formats ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", FORMATS)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_schema_and_format_maps_to_the_expected_problems(datasets, schema, file_format):
  train, evals = datasets[(schema, file_format)]
  task = make_task(train, evals)
  assert task.train_schemas == (schema,) and task.eval_schemas == (schema,)
  for split, problems in (("train", task.train_problems(0, task.num_train)), ("test", task.eval_problems(100))):
    expected = {plain_prompt(q): (a, s, m) for q, a, s, m in fx.EXPECTED[schema][split]}
    assert len(problems) == len(expected)
    # A TFDS split stores its examples in its own (hashed) order; files keep theirs. Compare as a mapping.
    got = {p.prompt: (p.answer, p.solution, dict(p.metadata)) for p in problems}
    assert got == expected
    assert all(isinstance(p, Problem) and isinstance(p.answer, str) for p in problems)
  if file_format != "tfds":
    assert [p.prompt for p in task.eval_problems(100)] == [plain_prompt(e[0]) for e in fx.EXPECTED[schema]["test"]]


def test_math_lighteval_is_math_under_its_own_source_name(math_jsonl):
  task = make_task(*math_jsonl, schema="math_lighteval")
  assert task.train_schemas == ("math_lighteval",)
  assert {p.answer for p in task.train_problems(0, task.num_train)} == {"\\frac{1}{2}", "4", "3", "2\\sqrt{2}", "6"}
  assert {p.metadata["source"] for p in task.eval_problems(10)} == {"math_lighteval"}


def test_math_answer_is_the_last_boxed_with_nested_braces():
  assert math_answer("so $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
  assert math_answer("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}.") == "\\sqrt{\\frac{a}{b}}"
  with pytest.raises(ValueError, match="boxed"):
    math_answer("no box here")


def test_gsm8k_answer_strips_commas_and_boxes_the_final_line():
  assert gsm8k_answer("He has 1,000+234 = <<1000+234=1234>>1,234.\n#### 1,234") == (
      "1234", "He has 1,000+234 = 1,234.\n\\boxed{1234}")
  with pytest.raises(ValueError, match="####"):
    gsm8k_answer("no final line")


def test_files_and_globs_concatenate_in_order_with_per_file_schemas(tmp_path):
  fx.write_jsonl(tmp_path / "part-0.jsonl", fx.RAW["math"]["train"][:2])
  fx.write_jsonl(tmp_path / "part-1.jsonl", fx.RAW["math"]["train"][2:])
  gsm = fx.write_parquet(tmp_path / "gsm.parquet", fx.RAW["gsm8k"]["train"])
  evals = fx.write_jsonl(tmp_path / "eval.jsonl", fx.RAW["deepscaler"]["test"])
  task = DatasetTask(train_files=[str(tmp_path / "part-*.jsonl"), str(gsm)], eval_files=str(evals),
                     num_processes=1, process_index=0)
  assert task.train_schemas == ("math", "math", "gsm8k")
  expected = [e[1] for e in fx.EXPECTED["math"]["train"] + fx.EXPECTED["gsm8k"]["train"]]
  assert task.num_train == len(expected) == 9
  # The stream is a permutation of the concatenation: undo it with the epoch-0 permutation.
  perm = epoch_permutation(0, 0, 9)
  stream = task.train_problems(0, 9)
  unshuffled = [None] * 9
  for position, index in enumerate(perm):
    unshuffled[index] = stream[position].answer
  assert unshuffled == expected


def test_reader_gives_random_access_records(datasets):
  for file_format in FORMATS:
    train, _ = datasets[("math500", file_format)]
    records = read_records(train, split="train")
    assert len(records) == 4
    rows = list(records)
    assert [records[i] for i in range(4)] == rows and records[-1] == rows[3] and records[1:3] == rows[1:3]
    assert {r["unique_id"] for r in rows} == {"test/precalculus/807.json", "test/prealgebra/1.json",
                                              "test/algebra/2.json", "test/prealgebra/3.json"}
    assert all(isinstance(r["level"], int) and isinstance(r["problem"], str) for r in rows)
    with pytest.raises(IndexError, match="out of range"):
      records[4]  # pylint: disable=pointless-statement


def test_importing_capo_jax_data_pulls_in_no_reader_backend():
  code = ("import sys, capo_jax.data; print([m for m in ('tensorflow', 'tensorflow_datasets', 'grain', 'pyarrow', "
          "'torch', 'transformers') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_tfds_reader_needs_no_tensorflow(datasets):
  train, _ = datasets[("gsm8k", "tfds")]
  records = read_records(train, split="test")
  assert len(records) == 2 and sorted(records[0]) == ["answer", "question"]
  assert isinstance(records[0]["question"], str)  # TFDS Text arrives as bytes; the reader decodes it
  assert "tensorflow" not in sys.modules


def test_tfds_reads_a_version_folder_and_split_slices(datasets):
  folder, _ = datasets[("deepscaler", "tfds")]
  assert len(read_records(folder / "1.0.0", split="train")) == 3
  assert len(read_records(folder, split="train[:2]")) == 2


# -- the stream: shuffling, resume, sharding ---------------------------------------------------------------------------


def test_epoch_permutation_is_a_fixed_function_of_seed_and_epoch():
  # Pinned values: a change here changes every resumed run's data order.
  np.testing.assert_array_equal(epoch_permutation(0, 0, 8), [4, 0, 1, 7, 6, 2, 5, 3])
  np.testing.assert_array_equal(epoch_permutation(0, 1, 8), [7, 0, 1, 6, 3, 4, 5, 2])
  np.testing.assert_array_equal(epoch_permutation(1, 0, 8), [3, 5, 2, 4, 1, 0, 6, 7])
  perms = [tuple(epoch_permutation(seed, epoch, 50)) for seed in range(3) for epoch in range(5)]
  assert all(sorted(p) == list(range(50)) for p in perms)
  assert len(set(perms)) == len(perms)


def test_every_problem_once_per_epoch_and_epochs_reshuffle(datasets):
  task = make_task(*datasets[("math", "parquet")], seed=3)
  n = task.num_train
  epochs = [task.train_problems(e * n, n) for e in range(4)]
  answers = sorted(e[1] for e in fx.EXPECTED["math"]["train"])
  for epoch in epochs:
    assert sorted(p.answer for p in epoch) == answers
  # Epoch e is the file order permuted by epoch_permutation(seed, e, N): a new order each epoch.
  file_order = [plain_prompt(e[0]) for e in fx.EXPECTED["math"]["train"]]
  for e, epoch in enumerate(epochs):
    assert [p.prompt for p in epoch] == [file_order[i] for i in epoch_permutation(3, e, n)]
  assert len({tuple(p.prompt for p in epoch) for epoch in epochs}) > 1
  # The stream is the concatenation of the epochs, whatever the call boundaries.
  assert task.train_problems(0, 4 * n) == [p for epoch in epochs for p in epoch]
  assert task.train_problems(n - 2, 4)[:2] == epochs[0][-2:] and task.train_problems(n - 2, 4)[2:] == epochs[1][:2]


def test_same_seed_same_order_other_seed_other_order(datasets):
  files = datasets[("gsm8k", "json")]
  first, again, other = make_task(*files, seed=7), make_task(*files, seed=7), make_task(*files, seed=8)
  stream = first.train_problems(0, 20)
  assert again.train_problems(0, 20) == stream
  assert other.train_problems(0, 20) != stream


def test_resume_from_a_stored_position_matches_the_uninterrupted_stream(datasets):
  files = datasets[("math500", "tfds")]
  uninterrupted = make_task(*files, seed=1)
  per_step = [uninterrupted.train_problems(step * 3, 3) for step in range(6)]
  restarted = make_task(*files, seed=1)  # a new process after a restart: files re-read, position 9 restored
  assert [restarted.train_problems(step * 3, 3) for step in range(3, 6)] == per_step[3:]
  assert restarted.train_problems(9, 9) == [p for step in per_step[3:] for p in step]


@pytest.mark.parametrize("num_processes", [2, 3])
def test_process_shards_union_to_the_single_process_batch(datasets, num_processes):
  """Process i's local positions p are global positions p·n + i, so at step s (position s·c, count c) the union of
  the n shards is exactly the single-process batch at step s with count c·n, interleaved:
  single[k·n + i] = shard_i[k]."""
  files = datasets[("math", "json")]
  single = make_task(*files, seed=5)
  shards = [make_task(*files, seed=5, num_processes=num_processes, process_index=i) for i in range(num_processes)]
  count = 3
  for step in range(4):
    batch = single.train_problems(step * count * num_processes, count * num_processes)
    per_process = [shard.train_problems(step * count, count) for shard in shards]
    assert [per_process[i][k] for k in range(count) for i in range(num_processes)] == batch
  for i, shard in enumerate(shards):
    np.testing.assert_array_equal(shard.global_positions(2, 3), [(2 + k) * num_processes + i for k in range(3)])


def test_process_defaults_are_read_from_jax_at_construction(math_jsonl):
  import jax  # pylint: disable=import-outside-toplevel

  task = DatasetTask(train_files=str(math_jsonl[0]), eval_files=str(math_jsonl[1]))
  assert (task.num_processes, task.process_index) == (jax.process_count(), jax.process_index()) == (1, 0)


def test_held_out_questions_never_enter_the_stream(tmp_path):
  train = fx.write_jsonl(tmp_path / "train.jsonl", fx.RAW["math"]["train"] + fx.RAW["math"]["test"][:1])
  evals = fx.write_jsonl(tmp_path / "test.jsonl", fx.RAW["math"]["test"])
  task = make_task(train, evals)
  assert task.train_dropped_overlap == 1 and task.num_train == 5
  eval_prompts = {p.prompt for p in task.eval_problems(10)}
  assert not eval_prompts & {p.prompt for p in task.train_problems(0, 50)}
  assert make_task(train, evals, drop_eval_overlap=False).num_train == 6


def test_eval_problems_are_the_first_count_in_file_order(math_jsonl):
  task = make_task(*math_jsonl)
  assert [p.answer for p in task.eval_problems(1)] == ["12"]
  assert [p.answer for p in task.eval_problems(50)] == ["12", "6"]


# -- prompts and length filtering --------------------------------------------------------------------------------------


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(math_jsonl, tmp_path):
  task = make_task(*math_jsonl)
  question = fx.EXPECTED["math"]["test"][0][0]
  assert task.eval_problems(1)[0].prompt == plain_prompt(question)

  chat = task.with_tokenizer(fx.tiny_tokenizer(fx.CHAT_TEMPLATE))
  assert chat.eval_problems(1)[0].prompt == (f"<|system|> {SYSTEM_PROMPT}\n<|user|> {question}\n<|assistant|> ")
  assert task.eval_problems(1)[0].prompt == plain_prompt(question)  # with_tokenizer returns a copy
  no_template = task.with_tokenizer(fx.tiny_tokenizer())
  assert no_template.eval_problems(1)[0].prompt == plain_prompt(question)
  user_only = make_task(*math_jsonl, system_role=False).with_tokenizer(fx.tiny_tokenizer(fx.CHAT_TEMPLATE))
  assert user_only.eval_problems(1)[0].prompt == f"<|user|> {question}\n{SYSTEM_PROMPT}\n<|assistant|> "
  # Same stream order and answers, only the prompt text changes.
  assert [p.answer for p in chat.train_problems(0, 10)] == [p.answer for p in task.train_problems(0, 10)]


def test_with_tokenizer_reuses_the_loaded_records(tmp_path):
  train = fx.write_jsonl(tmp_path / "train.jsonl", fx.RAW["gsm8k"]["train"])
  evals = fx.write_jsonl(tmp_path / "test.jsonl", fx.RAW["gsm8k"]["test"])
  task = make_task(train, evals)
  train.unlink()
  evals.unlink()
  chat = task.with_tokenizer(fx.tiny_tokenizer(fx.CHAT_TEMPLATE))
  assert chat.num_train == 4 and chat.prompt_tokenizer is not None


def test_build_prompt_round_trips_through_the_tokenizer():
  tokenizer = fx.tiny_tokenizer(fx.CHAT_TEMPLATE)
  prompt = build_prompt("What is 2 + 2 ?", tokenizer)
  ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  assert len(ids) == len(prompt.split()) == 3 + 12 + 6  # three role tags, the 12-word instruction, 6 words
  tokens = tokenizer.convert_ids_to_tokens(ids)
  assert (tokens[0], tokens[12], tokens[13], tokens[-1]) == ("<|system|>", "<unk>", "<|user|>", "<|assistant|>")


def _length_fixture(tmp_path):
  """Questions of 2, 4, 6, 8, 10 words (train) and 3, 9 words (eval); answers are the word counts."""
  train = [{"problem": " ".join(["w"] * n), "answer": str(n)} for n in (2, 4, 6, 8, 10)]
  evals = [{"problem": " ".join(["v"] * n), "answer": str(n)} for n in (3, 9)]
  return fx.write_jsonl(tmp_path / "train.jsonl", train), fx.write_jsonl(tmp_path / "test.jsonl", evals)


def test_length_filter_drops_long_prompts_plain_format(tmp_path, caplog):
  files = _length_fixture(tmp_path)
  # Plain format: len = words(question) + 12 instruction words. max 18 keeps questions of ≤ 6 words.
  task = make_task(*files, max_prompt_tokens=18)
  assert task.num_train == 5 and task.train_dropped_too_long == 0  # no tokenizer yet: nothing measured
  with caplog.at_level(logging.INFO, logger="capo_jax.data.task"):
    short = task.with_tokenizer(fx.tiny_tokenizer())
  assert (short.train_dropped_too_long, short.eval_dropped_too_long) == (2, 1)
  assert (short.num_train, short.num_eval) == (3, 1)
  assert sorted({p.answer for p in short.train_problems(0, 30)}) == ["2", "4", "6"]
  assert Counter(p.answer for p in short.train_problems(0, 30)) == {"2": 10, "4": 10, "6": 10}
  assert [p.answer for p in short.eval_problems(5)] == ["3"]
  assert any("dropped 2 train and 1 eval prompts longer than max_prompt_tokens=18" in r.message
             for r in caplog.records)


def test_length_filter_counts_the_chat_template_tokens(tmp_path):
  files = _length_fixture(tmp_path)
  # Chat format: len = 3 role tags + 12 + words(question): train 17, 19, 21, 23, 25 and eval 18, 24 tokens.
  # max 21 drops train 23, 25 and eval 24; max 24 drops train 25 only (eval 24 fits exactly).
  tokenizer = fx.tiny_tokenizer(fx.CHAT_TEMPLATE)
  task = make_task(*files, max_prompt_tokens=21).with_tokenizer(tokenizer)
  assert (task.train_dropped_too_long, task.eval_dropped_too_long) == (2, 1)
  task = make_task(*files, max_prompt_tokens=24).with_tokenizer(tokenizer)
  assert (task.train_dropped_too_long, task.eval_dropped_too_long) == (1, 0)
  assert make_task(*files, max_prompt_tokens=24, prompt_tokenizer=tokenizer).num_train == 4


def test_length_filter_that_drops_everything_is_an_error(tmp_path):
  files = _length_fixture(tmp_path)
  with pytest.raises(DataError, match=r"longer than max_prompt_tokens=5 tokens \(shortest 14\).*raise"):
    make_task(*files, max_prompt_tokens=5).with_tokenizer(fx.tiny_tokenizer())


# -- the Task interface, gin, the reward -------------------------------------------------------------------------------


def test_dataset_task_is_a_task_configurable_from_gin(math_jsonl):
  gin.parse_config(f"""
      DatasetTask.train_files = "{math_jsonl[0]}"
      DatasetTask.eval_files = ["{math_jsonl[1]}"]
      DatasetTask.seed = 4
      DatasetTask.num_processes = 1
      DatasetTask.process_index = 0
  """)
  task = check_task(DatasetTask())
  assert task.seed == 4 and task.eval_files == (str(math_jsonl[1]),)
  assert task.train_problems(0, 5) == make_task(*math_jsonl, seed=4).train_problems(0, 5)
  assert not hasattr(task, "tokenizer")  # the tokenizer comes from the model folder
  chat = task.with_tokenizer(fx.tiny_tokenizer(fx.CHAT_TEMPLATE))
  assert chat.train_problems(0, 1)[0].prompt.startswith("<|system|> ") and chat.seed == 4


def test_score_checks_boxed_answers_symbolically(math_jsonl):
  task = make_task(*math_jsonl)
  problems = [Problem("q", "\\frac{1}{2}"), Problem("q", "12"), Problem("q", "6"), Problem("q", "6")]
  completions = ["so \\boxed{0.5}", "\\boxed{12}", "the answer is 6", "\\boxed{7}"]
  try:
    rewards_b = task.score(completions, problems)
    assert rewards_b.dtype == np.float32
    np.testing.assert_array_equal(rewards_b, [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(task.score(completions[:2], problems[:2]), [1.0, 1.0])  # the pool is reused
  finally:
    task.close()
  with pytest.raises(ValueError, match="2 completions but 1 problems"):
    task.score(["a", "b"], problems[:1])


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path, math_jsonl):
  missing = tmp_path / "nope.jsonl"
  with pytest.raises(DataError, match=re.escape(f"{missing} does not exist; check the path")):
    make_task(missing, math_jsonl[1])
  with pytest.raises(DataError, match="matches no file"):
    make_task(tmp_path / "nope-*.parquet", math_jsonl[1])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_empty_file_is_an_error(tmp_path, math_jsonl, suffix):
  empty = tmp_path / f"empty{suffix}"
  if suffix == ".jsonl":
    empty.write_text("\n")
  elif suffix == ".json":
    empty.write_text("[]")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), empty)
  with pytest.raises(DataError, match=re.escape(f"{empty} holds no records; point to a non-empty file")):
    make_task(empty, math_jsonl[1])


def test_unknown_schema_names_the_keys_and_the_known_schemas(tmp_path, math_jsonl):
  odd = fx.write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "target": "y"}])
  with pytest.raises(DataError) as error:
    make_task(odd, math_jsonl[1])
  message = str(error.value)
  assert str(odd) in message and "['prompt', 'target']" in message
  for name in ("math500 (problem, answer, subject, level)", "gsm8k (question, answer)", "deepmath", "schema=<name>"):
    assert name in message
  with pytest.raises(ValueError, match="schema must be one of"):
    make_task(*math_jsonl, schema="mathh")


def test_record_missing_a_field_names_the_file_and_record(tmp_path, math_jsonl):
  records = [dict(r) for r in fx.RAW["gsm8k"]["train"]]
  del records[2]["answer"]
  bad = fx.write_jsonl(tmp_path / "bad.jsonl", records)
  message = f"record 2 of {bad} has no 'answer' (schema 'gsm8k' needs question, answer"
  with pytest.raises(DataError, match=re.escape(message)):
    make_task(bad, math_jsonl[1])
  records = [dict(r) for r in fx.RAW["math"]["train"]]
  records[1]["solution"] = "no box"
  bad = fx.write_parquet(tmp_path / "bad.parquet", records)
  with pytest.raises(DataError, match=re.escape(f"record 1 of {bad} cannot be read as 'math': the solution has no")):
    make_task(bad, math_jsonl[1])
  records = [dict(r) for r in fx.RAW["math500"]["train"]]
  records[0]["problem"] = None
  bad = fx.write_json(tmp_path / "bad.json", records)
  with pytest.raises(DataError, match=re.escape(f"record 0 of {bad} has no 'problem'")):
    make_task(bad, math_jsonl[1])


def test_malformed_files_and_formats(tmp_path, math_jsonl, datasets):
  bad_line = tmp_path / "bad.jsonl"
  bad_line.write_text(json.dumps(fx.RAW["math"]["train"][0]) + "\n{not json\n")
  with pytest.raises(DataError, match=re.escape(f"{bad_line} line 2 is not valid JSON")):
    make_task(bad_line, math_jsonl[1])
  not_a_list = fx.write_jsonl(tmp_path / "obj.json", [fx.RAW["math"]["train"][0]])
  with pytest.raises(DataError, match=re.escape(f"{not_a_list} holds a JSON dict, not a list of records")):
    make_task(not_a_list, math_jsonl[1])
  csv = tmp_path / "data.csv"
  csv.write_text("problem,answer\n")
  with pytest.raises(DataError, match=r"cannot tell the format of .*data.csv.*pass the format explicitly"):
    make_task(csv, math_jsonl[1])
  tfds_folder, _ = datasets[("math", "tfds")]
  with pytest.raises(DataError, match=r"(?s)cannot read split 'validation'.*its splits are test, train"):
    make_task(tfds_folder, tfds_folder, train_split="validation")
  with pytest.raises(DataError, match="holds no prepared TFDS dataset"):
    make_task(tmp_path, math_jsonl[1])


def test_invalid_arguments_are_rejected(math_jsonl):
  with pytest.raises(ValueError, match=r"process_index must be an int in \[0, num_processes=2\)"):
    make_task(*math_jsonl, num_processes=2, process_index=2)
  with pytest.raises(ValueError, match="max_prompt_tokens must be a positive int"):
    make_task(*math_jsonl, max_prompt_tokens=0)
  with pytest.raises(ValueError, match="train_files must be a path or a non-empty list"):
    DatasetTask(train_files=[], eval_files=str(math_jsonl[1]), num_processes=1, process_index=0)
  task = make_task(*math_jsonl)
  with pytest.raises(ValueError, match="position must be a non-negative int"):
    task.train_problems(-1, 2)
  with pytest.raises(ValueError, match="count must be a positive int"):
    task.eval_problems(0)
