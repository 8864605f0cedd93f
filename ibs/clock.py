"""The training clock: parameter updates (steps) ↔ examples seen ↔ epochs.

The clock is examples seen (docs/DESIGN.md decision 1). A schedule's phases start at
epochs, epochs become example counts, and steps are derived from those, all here and
under one rounding rule:

  Phase p is due to end at S_{p+1} = round(start_epoch_{p+1} · N) examples (the last
  phase at round(num_epochs · N); Python's round). It begins where the last batch of
  phase p − 1 ended, at E_{p−1} examples (E_{−1} = 0), and runs

      steps_p = ceil((S_{p+1} − E_{p−1}) / B_p)

  steps of B_p examples, so it ends at E_p = E_{p−1} + steps_p · B_p ≥ S_{p+1}.

Batches run across epoch boundaries and no example is dropped or repeated. A phase
overruns its due point by less than one of its batches and the next phase starts there, so
the overrun never accumulates. The paper counts *fractional* updates, the examples due in
a phase over its batch size, (S_{p+1} − S_p) / B_p (`nominal_updates`). A phase's integer
steps are fewer than its nominal updates + 1; when B never decreases (every conversion in
ibs.schedules) the integer steps up to the end of any phase are at least the nominal
updates up to there. A phase shorter than the previous phase's overrun would get no steps;
ibs.schedules.validate rejects such a schedule.

The functions take any schedule with `phases` (each with `start_epoch` and `batch_size`),
`num_epochs` and `num_train_examples`: an ibs.schedules.Schedule.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PhaseSpan:
  """Where a phase really falls under the rounding rule."""

  first_step: int
  num_steps: int
  start_examples: int  # examples seen when the phase's first step begins
  end_examples: int  # examples seen when its last step ends


@dataclasses.dataclass(frozen=True)
class ClockPosition:
  """Where the schedule says training stands before `step` (0-based) runs.

  `step` is also the number of parameter updates done so far. Derived from the schedule
  alone; the record saved with a checkpoint is ibs.durability.checkpoint.CheckpointRecord.
  """

  step: int
  phase: int
  examples_seen: int
  epoch: float  # examples_seen / N, fractional


def examples_at_epoch(epoch: float, num_train_examples: int) -> int:
  """The example count S = round(epoch · N) at which `epoch` begins."""
  return round(epoch * num_train_examples)


def due_epochs(schedule: Any) -> list[float]:
  """The epoch each phase is due to end at: the next phase's start, num_epochs for the
  last."""
  return [p.start_epoch for p in schedule.phases[1:]] + [schedule.num_epochs]


def due_examples(schedule: Any) -> list[int]:
  """S_{p+1} for every phase p: the example count at which the phase is due to end."""
  n = schedule.num_train_examples
  return [examples_at_epoch(epoch, n) for epoch in due_epochs(schedule)]


def phase_spans(schedule: Any) -> tuple[PhaseSpan, ...]:
  """Integer steps of every phase, under the rounding rule of the module docstring."""
  spans, examples, step = [], 0, 0
  for phase, due in zip(schedule.phases, due_examples(schedule), strict=True):
    steps = max(0, -(-(due - examples) // phase.batch_size))
    spans.append(PhaseSpan(step, steps, examples, examples + steps * phase.batch_size))
    examples += steps * phase.batch_size
    step += steps
  return tuple(spans)


def num_steps(schedule: Any) -> int:
  """Total parameter updates the trainer takes."""
  last = phase_spans(schedule)[-1]
  return last.first_step + last.num_steps


def nominal_updates(schedule: Any) -> list[float]:
  """Fractional updates per phase, (S_{p+1} − S_p) / B_p: how the paper counts them."""
  due = due_examples(schedule)
  starts = [0, *due[:-1]]
  return [
    (end - start) / phase.batch_size
    for phase, start, end in zip(schedule.phases, starts, due, strict=True)
  ]


def position(schedule: Any, step: int) -> ClockPosition:
  """Phase, examples seen and fractional epoch before step `step` runs.

  `step` may be `num_steps(schedule)`, the end of training (then `phase` is the last).
  """
  spans = phase_spans(schedule)
  total = spans[-1].first_step + spans[-1].num_steps
  if not 0 <= step <= total:
    raise ValueError(f'step={step} is outside training, which has steps 0 to {total}.')
  p = bisect.bisect_right([s.first_step for s in spans], step) - 1
  examples = (
    spans[p].start_examples + (step - spans[p].first_step) * schedule.phases[p].batch_size
  )
  return ClockPosition(step, p, examples, examples / schedule.num_train_examples)


def step_at_examples(schedule: Any, examples_seen: int) -> int:
  """The first step that begins at or after `examples_seen` (inverse of `position`).

  `step_at_examples(s, position(s, k).examples_seen) == k` for every step k.
  """
  spans = phase_spans(schedule)
  if not 0 <= examples_seen <= spans[-1].end_examples:
    raise ValueError(
      f'examples_seen={examples_seen} is outside training, which sees 0 to '
      f'{spans[-1].end_examples} examples.'
    )
  for span, phase in zip(spans, schedule.phases, strict=True):
    if examples_seen <= span.end_examples:
      offset = examples_seen - span.start_examples
      return span.first_step + -(-offset // phase.batch_size)
  raise AssertionError('unreachable: examples_seen is within the last span')


def step_at_epoch(schedule: Any, epoch: float) -> int:
  """The first step that begins at or after `epoch` (e.g. when to evaluate)."""
  return step_at_examples(schedule, examples_at_epoch(epoch, schedule.num_train_examples))
