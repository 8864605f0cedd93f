"""What the measured schedule kinds share: a decision point's inputs and outcome, the
phases a run's decisions realize, and the config checks every kind makes.

A measured kind is a ladder of what it may choose, and two pure functions over its
decisions (a frozen record, saved with every checkpoint):

    decide(decisions, examples, inputs) -> Decision   at each decision point
    realized(decisions) -> ibs.schedules.Schedule      the phases run so far, and to come

so that the clock, the tables and the summary treat a measured run as the fixed schedule
it turned out to be, and a resumed run, replaying the saved decisions, is where the
uninterrupted run was.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

from ibs import clock, schedules


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a decision point reads: the step's noise-scale moving averages, bias-corrected
  (ibs/gns.py; NaN before any estimate), and for `plateau` the training loss."""

  trace_cov: float
  grad_sq_norm: float
  train_loss: float = math.nan


@dataclasses.dataclass(frozen=True)
class Decision:
  """What one decision point saw and chose; the loop logs `scalars` to TensorBoard."""

  decisions: Any  # the kind's record after this point
  changed: bool  # a new phase begins with the next step
  scalars: dict[str, float]  # what it read, the bounds it applied, what it chose
  message: str  # the log line of a change ('' when nothing changed)


def realize(
  starts: list[tuple[int, int, float, float]], num_epochs: float, n: int
) -> schedules.Schedule:
  """The Schedule of phases (start examples, B, ε, m), in order of their starts.

  A decision taken at the very example count where a phase of the recipe begins (the
  end of the last step before it; ibs/clock.py) leaves that phase no step: it is
  dropped, and the decision's phase, whose ε already follows the recipe there, replaces
  it. Its predecessor then runs to the same last step (it ended there anyway).
  """
  phases = [
    schedules.Phase(examples / n, batch, lr, momentum)
    for examples, batch, lr, momentum in starts
  ]
  shape = types.SimpleNamespace(
    phases=phases, num_epochs=num_epochs, num_train_examples=n
  )
  spans = clock.phase_spans(shape)
  phases = [p for p, span in zip(phases, spans, strict=True) if span.num_steps]
  return schedules.Schedule(tuple(phases), num_epochs, n)


def number(section: Any, name: str, field: str) -> float:
  """`section[field]` as a float, or a ScheduleError naming config.schedule.NAME.FIELD."""
  value = section.get(field)
  if not (isinstance(value, int | float) and not isinstance(value, bool)):
    raise schedules.ScheduleError(
      f'config.schedule.{name}.{field}={value!r} must be a number.'
    )
  if not math.isfinite(value):
    raise schedules.ScheduleError(
      f'config.schedule.{name}.{field}={value!r} must be finite.'
    )
  return float(value)


def check_epochs(section: Any, name: str, field: str, num_epochs: float, *, zero=True):
  """An epoch count in [0, num_epochs] ((0, num_epochs] with zero=False)."""
  value = number(section, name, field)
  low_ok = value >= 0 if zero else value > 0
  if not (low_ok and value <= num_epochs):
    raise schedules.ScheduleError(
      f'config.schedule.{name}.{field}={value!r} must be '
      f'{"at least 0" if zero else "positive"} and at most '
      f'config.schedule.num_epochs={num_epochs!r}.'
    )
  return value


def check_common(config: Any, kind: str) -> None:
  """What no measured kind can follow: the checks `adaptive` makes too."""
  s = config.schedule
  if s.get(kind) is None:
    raise schedules.ScheduleError(
      f"config.schedule.kind='{kind}' needs config.schedule.{kind} "
      '(configs/default.py has an example).'
    )
  if s.get('warmup_epochs'):
    raise schedules.ScheduleError(
      f"config.schedule.warmup_epochs is not supported with kind='{kind}' (the run sets "
      'ε from the host when a phase begins); set it to 0.'
    )
  if s.get('scale_weight_decay'):
    raise schedules.ScheduleError(
      f"config.schedule.scale_weight_decay is not supported with kind='{kind}'; "
      'remove it.'
    )
  if config.optimizer == 'adam':
    raise schedules.ScheduleError(
      f"config.schedule.kind='{kind}' keeps SGD's g = εN/(B(1 − m)) (B ∝ ε); for Adam "
      "use a fixed kind ('sqrt_scaling' or 'seesaw'), or config.optimizer 'momentum', "
      "'nesterov' or 'sgd'."
    )
  if not config.gns.enabled:
    raise schedules.ScheduleError(
      f"config.schedule.kind='{kind}' decides from the measured noise scale; set "
      'config.gns.enabled=True.'
    )


def integer_batch(value: float, what: str) -> int:
  """`value` as a batch size, or a ScheduleError when it is not a whole number."""
  batch = round(value)
  if batch < 1 or abs(batch - value) > 1e-9 * max(1.0, value):
    raise schedules.ScheduleError(f'{what}: batch size {value:g} is not a whole number.')
  return batch
