"""Schedules decided by measurement (docs/REPRODUCTION.md, "Schedules decided by
measurement"): each kind a ladder and a rule over a record of decisions.

  measured_batch  the recipe's temperature g(t), the batch the measured noise scale
                  allows (ibs/measured/temperature.py)
  plateau         no milestones: climb the recipe's ladder when the training loss stops
                  improving, by B or, past B_simple, by ε (ibs/measured/plateau.py)

Their decision input is the window estimate of ibs/measured/window.py. (`adaptive`,
ibs/adaptive.py, is the first such kind.)
"""

from __future__ import annotations

from typing import Any

from ibs.measured import driven, plateau, temperature

KINDS = {
  temperature.KIND: temperature.MeasuredBatchSchedule,
  plateau.KIND: plateau.PlateauSchedule,
}
CHECKS = {temperature.KIND: temperature.check_config, plateau.KIND: plateau.check_config}


def from_config(config: Any, num_train_examples: int):
  """The measured schedule of `config.schedule.kind` (validated)."""
  return KINDS[config.schedule.kind].from_config(config, num_train_examples)


def run_schedule(config: Any, num_train_examples: int) -> driven.MeasuredSchedule:
  """The measured kind of `config` as the schedule the loop drives (ibs/segments.py)."""
  return driven.MeasuredSchedule(from_config(config, num_train_examples))


def check_config(config: Any, num_train_examples: int | None = None) -> None:
  CHECKS[config.schedule.kind](config, num_train_examples)
