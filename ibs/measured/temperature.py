"""Kind 'measured_batch': the temperature from the recipe, the batch from the measurement.

The user's step-decay recipe (ε₀, B₀, m, milestones, factors) fixes the paper's noise
temperature over training,

    g(t) = ε_recipe(t) · N / (B₀ (1 − m))                 (the paper's eq. 5, B ≪ N)

and the recipe's milestones stay. What the run chooses is the batch: at every decision
point it takes the largest batch of the ladder B₀, B₀r, B₀r², … (up to the cap) that

    B ≤ B_window / c                 the measured noise scale allows (window.py)
    ε = g(t) · B (1 − m) / N = ε_recipe(t) · B / B₀ ≤ ε_max     the learning-rate cap

and sets ε by the second line, so every update has the recipe's temperature while using
as many examples as the measurement says are still spent efficiently (McCandlish et
al. 2018: below the noise scale a larger batch buys a proportionally larger step).

* c (`divisor`) is how far below B_simple the batch stays. B_simple is an estimate of the
  critical batch from the gradient's own statistics; at B = B_simple a step needs about
  twice the examples of the small-batch limit (their eq. 2.11), so c = 2 keeps the run
  in the regime where B ∝ ε holds.
* ε_max (`max_learning_rate`) is the cap the paper's §5.2 motivates: raising ε and B
  together by 5× (ε 0.1 → 0.5, B 128 → 640) kept the test accuracy (94.5% against
  94.3–94.4%), but the B ∝ ε rule is a small-ε approximation and §5.2's note that the
  gains are "at the cost of a small drop in test accuracy" as ε grows (its increased
  momentum run, 93.3%) is the reason to bound it. The default, 0.5, is §5.2's largest ε
  that kept the accuracy; with a recipe of ε₀ = 0.1 it bounds B at 5·B₀ in the first
  phase, 25·B₀ in the second, and so on as ε_recipe falls.
* The batch never shrinks: a point that allows less keeps the current batch (B_simple
  grows through training, and a smaller batch would only follow the estimate's noise).
* Nothing is decided before the window holds `window_epochs` of training, nor in the
  last step of the budget.

The record (`Decisions`) holds each batch change (examples seen when its first step
begins, B) and the window's points; `realized` merges the changes with the recipe's
milestones into phases.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any

from ibs import clock, schedules
from ibs.measured import base, window

KIND = 'measured_batch'
FIELDS = ('divisor', 'ladder_factor', 'max_learning_rate', 'window_epochs',
          'check_every_epochs')  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Decisions:
  """The checkpointed part of a measured-batch run: its batch changes and its window."""

  changes: tuple[tuple[int, int], ...] = ()  # (examples at the first step, new B)
  window: tuple[window.Point, ...] = ()

  def to_record(self) -> dict[str, Any]:
    """JSON-friendly fields for the checkpoint's record."""
    return {
      'decisions': {
        'kind': KIND,
        'changes': [list(c) for c in self.changes],
        'window': window.to_record(self.window),
      }
    }

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> Decisions:
    return cls(
      tuple((int(e), int(b)) for e, b in record['changes']),
      window.from_record(record['window']),
    )


class MeasuredBatchSchedule:
  """The recipe, the batch ladder, the rule's constants and the run's budget."""

  kind = KIND
  needs_loss = False

  def __init__(
    self,
    recipe: schedules.StepDecay,
    ladder: tuple[int, ...],
    *,
    divisor: float,
    max_learning_rate: float,
    window_examples: int,
    check_every_examples: int,
    num_train_examples: int,
  ):
    self.recipe = recipe
    self.ladder = ladder
    self.divisor = divisor
    self.max_learning_rate = max_learning_rate
    self.window_examples = window_examples
    self.check_every_examples = check_every_examples
    self.n = num_train_examples
    self.end_examples = clock.examples_at_epoch(recipe.num_epochs, self.n)
    phases = schedules.decaying_lr(recipe)
    self.recipe_learning_rates = [p.learning_rate for p in phases]
    self.milestone_examples = [
      clock.examples_at_epoch(e, self.n) for e in recipe.milestones
    ]

  @classmethod
  def from_config(cls, config: Any, num_train_examples: int) -> MeasuredBatchSchedule:
    check_config(config, num_train_examples)
    s, n = config.schedule, num_train_examples
    k = s[KIND]
    recipe = schedules.recipe_from_config(config)
    return cls(
      recipe,
      ladder_of(recipe, float(k.ladder_factor), top_batch(config, recipe, n)),
      divisor=float(k.divisor),
      max_learning_rate=float(k.max_learning_rate),
      window_examples=round(k.window_epochs * n),
      check_every_examples=max(1, round(k.check_every_epochs * n)),
      num_train_examples=n,
    )

  def initial(self) -> Decisions:
    return Decisions()

  def from_record(self, record: dict[str, Any]) -> Decisions:
    return Decisions.from_record(record)

  def batch_size(self, decisions: Decisions) -> int:
    return decisions.changes[-1][1] if decisions.changes else self.recipe.batch_size

  def recipe_learning_rate(self, examples: int) -> float:
    """ε_recipe at `examples`: the decaying-LR recipe's ε of the phase due there."""
    return self.recipe_learning_rates[
      bisect.bisect_right(self.milestone_examples, examples)
    ]

  def learning_rate(self, examples: int, batch_size: int) -> float:
    """ε = ε_recipe · B/B₀: the recipe's g = εN/(B(1 − m)) at batch B."""
    return self.recipe_learning_rate(examples) * batch_size / self.recipe.batch_size

  def batch_sizes(self, decisions: Decisions) -> list[int]:
    """Every batch the run may still take (compiled before the first step)."""
    return [b for b in self.ladder if b >= self.batch_size(decisions)]

  def realized(self, decisions: Decisions) -> schedules.Schedule:
    """The recipe's milestones and the batch changes so far, merged into phases."""
    starts = sorted({0, *self.milestone_examples, *(e for e, _ in decisions.changes)})
    changes = [e for e, _ in decisions.changes]
    rows = []
    for examples in starts:
      i = bisect.bisect_right(changes, examples)
      batch = decisions.changes[i - 1][1] if i else self.recipe.batch_size
      lr = self.learning_rate(examples, batch)
      rows.append((examples, batch, lr, self.recipe.momentum))
    return base.realize(rows, self.recipe.num_epochs, self.n)

  def decide(
    self, decisions: Decisions, examples: int, inputs: base.Inputs
  ) -> base.Decision:
    """The rule of the module docstring at the decision point `examples`."""
    points = window.add(
      decisions.window,
      examples,
      inputs.trace_cov,
      inputs.grad_sq_norm,
      self.window_examples,
    )
    b_window = window.b_simple(points)
    current = self.batch_size(decisions)
    # ε_recipe · B/B₀ ≤ ε_max  ⇔  B ≤ ε_max · B₀ / ε_recipe.
    cap = (
      self.max_learning_rate
      * self.recipe.batch_size
      / self.recipe_learning_rate(examples)
    )
    allowed = min(b_window / self.divisor, cap)
    measured = examples >= self.window_examples and not math.isnan(b_window)
    target = max((b for b in self.ladder if b <= allowed), default=self.ladder[0])
    batch = max(current, target) if measured else current
    changed = batch != current and examples < self.end_examples
    if not changed:
      batch = current
    changes = (*decisions.changes, (examples, batch)) if changed else decisions.changes
    lr = self.learning_rate(examples, batch)
    scalars = {
      'decide/b_simple': b_window,
      'decide/batch_allowed_by_noise': b_window / self.divisor,
      'decide/batch_allowed_by_lr_cap': cap,
      'decide/batch_size': batch,
      'decide/learning_rate': lr,
      'decide/changed': float(changed),
    }
    message = (
      f'measured batch: B_simple {b_window:.4g} over the window allows B <= '
      f'{b_window / self.divisor:.4g}, the ε cap {self.max_learning_rate:g} B <= '
      f'{cap:.4g}: batch {current} -> {batch}, lr {lr:g}'
      if changed
      else ''
    )
    return base.Decision(Decisions(changes, points), changed, scalars, message)

  def check_growth(self, decisions: Decisions, examples_seen: int) -> list[str]:
    """What is wrong with a restored record (empty when this config could write it)."""
    problems, previous_e, previous_b = [], 0, self.recipe.batch_size
    for e, b in decisions.changes:
      if not (previous_e < e <= examples_seen) or b <= previous_b or b not in self.ladder:
        problems.append(f'batch {b} from {e} examples')
      previous_e, previous_b = e, b
    return problems

  def switches(self, decisions: Decisions) -> list[dict[str, Any]]:
    """The batch changes, for the summary: when, the new B and ε, and why."""
    return [
      {
        'examples': e,
        'epoch': e / self.n,
        'batch_size': b,
        'learning_rate': self.learning_rate(e, b),
        'why': 'noise scale',
      }
      for e, b in decisions.changes
    ]


def top_batch(config: Any, recipe: schedules.StepDecay, n: int) -> int:
  """The ladder's top: config.schedule.max_batch_size, or the batch the recipe's
  increasing-batch conversion ends at (B₀·Π factors), and never above N."""
  cap = config.schedule.get('max_batch_size') or 0
  if not cap:
    cap = recipe.batch_size * math.prod(recipe.factors)
  return min(int(cap), n)


def ladder_of(recipe: schedules.StepDecay, factor: float, top: int) -> tuple[int, ...]:
  """B₀, B₀r, B₀r², … up to `top`."""
  ladder, batch = [], float(recipe.batch_size)
  while batch <= top * (1 + 1e-12):
    ladder.append(base.integer_batch(batch, f'config.schedule.{KIND}.ladder_factor'))
    batch *= factor
  return tuple(ladder)


def check_config(config: Any, num_train_examples: int | None = None) -> None:
  """Refuses a measured_batch config that cannot work; each message names the field."""
  base.check_common(config, KIND)
  s = config.schedule
  k = s[KIND]
  values = {f: base.number(k, KIND, f) for f in FIELDS}
  if not values['divisor'] > 0:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.divisor={k.divisor!r} must be positive (the batch stays '
      'at most B_simple / divisor; 2 keeps it where B ∝ ε holds).'
    )
  if not values['ladder_factor'] > 1:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.ladder_factor={k.ladder_factor!r} must be > 1 (the '
      'ratio of one batch of the ladder to the next).'
    )
  if not values['max_learning_rate'] >= s.learning_rate:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.max_learning_rate={k.max_learning_rate!r} must be at '
      f"least the recipe's config.schedule.learning_rate={s.learning_rate!r} (the cap "
      "on ε = ε_recipe · B/B₀; the paper's §5.2 kept its accuracy up to 5× ε₀)."
    )
  base.check_epochs(k, KIND, 'window_epochs', s.num_epochs)
  base.check_epochs(k, KIND, 'check_every_epochs', s.num_epochs, zero=False)
  if num_train_examples is not None:
    recipe = schedules.recipe_from_config(config)
    ladder_of(
      recipe, values['ladder_factor'], top_batch(config, recipe, num_train_examples)
    )
