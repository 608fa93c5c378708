"""Built-in tasks: the embedded synthetic arithmetic-reasoning default and its tokenizer.

- `ArithTask`: deterministic problem streams (`batch(step, P)`), disjoint held-out split (`heldout(n)`), reward.
- `build_arith_tokenizer` / `load_arith_tokenizer`: a ~1k-token byte-level BPE (Qwen2-style) for that task.
"""

from capo_jax.tasks.arith import (
    DIFFICULTIES,
    INSTRUCTION,
    ArithProblem,
    ArithTask,
    Difficulty,
    format_prompt,
    solve_expression,
)
from capo_jax.tasks.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    arith_tokenizer_corpus,
    build_arith_tokenizer,
    load_arith_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "DIFFICULTIES",
    "EOS_TOKEN",
    "INSTRUCTION",
    "PAD_TOKEN",
    "ArithProblem",
    "ArithTask",
    "Difficulty",
    "arith_tokenizer_corpus",
    "build_arith_tokenizer",
    "format_prompt",
    "load_arith_tokenizer",
    "solve_expression",
]
