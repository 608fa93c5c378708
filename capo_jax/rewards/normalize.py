"""Answer normalisation for math rewards: rewrites that keep a final answer's meaning and drop its presentation.

Two levels, both pure string rewriting (nothing is parsed as math or evaluated here):

- `clean_answer(s)`: still valid LaTeX, the input of the symbolic checker. It removes
  - `$`, `\\(`/`\\)`, `\\[`/`\\]`, `\\left`/`\\right`, `\\displaystyle`, spacing (`\\!` `\\,` `\\;` `\\quad` `~`);
  - the wrappers `\\text{}`, `\\mbox{}`, `\\mathrm{}`, `\\textbf{}` … (their content stays);
  - degree marks (`^\\circ`, `^{\\circ}`, `°`, `\\degree`), dollar signs (`\\$`), trailing periods;
  - a unit word right after a number (`5 cm`, `12\\text{ inches}`, `3 square feet`, `30 degrees`, `7 dollars`).
    Words only: a single letter may be a variable, so `5 m` is left to math-verify (which reads it as 5, and `5x`
    as 5x);
  - thousands separators of a whole number (`1,000`, `1{,}000`, `1\\,000` → `1000`; `1,2` is a list and stays);
  - a leading single-variable assignment when there is no other `=` (`x = 3`, `\\theta=30`, `a_1 = 2` → the
    right-hand side).
  `\\dfrac`/`\\tfrac` become `\\frac`; `%`, `\\%` and the word `percent` become `\\%`.
- `answer_key(clean_answer(s))` = `normalize_answer(s)`: the key of the exact-match fast path. The percent sign and
  the spaces go (but the one in `\\pi r`), `\\frac12`/`\\sqrt2` are braced, a lone fraction of simple terms is
  written `a/b` (`\\frac{\\sqrt{2}}{2}` ≡ `\\sqrt{2}/2`, `-\\frac{1}{2}` ≡ `-1/2`), braces around the whole answer
  go, and a plain decimal number is made canonical (`+07.50` → `7.5`, `-0` → `0`).

Percentages: a percent sign is dropped for the exact comparison (`50\\%` ≡ `50`) but kept, as `\\%`, in the input of
the symbolic checker, where math-verify also reads it as a hundredth (`50\\%` ≡ `0.5` ≡ `\\frac12`). So an answer
with a percent sign matches both its number and its hundredth; a bare `0.5` never matches a bare `50`.

Every pass here is linear in the length of its input (whitespace runs are collapsed first, no pattern can
backtrack over a long span, the unit pattern only looks at the tail), so megabyte-long model outputs are safe.
"""

from __future__ import annotations

import re

from capo_jax.rewards.boxed import matching_brace

__all__ = ["answer_key", "canonical_decimal", "clean_answer", "normalize_answer"]

_WHITESPACE = re.compile(r"\s+")
# A space that separates a command from a letter (`\\pi r`) is kept in the exact-match key; every other one goes.
_KEY_SPACE = re.compile(r"(\\[A-Za-z]+) (?=[A-Za-z])|\s")


def _command(pattern: str) -> re.Pattern:
  """`pattern`, tried only where no `\\\\` (a LaTeX line break, e.g. a matrix row end) starts: group 1 catches those."""
  return re.compile(r"(\\\\)|(?:" + pattern + ")")


# Removed (or replaced by a space), each only outside a `\\\\`: `\\[2pt]` keeps its `\\` and `\\ 2` keeps its space.
_DROPPED = _command(r"\\[()\[\]!$]|\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|bigg|Bigg|big|Big|"
                    r"displaystyle|textstyle|scriptstyle)(?![A-Za-z])|\$")
_SPACING = _command(r"\\[,:;> ]|\\q?quad(?![A-Za-z])|~")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|textnormal|mbox|mathrm|mathbf|mathit|mathsf|mathnormal|"
                      r"boldsymbol)\s*\{")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\(?:text)?degree(?![A-Za-z])")
_PERCENT = re.compile(r"\\%|%| ?\bpercent\b", re.IGNORECASE)
_UNIT_WORDS = (r"cm|mm|km|meters?|metres?|inch(?:es)?|feet|foot|ft|yards?|miles?|seconds?|secs?|minutes?|mins?|"
               r"hours?|hrs?|days?|weeks?|months?|years?|grams?|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|"
               r"litres?|ml|gallons?|dollars?|cents?|degrees?|units?|mph")
# A unit word (optionally "square"/"sq"/"cubic" before it, a power after it) ending the answer right after a number:
# a digit, a closing brace or parenthesis, or \pi.
_TRAILING_UNIT = re.compile(r"(?:(?<=[0-9})])|(?<=\\pi)) ?(?:(?:square|sq\.?|cubic) )?(?:" + _UNIT_WORDS +
                            r")(?:\^\{?[23]\}?|²|³)?$", re.IGNORECASE)
_MAX_UNIT_CHARS = 32  # Longer than any " square kilograms^{3}" the pattern above can match.
_ASSIGNMENT = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)? ?= ?")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:([, ])[0-9]{3})(?:\1[0-9]{3})*(?:\.[0-9]+)?")
_DECIMAL = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
# `\\frac12`, `\\frac1{…`, `\\frac{…}2`: a one-character argument written without braces.
_SHORT_FRAC = re.compile(r"\\frac ?([0-9A-Za-z]) ?([0-9A-Za-z])|\\frac ?([0-9A-Za-z]) ?(\{)|"
                         r"\\frac ?(\{[^{}]*\}) ?([0-9A-Za-z])")
_SHORT_SQRT = re.compile(r"\\sqrt ?([0-9A-Za-z])")
_SIMPLE_TERM = r"(?:[0-9A-Za-z.]|\\pi|\\sqrt\{[0-9A-Za-z.]+\})+"
_LONE_FRACTION = re.compile(r"(-?)\\frac\{(" + _SIMPLE_TERM + r")\}\{(" + _SIMPLE_TERM + r")\}")
_MAX_UNWRAP_PASSES = 8  # Nested wrappers (`\text{\textbf{5}}`) need one pass per level; more is adversarial.


def _unwrap(text: str) -> str:
  """Replaces every `\\text{...}`-like wrapper by its content (one level per pass; stops at an unclosed brace)."""
  for _ in range(_MAX_UNWRAP_PASSES):
    if _WRAPPER.search(text) is None:
      break
    pieces = []
    pos = 0
    while (match := _WRAPPER.search(text, pos)) is not None:
      close = matching_brace(text, match.end() - 1)
      if close is None:
        break
      pieces.append(text[pos : match.start()])
      pieces.append(text[match.end() : close])
      pos = close + 1
    pieces.append(text[pos:])
    unwrapped = "".join(pieces)
    if unwrapped == text:
      break
    text = unwrapped
  return text


def _collapse(text: str) -> str:
  return _WHITESPACE.sub(" ", text).strip()


def clean_answer(answer: str) -> str:
  """Drops presentation from a final answer and keeps it valid LaTeX (see the module docstring for each rule).

  E.g. `\\$\\dfrac{1}{2}\\,\\text{cm}.` → `\\frac{1}{2}`, `x = 1{,}000` → `1000`, `50 percent` → `50\\%`,
  `\\left(1, 2\\right]` → `(1, 2]`, `30^{\\circ}` → `30`.

  Args:
    answer: a raw final answer (e.g. the content of a `\\boxed{}`), any string.

  Returns:
    The cleaned answer, spaces collapsed to single ones and stripped; never raises on a str.
  """
  text = _collapse(answer)
  text = _DROPPED.sub(lambda m: m.group(1) or "", text)
  text = _SPACING.sub(lambda m: m.group(1) or " ", text)
  text = _FRAC_VARIANT.sub(r"\\frac", text)
  text = _unwrap(text)
  text = _DEGREES.sub("", text)
  text = _PERCENT.sub(r"\\%", text)
  text = _collapse(text).rstrip(". ")
  unit = _TRAILING_UNIT.search(text, max(0, len(text) - _MAX_UNIT_CHARS))  # Only the tail can hold a unit.
  if unit is not None:
    text = text[: unit.start()].rstrip()
  if text.count("=") == 1 and (assignment := _ASSIGNMENT.match(text)) is not None:
    text = text[assignment.end():]
  text = text.replace("{,}", ",")
  thousands = _THOUSANDS.fullmatch(text)
  if thousands is not None:
    text = text.replace(thousands.group(1), "")
  return text.strip()


def canonical_decimal(text: str) -> str | None:
  """The canonical form of a plain decimal number (`+07.50` → `7.5`, `-0.0` → `0`, `.5` → `0.5`), or None.

  Only optional sign, ASCII digits and one optional point are accepted (no exponent, no separators), and the result
  is built from the digit strings alone, so numbers of any length are handled exactly without int/float conversion.
  """
  match = _DECIMAL.fullmatch(text)
  if match is None:
    return None
  sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
  if not whole and not fraction:
    return None
  whole = whole.lstrip("0") or "0"
  fraction = fraction.rstrip("0")
  number = whole + ("." + fraction if fraction else "")
  return number if sign != "-" or number == "0" else "-" + number


def _brace_short_args(text: str) -> str:
  def braced(match: re.Match) -> str:
    groups = match.groups()
    if groups[0] is not None:
      return f"\\frac{{{groups[0]}}}{{{groups[1]}}}"
    if groups[2] is not None:
      return f"\\frac{{{groups[2]}}}{{"
    return f"\\frac{groups[4]}{{{groups[5]}}}"
  return _SHORT_SQRT.sub(r"\\sqrt{\1}", _SHORT_FRAC.sub(braced, text))


def _strip_outer_braces(text: str) -> str:
  """`{{5}}` → `5`: braces around the whole answer group nothing. One pass, whatever the depth."""
  leading = len(text) - len(text.lstrip("{"))
  if leading == 0:
    return text
  closes: dict[int, int] = {}
  stack: list[int] = []
  i = 0
  while i < len(text):
    if text[i] == "\\":
      i += 2
      continue
    if text[i] == "{":
      stack.append(i)
    elif text[i] == "}" and stack:
      opened = stack.pop()
      if opened < leading:
        closes[opened] = i
    i += 1
  depth = 0
  while depth < leading and closes.get(depth) == len(text) - 1 - depth:
    depth += 1
  return text[depth : len(text) - depth]


def answer_key(cleaned: str) -> str:
  """The exact-match key of an already cleaned answer (`normalize_answer` = `answer_key` ∘ `clean_answer`)."""
  key = cleaned.replace("\\%", "")
  key = _KEY_SPACE.sub(lambda m: m.group(1) + " " if m.group(1) else "", key)
  key = _strip_outer_braces(key)
  key = _brace_short_args(key)
  fraction = _LONE_FRACTION.fullmatch(key)
  if fraction is not None:
    key = f"{fraction.group(1)}{fraction.group(2)}/{fraction.group(3)}"
  number = canonical_decimal(key)
  return key if number is None else number


def normalize_answer(answer: str) -> str:
  """The exact-match key of an answer: `clean_answer`, then no percent sign, no spaces, canonical short forms.

  Two answers with the same key are the same answer; different keys prove nothing (the symbolic checker decides).
  E.g. `\\dfrac{\\sqrt2}{2}` and `\\sqrt{2}/2` → `\\sqrt{2}/2`; `x = 3.50` and `3.5` → `3.5`; `50\\%` → `50`;
  `\\text{(A)}` → `(A)`.

  Args:
    answer: a raw final answer, any string.

  Returns:
    The key; `""` when nothing is left (an empty or whitespace-only answer).
  """
  return answer_key(clean_answer(answer))
