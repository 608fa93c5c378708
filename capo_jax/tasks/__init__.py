"""Tasks: the interface the trainer uses, and the embedded synthetic arithmetic-reasoning default.

- `Task`, `Problem` (`base.py`): a resumable stream of training problems, a held-out set, a batch reward on text.
- `ArithTask`: the embedded task (deterministic problem streams, disjoint held-out split, integer reward).
- `build_arith_tokenizer` / `load_arith_tokenizer`: a ~1k-token byte-level BPE (Qwen2-style) for that task.
- `warm_start.warm_start`: the supervised warm start of a fresh policy on a task's worked solutions.
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
from capo_jax.tasks.base import Problem, Task, check_task
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
    "Problem",
    "Task",
    "ArithProblem",
    "ArithTask",
    "Difficulty",
    "arith_tokenizer_corpus",
    "build_arith_tokenizer",
    "check_task",
    "format_prompt",
    "load_arith_tokenizer",
    "solve_expression",
]
