"""Readers for local data files: each returns the file's raw records as a random-access sequence of dicts.

Formats (``FORMATS``), chosen from the path unless given explicitly:

- ``jsonl``   one JSON object per line (``.jsonl``, ``.ndjson``); blank lines are skipped.
- ``json``    one JSON list of objects (``.json``).
- ``parquet`` a parquet table (``.parquet``, ``.pq``), read with pyarrow; rows are converted to dicts on access.
- ``tfds``    a prepared TFDS dataset stored as ``array_record`` (a directory), read without TensorFlow:
              ``tfds.builder_from_directory(dir).as_data_source(split)`` (what ``tfds.data_source`` does for a local
              folder, minus any download) wrapped in ``grain.MapDataset.source``. ``dir`` is the version folder that
              holds ``dataset_info.json`` (``<data_dir>/<name>/<version>``) or a folder above it with one dataset in
              it (``<data_dir>/<name>``: its highest version). ``split`` takes TFDS slicing (``"train[:90%]"``).
              TFDS ``Text`` features arrive as bytes and are decoded to ``str``; numpy scalars become Python scalars.

Every reader returns a ``Records`` sequence: ``len(records)``, ``records[i]`` (a dict, negative indices allowed,
out-of-range raises ``IndexError``) and iteration in file order. A path may be a glob (``data/train-*.parquet``):
``expand_paths`` turns it into the sorted list of matching files.

pyarrow, tensorflow_datasets and grain are imported inside the readers that need them, so importing this module
stays cheap. Every failure (missing file, unknown format, empty file, bad line, a file that is not UTF-8 or is damaged)
raises ``DataError`` naming the file and the fix. Parquet values and TFDS records are decoded when a record is read,
so a damaged parquet page or TFDS shard (missing, truncated, overwritten) raises ``DataError`` from ``records[i]`` or
iteration, naming the file or folder and the record.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["FORMATS", "DataError", "Records", "expand_paths", "infer_format", "read_records"]

FORMATS = ("jsonl", "json", "parquet", "tfds")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
_GLOB_CHARS = ("*", "?", "[")


class DataError(ValueError):
  """A data file that cannot be used as given; the message names the file and the fix."""


class Records(Sequence):
  """The raw records of one file (or TFDS split): random access by index, iteration in file order.

  Attributes:
    path: the file or TFDS folder the records come from (for error messages).
    split: the TFDS split read, or None for files.
  """

  def __init__(self, path: str, length: int, get: Callable[[int], dict], iterate: Callable[[], Iterator[dict]],
               split: str | None = None):
    self.path, self.split = path, split
    self._length, self._get, self._iterate = length, get, iterate

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._length))]
    index = int(index)
    if not -self._length <= index < self._length:
      raise IndexError(f"record {index} out of range for {self.describe()} ({self._length} records).")
    return self._get(index % self._length)

  def __iter__(self) -> Iterator[dict]:
    return self._iterate()

  def describe(self) -> str:
    """``path`` or ``path (split …)``, as error messages name the source."""
    return self.path if self.split is None else f"{self.path} (split {self.split!r})"


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """One path or several, with globs expanded (sorted) in place; raises DataError for a glob that matches nothing."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  expanded: list[str] = []
  for path in paths:
    path = os.fspath(path)
    if any(c in path for c in _GLOB_CHARS):
      matches = sorted(glob.glob(path))
      if not matches:
        raise DataError(f"data: the pattern {path} matches no file; check the folder and the file names.")
      expanded.extend(matches)
    else:
      expanded.append(path)
  return expanded


def infer_format(path: str | os.PathLike) -> str:
  """The format of ``path`` from its extension (a directory is a TFDS dataset); raises DataError when unknown."""
  path = pathlib.Path(path)
  if path.is_dir():
    return "tfds"
  suffix = path.suffix.lower()
  if suffix in _EXTENSIONS:
    return _EXTENSIONS[suffix]
  raise DataError(f"data: cannot tell the format of {path} from its extension {suffix!r}; use one of "
                  f"{', '.join(sorted(_EXTENSIONS))} (or a prepared TFDS folder), or pass the format explicitly "
                  f"(one of {', '.join(FORMATS)}).")


def read_records(path: str | os.PathLike, file_format: str | None = None, *, split: str = "train") -> Records:
  """The raw records of one local file or TFDS dataset.

  Args:
    path: a file (``.jsonl``, ``.json``, ``.parquet``) or a prepared TFDS folder.
    file_format: one of ``FORMATS``; inferred from ``path`` when None.
    split: the TFDS split (ignored for files).

  Returns:
    A non-empty ``Records`` sequence of dicts.

  Raises:
    DataError: the path does not exist, the format is unknown, the file is malformed or holds no records.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"data: {path} does not exist; check the path (relative paths start at {os.getcwd()}).")
  file_format = infer_format(path) if file_format is None else file_format
  if file_format not in FORMATS:
    raise DataError(f"data: unknown format {file_format!r} for {path}; use one of {', '.join(FORMATS)}.")
  if file_format == "tfds" and not os.path.isdir(path):
    raise DataError(f"data: {path} is a file, but format 'tfds' needs a prepared TFDS folder "
                    "(<data_dir>/<name>[/<version>]); pass the folder, or the file's own format.")
  if file_format != "tfds" and os.path.isdir(path):
    raise DataError(f"data: {path} is a folder, but format {file_format!r} needs a file; pass the file, or a glob "
                    f"such as {os.path.join(path, '*.' + file_format)}.")
  if file_format == "tfds":
    records = _read_tfds(path, split)
  else:
    records = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[file_format](path)
  if len(records) == 0:
    raise DataError(f"data: {records.describe()} holds no records; point to a non-empty file or split.")
  return records


def _in_memory(path: str, rows: list[dict]) -> Records:
  return Records(path, len(rows), rows.__getitem__, lambda: iter(rows))


def _check_record(path: str, where: str, row: Any) -> dict:
  if not isinstance(row, dict):
    raise DataError(f"data: {path} {where} is a {type(row).__name__}, not a JSON object; each record must be an "
                    "object such as {\"problem\": ..., \"answer\": ...}.")
  return row


def _not_utf8(path: str) -> DataError:
  """The DataError for a file that does not decode as UTF-8, with the offset of its first bad byte."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    data.decode("utf-8")
    where = ""
  except UnicodeDecodeError as e:
    where = f" (byte {e.start}: {e.reason})"
  return DataError(f"data: {path} is not UTF-8 text{where}; save it as UTF-8 (or, for a binary file, pass its real "
                   "format).")


def _json_error(error: Exception) -> str:
  """Why ``json`` rejected a text: its message, or 'nested too deeply' for a recursion error."""
  if isinstance(error, RecursionError):
    return "nested too deeply"
  return error.msg if isinstance(error, json.JSONDecodeError) else str(error)


def _read_jsonl(path: str) -> Records:
  rows: list[dict] = []
  try:
    with open(path, encoding="utf-8") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, an int over the digit limit, deep nesting.
          raise DataError(f"data: {path} line {line_number} is not valid JSON ({_json_error(e)}); a .jsonl file holds "
                          "one JSON object per line (a single JSON list belongs in a .json file).") from None
        rows.append(_check_record(path, f"line {line_number}", row))
  except UnicodeDecodeError:
    raise _not_utf8(path) from None
  return _in_memory(path, rows)


def _read_json(path: str) -> Records:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except UnicodeDecodeError:
    raise _not_utf8(path) from None
  except json.JSONDecodeError as e:
    raise DataError(f"data: {path} is not valid JSON ({e.msg} at line {e.lineno}); a .json file holds one list of "
                    "records (one object per line belongs in a .jsonl file).") from None
  except (ValueError, RecursionError) as e:  # an int over the digit limit, deep nesting.
    raise DataError(f"data: {path} is not valid JSON ({_json_error(e)}); a .json file holds one list of records "
                    "(one object per line belongs in a .jsonl file).") from None
  if not isinstance(data, list):
    raise DataError(f"data: {path} holds a JSON {type(data).__name__}, not a list of records; write the records as "
                    "[{...}, {...}] (or one object per line in a .jsonl file).")
  return _in_memory(path, [_check_record(path, f"item {i}", row) for i, row in enumerate(data)])


def _read_parquet(path: str) -> Records:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a bad file.
    raise DataError(f"data: {path} is not a readable parquet file ({e}); rewrite it, or pass its real format.") from e
  names = table.column_names

  def unreadable(where: str, error: Exception) -> DataError:
    return DataError(f"data: {path} {where} cannot be read ({type(error).__name__}: {error}); the file is damaged: "
                     "rewrite it.")

  # Values are decoded on access: a damaged page (a string that is not UTF-8, say) fails here, not at read_table.
  def get(index: int) -> dict:
    try:
      return {name: table.column(name)[index].as_py() for name in names}
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for a damaged value.
      raise unreadable(f"row {index}", e) from e

  def iterate() -> Iterator[dict]:
    row = 0
    for batch in table.to_batches():
      try:
        rows = batch.to_pylist()
      except Exception as e:  # noqa: BLE001
        raise unreadable(f"rows {row}-{row + batch.num_rows - 1}", e) from e
      row += batch.num_rows
      yield from rows

  return Records(path, table.num_rows, get, iterate)


def _plain(value: Any) -> Any:
  """TFDS values as Python values: bytes → str, numpy scalars → int/float/bool, arrays → lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _tfds_builder_dir(path: str) -> str:
  """The folder holding dataset_info.json at or below ``path`` (a dataset folder: its highest version)."""
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(str(p.parent) for depth in ("*", "*/*") for p in pathlib.Path(path).glob(f"{depth}/dataset_info.json"))
  if not found:
    raise DataError(f"data: {path} holds no prepared TFDS dataset (no dataset_info.json in it or its version "
                    "folders); prepare it with builder.download_and_prepare(file_format='array_record').")
  parents = {os.path.dirname(p) for p in found}
  if len(parents) > 1:
    raise DataError(f"data: {path} holds several TFDS datasets or configs ({', '.join(found)}); pass one of them.")

  def version_key(folder: str):
    name = os.path.basename(folder)
    parts = name.split(".")
    return (1, tuple(int(p) for p in parts)) if all(p.isdigit() for p in parts) else (0, (name,))

  return max(found, key=version_key)


def _read_tfds(path: str, split: str) -> Records:
  import grain  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder_dir = _tfds_builder_dir(path)
  try:
    builder = tfds.builder_from_directory(builder_dir)
  except Exception as e:  # noqa: BLE001 — TFDS raises many types for a broken folder.
    raise DataError(f"data: {builder_dir} is not a readable TFDS dataset ({e}); prepare it again.") from e
  try:
    source = builder.as_data_source(split=split)
    dataset = grain.MapDataset.source(source).map(_plain)
    length = len(dataset)
  except Exception as e:  # noqa: BLE001
    splits = ", ".join(sorted(builder.info.splits.keys()))
    raise DataError(f"data: cannot read split {split!r} of the TFDS dataset {builder_dir} ({e}); its splits are "
                    f"{splits}, and it must be stored as array_record (file_format='array_record').") from e

  def get(index: int) -> dict:
    # array_record opens and reads its files lazily: a missing, truncated or damaged file fails here, on access.
    try:
      return dataset[index]
    except Exception as e:  # noqa: BLE001 — array_record and the feature decoders raise many types.
      raise DataError(f"data: record {index} of split {split!r} of the TFDS dataset {builder_dir} cannot be read "
                      f"({type(e).__name__}: {e}); its files are damaged or missing: prepare it again.") from e

  def iterate() -> Iterator[dict]:
    return (get(i) for i in range(length))

  return Records(builder_dir, length, get, iterate, split=split)
