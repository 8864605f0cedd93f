"""Events keyed to examples seen: logging, evaluation, checkpoints.

An event with a period of P examples (docs/DESIGN.md decision 1) is due whenever the
example count crosses a multiple of P, whatever the batch size of the phase: a log every
epoch is a log every epoch at B = 32 and at B = 4000. The loop asks two questions of one
small value: how many steps it may run before the next event (so that a dispatch of
several steps ends exactly there), and which events a dispatch made due.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ibs import clock

EVENTS = ('log', 'eval', 'checkpoint')


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Periods in examples, one per event name."""

  periods: dict[str, int]

  @classmethod
  def from_config(cls, config: Any, num_train_examples: int) -> Cadence:
    """`config.{log,eval,checkpoint}_every_epochs`, in examples (at least 1)."""
    return cls(
      {
        event: max(
          1, clock.examples_at_epoch(config[f'{event}_every_epochs'], num_train_examples)
        )
        for event in EVENTS
      }
    )

  def with_period(self, event: str, period: int) -> Cadence:
    """This cadence and one more event every `period` examples (e.g. a schedule's
    decision points, ibs/segments.py); a period of 0 adds none."""
    if not period:
      return self
    return Cadence({**self.periods, event: max(1, int(period))})

  def steps_until_next(self, examples: int, batch_size: int) -> int:
    """Steps of `batch_size` from `examples` until the count first passes a multiple of
    some period: the longest dispatch that ends at or before the next event."""
    return min(
      -(-((examples // period + 1) * period - examples) // batch_size)
      for period in self.periods.values()
    )

  def due(self, before: int, after: int) -> set[str]:
    """The events whose period the count crossed going from `before` to `after`."""
    return {
      event
      for event, period in self.periods.items()
      if before // period < after // period
    }
