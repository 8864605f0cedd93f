"""The divergence guard's host side: a NaN or inf loss or gradient stops the run.

The step counts the updates whose loss or gradient was not finite in its running
metrics (`nonfinite`, summed over the dispatch) and, with config.nonfinite = 'skip',
leaves the parameters, BN statistics and optimizer state of those updates as they were.
The loop reads the count after every dispatch (one scalar): with 'stop' (the default) a
non-zero count ends the run with `Diverged` before anything of that state is evaluated
or checkpointed, so the checkpoints on disk stay finite and rotation never replaces the
last good one; with 'skip' the skips are counted, logged and kept in the position record.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# config.nonfinite: what the step does at a non-finite update (ibs/step.py).
POLICIES = ('stop', 'skip')


class Diverged(RuntimeError):
  """Training met a non-finite loss or gradient (config.nonfinite = 'stop'); one line."""


def nonfinite_total(train_metrics: Any) -> int:
  """Non-finite updates counted in the running metrics since their last reset."""
  total = train_metrics.nonfinite.total
  value = total.addressable_data(0) if isinstance(total, jax.Array) else total
  return int(np.asarray(value))


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
) -> str:
  where = (
    f'update {last_step}'
    if first_step == last_step
    else f'updates {first_step}–{last_step} (one dispatch)'
  )
  return (
    f'Training diverged: {count} update(s) with a NaN or inf loss or gradient in '
    f'{where}, phase {phase_index}, {examples_seen:,} examples seen (epoch {epoch:.2f}), '
    f'learning rate ε={learning_rate:g}, batch size B={batch_size}. Nothing of it was '
    f'checkpointed; the last good checkpoint is {last_good}. Lower the learning rate, '
    "or set config.nonfinite='skip' to skip such updates."
  )
