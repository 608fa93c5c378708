"""Record schemas of the common math data sets, mapped to question / answer / solution / metadata.

A schema is named by the keys its records carry. ``detect_schema`` tries them in this order and takes the first whose
required keys a record has (so a record with both ``answer`` and ``solution`` is read by its explicit answer):

- ``math500``     keys problem, answer, subject, level. Answer: ``answer``; solution: ``solution`` if present.
- ``deepscaler``  keys problem, answer. Answer: ``answer``; solution: ``solution`` if present.
- ``math``        keys problem, solution. Answer: the content of the solution's last ``\\boxed{}`` (nested braces
                  kept: ``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``); solution: ``solution``.
- ``gsm8k``       keys question, answer (``… #### n``). Answer: n without commas (``1,234`` → ``1234``); solution: the
                  worked text with its calculator notes ``<<48/2=24>>`` removed and ``#### n`` turned into
                  ``\\boxed{n}``.
- ``deepmath``    keys question, final_answer. Answer: ``final_answer``; solution: ``r1_solution_1`` if present.

``math_lighteval`` is ``math`` under another name (the lighteval copy of MATH has the same fields); it is never
detected, only chosen explicitly, and only changes ``metadata["source"]``. ``deepscaler`` also reads DeepMath-style
files written as problem / answer / solution.

Metadata (all strings): ``source`` (the schema name), ``level`` (the bare level: MATH's ``"Level 3"`` → ``"3"``,
MATH500's ``3`` → ``"3"``, DeepMath's difficulty), ``subject`` (MATH's ``type``, MATH500's ``subject``, DeepMath's
``topic``), plus ``type`` (MATH) and ``unique_id`` (MATH500) where the source has them. Absent or null optional fields
are left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from capo_jax.data.readers import DataError, Records
from capo_jax.rewards.boxed import extract_boxed

__all__ = ["SCHEMAS", "ProblemFields", "Schema", "detect_schema", "gsm8k_answer", "math_answer", "records_to_fields"]


class ProblemFields(NamedTuple):
  """One record in schema-free form: the question text (no instruction), the reference answer, the worked solution
  (``""`` when the source has none) and string metadata."""
  question: str
  answer: str
  solution: str
  metadata: Mapping[str, str]


class _BadRecord(Exception):
  """Raised by a converter for a record whose content cannot be read; the caller adds the file and index."""


@dataclasses.dataclass(frozen=True)
class Schema:
  """A record layout: the keys every record must have and the conversion to ``ProblemFields``."""
  name: str
  required: tuple[str, ...]
  convert: Callable[[str, Mapping[str, Any]], ProblemFields]  # (schema name, record) -> fields


_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")


def math_answer(solution: str) -> str:
  """The content of the last top-level ``\\boxed{}`` of a MATH solution, stripped (``\\boxed{\\frac{1}{2}}`` →
  ``\\frac{1}{2}``); raises ValueError when the solution has none."""
  content = extract_boxed(solution)
  if content is None or not content.strip():
    raise ValueError("the solution has no complete, non-empty \\boxed{...}")
  return content.strip()


def gsm8k_answer(answer_text: str) -> tuple[str, str]:
  """Splits a GSM8K answer field into (final answer, solution).

  The final answer is the text after the last ``####`` with commas removed (``"#### 1,234"`` → ``"1234"``). The
  solution is the worked text before it, with the calculator annotations ``<<48/2=24>>`` removed, followed by
  ``\\boxed{answer}`` on its own line. Raises ValueError when there is no ``#### n`` line.
  """
  head, sep, tail = answer_text.rpartition("####")
  final = tail.strip().replace(",", "")
  if not sep or not final or "\n" in final:
    raise ValueError("the answer field has no final '#### <number>' line")
  worked = _GSM8K_CALCULATOR.sub("", head).rstrip()
  solution = f"{worked}\n\\boxed{{{final}}}" if worked else f"\\boxed{{{final}}}"
  return final, solution


def _unicode(key: str, text: str) -> str:
  """``text`` unless it holds a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _BadRecord(f"its {key!r} holds the lone surrogate {text[e.start:e.end]!r} at character {e.start}, which is "
                     "not Unicode text") from None
  return text


def _text(record: Mapping[str, Any], key: str) -> str:
  value = record[key]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise _BadRecord(f"its {key!r} is a {type(value).__name__}, not text")
  text = _unicode(key, str(value).strip())
  if not text:
    raise _BadRecord(f"its {key!r} is empty")
  return text


def _optional_text(record: Mapping[str, Any], key: str) -> str:
  value = record.get(key)
  return "" if value is None else _unicode(key, str(value).strip())


def _metadata(source: str, **fields: Any) -> dict[str, str]:
  metadata = {"source": source}
  for key, value in fields.items():
    if value is not None and str(value).strip():
      metadata[key] = str(value).strip()
  return metadata


def _bare_level(level: Any) -> Any:
  if isinstance(level, str) and level.strip().lower().startswith("level"):
    return level.strip()[len("level"):].strip()
  return level


def _convert_math(name: str, record: Mapping[str, Any]) -> ProblemFields:
  solution = _text(record, "solution")
  try:
    answer = math_answer(solution)
  except ValueError as e:
    raise _BadRecord(f"{e}, so its answer is unknown") from None
  return ProblemFields(_text(record, "problem"), answer, solution,
                       _metadata(name, level=_bare_level(record.get("level")), subject=record.get("type"),
                                 type=record.get("type")))


def _convert_math500(name: str, record: Mapping[str, Any]) -> ProblemFields:
  return ProblemFields(_text(record, "problem"), _text(record, "answer"), _optional_text(record, "solution"),
                       _metadata(name, level=_bare_level(record.get("level")), subject=record.get("subject"),
                                 unique_id=record.get("unique_id")))


def _convert_deepscaler(name: str, record: Mapping[str, Any]) -> ProblemFields:
  return ProblemFields(_text(record, "problem"), _text(record, "answer"), _optional_text(record, "solution"),
                       _metadata(name, level=_bare_level(record.get("level")),
                                 subject=record.get("subject", record.get("type"))))


def _convert_gsm8k(name: str, record: Mapping[str, Any]) -> ProblemFields:
  try:
    answer, solution = gsm8k_answer(_text(record, "answer"))
  except ValueError as e:
    raise _BadRecord(str(e)) from None
  return ProblemFields(_text(record, "question"), answer, solution, _metadata(name))


def _convert_deepmath(name: str, record: Mapping[str, Any]) -> ProblemFields:
  return ProblemFields(_text(record, "question"), _text(record, "final_answer"),
                       _optional_text(record, "r1_solution_1"),
                       _metadata(name, level=record.get("difficulty"), subject=record.get("topic")))


# In detection order: the first schema whose required keys a record has is its schema.
_DETECTED = (
    Schema("math500", ("problem", "answer", "subject", "level"), _convert_math500),
    Schema("deepscaler", ("problem", "answer"), _convert_deepscaler),
    Schema("math", ("problem", "solution"), _convert_math),
    Schema("gsm8k", ("question", "answer"), _convert_gsm8k),
    Schema("deepmath", ("question", "final_answer"), _convert_deepmath),
)
SCHEMAS: dict[str, Schema] = {s.name: s for s in _DETECTED}
SCHEMAS["math_lighteval"] = Schema("math_lighteval", ("problem", "solution"), _convert_math)


def _known() -> str:
  return "; ".join(f"{s.name} ({', '.join(s.required)})" for s in SCHEMAS.values())


def detect_schema(keys: Iterable[str], *, source: str = "the data") -> Schema:
  """The first schema (in the order of the module table) whose required keys are all in ``keys``.

  Raises:
    DataError: no schema fits; the message lists the keys found and the schemas known.
  """
  keys = set(keys)
  for schema in _DETECTED:
    if keys.issuperset(schema.required):
      return schema
  raise DataError(f"data: cannot tell the schema of {source}: its records have the keys {sorted(keys)}, and the "
                  f"known schemas need: {_known()}. Rename the columns to one of these, or pass schema=<name>.")


def _schema_named(name: str) -> Schema:
  if name not in SCHEMAS:
    raise DataError(f"data: unknown schema {name!r}; the known schemas are {_known()}.")
  return SCHEMAS[name]


def records_to_fields(records: Records, schema: str | None = None) -> tuple[str, list[ProblemFields]]:
  """Reads every record of ``records`` with one schema (``schema``, or detected from the first record's keys).

  Returns:
    (schema name, one ``ProblemFields`` per record, in file order).

  Raises:
    DataError: unknown or undetectable schema, or a record that lacks a required key (or has it null) or whose
      content cannot be read (a MATH solution without ``\\boxed{}``, a GSM8K answer without ``####``, a text field
      that is not text or holds a lone surrogate); the message names the file, the record index and the fix.
  """
  source = records.describe()
  resolved = _schema_named(schema) if schema is not None else detect_schema(records[0].keys(), source=source)
  fields: list[ProblemFields] = []
  for index, record in enumerate(records):
    missing = [key for key in resolved.required if record.get(key) is None]
    if missing:
      raise DataError(f"data: record {index} of {source} has no {', '.join(repr(k) for k in missing)} (schema "
                      f"{resolved.name!r} needs {', '.join(resolved.required)}; the record has {sorted(record)}). "
                      "Fix or remove that record, or pass the schema that fits the file.")
    try:
      fields.append(resolved.convert(resolved.name, record))
    except _BadRecord as e:
      raise DataError(f"data: record {index} of {source} cannot be read as {resolved.name!r}: {e}. Fix or remove "
                      "that record, or pass the schema that fits the file.") from None
  return resolved.name, fields
