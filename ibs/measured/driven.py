"""A measured kind as the schedule the loop drives (ibs/segments.py's `RunSchedule`).

The kinds themselves (ibs/measured/temperature.py, plateau.py) are a ladder and a pure
rule over their own record of decisions, read from `base.Inputs`; this adapter answers
the loop's questions with them: what the loop measured becomes the rule's inputs, the
decisions travel in the checkpoint record's `decisions` field, and the switches go to
the summary with the step each began at.
"""

from __future__ import annotations

from typing import Any

from ibs import clock, noise_scale, schedules, segments
from ibs.durability import checkpoint
from ibs.measured import base


class Decision:
  """One decision point of a measured kind, as ibs.segments.Decision."""

  def __init__(self, decision: base.Decision):
    self.decision = decision

  @property
  def switched(self) -> bool:
    return self.decision.changed

  @property
  def decisions(self) -> Any:
    return self.decision.decisions

  def scalars(self) -> dict[str, float]:
    return dict(self.decision.scalars)

  def describe(self, step: int) -> str:
    return f'Step {step}: {self.decision.message}.'


class MeasuredSchedule:
  """`rule` (a measured kind) behind ibs.segments.RunSchedule."""

  host_sets_hyperparams = True  # its step cannot know when a decision changes ε

  def __init__(self, rule: Any):
    self.rule = rule
    self.kind = rule.kind
    self.num_train_examples = rule.n
    self.budget_examples = rule.end_examples
    self.decide_every_examples = rule.check_every_examples
    # The plateau kind judges the training loss on a fixed slice of the training set,
    # which the loop evaluates at a decision point only when it is asked for.
    self.train_slice_examples = rule.loss_examples if rule.needs_loss else 0

  def initial(self) -> Any:
    return self.rule.initial()

  def from_record(self, record: Any) -> Any:
    """The decisions in a checkpoint record's `decisions` field, of this kind."""
    saved = record.decisions
    if not saved or saved.get('kind') != self.kind:
      raise checkpoint.CheckpointError(
        f'The checkpoint of step {record.step} records no decisions of kind '
        f'{self.kind!r}. Resume it with the config that wrote it, or use a new --workdir.'
      )
    return self.rule.from_record(saved)

  def to_record(self, decisions: Any) -> dict[str, Any]:
    return decisions.to_record()

  def realized(self, decisions: Any) -> schedules.Schedule:
    return self.rule.realized(decisions)

  def batch_sizes(self, decisions: Any, step: int) -> list[int]:
    """Every batch it may still choose: a decision cannot wait on a compile."""
    return self.rule.batch_sizes(decisions)

  def total_steps(self, decisions: Any) -> int | None:
    return None  # decided as it runs: the budget is in examples

  def problems(self, decisions: Any, examples_seen: int) -> list[str]:
    return self.rule.check_growth(decisions, examples_seen)

  def decide(
    self, decisions: Any, examples: int, measured: segments.Measured
  ) -> Decision:
    inputs = base.Inputs(
      measured.trace_cov, measured.grad_sq_norm, measured.train_slice_loss
    )
    return Decision(self.rule.decide(decisions, examples, inputs))

  def describe(self, optimizer: str | None = None) -> str:
    """The opening table: the phases as known at the start, and the budget."""
    table = noise_scale.format_table(
      self.rule.realized(self.rule.initial()),
      title=f'schedule: {self.kind}, the phases before any decision',
      optimizer=optimizer,
    )
    n = self.num_train_examples
    return (
      f'{table}\nbudget: {self.budget_examples:,} examples = '
      f'{self.budget_examples / n:g} epochs of N={n:,}; decided every '
      f'{self.decide_every_examples / n:g} epochs by measurement.'
    )

  def summary(self, decisions: Any, segs: segments.Segments) -> dict[str, Any]:
    """The switches taken (when, the new B and ε, why), with the step each began."""
    return {
      'switches': [
        {**s, 'step': clock.step_at_examples(segs.schedule, s['examples'])}
        for s in self.rule.switches(decisions)
      ]
    }
