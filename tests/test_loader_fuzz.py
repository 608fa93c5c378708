"""Hypothesis fuzzing of the data loaders and the tokenizer loader (docs/RELIABILITY.md): a damaged input loads, or
raises the loader's documented error naming the damaged file — never another exception.

- Data (``capo_jax.data``): ``read_records`` and ``DatasetTask`` (schema detected and explicit, its train and eval
  streams) on JSONL / JSON / parquet files damaged byte by byte (random bytes, truncation, appended garbage, emptied,
  bytes that are not UTF-8, NUL bytes, lines that are JSON but not objects) or record by record (fields dropped,
  renamed or of another type, huge and unusual strings), and on a TFDS array_record folder with a file damaged or
  deleted. The documented error is ``DataError``; ``DatasetTask`` documents no skipping, so a task that loads holds
  every record of its files.
- Tokenizer (``capo_jax.tokenization``): ``load_tokenizer`` on a folder whose tokenizer.json, tokenizer_config.json,
  chat_template.jinja or chat_template.json is damaged, deleted, of the wrong JSON shape or not valid Jinja, then
  ``check_tokenizer_fits``. The documented error is ``ValueError`` with a ``load_tokenizer: <file> ...`` message.

Every fixture file is written by the test (tests/data_fixtures.py, tests/hf_fixtures.py); the TFDS dataset is built
once per module and copied per example.
"""

import json
import pathlib
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capo_jax.data import DataError, DatasetTask, read_records
from capo_jax.models import ModelConfig
from capo_jax.tasks.base import Problem
from capo_jax.tokenization import check_tokenizer_fits, load_tokenizer
from tests import data_fixtures as fx
from tests.hf_fixtures import CHAT_TEMPLATE, write_tiny_tokenizer

SCHEMAS = ("math", "gsm8k", "math500")
FILE_FORMATS = ("jsonl", "json", "parquet")
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Byte strings that stress a loader: not UTF-8 (a lone continuation byte, an encoded surrogate, a BOM in the middle),
# NUL, JSON lines that are not objects, an int past Python's 4,300-digit limit, nesting past the recursion limit.
PAYLOADS = st.one_of(
    st.binary(min_size=1, max_size=32),
    st.sampled_from([b"\xff\xfe", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b"\x00" * 16,
                     b"\n[1, 2]\n", b"\n42\n", b'\n"text"\n', b"\nnull\n", b"\n{}\n", b"\ntrue\n", b"\n[{}]\n",
                     b"1" * 5000, b"[" * 5000, b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n",
                     b"\\ud800", b'"\\ud800"', b"NaN", b"\r\n\r\n"]))
BYTE_OPERATIONS = ("bytes", "insert", "truncate", "append", "empty")


def _damage(path: pathlib.Path, operation: str, position: float, payload: bytes) -> None:
  """Writes one damage to ``path`` (a file): overwrite / insert ``payload`` at ``position`` (a fraction of the size),
  cut the file there, append ``payload``, empty it, replace its content by ``payload``, delete it, or replace it by a
  folder."""
  if operation == "delete":
    path.unlink()
    return
  if operation == "folder":
    path.unlink()
    path.mkdir()
    return
  data = path.read_bytes()
  cut = int(position * len(data))
  damaged = {
      "bytes": data[:cut] + payload + data[cut + len(payload):],
      "insert": data[:cut] + payload + data[cut:],
      "truncate": data[:cut],
      "append": data + payload,
      "empty": b"",
      "replace": payload,
  }[operation]
  path.write_bytes(damaged)


# ---------------------------------------------------------------------------------------------------------------------
# Data files.


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer with a chat template, so prompts go through the template and the length filter."""
  return fx.tiny_tokenizer(fx.CHAT_TEMPLATE)


def _problems_are_sound(problems, count: int) -> None:
  assert len(problems) == count
  for problem in problems:
    assert isinstance(problem, Problem) and isinstance(problem.prompt, str) and problem.prompt
    assert isinstance(problem.answer, str) and problem.answer
    assert all(isinstance(v, str) for v in problem.metadata.values())


def _exercise(train, evals, damaged, schema: str, tokenizer, position: int, count: int, **kwargs) -> None:
  """``read_records`` of the damaged file and ``DatasetTask`` over (train, evals) with the schema detected and with
  ``schema`` given, then its streams: each works, or raises ``DataError`` whose message names the damaged file.

  A task that loads dropped nothing silently: its kept and dropped problems add up to the records of its files.
  """
  damaged = str(damaged)

  def read(path, split):
    return read_records(path, kwargs.get("file_format"), split=split)

  try:
    read(damaged, kwargs.get("train_split", "train"))
  except DataError as e:
    assert damaged in str(e), str(e)
  for given_schema in (None, schema):
    try:
      task = DatasetTask(train_files=str(train), eval_files=str(evals), schema=given_schema, num_processes=1,
                         process_index=0, prompt_tokenizer=tokenizer, max_prompt_tokens=10**9, **kwargs)
    except DataError as e:
      assert damaged in str(e), str(e)
      continue
    train_records = len(read(train, kwargs.get("train_split", "train")))
    eval_records = len(read(evals, kwargs.get("eval_split", "test")))
    assert task.num_train + task.train_dropped_overlap + task.train_dropped_too_long == train_records
    assert task.num_eval + task.eval_dropped_too_long == eval_records
    _problems_are_sound(task.train_problems(position, count), count)
    _problems_are_sound(task.eval_problems(count), min(count, task.num_eval))


def _fresh_dataset(tmp_path_factory, schema: str, file_format: str) -> tuple[pathlib.Path, pathlib.Path]:
  """The fixture records of ``schema`` written anew as (train file, eval file) in a folder of their own."""
  return fx.write_dataset(tmp_path_factory.mktemp("data"), schema, file_format)


@FUZZ
@given(schema=st.sampled_from(SCHEMAS), file_format=st.sampled_from(FILE_FORMATS), damage_eval=st.booleans(),
       operation=st.sampled_from(BYTE_OPERATIONS), position=st.floats(0.0, 1.0), payload=PAYLOADS,
       stream_position=st.integers(0, 10**6), count=st.integers(1, 12))
def test_damaged_data_file_loads_or_raises_data_error(tmp_path_factory, tokenizer, schema, file_format, damage_eval,
                                                       operation, position, payload, stream_position, count):
  train, evals = _fresh_dataset(tmp_path_factory, schema, file_format)
  damaged = evals if damage_eval else train
  _damage(damaged, operation, position, payload)
  _exercise(train, evals, damaged, schema, tokenizer, stream_position, count)


# Texts that trip the schemas (no \boxed, no '####', blank) or the tokenizer (a lone surrogate, NUL, unusual
# Unicode), and huge ones.
SCHEMA_TEXTS = st.sampled_from(["", "   ", "no box", "\\boxed{", "\\boxed{}", "\\boxed{ }", "\\boxed{7}", "#### 5",
                                "####", "1 #### ", "a #### 1\n2", "Level 3"])
UNICODE_TEXTS = st.sampled_from(["\ud800", "x\udfffy", "\ud83d", "\u2028", "\x00", "𝔸𝔹ℂ \u200b\ufeff"])
HUGE_TEXTS = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(10**4, 10**5))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), SCHEMA_TEXTS)
JSON_VALUES = st.one_of(JSON_SCALARS, st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6))
OTHER_KEYS = ("problem", "solution", "answer", "question", "final_answer", "level", "subject", "type", "unique_id",
              "extra")
NOT_OBJECTS = st.one_of(st.lists(JSON_SCALARS, max_size=3), st.integers(), st.floats(), st.text(max_size=10),
                        st.none(), st.booleans())


def _text_keys(schema: str, question_only: bool = False):
  """A text key that ``schema``'s records carry: the question (problem / question), or also solution / answer."""
  names = ("problem", "question") if question_only else ("problem", "question", "solution", "answer")
  return st.sampled_from(tuple(k for k in fx.RAW[schema]["train"][0] if k in names))


def _keys(schema: str):
  """A key of ``schema``'s records (its text keys as often as all others together)."""
  return st.one_of(_text_keys(schema), st.sampled_from(OTHER_KEYS))


def _record_mutations(schema: str):
  """A stress text as the question of a record, another in any text field, then up to three mutations of any
  kind."""
  stress = st.one_of(SCHEMA_TEXTS, UNICODE_TEXTS, st.text(min_size=1, max_size=20), HUGE_TEXTS)
  keys = _keys(schema)
  question = st.tuples(st.integers(0, 10), st.tuples(st.just("set"), _text_keys(schema, True), stress))
  text = st.tuples(st.integers(0, 10), st.tuples(st.just("set"), _text_keys(schema), stress))
  others = st.lists(st.tuples(st.integers(0, 10), st.one_of(
      st.tuples(st.just("drop"), keys),
      st.tuples(st.just("set"), keys, JSON_VALUES),
      st.tuples(st.just("rename"), keys, keys),
      st.tuples(st.just("replace"), NOT_OBJECTS))), max_size=3)
  return st.builds(lambda first, second, rest: [first, *second, *rest], question, st.lists(text, max_size=1), others)


def _mutate_records(records: list, mutations) -> list:
  records = [dict(r) for r in records]
  for index, mutation in mutations:
    index %= len(records)
    kind, *args = mutation
    record = records[index]
    if kind == "replace":
      records[index] = args[0]
    elif not isinstance(record, dict):
      continue
    elif kind == "drop":
      record.pop(args[0], None)
    elif kind == "set":
      record[args[0]] = args[1]
    elif args[0] in record:
      record[args[1]] = record.pop(args[0])
  return records


@FUZZ
@given(schema=st.sampled_from(SCHEMAS), file_format=st.sampled_from(("jsonl", "json")), damage_eval=st.booleans(),
       data=st.data(), stream_position=st.integers(0, 10**6), count=st.integers(1, 12))
def test_bad_json_records_load_or_raise_data_error(tmp_path_factory, tokenizer, schema, file_format, damage_eval,
                                                   data, stream_position, count):
  train, evals = _fresh_dataset(tmp_path_factory, schema, file_format)
  damaged = evals if damage_eval else train
  records = _mutate_records(fx.RAW[schema]["test" if damage_eval else "train"], data.draw(_record_mutations(schema)))
  writer = fx.write_jsonl if file_format == "jsonl" else fx.write_json
  writer(damaged, records)
  _exercise(train, evals, damaged, schema, tokenizer, stream_position, count)


# A parquet column holds one type: a mutation drops a column, nulls some of its values, or retypes it whole.
PARQUET_TYPES = {
    "int64": st.integers(-2**63, 2**63 - 1), "float": st.floats(), "bool": st.booleans(),
    "text": st.one_of(SCHEMA_TEXTS, st.text(max_size=20), HUGE_TEXTS),
    "binary": st.binary(max_size=8), "list": st.lists(st.integers(-5, 5), max_size=3),
    "struct": st.fixed_dictionaries({"a": st.integers(-5, 5), "b": st.text(max_size=3)}),
}


def _column_mutations(schema: str):
  keys = _keys(schema)
  return st.lists(st.one_of(
      st.tuples(st.just("drop"), keys),
      st.tuples(st.just("null"), keys, st.lists(st.integers(0, 10), max_size=3)),
      st.tuples(st.just("retype"), keys, st.sampled_from(sorted(PARQUET_TYPES)).flatmap(
          lambda name: st.lists(PARQUET_TYPES[name], min_size=5, max_size=5)))), min_size=1, max_size=3)


def _mutate_columns(records: list[dict], mutations) -> pa.Table:
  columns = {key: [r.get(key) for r in records] for r in records for key in r}
  for mutation in mutations:
    kind, key, *args = mutation
    if kind == "drop":
      columns.pop(key, None)
    elif kind == "null":
      if key in columns:
        for index in args[0]:
          columns[key][index % len(records)] = None
    else:
      columns[key] = args[0][:len(records)]
  return pa.table(columns) if columns else pa.table({"extra": [None] * len(records)})


@FUZZ
@given(schema=st.sampled_from(SCHEMAS), damage_eval=st.booleans(), data=st.data(),
       stream_position=st.integers(0, 10**6), count=st.integers(1, 12))
def test_bad_parquet_columns_load_or_raise_data_error(tmp_path_factory, tokenizer, schema, damage_eval, data,
                                                      stream_position, count):
  train, evals = _fresh_dataset(tmp_path_factory, schema, "parquet")
  damaged = evals if damage_eval else train
  table = _mutate_columns(fx.RAW[schema]["test" if damage_eval else "train"], data.draw(_column_mutations(schema)))
  pq.write_table(table, damaged, row_group_size=max(1, (table.num_rows + 1) // 2))
  _exercise(train, evals, damaged, schema, tokenizer, stream_position, count)


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
  """The MATH fixture records as a prepared TFDS array_record dataset (train and test splits): its dataset folder."""
  return fx.write_tfds(tmp_path_factory.mktemp("tfds"), "fuzz_math", fx.RAW["math"])


JSON_OF_THE_WRONG_SHAPE = [b"[]", b"{}", b"null", b"3", b'"x"', b'{"splits": 5}', b'{"splits": [{"name": 3}]}',
                           b'{"splits": [{"name": "train", "shardLengths": ["x"]}]}', b'{"featuresDict": []}']


@FUZZ
@given(which=st.integers(0, 50), operation=st.sampled_from(BYTE_OPERATIONS + ("delete", "replace")),
       near_start=st.booleans(), position=st.floats(0.0, 1.0),
       payload=st.one_of(PAYLOADS, st.sampled_from(JSON_OF_THE_WRONG_SHAPE)), count=st.integers(1, 8))
def test_damaged_tfds_folder_loads_or_raises_data_error(tmp_path_factory, tokenizer, tfds_source, which, operation,
                                                        near_start, position, payload, count):
  """A file of the version folder damaged or deleted (array_record shards are 128 KiB, mostly padding: half the
  damages fall in their first 4 KiB, where the records are)."""
  folder = tmp_path_factory.mktemp("tfds_copy") / "fuzz_math"
  shutil.copytree(tfds_source, folder)
  files = sorted(p for p in folder.rglob("*") if p.is_file())
  target = files[which % len(files)]
  if near_start:
    position *= min(1.0, 4096 / max(1, target.stat().st_size))
  _damage(target, operation, position, payload)
  _exercise(folder, folder, folder, "math", tokenizer, 0, count, train_split="train", eval_split="test",
            drop_eval_overlap=False)


def test_truncated_parquet_names_the_file(tmp_path):
  train, evals = fx.write_dataset(tmp_path, "math", "parquet")
  train.write_bytes(train.read_bytes()[:100])
  with pytest.raises(DataError, match=rf"^data: {re.escape(str(train))} is not a readable parquet file .*rewrite it"):
    DatasetTask(train_files=str(train), eval_files=str(evals), num_processes=1, process_index=0)


def test_jsonl_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
  path = fx.write_jsonl(tmp_path / "train.jsonl", fx.RAW["math"]["train"])
  data = path.read_bytes()
  path.write_bytes(data[:40] + b"\xff" + data[41:])
  with pytest.raises(DataError, match=rf"^data: {re.escape(str(path))} is not UTF-8 text \(byte 40: invalid start "
                     r"byte\); save it as UTF-8"):
    read_records(path)


def test_lone_surrogate_question_names_the_file_and_record(tmp_path):
  train, evals = fx.write_dataset(tmp_path, "gsm8k", "jsonl")
  records = [dict(r) for r in fx.RAW["gsm8k"]["train"]]
  records[2]["question"] = "How many \ud83d apples?"
  fx.write_jsonl(train, records)
  with pytest.raises(DataError, match=rf"^data: record 2 of {re.escape(str(train))} cannot be read as 'gsm8k': its "
                     r"'question' holds the lone surrogate '\\ud83d' at character 9"):
    DatasetTask(train_files=str(train), eval_files=str(evals), num_processes=1, process_index=0)


def test_deleted_tfds_shard_names_the_folder(tmp_path, tfds_source):
  folder = tmp_path / "fuzz_math"
  shutil.copytree(tfds_source, folder)
  (shard,) = folder.glob("1.0.0/*-train.array_record-*")
  shard.unlink()
  with pytest.raises(DataError, match=rf"record 0 of split 'train' of the TFDS dataset {re.escape(str(folder))}/1.0.0 "
                     rf"cannot be read \(RuntimeError: .*{re.escape(shard.name)}.*prepare it again"):
    read_records(folder, split="train")[0]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer folders.


@pytest.fixture(scope="module")
def tokenizer_source(tmp_path_factory):
  """A character-level tokenizer folder (tokenizer.json, tokenizer_config.json, chat_template.jinja; 99 tokens)."""
  return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer_source") / "tok")


def _tokenizer_layout(folder: pathlib.Path, layout: str) -> None:
  """Where the folder keeps its chat template: chat_template.jinja, inline in tokenizer_config.json, or in
  chat_template.json (a plain template, or the named-template list)."""
  if layout == "jinja":
    return
  (folder / "chat_template.jinja").unlink()
  if layout == "inline":
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
  elif layout == "json":
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
  else:
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": CHAT_TEMPLATE}]}))


TOKENIZER_PAYLOADS = st.one_of(PAYLOADS, st.sampled_from([
    b"[]", b"3", b'"x"', b"null", b"{}", b'{"model": 3}', b'{"model": {"type": "WordLevel"}}', b'{"added_tokens": "x"}',
    b'{"eos_token": 5}', b'{"eos_token": {"content": []}}', b'{"pad_token": "<new>"}', b'{"padding_side": "middle"}',
    b'{"model_max_length": "x"}', b'{"additional_special_tokens": [1, null]}', b'{"chat_template": [1]}',
    b'{"chat_template": 7}', b'{"chat_template": [{"name": "default", "template": "{% if %}"}]}',
    b"{% if x %}", b"{{", b"{% endfor %}", b"{{ x | no_such_filter }}", b"{% generation %}", b"{% for m in %}",
    b"{# open comment"]))


@FUZZ
@given(layout=st.sampled_from(("jinja", "inline", "json", "named")), which=st.integers(0, 10),
       operation=st.sampled_from(BYTE_OPERATIONS + ("delete", "replace", "folder")), position=st.floats(0.0, 1.0),
       payload=TOKENIZER_PAYLOADS, vocab_size=st.integers(1, 200))
def test_damaged_tokenizer_folder_loads_or_raises_value_error(tmp_path_factory, tokenizer_source, layout, which,
                                                              operation, position, payload, vocab_size):
  folder = tmp_path_factory.mktemp("tok_copy") / "tok"
  shutil.copytree(tokenizer_source, folder)
  _tokenizer_layout(folder, layout)
  files = sorted(p for p in folder.iterdir() if p.is_file())
  target = files[which % len(files)]
  _damage(target, operation, position, payload)
  try:
    tok = load_tokenizer(folder)
  except ValueError as e:
    message = str(e)
    assert message.startswith(f"load_tokenizer: {folder}") or message.startswith(
        f"load_tokenizer: the chat template in {folder}"), message
    return
  text = "Compute 12*3.\nAnswer: 36"
  assert isinstance(tok.decode(tok.encode(text)), str)
  assert tok.chat_template is None or isinstance(tok.chat_template, str)
  assert tok.padding_side in ("left", "right")
  model = ModelConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                      num_kv_heads=1)
  if len(tok) <= vocab_size:
    check_tokenizer_fits(tok, model)
  else:
    with pytest.raises(ValueError, match=f"tokenizer has {len(tok)} tokens .* vocab_size .* is {vocab_size};"):
      check_tokenizer_fits(tok, model)


def test_chat_template_that_is_not_jinja_names_the_file_and_line(tmp_path):
  folder = write_tiny_tokenizer(tmp_path / "tok", chat_template="{% for m in messages %}\n{{ m['content'] }}")
  with pytest.raises(ValueError, match=rf"^load_tokenizer: the chat template in {re.escape(str(folder))}/"
                     r"chat_template\.jinja is not valid Jinja \(line 2\): Unexpected end of template"):
    load_tokenizer(folder)


def test_tokenizer_config_of_the_wrong_shape_names_the_file(tmp_path):
  folder = write_tiny_tokenizer(tmp_path / "tok")
  (folder / "tokenizer_config.json").write_text('["<|endoftext|>"]')
  with pytest.raises(ValueError, match=rf"^load_tokenizer: {re.escape(str(folder))}/tokenizer_config\.json holds a JSON "
                     r"list, not an object; save the tokenizer again"):
    load_tokenizer(folder)


def test_truncated_tokenizer_json_names_the_file(tmp_path):
  folder = write_tiny_tokenizer(tmp_path / "tok")
  path = folder / "tokenizer.json"
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match=rf"^load_tokenizer: {re.escape(str(path))} cannot be loaded \(Exception: EOF "
                     r"while parsing .*save the tokenizer again"):
    load_tokenizer(folder)
