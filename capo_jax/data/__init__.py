"""Data-set tasks from local files: readers, record schemas, prompts and ``DatasetTask``.

- ``readers``: JSONL / JSON / parquet files and prepared TFDS ``array_record`` folders (no TensorFlow) → a
  random-access sequence of raw records (``read_records``).
- ``schemas``: MATH, MATH-lighteval, MATH500, GSM8K, DeepScaleR, DeepMath records → question / answer / solution /
  metadata, with the schema detected from the keys (``detect_schema``, ``records_to_fields``).
- ``prompts``: ``SYSTEM_PROMPT`` and ``build_prompt`` (the tokenizer's chat template, else a plain format).
- ``task``: ``DatasetTask``, the gin-configurable Task with a deterministic, resumable, process-sharded stream.

pyarrow, tensorflow_datasets and grain are imported only by the readers that use them.
"""

from capo_jax.data.prompts import SYSTEM_PROMPT, build_prompt, has_chat_template, prompt_lengths
from capo_jax.data.readers import FORMATS, DataError, Records, expand_paths, infer_format, read_records
from capo_jax.data.schemas import (
    SCHEMAS,
    ProblemFields,
    Schema,
    detect_schema,
    gsm8k_answer,
    math_answer,
    records_to_fields,
)
from capo_jax.data.task import DatasetTask, epoch_permutation

__all__ = [
    "FORMATS",
    "SCHEMAS",
    "SYSTEM_PROMPT",
    "DataError",
    "DatasetTask",
    "ProblemFields",
    "Records",
    "Schema",
    "build_prompt",
    "detect_schema",
    "epoch_permutation",
    "expand_paths",
    "gsm8k_answer",
    "has_chat_template",
    "infer_format",
    "math_answer",
    "prompt_lengths",
    "read_records",
    "records_to_fields",
]
