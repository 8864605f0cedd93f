"""Kind 'plateau': no milestones; the batch grows when the training loss stops improving.

The batch analogue of reduce-on-plateau. The recipe gives the ladder, its factors
α₁, α₂, … (one rung per milestone of the recipe, whose epochs are not used) and its
starting (ε₀, B₀, m). At decision points every `check_every_epochs` the run evaluates the
training cross-entropy on a fixed slice of `loss_examples` training examples (the same
examples every time, so two points differ by the parameters only), and keeps the values
of its current rung. With W = `window_epochs` the rung has reached a plateau when

    mean L over (t − W, t]  >  (1 − δ) · mean L over (t − 2W, t − W]

i.e. the last W epochs improved the loss by less than a fraction δ over the W before
(which needs 2W epochs on the rung). The run then climbs one rung, lowering g by α:

    B ← α·B           if α·B ≤ B_window / c and α·B ≤ the cap (max_batch_size, N)
    ε ← ε/α, B kept    otherwise,

so it never grows the batch past what the measured noise scale (ibs/measured/window.py)
says is spent efficiently: the hybrid schedule, with its cap set by the measurement
(c = `divisor`, 1 by default: "never above the measured B_simple"). After the last rung
it trains at the lowest temperature to the end of the budget.

The record (`Decisions`) holds each climb (examples seen when the next rung's first step
begins, and whether B or ε moved), the current rung's loss values and the noise window.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

from ibs import clock, schedules
from ibs.measured import base, window

KIND = 'plateau'
FIELDS = ('delta', 'window_epochs', 'check_every_epochs', 'loss_examples', 'divisor',
          'noise_window_epochs')  # fmt: skip
BATCH, LEARNING_RATE = 'batch', 'lr'  # what a climb moved


@dataclasses.dataclass(frozen=True)
class Decisions:
  """The checkpointed part of a plateau run."""

  climbs: tuple[tuple[int, str], ...] = ()  # (examples at the first step, BATCH | LR)
  losses: tuple[tuple[int, float], ...] = ()  # the current rung's (examples, loss)
  window: tuple[window.Point, ...] = ()

  def to_record(self) -> dict[str, Any]:
    return {
      'decisions': {
        'kind': KIND,
        'climbs': [list(c) for c in self.climbs],
        'losses': [list(x) for x in self.losses],
        'window': window.to_record(self.window),
      }
    }

  @classmethod
  def from_record(cls, record: dict[str, Any]) -> Decisions:
    return cls(
      tuple((int(e), str(by)) for e, by in record['climbs']),
      tuple((int(e), float(loss)) for e, loss in record['losses']),
      window.from_record(record['window']),
    )


class PlateauSchedule:
  """The ladder's start and factors, the rule's constants and the run's budget."""

  kind = KIND
  needs_loss = True

  def __init__(
    self,
    recipe: schedules.StepDecay,
    *,
    delta: float,
    window_examples: int,
    check_every_examples: int,
    loss_examples: int,
    divisor: float,
    noise_window_examples: int,
    max_batch_size: int,
    num_train_examples: int,
  ):
    self.recipe = recipe
    self.delta = delta
    self.window_examples = window_examples
    self.check_every_examples = check_every_examples
    self.loss_examples = loss_examples
    self.divisor = divisor
    self.noise_window_examples = noise_window_examples
    self.max_batch_size = max_batch_size
    self.n = num_train_examples
    self.end_examples = clock.examples_at_epoch(recipe.num_epochs, self.n)

  @classmethod
  def from_config(cls, config: Any, num_train_examples: int) -> PlateauSchedule:
    check_config(config, num_train_examples)
    s, n = config.schedule, num_train_examples
    p = s[KIND]
    return cls(
      schedules.recipe_from_config(config),
      delta=float(p.delta),
      window_examples=round(p.window_epochs * n),
      check_every_examples=max(1, round(p.check_every_epochs * n)),
      loss_examples=int(p.loss_examples),
      divisor=float(p.divisor),
      noise_window_examples=round(p.noise_window_epochs * n),
      max_batch_size=min(int(s.get('max_batch_size') or n), n),
      num_train_examples=n,
    )

  def initial(self) -> Decisions:
    return Decisions()

  def from_record(self, record: dict[str, Any]) -> Decisions:
    return Decisions.from_record(record)

  def rungs(self, decisions: Decisions) -> list[tuple[int, int, float]]:
    """(start examples, B, ε) of every rung so far."""
    batch, lr = self.recipe.batch_size, self.recipe.learning_rate
    rungs = [(0, batch, lr)]
    for (examples, by), factor in zip(
      decisions.climbs, self.recipe.factors, strict=False
    ):
      if by == BATCH:
        batch = base.integer_batch(batch * factor, f'Growing the batch ×{factor:g}')
      else:
        lr = lr / factor
      rungs.append((examples, batch, lr))
    return rungs

  def batch_sizes(self, decisions: Decisions) -> list[int]:
    """Every batch the run may still take: the current one grown by any subset of the
    factors still to come, up to the cap (compiled before the first step)."""
    batch = self.rungs(decisions)[-1][1]
    sizes = {batch}
    for factor in self.recipe.factors[len(decisions.climbs) :]:
      sizes |= {b * factor for b in sizes if b * factor <= self.max_batch_size}
    return sorted(base.integer_batch(b, 'A batch of the ladder') for b in sizes)

  def realized(self, decisions: Decisions) -> schedules.Schedule:
    rows = [(e, b, lr, self.recipe.momentum) for e, b, lr in self.rungs(decisions)]
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
      self.noise_window_examples,
    )
    b_window = window.b_simple(points)
    losses = decisions.losses
    if math.isfinite(inputs.train_loss):
      losses = (*losses, (int(examples), float(inputs.train_loss)))
    w = self.window_examples
    recent = [x for e, x in losses if e > examples - w]
    previous = [x for e, x in losses if examples - 2 * w < e <= examples - w]
    entered = decisions.climbs[-1][0] if decisions.climbs else 0
    _, batch, lr = self.rungs(decisions)[-1]
    ready = (
      examples - entered >= 2 * w
      and len(decisions.climbs) < len(self.recipe.factors)
      and examples < self.end_examples
      and bool(recent)
      and bool(previous)
    )
    recent_mean = statistics.fmean(recent) if recent else math.nan
    previous_mean = statistics.fmean(previous) if previous else math.nan
    plateau = ready and recent_mean > (1 - self.delta) * previous_mean
    scalars = {
      'decide/train_loss': inputs.train_loss,
      'decide/loss_recent': recent_mean,
      'decide/loss_previous': previous_mean,
      'decide/plateau': float(plateau),
      'decide/b_simple': b_window,
      'decide/rung': len(decisions.climbs) + plateau,
    }
    if not plateau:
      scalars.update({'decide/batch_size': batch, 'decide/learning_rate': lr})
      return base.Decision(
        Decisions(decisions.climbs, losses, points), False, scalars, ''
      )
    factor = self.recipe.factors[len(decisions.climbs)]
    grown = batch * factor
    by = (
      BATCH
      if grown <= b_window / self.divisor and grown <= self.max_batch_size
      else LEARNING_RATE
    )
    new = Decisions((*decisions.climbs, (int(examples), by)), (), points)
    _, batch, lr = self.rungs(new)[-1]
    scalars.update(
      {
        'decide/batch_size': batch,
        'decide/learning_rate': lr,
        'decide/climb_by_batch': float(by == BATCH),
      }  # fmt: skip
    )
    message = (
      f'plateau: loss {recent_mean:.4g} over the last window against {previous_mean:.4g} '
      f'before (less than {self.delta:g} better); B_simple {b_window:.4g} -> '
      f'{"batch" if by == BATCH else "lr"} climbs: batch {batch}, lr {lr:g}'
    )
    return base.Decision(new, True, scalars, message)

  def check_growth(self, decisions: Decisions, examples_seen: int) -> list[str]:
    problems, previous = [], 0
    if len(decisions.climbs) > len(self.recipe.factors):
      problems.append(
        f'{len(decisions.climbs)} climbs of a {len(self.recipe.factors)}-rung ladder'
      )
    for e, by in decisions.climbs:
      if not previous < e <= examples_seen or by not in (BATCH, LEARNING_RATE):
        problems.append(f'a climb by {by!r} at {e} examples')
      previous = e
    return problems

  def switches(self, decisions: Decisions) -> list[dict[str, Any]]:
    rungs = self.rungs(decisions)[1:]
    return [
      {
        'examples': e,
        'epoch': e / self.n,
        'batch_size': b,
        'learning_rate': lr,
        'why': f'plateau: {by}',
      }
      for (e, b, lr), (_, by) in zip(rungs, decisions.climbs, strict=True)
    ]


def check_config(config: Any, num_train_examples: int | None = None) -> None:
  """Refuses a plateau config that cannot work; each message names the field."""
  base.check_common(config, KIND)
  s = config.schedule
  p = s[KIND]
  values = {f: base.number(p, KIND, f) for f in FIELDS}
  if not 0 <= values['delta'] < 1:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.delta={p.delta!r} must be in [0, 1) (the relative '
      'improvement of the loss over a window below which the rung has reached a plateau).'
    )
  if not values['divisor'] > 0:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.divisor={p.divisor!r} must be positive (the batch grows '
      'only while it stays at most B_simple / divisor).'
    )
  if not (float(p.loss_examples).is_integer() and values['loss_examples'] >= 1):
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.loss_examples={p.loss_examples!r} must be a positive '
      'integer (the training examples the plateau is judged on).'
    )
  if num_train_examples is not None and values['loss_examples'] > num_train_examples:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.loss_examples={p.loss_examples!r} exceeds the '
      f'{num_train_examples} training examples; use at most that many.'
    )
  w = base.check_epochs(p, KIND, 'window_epochs', s.num_epochs, zero=False)
  if 2 * w > s.num_epochs:
    raise schedules.ScheduleError(
      f'config.schedule.{KIND}.window_epochs={p.window_epochs!r}: a plateau needs two '
      f'windows on a rung, more than config.schedule.num_epochs={s.num_epochs!r}.'
    )
  base.check_epochs(p, KIND, 'check_every_epochs', s.num_epochs, zero=False)
  base.check_epochs(p, KIND, 'noise_window_epochs', s.num_epochs)
  if not s.milestones:
    raise schedules.ScheduleError(
      f"config.schedule.kind='{KIND}' climbs one rung per milestone of the recipe; give "
      'config.schedule.milestones (their epochs are not used) and decay_factor.'
    )
