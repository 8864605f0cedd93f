"""Phase schedules keyed to examples seen, the paper's conversion rules, optax schedules.

The clock is *examples seen* (DESIGN.md decision 1). A schedule is a tuple of phases, each
starting at an epoch with its own batch size B, learning rate ε and momentum m. Steps
are derived from examples, never the other way round.

Rounding rule (stated once, used everywhere): phase p begins where the last batch of
phase p − 1 ended and runs ceil((S_{p+1} − start_p) / B_p) steps, where
S_{p+1} = round(start_epoch_{p+1} · N) is the example count at which the next phase is
due (for the last phase, the end of training). Batches run across epoch boundaries and
no example is dropped; a phase may overrun its nominal end by less than one of its
batches, and the next phase starts there. The paper counts *fractional* updates
(examples / B per phase); `nominal_updates` gives those, `num_steps` the integer steps
the trainer actually takes (at most one more per phase).

Conversions (PAPER.md "The idea" and "The cap"): wherever a step-decay schedule divides ε
by α, the increasing-batch schedule multiplies B by α instead; the hybrid does so up to
B_max and then decays ε, so that ε/B — and the noise scale g — falls by exactly α at every
milestone.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ibs import noise_scale as noise_scale_lib

SCHEDULE_KINDS = ('decaying_lr', 'increasing_batch', 'hybrid', 'explicit')


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with fixed batch size, learning rate and momentum."""

  start_epoch: float
  batch_size: int
  learning_rate: float
  momentum: float


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Phases over `num_epochs` epochs of a dataset of `num_train_examples` examples.

  `warmup_epochs` > 0 ramps the learning rate linearly from 0 over that many epochs
  (Goyal et al. 2017), keyed to examples seen like everything else.
  """

  phases: tuple[Phase, ...]
  num_epochs: float
  num_train_examples: int
  warmup_epochs: float = 0.0

  def __post_init__(self):
    validate(self)


@dataclasses.dataclass(frozen=True)
class StepDecay:
  """A conventional step-decay recipe: ε divided by `factors[i]` at `milestones[i]`."""

  learning_rate: float
  batch_size: int
  momentum: float
  milestones: tuple[float, ...]  # epochs
  factors: tuple[float, ...]  # one per milestone, each > 1
  num_epochs: float


@dataclasses.dataclass(frozen=True)
class PhaseSpan:
  """Where a phase really falls under the rounding rule (see the module docstring)."""

  first_step: int
  num_steps: int
  start_examples: int  # examples seen when the phase's first step begins
  end_examples: int  # examples seen when its last step ends


@dataclasses.dataclass(frozen=True)
class Position:
  """Where training stands before `step` (0-based) runs."""

  step: int  # parameter updates done so far
  phase: int
  examples_seen: int
  epoch: float


class ScheduleError(ValueError):
  """A schedule that cannot be trained; the message names the field and the fix."""


# ----------------------------------------------------------------------------- validation


def validate(schedule: Schedule) -> None:
  """Raises ScheduleError naming the offending field and how to fix it."""
  n = schedule.num_train_examples
  if not isinstance(n, int | np.integer) or n <= 0:
    raise ScheduleError(f'num_train_examples={n!r} must be a positive integer.')
  if not schedule.phases:
    raise ScheduleError('The schedule has no phases; give at least one.')
  if not schedule.num_epochs > 0:
    raise ScheduleError(
        f'schedule.num_epochs={schedule.num_epochs!r} must be positive.'
    )
  if schedule.warmup_epochs < 0:
    raise ScheduleError(
        f'schedule.warmup_epochs={schedule.warmup_epochs!r} must be >= 0 (0 disables warm-up).'
    )
  if schedule.phases[0].start_epoch != 0:
    raise ScheduleError(
        f'The first phase starts at epoch {schedule.phases[0].start_epoch}; it must '
        'start at epoch 0.'
    )
  for i, phase in enumerate(schedule.phases):
    where = f'phase {i} (starting at epoch {phase.start_epoch})'
    if i and not phase.start_epoch > schedule.phases[i - 1].start_epoch:
      raise ScheduleError(
          f'Phase starts must strictly increase, but {where} does not start after '
          f'phase {i - 1} (epoch {schedule.phases[i - 1].start_epoch}). Sort the '
          'milestones and remove duplicates.'
      )
    if not phase.start_epoch < schedule.num_epochs:
      raise ScheduleError(
          f'{where} starts at or after the end of training (num_epochs='
          f'{schedule.num_epochs}). Raise num_epochs or drop the milestone.'
      )
    if (
        isinstance(phase.batch_size, bool)
        or not isinstance(phase.batch_size, int | np.integer)
        or phase.batch_size <= 0
    ):
      raise ScheduleError(
          f'{where}: batch_size={phase.batch_size!r} must be a positive integer.'
      )
    if phase.batch_size > n:
      raise ScheduleError(
          f'{where}: batch_size={phase.batch_size} exceeds the {n} training examples; '
          'the paper caps B well below N (B_max ≈ N/10). Lower schedule.max_batch_size '
          'or the decay factors.'
      )
    if not (math.isfinite(phase.learning_rate) and phase.learning_rate > 0):
      raise ScheduleError(
          f'{where}: learning_rate={phase.learning_rate!r} must be a positive number.'
      )
    if not 0 <= phase.momentum < 1:
      raise ScheduleError(
          f'{where}: momentum={phase.momentum!r} must be in [0, 1); use 0 for plain SGD.'
      )


# -------------------------------------------------------------------------- conversions


def decaying_lr(recipe: StepDecay) -> tuple[Phase, ...]:
  """The original schedule: ε ← ε/α at each milestone, B fixed."""
  phases = [Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)]
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    phases.append(Phase(epoch, last.batch_size, last.learning_rate / factor, last.momentum))
  return tuple(phases)


def increasing_batch(recipe: StepDecay) -> tuple[Phase, ...]:
  """The paper's schedule: B ← B·α at each milestone, ε fixed (§2, §5.1)."""
  return hybrid(recipe, max_batch_size=None)


def hybrid(recipe: StepDecay, max_batch_size: int | None) -> tuple[Phase, ...]:
  """Increase B up to `max_batch_size`, then decay ε (PAPER.md, "The cap").

  At a milestone dividing ε by α:
      if B·α ≤ B_max:  B ← B·α                          (ε unchanged)
      else:            r = B_max/B;  B ← B_max;  ε ← ε·r/α
  so ε/B falls by exactly α either way. `max_batch_size=None` never caps.
  """
  phases = [Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)]
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    grown = last.batch_size * factor
    if max_batch_size is None or grown <= max_batch_size:
      batch, lr = _as_batch_size(grown, 'increasing the batch'), last.learning_rate
    else:
      ratio = max_batch_size / last.batch_size
      batch, lr = max_batch_size, last.learning_rate * ratio / factor
    phases.append(Phase(epoch, batch, lr, last.momentum))
  return tuple(phases)


def _as_batch_size(value: float, what: str) -> int:
  rounded = round(value)
  if abs(value - rounded) > 1e-9 * max(1.0, value):
    raise ScheduleError(
        f'{what} gives a batch size of {value}, which is not an integer. Choose a '
        'batch size and factors whose products are integers.'
    )
  return int(rounded)


def scale_batch_with_learning_rate(phases: Sequence[Phase], factor: float) -> tuple[Phase, ...]:
  """B ∝ ε: multiply every phase's ε and B by `factor`, keeping g (§5.2, §4)."""
  return tuple(
      dataclasses.replace(
          p,
          batch_size=_as_batch_size(p.batch_size * factor, 'Scaling B with ε'),
          learning_rate=p.learning_rate * factor,
      )
      for p in phases
  )


def scale_batch_with_momentum(phases: Sequence[Phase], momentum: float) -> tuple[Phase, ...]:
  """B ∝ 1/(1 − m): set momentum to `momentum` and rescale B to keep g (§4, §5.2)."""
  return tuple(
      dataclasses.replace(
          p,
          batch_size=_as_batch_size(
              p.batch_size * (1 - p.momentum) / (1 - momentum), 'Scaling B with momentum'
          ),
          momentum=momentum,
      )
      for p in phases
  )


def step_decay_from_piecewise_constant(
    init_value: float,
    boundaries_and_scales: dict[float, float],
    *,
    batch_size: int,
    momentum: float,
    num_epochs: float,
) -> StepDecay:
  """Reads an optax.piecewise_constant_schedule whose boundaries are in *epochs*.

  `boundaries_and_scales` maps epoch → multiplicative scale (0.2 means ε/5), as optax
  takes it; the scale must shrink ε.
  """
  milestones = tuple(sorted(boundaries_and_scales))
  factors = []
  for epoch in milestones:
    scale = boundaries_and_scales[epoch]
    if not 0 < scale < 1:
      raise ScheduleError(
          f'The scale {scale} at epoch {epoch} does not decay the learning rate; '
          'converting to a batch-size schedule needs scales in (0, 1).'
      )
    factors.append(1.0 / scale)
  return StepDecay(init_value, batch_size, momentum, milestones, tuple(factors), num_epochs)


def from_config(config: Any, num_train_examples: int) -> Schedule:
  """Builds the Schedule that `config.schedule` describes, for N training examples.

  Fields of `config.schedule`:
    kind: 'decaying_lr' | 'increasing_batch' | 'hybrid' | 'explicit'.
    num_epochs, warmup_epochs.
    learning_rate, batch_size, momentum, milestones, decay_factor (a number or one per
      milestone), max_batch_size (hybrid): the step-decay recipe to convert.
    phases: for 'explicit', a sequence of (start_epoch, batch_size, learning_rate,
      momentum).
  """
  s = config.schedule
  kind = s.kind
  if kind not in SCHEDULE_KINDS:
    raise ScheduleError(
        f'Unknown config.schedule.kind={kind!r}. Choose one of {list(SCHEDULE_KINDS)}.'
    )
  if kind == 'explicit':
    phases = tuple(Phase(float(e), int(b), float(lr), float(m)) for e, b, lr, m in s.phases)
  else:
    milestones = tuple(float(e) for e in s.milestones)
    factors = s.decay_factor
    if isinstance(factors, int | float):
      factors = (float(factors),) * len(milestones)
    factors = tuple(float(f) for f in factors)
    if len(factors) != len(milestones):
      raise ScheduleError(
          f'config.schedule.decay_factor has {len(factors)} entries for '
          f'{len(milestones)} milestones; give one number or one per milestone.'
      )
    for f in factors:
      if not f > 1:
        raise ScheduleError(
            f'config.schedule.decay_factor={f} must be > 1 (the factor ε is divided by).'
        )
    recipe = StepDecay(
        float(s.learning_rate), int(s.batch_size), float(s.momentum), milestones,
        factors, float(s.num_epochs),
    )
    if kind == 'decaying_lr':
      phases = decaying_lr(recipe)
    elif kind == 'increasing_batch':
      phases = increasing_batch(recipe)
    else:
      cap = s.get('max_batch_size')
      if not cap or cap < recipe.batch_size:
        raise ScheduleError(
            f'config.schedule.max_batch_size={cap!r}: the hybrid schedule needs a cap '
            f'at least the initial batch size {recipe.batch_size} (the paper uses ≈ N/10).'
        )
      phases = hybrid(recipe, int(cap))
  return Schedule(
      phases=phases,
      num_epochs=float(s.num_epochs),
      num_train_examples=int(num_train_examples),
      warmup_epochs=float(s.get('warmup_epochs', 0.0)),
  )


# ------------------------------------------------------------------- steps and examples


def phase_spans(schedule: Schedule) -> tuple[PhaseSpan, ...]:
  """Integer steps of every phase under the rounding rule of the module docstring."""
  n = schedule.num_train_examples
  due = [round(p.start_epoch * n) for p in schedule.phases[1:]]
  due.append(round(schedule.num_epochs * n))
  spans, examples, step = [], 0, 0
  for phase, end in zip(schedule.phases, due, strict=True):
    steps = max(0, -(-(end - examples) // phase.batch_size))
    spans.append(PhaseSpan(step, steps, examples, examples + steps * phase.batch_size))
    examples += steps * phase.batch_size
    step += steps
  return tuple(spans)


def num_steps(schedule: Schedule) -> int:
  """Total parameter updates the trainer takes."""
  last = phase_spans(schedule)[-1]
  return last.first_step + last.num_steps


def nominal_updates(schedule: Schedule) -> list[float]:
  """Fractional updates per phase, (epochs in phase)·N/B: how the paper counts them."""
  n = schedule.num_train_examples
  ends = [p.start_epoch for p in schedule.phases[1:]] + [schedule.num_epochs]
  return [(end - p.start_epoch) * n / p.batch_size for p, end in zip(schedule.phases, ends)]


def phase_index(schedule: Schedule, step: int) -> int:
  """The phase that step `step` (0-based) belongs to."""
  spans = phase_spans(schedule)
  starts = [s.first_step for s in spans if s.num_steps]
  indices = [i for i, s in enumerate(spans) if s.num_steps]
  return indices[max(0, bisect.bisect_right(starts, step) - 1)]


def position(schedule: Schedule, step: int) -> Position:
  """(phase, examples seen, fractional epoch) before step `step` runs."""
  if step < 0:
    raise ValueError(f'step={step} must be >= 0.')
  spans = phase_spans(schedule)
  p = phase_index(schedule, step)
  examples = spans[p].start_examples + (step - spans[p].first_step) * schedule.phases[
      p
  ].batch_size
  return Position(step, p, examples, examples / schedule.num_train_examples)


def step_at_examples(schedule: Schedule, examples_seen: int) -> int:
  """The first step that begins at or after `examples_seen` examples (inverse of position)."""
  for span, phase in zip(phase_spans(schedule), schedule.phases):
    if span.num_steps and examples_seen <= span.end_examples:
      offset = max(0, examples_seen - span.start_examples)
      return span.first_step + -(-offset // phase.batch_size)
  return num_steps(schedule)


# --------------------------------------------------------------- optax-ready schedules


def _step_tables(schedule: Schedule):
  spans = [s for s in phase_spans(schedule) if s.num_steps]
  kept = [p for p, s in zip(schedule.phases, phase_spans(schedule)) if s.num_steps]
  return (
      np.array([s.first_step for s in spans], np.int32),
      np.array([s.start_examples for s in spans], np.float32),
      kept,
  )


def _traced_phase(first_steps: np.ndarray, step) -> Any:
  step = jnp.asarray(step)
  return jnp.clip(jnp.searchsorted(first_steps, step, side='right') - 1, 0, None)


def learning_rate_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → ε, traceable under jit; use with `optax.inject_hyperparams`.

  Correct while B changes: the step is mapped to examples seen through the phase table,
  and linear warm-up (if any) is ε·min(1, (examples seen + B)/warm-up examples).
  """
  first_steps, start_examples, phases = _step_tables(schedule)
  lrs = np.array([p.learning_rate for p in phases], np.float32)
  batches = np.array([p.batch_size for p in phases], np.float32)
  warmup = schedule.warmup_epochs * schedule.num_train_examples

  def schedule_fn(step):
    i = _traced_phase(first_steps, step)
    lr = jnp.asarray(lrs)[i]
    if warmup > 0:
      examples = jnp.asarray(start_examples)[i] + (
          jnp.asarray(step, jnp.float32) - jnp.asarray(first_steps, jnp.float32)[i]
      ) * jnp.asarray(batches)[i]
      lr = lr * jnp.minimum(1.0, (examples + jnp.asarray(batches)[i]) / warmup)
    return lr

  return schedule_fn


def momentum_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → m, traceable under jit; use with `optax.inject_hyperparams`."""
  first_steps, _, phases = _step_tables(schedule)
  values = np.array([p.momentum for p in phases], np.float32)
  return lambda step: jnp.asarray(values)[_traced_phase(first_steps, step)]


def batch_size_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → B (int32), traceable; a user's loop reads its next batch size from it."""
  first_steps, _, phases = _step_tables(schedule)
  values = np.array([p.batch_size for p in phases], np.int32)
  return lambda step: jnp.asarray(values)[_traced_phase(first_steps, step)]


def noise_scale_schedule(schedule: Schedule, exact: bool = True) -> Callable[[Any], Any]:
  """step → g, the SGD noise scale at that step (warm-up included)."""
  lr_fn, m_fn, b_fn = (
      learning_rate_schedule(schedule),
      momentum_schedule(schedule),
      batch_size_schedule(schedule),
  )
  formula = noise_scale_lib.noise_scale if exact else noise_scale_lib.approximate_noise_scale

  def schedule_fn(step):
    return formula(lr_fn(step), schedule.num_train_examples, b_fn(step), m_fn(step))

  return schedule_fn
