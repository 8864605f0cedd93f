"""The adaptive schedule: the measured gradient noise scale decides when the batch grows.

`config.schedule.kind = 'adaptive'` keeps the recipe's ladder and lets the run choose
when to climb it (docs/DESIGN.md decision 14):

* **The ladder** is the (B, ε, m) of the recipe's fixed conversion, without its
  milestones: `increasing_batch` (B₀, B₀·f₁, B₀·f₁·f₂, … at constant ε), or `hybrid`
  when `config.schedule.max_batch_size` caps it, whose rungs past B_max divide ε by the
  same factors instead (the paper's hybrid cap rule, docs/PAPER.md "The cap"). Every rung
  is compiled, and its memory read, before the first step.

* **The rule**, applied at decision points every `check_every_epochs` of examples: with
  the noise scale B_simple = tr(Σ)/|G|² from the step's moving averages (ibs/gns.py),
  rung k is *ready* when

      B_simple ≥ threshold · B_eff,k,     B_eff,k = B_k · ε₀ / ε_k,

  B_eff being the batch that gives rung k's noise g ∝ ε/B at the first rung's ε: on batch
  rungs it is B_k, on the cap's ε rungs the batch they stand in for. The run moves up one
  rung when rung k has been ready at every decision point for `window_epochs` of examples
  and has run for `min_epochs`; a point where it is not ready restarts the window. It
  never moves down. McCandlish et al. (2018) give the reason for the default threshold,
  the ladder's factor: the examples needed to reach a loss grow as E_min·(1 + B/B_noise),
  so moving to B_{k+1} = f·B_k while B_simple ≥ f·B_k keeps that overhead under 2×. That
  is a rule for spending examples well, not for a fixed budget of epochs: on the
  MNIST-1D study it saves 2.8× the fixed schedule's updates and loses 0.6 points of
  test accuracy (docs/REPRODUCTION.md, "The adaptive schedule and the critical-batch
  probe").

* **The record**: each switch (the examples seen when the new rung's first step begins,
  and the rung) and the example count since which the current rung has been ready are
  part of the checkpoint's position. A resumed run replays the switches taken and decides
  the rest from the restored noise-scale averages at the same decision points, so it
  ends where an uninterrupted run ends (tests/test_adaptive.py, with kill -9).

The run's phases are the switches so far, the current rung lasting to the end of the
budget (`realized`): an ibs.schedules.Schedule like any other, so the clock, the tables
and the summary treat an adaptive run as the fixed schedule it turned out to be.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ibs import clock, schedules

if TYPE_CHECKING:  # annotations only: ibs.segments drives this schedule, not the reverse
  from ibs.segments import Measured, Segments

NOT_READY = -1  # `Growth.ready_since` when the current rung is not ready


@dataclasses.dataclass(frozen=True)
class Switch:
  """The run moved to `rung` with the step that begins at `examples` examples seen."""

  examples: int
  rung: int


@dataclasses.dataclass(frozen=True)
class Growth:
  """What the run decided so far: the checkpointed part of an adaptive schedule."""

  switches: tuple[Switch, ...] = ()
  ready_since: int = NOT_READY  # examples at the first of the consecutive ready points

  @property
  def rung(self) -> int:
    return self.switches[-1].rung if self.switches else 0

  def to_record(self) -> dict[str, Any]:
    """JSON-friendly fields for the checkpoint's position record."""
    return {
      'switches': [[s.examples, s.rung] for s in self.switches],
      'ready_since': self.ready_since,
    }

  @classmethod
  def from_record(cls, switches: Any, ready_since: int) -> Growth:
    return cls(tuple(Switch(int(e), int(r)) for e, r in switches), int(ready_since))


@dataclasses.dataclass(frozen=True)
class Rules:
  """When to climb, in examples (converted from the config's epochs once)."""

  threshold: float
  window_examples: int
  min_examples: int
  check_every_examples: int


@dataclasses.dataclass(frozen=True)
class Decision:
  """What one decision point saw and chose; the loop logs it (ibs.segments.Decision)."""

  growth: Growth
  b_simple: float
  ready_at: float  # threshold · B_eff of the rung the point stood on
  switched: bool
  phase: schedules.Phase | None = None  # the rung climbed to, at a switch

  @property
  def decisions(self) -> Growth:
    return self.growth

  def scalars(self) -> dict[str, float]:
    scalars = {
      'adaptive/b_simple': self.b_simple,
      'adaptive/ready_at': self.ready_at,
      'adaptive/rung': self.growth.rung,
    }
    if self.switched:
      scalars['adaptive/switch_to_batch'] = self.phase.batch_size
    return scalars

  def describe(self, step: int) -> str:
    return (
      f'Adaptive schedule: B_simple {self.b_simple:.4g} >= {self.ready_at:.4g} held; '
      f'rung {self.growth.rung} from step {step}: batch {self.phase.batch_size}, '
      f'lr {self.phase.learning_rate:g}.'
    )


class AdaptiveSchedule:
  """A ladder of rungs, the rules to climb it, and the budget of the run.

  The loop drives it through ibs.segments.RunSchedule, as it drives a fixed schedule;
  its decisions are a `Growth`.
  """

  host_sets_hyperparams = True  # its step cannot know when it switches
  train_slice_examples = 0  # it decides from the noise scale alone

  def __init__(
    self,
    ladder: tuple[schedules.Phase, ...],
    rules: Rules,
    num_epochs: float,
    num_train_examples: int,
  ):
    self.ladder = tuple(dataclasses.replace(p, start_epoch=0.0) for p in ladder)
    self.rules = rules
    self.num_epochs = num_epochs
    self.n = num_train_examples
    self.num_train_examples = num_train_examples
    self.end_examples = clock.examples_at_epoch(num_epochs, num_train_examples)
    self.budget_examples = self.end_examples
    self.decide_every_examples = rules.check_every_examples

  @classmethod
  def from_config(cls, config: Any, num_train_examples: int) -> AdaptiveSchedule:
    """The ladder and rules of `config.schedule` (validated: see `check_config`)."""
    check_config(config)
    ladder = schedules.from_config(config, num_train_examples).phases
    a = config.schedule.adaptive
    n = num_train_examples
    rules = Rules(
      threshold=float(a.threshold),
      window_examples=clock.examples_at_epoch(a.window_epochs, n),
      min_examples=clock.examples_at_epoch(a.min_epochs, n),
      check_every_examples=max(1, clock.examples_at_epoch(a.check_every_epochs, n)),
    )
    return cls(ladder, rules, float(config.schedule.num_epochs), n)

  def effective_batch(self, rung: int) -> float:
    """B_eff,k = B_k·ε₀/ε_k: the batch at the first rung's ε with rung k's noise."""
    first, phase = self.ladder[0], self.ladder[rung]
    return phase.batch_size * first.learning_rate / phase.learning_rate

  def realized(self, growth: Growth) -> schedules.Schedule:
    """The phases run so far, the current rung lasting to the end of the budget."""
    starts = [(0, 0), *((s.examples, s.rung) for s in growth.switches)]
    phases = tuple(
      dataclasses.replace(self.ladder[rung], start_epoch=examples / self.n)
      for examples, rung in starts
    )
    return schedules.Schedule(phases, self.num_epochs, self.n)

  def decide(self, growth: Growth, examples: int, measured: Measured) -> Decision:
    """The rule of the module docstring at the decision point `examples`.

    It reads the measured B_simple (not the training loss). A NaN B_simple (nothing
    measured yet) is not ready. A switch needs a rung above, and room for at least one
    step of it before the budget ends.
    """
    b_simple = measured.b_simple
    rung = growth.rung
    entered = growth.switches[-1].examples if growth.switches else 0
    ready_at = self.rules.threshold * self.effective_batch(rung)
    ready = not math.isnan(b_simple) and b_simple >= ready_at
    since = (
      NOT_READY
      if not ready
      else (examples if growth.ready_since == NOT_READY else growth.ready_since)
    )
    climb = (
      ready
      and examples - since >= self.rules.window_examples
      and examples - entered >= self.rules.min_examples
      and rung + 1 < len(self.ladder)
      and examples < self.end_examples
    )
    if not climb:
      return Decision(Growth(growth.switches, since), b_simple, ready_at, False)
    growth = Growth((*growth.switches, Switch(examples, rung + 1)), NOT_READY)
    return Decision(growth, b_simple, ready_at, True, self.ladder[rung + 1])

  # ------------------------------------------------- the rest of ibs.segments.RunSchedule

  def initial(self) -> Growth:
    return Growth()

  def from_record(self, record: Any) -> Growth:
    """The decisions a checkpoint's record holds (its `switches` and `ready_since`)."""
    return Growth.from_record(record.switches, record.ready_since)

  def to_record(self, growth: Growth) -> dict[str, Any]:
    return growth.to_record()

  def batch_sizes(self, growth: Growth, step: int) -> list[int]:
    """Every rung from the current one up: its switches cannot wait on a compile."""
    return [p.batch_size for p in self.ladder[growth.rung :]]

  def total_steps(self, growth: Growth) -> int | None:
    return None  # decided as it runs: the budget is in examples

  def describe(self, optimizer: str | None = None) -> str:
    """The opening table: the ladder, the rule, and the budget in examples and epochs."""
    r = self.rules
    lines = [
      'schedule: adaptive, climbing the ladder when the measured B_simple stays at or '
      f'above {r.threshold:g} × B_eff',
      f'{"rung":>5} {"lr":>9} {"momentum":>8} {"batch":>7} {"B_eff":>8} '
      f'{"climbs at B_simple ≥":>21}',
    ]
    lines.append('-' * len(lines[-1]))
    for k, p in enumerate(self.ladder):
      climb = (
        f'{r.threshold * self.effective_batch(k):>21.4g}'
        if k + 1 < len(self.ladder)
        else f'{"(top)":>21}'
      )
      lines.append(
        f'{k:>5} {p.learning_rate:>9.4g} {p.momentum:>8.4g} {p.batch_size:>7d} '
        f'{self.effective_batch(k):>8.4g} {climb}'
      )
    lines.append('-' * len(lines[1]))
    n = self.n
    lines += [
      f'budget: {self.budget_examples:,} examples = {self.num_epochs:g} epochs of '
      f'N={n:,}; the steps follow from when it climbs.',
      f'rule: held for {r.window_examples / n:g} epochs, at least {r.min_examples / n:g} '
      f'epochs on a rung, decided every {r.check_every_examples / n:g} epochs.',
    ]
    return '\n'.join(lines)

  def summary(self, growth: Growth, segments: Segments) -> dict[str, Any]:
    """The switches taken, for the run's summary."""
    schedule = segments.schedule
    return {
      'switches': [
        {
          'examples': s.examples,
          'epoch': s.examples / self.n,
          'step': clock.step_at_examples(schedule, s.examples),
          'batch_size': schedule.phases[i + 1].batch_size,
          'learning_rate': schedule.phases[i + 1].learning_rate,
        }
        for i, s in enumerate(growth.switches)
      ]
    }

  def problems(self, growth: Growth, examples_seen: int) -> list[str]:
    return self.check_growth(growth, examples_seen)

  def check_growth(self, growth: Growth, examples_seen: int) -> list[str]:
    """What is wrong with a restored record (empty when it fits this ladder)."""
    problems = []
    previous_examples, previous_rung = 0, 0
    for s in growth.switches:
      if s.rung != previous_rung + 1 or not previous_examples < s.examples:
        problems.append(f'switch to rung {s.rung} at {s.examples} examples')
      previous_examples, previous_rung = s.examples, s.rung
    if growth.rung >= len(self.ladder):
      problems.append(f'rung {growth.rung} of a {len(self.ladder)}-rung ladder')
    if previous_examples > examples_seen:
      problems.append(f'a switch after the {examples_seen} examples seen')
    return problems


# ------------------------------------------------------------------------ the config

ADAPTIVE_FIELDS = ('threshold', 'window_epochs', 'min_epochs', 'check_every_epochs')


def check_config(config: Any) -> None:
  """Refuses an adaptive config that cannot work; each message names the field."""
  s = config.schedule
  a = s.get('adaptive')
  if a is None:
    raise schedules.ScheduleError(
      "config.schedule.kind='adaptive' needs config.schedule.adaptive with "
      f'{", ".join(ADAPTIVE_FIELDS)} (configs/default.py has an example).'
    )
  for field in ADAPTIVE_FIELDS:
    value = a.get(field)
    if not (isinstance(value, int | float) and not isinstance(value, bool)):
      raise schedules.ScheduleError(
        f'config.schedule.adaptive.{field}={value!r} must be a number.'
      )
  if not (math.isfinite(a.threshold) and a.threshold > 0):
    raise schedules.ScheduleError(
      f'config.schedule.adaptive.threshold={a.threshold!r} must be a positive number '
      '(climb when B_simple >= threshold × B).'
    )
  for field in ('window_epochs', 'min_epochs'):
    if not (math.isfinite(a[field]) and 0 <= a[field] <= s.num_epochs):
      raise schedules.ScheduleError(
        f'config.schedule.adaptive.{field}={a[field]!r} must be between 0 and '
        f'config.schedule.num_epochs={s.num_epochs!r}.'
      )
  if not (
    math.isfinite(a.check_every_epochs) and 0 < a.check_every_epochs <= s.num_epochs
  ):
    raise schedules.ScheduleError(
      f'config.schedule.adaptive.check_every_epochs={a.check_every_epochs!r} must be '
      f'positive and at most config.schedule.num_epochs={s.num_epochs!r}.'
    )
  if s.get('warmup_epochs'):
    raise schedules.ScheduleError(
      "config.schedule.warmup_epochs is not supported with kind='adaptive' (the run "
      'sets ε from the host at its switches); set it to 0.'
    )
  if s.get('scale_weight_decay'):
    raise schedules.ScheduleError(
      "config.schedule.scale_weight_decay is not supported with kind='adaptive'; "
      'remove it.'
    )
  if config.optimizer == 'adam':
    raise schedules.ScheduleError(
      "config.schedule.kind='adaptive' climbs SGD's ladder (B ∝ ε); for Adam use a fixed "
      "kind ('sqrt_scaling' or 'seesaw'), or config.optimizer 'momentum', 'nesterov' or "
      "'sgd'."
    )
  if not config.gns.enabled:
    raise schedules.ScheduleError(
      "config.schedule.kind='adaptive' decides from the measured noise scale; set "
      'config.gns.enabled=True.'
    )
