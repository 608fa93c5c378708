"""The README's demo learns: GRPO advantages + clipped surrogate + Adam solve a 16-prompt verifiable task."""

from experiments import demo


def test_demo_policy_learns_the_answers(capsys):
  accuracy = demo.main(["--steps", "60"])
  # Uniform guessing over 32 answers gets 1/32 right; a sign error in the loss or advantages would unlearn.
  assert accuracy >= 0.9
  assert "greedy_accuracy=" in capsys.readouterr().out
