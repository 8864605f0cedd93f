"""The divergence guard's host side: a non-finite update stops the run, or too many skips.

The step (ibs/step.py) never applies an update whose loss or gradient is not finite or
that would leave the state non-finite; it counts them in the state
(`nonfinite_updates`) and, with config.nonfinite = 'stop' (the default), freezes the
state at the first (`halted_at_step`). The loop reads those scalars before every event
(log, evaluation, checkpoint): 'stop' ends the run with `Diverged` before anything of
that state is evaluated or checkpointed, so the checkpoints on disk stay finite and
rotation never replaces the last good one. With 'skip' the skips are counted, logged
and kept in the position record, and `SkipWindow` stops the run with `Diverged` when
more than config.nonfinite_max_skipped of the updates since the previous event were
skipped: a run that skips nearly every update is not training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ibs import sharding
from ibs.durability import checkpoint

# config.nonfinite: what the step does at a non-finite update (ibs/step.py).
POLICIES = ('stop', 'skip')


class Diverged(RuntimeError):
  """Training met a non-finite loss or gradient (config.nonfinite = 'stop'); one line."""


def nonfinite_total(train_metrics: Any) -> int:
  """Non-finite updates counted in the running metrics since their last reset."""
  return int(sharding.host_value(train_metrics.nonfinite.total))


def message(
  *,
  first_step: int,
  last_step: int,
  count: int,
  phase_index: int,
  examples_seen: int,
  epoch: float,
  learning_rate: float,
  batch_size: int,
  last_good: str,
  max_skipped: float | None = None,
) -> str:
  """The one line of `Diverged`: a non-finite update ('stop'), or, given `max_skipped`
  (config.nonfinite_max_skipped), a window of 'skip' that skipped too many."""
  if max_skipped is None:
    where = (
      f'update {last_step}'
      if first_step == last_step
      else f'updates {first_step}–{last_step} (one dispatch)'
    )
    what = f'{count} update(s) with a NaN or inf loss or gradient in {where}'
    fix = "or set config.nonfinite='skip' to skip such updates."
  else:
    what = (
      f'{count} of the {last_step - first_step + 1} updates {first_step}–{last_step} '
      f'skipped as not finite (more than config.nonfinite_max_skipped={max_skipped:g})'
    )
    fix = 'or raise config.nonfinite_max_skipped.'
  return (
    f'Training diverged: {what}, phase {phase_index}, {examples_seen:,} examples seen '
    f'(epoch {epoch:.2f}), learning rate ε={learning_rate:g}, batch size B={batch_size}. '
    f'Nothing of it was checkpointed; the last good checkpoint is {last_good}. Lower the '
    f'learning rate, {fix}'
  )


@dataclasses.dataclass
class SkipWindow:
  """The skipped updates of each window: the updates between two events of the loop.

  `max_fraction` is config.nonfinite_max_skipped; `step` and `skipped` where the
  current window began (the session's start, then each event).
  """

  max_fraction: float
  step: int
  skipped: int

  def exceeded(self, step: int, skipped: int) -> tuple[int, int, int] | None:
    """(first step, last step, skips) of a window that skipped more than allowed, or
    None (and a new window begins at `step`)."""
    window = (self.step, step - 1, skipped - self.skipped)
    self.step, self.skipped = step, skipped
    updates = window[1] - window[0] + 1
    if updates > 0 and window[2] > self.max_fraction * updates:
      return window
    return None


def skip_window(config: Any, state: Any) -> SkipWindow | None:
  """With config.nonfinite 'skip', the window that begins at `state`: too many skipped
  updates between two events stop the run. None with 'stop' (the first stops it)."""
  if config.nonfinite != 'skip':
    return None
  return SkipWindow(
    config.nonfinite_max_skipped, int(state.step), int(state.nonfinite_updates)
  )


def check(state: Any, segs: Any, manager: Any, skips: SkipWindow | None = None) -> None:
  """Raises `Diverged` if the step halted on a non-finite update ('stop'), or if `skips`
  ('skip') finds too many skipped since the last event; the loop calls it before every
  event. `segs` is the run's ibs.segments.Segments (where the update was), `manager` its
  checkpoint manager (the last good checkpoint, in the message).

  The step itself never applies such an update and freezes the state at the first one
  (ibs/step.py), so checking before every event is enough: no log, evaluation or
  checkpoint ever sees a non-finite state.
  """
  halted = int(state.halted_at_step)
  window = (
    skips.exceeded(int(state.step), int(state.nonfinite_updates)) if skips else None
  )
  if halted < 0 and window is None:
    return
  manager.wait_until_finished()
  first, last, count = (halted, halted, 1) if window is None else window
  segment = segs.at(last)
  examples = segment.examples_at(last)
  raise Diverged(
    message(
      first_step=first,
      last_step=last,
      count=count,
      max_skipped=None if window is None else skips.max_fraction,
      phase_index=segment.index,
      examples_seen=examples,
      epoch=examples / segs.schedule.num_train_examples,
      learning_rate=float(state.opt_state.hyperparams['learning_rate']),
      batch_size=segment.phase.batch_size,
      last_good=checkpoint.last_good(manager),
    )
  )
