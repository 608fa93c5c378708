"""The embedded arithmetic task's reward in plain Python, for the peers' scratch environments (no capo_jax there).

1.0 iff the content of the completion's last top-level ``\\boxed{...}`` / ``\\fbox{...}`` is the integer answer
(optional sign, ASCII digits, surrounding whitespace ignored), else 0.0: the rule of ``ArithTask.score``
(docs/MATH.md §1). ``benchmarks.peers`` checks that the two agree before it measures anything.
"""

import re

_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _closing(text: str, start: int):
  """Index of the brace closing the one at ``start`` (backslash escapes skipped), or None."""
  depth = 0
  i = start
  while i < len(text):
    if text[i] == "\\":
      i += 2
      continue
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def last_box(text: str):
  """The raw content of the last top-level box, or None (no box, or the last one opened is never closed)."""
  content, pos = None, 0
  while True:
    found = _OPEN.search(text, pos)
    if found is None:
      return content
    end = _closing(text, found.end() - 1)
    if end is None:
      return None
    content, pos = text[found.end():end], end + 1


def score(completion: str, answer: int) -> float:
  """1.0 iff the last box of ``completion`` holds exactly ``answer``."""
  content = last_box(completion)
  if content is None:
    return 0.0
  content = content.strip()
  if _INTEGER.fullmatch(content) is None:
    return 0.0
  digits = content.lstrip("+-").lstrip("0") or "0"
  negative = content.startswith("-") and digits != "0"
  answer = int(answer)
  return 1.0 if negative == (answer < 0) and digits == str(abs(answer)) else 0.0


def scores(completions, answers) -> list:
  """``score`` over aligned lists."""
  return [score(c, a) for c, a in zip(completions, answers)]
