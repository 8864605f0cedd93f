"""The schedule the loop drives: its phases as segments held once, and its decisions.

A run's schedule answers the loop's questions through one interface (`RunSchedule`),
whatever its kind (docs/DESIGN.md decision 14):

* **the segments known now**: each phase's first and end step and the examples seen at
  its start, computed once from ibs.clock's rounding rule (`Segments`) and held until
  a decision changes the phases, never re-derived per dispatch;
* **when a decision is due** (`decide_every_examples`, one more event of the cadence)
  and **what it decides** (`decide`, from what the run measured: the noise scale and
  the running training loss);
* **what it decided so far** (its decisions, data saved in every checkpoint's record
  and replayed on resume, never re-derived).

A fixed schedule (`Fixed`) is the case that never decides: its segments are its phases,
its decisions empty. The adaptive schedule (ibs/adaptive.py) decides when the batch
grows; a kind that decides ε, or B and ε, plugs in the same way: its decisions are a
record, `realized(decisions)` the ibs.schedules.Schedule they make.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from ibs import clock, gns, noise_scale, optim, schedules


@dataclasses.dataclass(frozen=True)
class Segment:
  """Phase `index` of the schedule: steps [first_step, end_step), starting at
  `start_examples` examples seen."""

  index: int
  phase: schedules.Phase
  first_step: int
  end_step: int
  start_examples: int

  def examples_at(self, step: int) -> int:
    """Examples seen before `step` (within this segment) runs."""
    return self.start_examples + (step - self.first_step) * self.phase.batch_size


@dataclasses.dataclass(frozen=True)
class Segments:
  """A schedule's phases as segments, under ibs.clock's rounding rule; built once."""

  schedule: schedules.Schedule
  segments: tuple[Segment, ...]
  end_examples: int  # examples seen when the last step ends

  @classmethod
  def of(cls, schedule: schedules.Schedule) -> Segments:
    spans = clock.phase_spans(schedule)
    segments = tuple(
      Segment(p, phase, s.first_step, s.first_step + s.num_steps, s.start_examples)
      for p, (phase, s) in enumerate(zip(schedule.phases, spans, strict=True))
    )
    return cls(schedule, segments, spans[-1].end_examples)

  @property
  def num_steps(self) -> int:
    return self.segments[-1].end_step

  def at(self, step: int) -> Segment:
    """The segment that step `step` belongs to (the last one at the end of training)."""
    starts = [s.first_step for s in self.segments]
    return self.segments[bisect.bisect_right(starts, step) - 1]

  def examples_at(self, step: int) -> int:
    """Examples seen before `step` runs (at num_steps, when training ends)."""
    if step >= self.num_steps:
      return self.end_examples
    return self.at(step).examples_at(step)


class Measured(NamedTuple):
  """What the run measured at a decision point, for the schedule to decide from."""

  b_simple: float  # the noise scale tr(Σ)/|G|² (ibs/gns.py); NaN before a measurement
  train_loss: float  # the running training loss since the last log; NaN if none
  # The bias-corrected moving averages behind B_simple (ibs/gns.py), for a schedule that
  # averages them over its own window (ibs/measured/window.py); NaN before an estimate.
  trace_cov: float = math.nan
  grad_sq_norm: float = math.nan
  # The loss on the schedule's fixed training slice, evaluated only for a schedule that
  # asks for it (`train_slice_examples`, ibs/measured/plateau.py); NaN otherwise.
  train_slice_loss: float = math.nan


def measure(
  run_schedule: RunSchedule,
  state: Any,
  metrics: Any,
  train_slice_loss: Callable[[Any, int], float],
) -> Measured:
  """What a schedule's decision reads from the run's `state` and running `metrics`: the
  noise scale and the averages behind it, the running training loss, and, where the
  schedule asks for it, `train_slice_loss(state, examples)` (an evaluation pass, so
  only then; ibs/setup.py's `Run.train_slice_loss`)."""
  loss = float(np.asarray(metrics.compute()['loss']))
  estimates = gns.estimates(state.gns)
  slice_loss = math.nan
  if run_schedule.train_slice_examples:
    slice_loss = train_slice_loss(state, run_schedule.train_slice_examples)
  return Measured(
    gns.b_simple(state.gns),
    loss,
    trace_cov=estimates['gns/trace_cov'],
    grad_sq_norm=estimates['gns/grad_sq_norm'],
    train_slice_loss=slice_loss,
  )


class Decision(Protocol):
  """What one decision point chose: the decisions after it, whether the phases changed,
  and the scalars and log line that say what it saw."""

  switched: bool

  @property
  def decisions(self) -> Any: ...

  def scalars(self) -> dict[str, float]: ...

  def describe(self, step: int) -> str: ...


class RunSchedule(Protocol):
  """The questions the loop asks of a schedule (see the module docstring)."""

  num_train_examples: int
  budget_examples: int  # the examples the run is due to see
  decide_every_examples: int  # 0: the schedule never decides
  host_sets_hyperparams: bool  # ε and m set from the host as each phase begins
  train_slice_examples: int  # > 0: a decision reads the loss on this many (Measured)

  def initial(self) -> Any: ...

  def from_record(self, record: Any) -> Any: ...

  def to_record(self, decisions: Any) -> dict[str, Any]: ...

  def realized(self, decisions: Any) -> schedules.Schedule: ...

  def batch_sizes(self, decisions: Any, step: int) -> list[int]: ...

  def total_steps(self, decisions: Any) -> int | None: ...

  def problems(self, decisions: Any, examples_seen: int) -> list[str]: ...

  def decide(self, decisions: Any, examples: int, measured: Measured) -> Decision: ...

  def describe(self, optimizer: str | None = None) -> str: ...

  def summary(self, decisions: Any, segments: Segments) -> dict[str, Any]: ...


class Fixed:
  """A schedule whose phases are known from the config: it never decides."""

  decide_every_examples = 0
  host_sets_hyperparams = False
  train_slice_examples = 0

  def __init__(self, schedule: schedules.Schedule):
    self.schedule = schedule
    self.num_train_examples = schedule.num_train_examples
    self.budget_examples = clock.examples_at_epoch(
      schedule.num_epochs, schedule.num_train_examples
    )

  def initial(self) -> tuple[()]:
    return ()

  def from_record(self, record: Any) -> tuple[()]:
    return ()

  def to_record(self, decisions: Any) -> dict[str, Any]:
    return {}

  def realized(self, decisions: Any) -> schedules.Schedule:
    return self.schedule

  def batch_sizes(self, decisions: Any, step: int) -> list[int]:
    """The batch of every phase still to run from `step` on."""
    return [
      s.phase.batch_size
      for s in Segments.of(self.schedule).segments
      if s.end_step > step and s.end_step > s.first_step
    ]

  def total_steps(self, decisions: Any) -> int:
    return clock.num_steps(self.schedule)

  def problems(self, decisions: Any, examples_seen: int) -> list[str]:
    return []

  def decide(self, decisions: Any, examples: int, measured: Measured) -> Decision:
    raise AssertionError('a fixed schedule has no decision points')

  def describe(self, optimizer: str | None = None) -> str:
    return noise_scale.format_table(self.schedule, title='schedule', optimizer=optimizer)

  def summary(self, decisions: Any, segments: Segments) -> dict[str, Any]:
    return {}


def begin_phase(run_schedule: RunSchedule, state: Any, phase: schedules.Phase) -> Any:
  """`state` ready for `phase`: with its ε and m in the optimizer state where the host
  sets them (optim.create_optimizer's `host_set`); unchanged otherwise. Idempotent, so
  a resume does the same."""
  if not run_schedule.host_sets_hyperparams:
    return state
  values = {'learning_rate': phase.learning_rate, 'momentum': phase.momentum}
  values = {k: v for k, v in values.items() if k in state.opt_state.hyperparams}
  return state.replace(opt_state=optim.set_hyperparams(state.opt_state, **values))
