"""Small fixture data sets for tests/test_data.py: records of each schema, writers for each format, a tiny tokenizer.

Each schema has a few train and eval records in its source's own layout, with the answer, solution and metadata
that ``capo_jax.data`` must read from them written out by hand (``EXPECTED``).
"""

from __future__ import annotations

import json
import pathlib
import types

import numpy as np

SPLITS = ("train", "test")

RAW: dict[str, dict[str, list[dict]]] = {
    "math": {
        "train": [
            {"problem": "What is $1/2$ as a fraction?", "level": "Level 3", "type": "Algebra",
             "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Compute $2+2$.", "level": "Level 1", "type": "Prealgebra",
             "solution": "First $\\boxed{3}$ is wrong; $2+2=\\boxed{4}$."},
            {"problem": "Find $x$ if $x^2=9$, $x>0$.", "level": "Level 2", "type": "Algebra",
             "solution": "So $x = \\boxed{ 3 }$."},
            {"problem": "Simplify $\\sqrt{8}$.", "level": "Level ?", "type": "Intermediate Algebra",
             "solution": "$\\sqrt{8} = \\boxed{2\\sqrt{2}}$"},
            {"problem": "How many sides has a hexagon?", "level": "Level 1", "type": "Geometry",
             "solution": "A hexagon has $\\fbox{6}$ sides."},
        ],
        "test": [
            {"problem": "What is $3 \\cdot 4$?", "level": "Level 1", "type": "Prealgebra",
             "solution": "$3 \\cdot 4 = \\boxed{12}$."},
            {"problem": "Evaluate $\\binom{4}{2}$.", "level": "Level 2", "type": "Counting & Probability",
             "solution": "$\\binom{4}{2} = \\boxed{6}$."},
        ],
    },
    "math500": {
        "train": [
            {"problem": "Convert $(0,3)$ to polar.", "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
             "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
             "unique_id": "test/precalculus/807.json"},
            {"problem": "What is $1+1$?", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Prealgebra",
             "level": 1, "unique_id": "test/prealgebra/1.json"},
            {"problem": "Solve $2x=10$.", "solution": "$x=\\boxed{5}$", "answer": "5", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/2.json"},
            {"problem": "What is $10/4$?", "solution": "$\\boxed{\\frac52}$", "answer": "\\frac52",
             "subject": "Prealgebra", "level": 3, "unique_id": "test/prealgebra/3.json"},
        ],
        "test": [
            {"problem": "What is $7-2$?", "solution": "$\\boxed{5}$", "answer": "5", "subject": "Prealgebra",
             "level": 1, "unique_id": "test/prealgebra/4.json"},
            {"problem": "What is $2^5$?", "solution": "$\\boxed{32}$", "answer": "32", "subject": "Algebra",
             "level": 2, "unique_id": "test/algebra/5.json"},
        ],
    },
    "gsm8k": {
        "train": [
            {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"},
            {"question": "A farm has 1,000 hens and 234 ducks. How many birds?",
             "answer": "1,000 + 234 = <<1000+234=1234>>1,234 birds.\n#### 1,234"},
            {"question": "Tom had 5 apples and ate 8. How many are left, counting debt?",
             "answer": "5 - 8 = <<5-8=-3>>-3.\n#### -3"},
            {"question": "Half of 3 cups is how many cups?", "answer": "3 / 2 = <<3/2=1.5>>1.5\n####1.5"},
        ],
        "test": [
            {"question": "Ann has 3 pens and buys 4. How many pens?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A box holds 12 eggs. How many in 10 boxes?",
             "answer": "12 * 10 = <<12*10=120>>120\n#### 120"},
        ],
    },
    "deepscaler": {
        "train": [
            {"problem": "Find the sum of 1 through 10.", "answer": "55", "solution": "It is $\\boxed{55}$."},
            {"problem": "What is $\\frac{6}{4}$ in lowest terms?", "answer": "\\frac{3}{2}",
             "solution": "$\\boxed{\\frac{3}{2}}$"},
            {"problem": "How many primes are below 10?", "answer": "4", "solution": ""},
        ],
        "test": [
            {"problem": "What is the smallest prime?", "answer": "2", "solution": "$\\boxed{2}$"},
        ],
    },
    "deepmath": {
        "train": [
            {"question": "Evaluate $\\lim_{x\\to 0} \\sin(x)/x$.", "final_answer": "1", "difficulty": 4.5,
             "topic": "Mathematics -> Calculus -> Limits", "r1_solution_1": "The limit is \\boxed{1}."},
            {"question": "Is 91 prime? Answer 0 or 1.", "final_answer": "0", "difficulty": 2.0,
             "topic": "Mathematics -> Number Theory", "r1_solution_1": "91 = 7*13, \\boxed{0}."},
            {"question": "Compute $\\int_0^1 2x\\,dx$.", "final_answer": "1", "difficulty": 3.0,
             "topic": "Mathematics -> Calculus -> Integrals", "r1_solution_1": "\\boxed{1}"},
        ],
        "test": [
            {"question": "What is $e^0$?", "final_answer": "1", "difficulty": 1.0,
             "topic": "Mathematics -> Algebra", "r1_solution_1": "\\boxed{1}"},
        ],
    },
}

# (question, answer, solution, metadata) per record, in the order of RAW.
EXPECTED: dict[str, dict[str, list[tuple[str, str, str, dict]]]] = {
    "math": {
        "train": [
            ("What is $1/2$ as a fraction?", "\\frac{1}{2}", "It is $\\boxed{\\frac{1}{2}}$.",
             {"source": "math", "level": "3", "subject": "Algebra", "type": "Algebra"}),
            ("Compute $2+2$.", "4", "First $\\boxed{3}$ is wrong; $2+2=\\boxed{4}$.",
             {"source": "math", "level": "1", "subject": "Prealgebra", "type": "Prealgebra"}),
            ("Find $x$ if $x^2=9$, $x>0$.", "3", "So $x = \\boxed{ 3 }$.",
             {"source": "math", "level": "2", "subject": "Algebra", "type": "Algebra"}),
            ("Simplify $\\sqrt{8}$.", "2\\sqrt{2}", "$\\sqrt{8} = \\boxed{2\\sqrt{2}}$",
             {"source": "math", "level": "?", "subject": "Intermediate Algebra", "type": "Intermediate Algebra"}),
            ("How many sides has a hexagon?", "6", "A hexagon has $\\fbox{6}$ sides.",
             {"source": "math", "level": "1", "subject": "Geometry", "type": "Geometry"}),
        ],
        "test": [
            ("What is $3 \\cdot 4$?", "12", "$3 \\cdot 4 = \\boxed{12}$.",
             {"source": "math", "level": "1", "subject": "Prealgebra", "type": "Prealgebra"}),
            ("Evaluate $\\binom{4}{2}$.", "6", "$\\binom{4}{2} = \\boxed{6}$.",
             {"source": "math", "level": "2", "subject": "Counting & Probability", "type": "Counting & Probability"}),
        ],
    },
    "math500": {
        "train": [
            ("Convert $(0,3)$ to polar.", "\\left( 3, \\frac{\\pi}{2} \\right)",
             "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
             {"source": "math500", "level": "2", "subject": "Precalculus", "unique_id": "test/precalculus/807.json"}),
            ("What is $1+1$?", "2", "$\\boxed{2}$",
             {"source": "math500", "level": "1", "subject": "Prealgebra", "unique_id": "test/prealgebra/1.json"}),
            ("Solve $2x=10$.", "5", "$x=\\boxed{5}$",
             {"source": "math500", "level": "1", "subject": "Algebra", "unique_id": "test/algebra/2.json"}),
            ("What is $10/4$?", "\\frac52", "$\\boxed{\\frac52}$",
             {"source": "math500", "level": "3", "subject": "Prealgebra", "unique_id": "test/prealgebra/3.json"}),
        ],
        "test": [
            ("What is $7-2$?", "5", "$\\boxed{5}$",
             {"source": "math500", "level": "1", "subject": "Prealgebra", "unique_id": "test/prealgebra/4.json"}),
            ("What is $2^5$?", "32", "$\\boxed{32}$",
             {"source": "math500", "level": "2", "subject": "Algebra", "unique_id": "test/algebra/5.json"}),
        ],
    },
    "gsm8k": {
        "train": [
            ("Natalia sold 48 clips in April and half as many in May. How many in total?", "72",
             "In May she sold 48/2 = 24 clips.\nIn total 48+24 = 72 clips.\n\\boxed{72}", {"source": "gsm8k"}),
            ("A farm has 1,000 hens and 234 ducks. How many birds?", "1234",
             "1,000 + 234 = 1,234 birds.\n\\boxed{1234}", {"source": "gsm8k"}),
            ("Tom had 5 apples and ate 8. How many are left, counting debt?", "-3", "5 - 8 = -3.\n\\boxed{-3}",
             {"source": "gsm8k"}),
            ("Half of 3 cups is how many cups?", "1.5", "3 / 2 = 1.5\n\\boxed{1.5}", {"source": "gsm8k"}),
        ],
        "test": [
            ("Ann has 3 pens and buys 4. How many pens?", "7", "3 + 4 = 7\n\\boxed{7}", {"source": "gsm8k"}),
            ("A box holds 12 eggs. How many in 10 boxes?", "120", "12 * 10 = 120\n\\boxed{120}", {"source": "gsm8k"}),
        ],
    },
    "deepscaler": {
        "train": [
            ("Find the sum of 1 through 10.", "55", "It is $\\boxed{55}$.", {"source": "deepscaler"}),
            ("What is $\\frac{6}{4}$ in lowest terms?", "\\frac{3}{2}", "$\\boxed{\\frac{3}{2}}$",
             {"source": "deepscaler"}),
            ("How many primes are below 10?", "4", "", {"source": "deepscaler"}),
        ],
        "test": [
            ("What is the smallest prime?", "2", "$\\boxed{2}$", {"source": "deepscaler"}),
        ],
    },
    "deepmath": {
        "train": [
            ("Evaluate $\\lim_{x\\to 0} \\sin(x)/x$.", "1", "The limit is \\boxed{1}.",
             {"source": "deepmath", "level": "4.5", "subject": "Mathematics -> Calculus -> Limits"}),
            ("Is 91 prime? Answer 0 or 1.", "0", "91 = 7*13, \\boxed{0}.",
             {"source": "deepmath", "level": "2.0", "subject": "Mathematics -> Number Theory"}),
            ("Compute $\\int_0^1 2x\\,dx$.", "1", "\\boxed{1}",
             {"source": "deepmath", "level": "3.0", "subject": "Mathematics -> Calculus -> Integrals"}),
        ],
        "test": [
            ("What is $e^0$?", "1", "\\boxed{1}",
             {"source": "deepmath", "level": "1.0", "subject": "Mathematics -> Algebra"}),
        ],
    },
}


def write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return path


def write_json(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
  path.write_text(json.dumps(records), encoding="utf-8")
  return path


def write_parquet(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
  import pyarrow as pa
  import pyarrow.parquet as pq

  # Two row groups, so readers that walk record batches cross a chunk boundary.
  pq.write_table(pa.Table.from_pylist(records), path, row_group_size=max(1, (len(records) + 1) // 2))
  return path


def _tfds_feature(value):
  import tensorflow_datasets as tfds

  if isinstance(value, str):
    return tfds.features.Text()
  if isinstance(value, int):
    return tfds.features.Scalar(dtype=np.int64)
  return tfds.features.Scalar(dtype=np.float32)


def write_tfds(data_dir: pathlib.Path, name: str, splits: dict[str, list[dict]]) -> pathlib.Path:
  """Prepares `splits` as the array_record TFDS dataset `name` under `data_dir` with a GeneratorBasedBuilder
  (unregistered, so tests can build many); returns the dataset folder `data_dir/name`."""
  import tensorflow_datasets as tfds

  first = next(iter(splits.values()))[0]
  features = {key: _tfds_feature(value) for key, value in first.items()}

  def body(namespace):
    namespace["name"] = name
    namespace["VERSION"] = tfds.core.Version("1.0.0")
    namespace["_info"] = lambda self: tfds.core.DatasetInfo(builder=self,
                                                            features=tfds.features.FeaturesDict(features))
    namespace["_split_generators"] = lambda self, dl_manager: {
        split: self._generate_examples(records) for split, records in splits.items()}
    namespace["_generate_examples"] = lambda self, records: ((i, r) for i, r in enumerate(records))

  builder_cls = types.new_class(f"Fixture_{name}", (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True},
                                body)
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return data_dir / name


FORMAT_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}


def write_dataset(folder: pathlib.Path, schema: str, file_format: str) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes RAW[schema] in `file_format`; returns (train path, eval path) (the same TFDS folder for 'tfds')."""
  folder.mkdir(parents=True, exist_ok=True)
  if file_format == "tfds":
    path = write_tfds(folder, f"fixture_{schema}", RAW[schema])
    return path, path
  writer = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}[file_format]
  suffix = FORMAT_SUFFIX[file_format]
  return (writer(folder / f"{schema}_train{suffix}", RAW[schema]["train"]),
          writer(folder / f"{schema}_test{suffix}", RAW[schema]["test"]))


# A chat template in the shape of the common ones: one "<|role|> content" line per message, then the generation cue.
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer(chat_template: str | None = None):
  """A word-level tokenizer that splits on whitespace only: a prompt's token count is len(prompt.split()).

  Every word outside its few special tokens is <unk>; no special tokens are added on encode.
  """
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = ["<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
  backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(specials)}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                      additional_special_tokens=specials[2:])
  if chat_template is not None:
    tokenizer.chat_template = chat_template
  return tokenizer
