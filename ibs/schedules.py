"""Phase schedules, the paper's conversion and scaling rules, and optax schedules.

A schedule is a tuple of phases, each starting at an epoch with its own batch size B,
learning rate ε and momentum m, over a dataset of N training examples. The clock is
examples seen (docs/DESIGN.md decision 1): steps are derived by ibs.clock, whose
docstring states the rounding rule.

Conversions (docs/PAPER.md, "The idea", "The cap"): where a step-decay recipe divides ε by
α, the increasing-batch schedule multiplies B by α instead; the hybrid does so up to B_max
and then decays ε, so that ε/B, and with it the noise scale g ≈ εN/(B(1 − m)), falls by
exactly α at every milestone. Scaling rules (§4, §5.2) change the initial ε or m and scale
B with them so that g stays the same: B ∝ ε and B ∝ 1/(1 − m).

Optimizer-aware rules beside the paper's (each function's docstring holds its equation):
`sqrt_scaling` and `seesaw` convert a recipe for Adam, whose normalised update makes
ε/√B, not ε/B, the quantity a decay lowers (Malladi et al. 2022; Meterez et al. 2025);
`scale_weight_decay` makes the decoupled weight decay λ a per-phase value that keeps
AdamW's timescale τ = B/(ε·λ·N) constant (Wang & Aitchison 2024; Bergsma et al. 2025).

In a user's own optax loop:

    tx = optax.inject_hyperparams(optax.sgd)(
        learning_rate=schedules.learning_rate_schedule(schedule),
        momentum=schedules.momentum_schedule(schedule))
    batch_size = schedules.batch_size_schedule(schedule)  # step → B for the data loader

and, where the phases carry λ (`scale_weight_decay`), `weight_decay_schedule(schedule)`
goes to `optax.inject_hyperparams(optax.adamw)(..., weight_decay=...)` the same way.

JAX is imported only when one of these step → value functions is built, so the
schedule arithmetic (and the `python -m ibs.calculator` calculator) starts in a fraction
of a second.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ibs import clock

SCHEDULE_KINDS = (
  'decaying_lr',
  'increasing_batch',
  'hybrid',
  'sqrt_scaling',
  'seesaw',
  'explicit',
  'adaptive',
  'measured_batch',
  'plateau',
)
# Kinds whose conversion follows Adam's ε/√B rather than SGD's ε/B (ibs.config_checks
# refuses them with other optimizers).
ADAM_KINDS = ('sqrt_scaling', 'seesaw')


class ScheduleError(ValueError):
  """A schedule that cannot be trained; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with fixed batch size, learning rate and momentum.

  The optional fields are per-phase values of hyperparameters that are otherwise constant
  (None: the optimizer's own value applies): the decoupled weight decay λ
  (`scale_weight_decay`), and Adam's β2 and its epsilon term ε̂ (`sqrt_scaling`). For Adam
  the momentum m is β1.
  """

  start_epoch: float
  batch_size: int
  learning_rate: float
  momentum: float
  weight_decay: float | None = None
  adam_b2: float | None = None
  adam_eps: float | None = None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Phases over `num_epochs` epochs of a dataset of `num_train_examples` examples.

  `warmup_epochs` > 0 ramps the learning rate linearly from 0 over that many epochs
  (Goyal et al. 2017), keyed to examples seen like everything else. Construction
  validates (see `validate`).
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


def _is_positive_integer(value: Any) -> bool:
  return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def validate(schedule: Schedule) -> None:
  """Raises ScheduleError naming the offending field and how to fix it.

  Phase starts strictly increase from 0 and lie before the end of training; batch sizes
  are positive integers no larger than N; 0 < ε; 0 ≤ m < 1; every phase gets at least
  one step under the rounding rule of ibs.clock.
  """
  n = schedule.num_train_examples
  if not _is_positive_integer(n):
    raise ScheduleError(f'num_train_examples={n!r} must be a positive integer.')
  if not schedule.phases:
    raise ScheduleError('The schedule has no phases; give at least one.')
  if not (math.isfinite(schedule.num_epochs) and schedule.num_epochs > 0):
    raise ScheduleError(
      f'schedule.num_epochs={schedule.num_epochs!r} must be a positive number.'
    )
  if not 0 <= schedule.warmup_epochs <= schedule.num_epochs:
    raise ScheduleError(
      f'schedule.warmup_epochs={schedule.warmup_epochs!r} must be between 0 (no '
      f'warm-up) and num_epochs={schedule.num_epochs!r}.'
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
    if not _is_positive_integer(phase.batch_size):
      raise ScheduleError(
        f'{where}: batch_size={phase.batch_size!r} must be a positive integer.'
      )
    if phase.batch_size > n:
      raise ScheduleError(
        f'{where}: batch_size={phase.batch_size} exceeds the {n} training examples; '
        'the paper caps B well below N (B_max ≈ N/10). Lower config.schedule.batch_size '
        "or decay_factor, or cap B with kind='hybrid' and a max_batch_size below N."
      )
    if not (math.isfinite(phase.learning_rate) and phase.learning_rate > 0):
      raise ScheduleError(
        f'{where}: learning_rate={phase.learning_rate!r} must be a positive number.'
      )
    if not 0 <= phase.momentum < 1:
      raise ScheduleError(
        f'{where}: momentum={phase.momentum!r} must be in [0, 1); use 0 for plain SGD.'
      )
    for field, (low, high) in _OPTIONAL_RANGES.items():
      value = getattr(phase, field)
      if (value is None) != (getattr(schedule.phases[0], field) is None):
        raise ScheduleError(
          f'{where}: {field}={value!r}, but phase 0 has {field}='
          f'{getattr(schedule.phases[0], field)!r}; set it in every phase or in none.'
        )
      if value is not None and not (math.isfinite(value) and low <= value < high):
        raise ScheduleError(f'{where}: {field}={value!r} must be in [{low}, {high}).')
  for i, span in enumerate(clock.phase_spans(schedule)):
    if span.num_steps:
      continue
    where = f'Phase {i} (starting at epoch {schedule.phases[i].start_epoch})'
    if i == 0:
      raise ScheduleError(
        f'{where} is due to end at round(epoch · N) = 0 examples (N={n}), so it would '
        'get no steps. Move the first milestone later.'
      )
    raise ScheduleError(
      f'{where} is shorter than the overrun of phase {i - 1}, whose last batch of '
      f'{schedule.phases[i - 1].batch_size} examples already reaches past it, so it '
      'would get no steps. Move its milestones apart or lower the batch size.'
    )


_OPTIONAL_RANGES = {
  'weight_decay': (0.0, math.inf),
  'adam_b2': (0.0, 1.0),
  'adam_eps': (0.0, math.inf),
}


def decaying_lr(recipe: StepDecay) -> tuple[Phase, ...]:
  """The original schedule: ε ← ε/α at each milestone, B fixed."""
  phases = [Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)]
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    phases.append(
      Phase(float(epoch), last.batch_size, last.learning_rate / factor, last.momentum)
    )
  return tuple(phases)


def increasing_batch(recipe: StepDecay) -> tuple[Phase, ...]:
  """The paper's schedule: B ← B·α at each milestone, ε fixed (§2, §5.1)."""
  return hybrid(recipe, max_batch_size=None)


def hybrid(recipe: StepDecay, max_batch_size: int | None) -> tuple[Phase, ...]:
  """Increase B up to `max_batch_size`, then decay ε (docs/PAPER.md, "The cap").

  At a milestone dividing ε by α:
      if B·α ≤ B_max:  B ← B·α                          (ε unchanged)
      else:            r = B_max/B;  B ← B_max;  ε ← ε·r/α
  so ε/B falls by exactly α either way. `max_batch_size=None` never caps.
  """
  if max_batch_size is not None and not (
    _is_positive_integer(max_batch_size) and max_batch_size >= recipe.batch_size
  ):
    raise _cap_error(max_batch_size, recipe.batch_size)
  phases = [Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)]
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    grown = last.batch_size * factor
    if max_batch_size is None or grown <= max_batch_size:
      batch = _integer_batch_size(
        grown, f'Increasing the batch ×{factor:g} at epoch {epoch:g}'
      )
      lr = last.learning_rate
    else:
      ratio = max_batch_size / last.batch_size
      batch, lr = max_batch_size, last.learning_rate * ratio / factor
    phases.append(Phase(float(epoch), batch, lr, last.momentum))
  return tuple(phases)


def _cap_error(max_batch_size: Any, batch_size: int) -> ScheduleError:
  return ScheduleError(
    f'max_batch_size={max_batch_size!r}: the hybrid schedule needs an integer cap B_max '
    f'of at least the initial batch size {batch_size} (the paper uses B_max ≈ N/10). '
    'Set config.schedule.max_batch_size.'
  )


def _integer_batch_size(value: float, what: str) -> int:
  rounded = round(value)
  if abs(value - rounded) > 1e-9 * max(1.0, value):
    raise ScheduleError(
      f'{what} gives a batch size of {value:g}, which is not an integer. Choose a '
      'batch size and factors whose products are integers.'
    )
  return int(rounded)


def seesaw(recipe: StepDecay) -> tuple[Phase, ...]:
  """Seesaw (Meterez et al. 2025): B ← B·α and ε ← ε/√α where the recipe divides ε by α.

  For Adam. Its update is normalised, so in the variance-dominated regime a step's noise
  scales as ε/√B rather than SGD's ε/B; Seesaw lowers ε/√B by exactly α at each milestone,
  as the decay does:
      ε_{k+1}/√B_{k+1} = (ε_k/√α)/√(α·B_k) = (ε_k/√B_k)/α.
  Meterez et al. prove the equivalence for normalised SGD (their proxy for Adam). For
  plain SGD the equivalence they prove needs ε/B to fall by α, which the paper's
  conversion does and Seesaw does not (ε/B falls by α^1.5), so ibs.config_checks refuses
  Seesaw with optimizers other than Adam. Same batch sizes, hence updates, as
  `increasing_batch`.
  """
  phases = [Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)]
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    batch = _integer_batch_size(
      last.batch_size * factor,
      f'Seesaw: increasing the batch ×{factor:g} at epoch {epoch:g}',
    )
    lr = last.learning_rate / math.sqrt(factor)
    phases.append(Phase(float(epoch), batch, lr, last.momentum))
  return tuple(phases)


def sqrt_scaling(
  recipe: StepDecay,
  adam_b2: float = 0.999,
  adam_eps: float = 1e-8,
  scale_b1: bool = True,
) -> tuple[Phase, ...]:
  """Increasing batch under Adam's square-root scaling rule (Malladi et al. 2022).

  The rule (their square-root scaling rule for Adam and RMSprop, from the SDE of Adam):
  a run with batch κ·B follows the same SDE as one with batch B when
      ε ← √κ·ε,   1 − β1 ← κ(1 − β1),   1 − β2 ← κ(1 − β2),   ε̂ ← ε̂/√κ
  (ε̂ Adam's epsilon term, β1 the schedule's momentum m). Where the recipe divides ε by α,
  this conversion takes the decayed phase (ε/α, B) and maps it by the rule with κ = α:
      B ← α·B,   ε ← ε·√α/α = ε/√α,   1 − β1 ← α(1 − β1),   1 − β2 ← α(1 − β2),
      ε̂ ← ε̂/√α.
  B and ε are Seesaw's (same batch sizes and updates as `increasing_batch`); the β1, β2
  and ε̂ adjustments are the rule's. The rule needs κ(1 − β) < 1: over milestones the
  factors multiply, so β1 = 0.9 (1 − β1 = 0.1) takes at most a total κ < 10. With
  `scale_b1=False` β1 stays the recipe's momentum and only β2 and ε̂ follow the rule.
  `adam_b2` and `adam_eps` are the recipe's β2 and ε̂ (optax's defaults).
  """
  phases = [
    Phase(
      0.0,
      recipe.batch_size,
      recipe.learning_rate,
      recipe.momentum,
      adam_b2=adam_b2,
      adam_eps=adam_eps,
    )
  ]
  kappa = 1.0
  for epoch, factor in zip(recipe.milestones, recipe.factors, strict=True):
    last = phases[-1]
    kappa *= factor
    batch = _integer_batch_size(
      last.batch_size * factor,
      f'sqrt_scaling: increasing the batch ×{factor:g} at epoch {epoch:g}',
    )
    momentum = last.momentum
    if scale_b1:
      momentum = 1 - factor * (1 - last.momentum)
      if not momentum > 0:
        raise ScheduleError(
          f'sqrt_scaling at epoch {epoch:g}: the square-root rule sets 1 − β1 ← '
          f'κ(1 − β1) = {kappa:g} × {1 - recipe.momentum:g} = '
          f'{kappa * (1 - recipe.momentum):g}, so β1 = {momentum:g} is not in (0, 1); '
          'the rule holds only while κ(1 − β1) < 1. Use fewer or smaller decay factors, '
          'or keep β1 with config.schedule.sqrt_scaling_b1=False.'
        )
    b2 = 1 - factor * (1 - last.adam_b2)
    if not b2 > 0:
      raise ScheduleError(
        f'sqrt_scaling at epoch {epoch:g}: the square-root rule sets 1 − β2 ← κ(1 − β2) '
        f'= {kappa * (1 - adam_b2):g}, so β2 = {b2:g} is not in (0, 1). Use a β2 closer '
        'to 1 (config.schedule.adam_b2) or fewer or smaller decay factors.'
      )
    phases.append(
      Phase(
        float(epoch),
        batch,
        last.learning_rate / math.sqrt(factor),
        momentum,
        adam_b2=b2,
        adam_eps=last.adam_eps / math.sqrt(factor),
      )
    )
  return tuple(phases)


def scale_weight_decay(phases: Sequence[Phase], weight_decay: float) -> tuple[Phase, ...]:
  """λ per phase keeping AdamW's timescale τ = B/(ε·λ·N) constant (in epochs).

  Decoupled weight decay shrinks ω by ε·λ per step and there are N/B steps per epoch, so
  the weights forget their past over τ = B/(ε·λ·N) epochs (Wang & Aitchison 2024; Bergsma
  et al. 2025, "Power Lines"). Phase 0 takes `weight_decay` = λ0; phase i takes
      λ_i = λ0 · (B_i/B_0) · (ε_0/ε_i)
  so that τ_i = τ_0. Under `increasing_batch` λ grows by α at each milestone; under
  `decaying_lr` too (ε/α), whereas a constant λ there lets τ grow by α per milestone.
  """
  if not (math.isfinite(weight_decay) and weight_decay > 0):
    raise ScheduleError(
      f'scale_weight_decay needs a decoupled weight decay λ0 > 0 to scale, but '
      f'config.weight_decay={weight_decay!r}.'
    )
  first = phases[0]
  return tuple(
    dataclasses.replace(
      p,
      weight_decay=weight_decay
      * (p.batch_size / first.batch_size)
      * (first.learning_rate / p.learning_rate),
    )
    for p in phases
  )


def convert(
  recipe: StepDecay,
  kind: str,
  max_batch_size: int | None = None,
  *,
  adam_b2: float = 0.999,
  adam_eps: float = 1e-8,
  sqrt_scaling_b1: bool = True,
) -> tuple[Phase, ...]:
  """The phases of `recipe` as `kind`: decaying_lr, increasing_batch, hybrid,
  sqrt_scaling (with Adam's β2 `adam_b2`, ε̂ `adam_eps`) or seesaw."""
  if kind == 'decaying_lr':
    return decaying_lr(recipe)
  if kind == 'increasing_batch':
    return increasing_batch(recipe)
  if kind == 'hybrid':
    if max_batch_size is None:
      raise _cap_error(max_batch_size, recipe.batch_size)
    return hybrid(recipe, max_batch_size)
  if kind == 'sqrt_scaling':
    return sqrt_scaling(recipe, adam_b2, adam_eps, scale_b1=sqrt_scaling_b1)
  if kind == 'seesaw':
    return seesaw(recipe)
  raise ScheduleError(
    f'Unknown schedule kind {kind!r}; choose decaying_lr, increasing_batch, hybrid, '
    'sqrt_scaling or seesaw.'
  )


def from_step_decay(
  recipe: StepDecay,
  kind: str,
  num_train_examples: int,
  *,
  max_batch_size: int | None = None,
  warmup_epochs: float = 0.0,
) -> Schedule:
  """The validated Schedule of `recipe` converted to `kind` (see `convert`)."""
  return Schedule(
    phases=convert(recipe, kind, max_batch_size),
    num_epochs=float(recipe.num_epochs),
    num_train_examples=num_train_examples,
    warmup_epochs=float(warmup_epochs),
  )


def scale_batch_with_learning_rate(recipe: StepDecay, factor: float) -> StepDecay:
  """B ∝ ε: multiply the initial ε and B by `factor`, keeping g (§4, §5.2).

  §5.2's "increased initial LR": ε 0.1 → 0.5 and B 128 → 640 (factor 5).
  """
  if not (math.isfinite(factor) and factor > 0):
    raise ScheduleError(
      f'The B ∝ ε scaling factor {factor!r} must be a positive number '
      '(config.schedule.scale_batch_with_learning_rate; 1 leaves the recipe as it is).'
    )
  return dataclasses.replace(
    recipe,
    batch_size=_integer_batch_size(
      recipe.batch_size * factor, f'Scaling B with ε by {factor:g}'
    ),
    learning_rate=recipe.learning_rate * factor,
  )


def scale_batch_with_momentum(recipe: StepDecay, momentum: float) -> StepDecay:
  """B ∝ 1/(1 − m): set the momentum to `momentum` and rescale B to keep g (§4, §5.2).

  §5.2's "increased momentum": m 0.9 → 0.98 and B 640 → 3200.
  """
  if not 0 <= momentum < 1:
    raise ScheduleError(
      f'The momentum to scale B with, {momentum!r}, must be in [0, 1) '
      '(config.schedule.scale_batch_with_momentum; None leaves the recipe as it is).'
    )
  if not 0 <= recipe.momentum < 1:
    raise ScheduleError(f'momentum={recipe.momentum!r} must be in [0, 1).')
  batch = recipe.batch_size * (1 - recipe.momentum) / (1 - momentum)
  return dataclasses.replace(
    recipe,
    batch_size=_integer_batch_size(batch, f'Scaling B for momentum {momentum:g}'),
    momentum=momentum,
  )


def step_decay_from_piecewise_constant(
  init_value: float,
  boundaries_and_scales: dict[float, float],
  *,
  batch_size: int,
  momentum: float,
  num_epochs: float,
) -> StepDecay:
  """Reads the arguments of an optax.piecewise_constant_schedule in *epochs*.

  `boundaries_and_scales` maps epoch → multiplicative scale (0.2 means ε/5), as optax
  takes it (with steps there); every scale must shrink ε.
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
  return StepDecay(
    init_value,
    batch_size,
    momentum,
    tuple(float(e) for e in milestones),
    tuple(factors),
    num_epochs,
  )


def _config_integer(value: Any, field: str) -> int:
  if isinstance(value, float) and value.is_integer():
    value = int(value)  # 128.0 from a command-line override is fine; 128.5 is not.
  if not _is_positive_integer(value):
    raise ScheduleError(f'config.schedule.{field}={value!r} must be a positive integer.')
  return int(value)


def recipe_from_config(config: Any) -> StepDecay:
  """The step-decay recipe of `config.schedule`, before any scaling rule."""
  s = config.schedule
  milestones = tuple(float(e) for e in s.milestones)
  factors = s.decay_factor
  if isinstance(factors, int | float):
    factors = (factors,) * len(milestones)
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
  return StepDecay(
    learning_rate=float(s.learning_rate),
    batch_size=_config_integer(s.batch_size, 'batch_size'),
    momentum=float(s.momentum),
    milestones=milestones,
    factors=factors,
    num_epochs=float(s.num_epochs),
  )


def from_config(config: Any, num_train_examples: int) -> Schedule:
  """Builds the Schedule that `config.schedule` describes, for N training examples.

  Fields of `config.schedule`:
    kind: 'decaying_lr' | 'increasing_batch' | 'hybrid' | 'sqrt_scaling' | 'seesaw' |
      'explicit' | 'adaptive' | 'measured_batch' | 'plateau'. For 'adaptive' the result
      is its ladder at the recipe's milestones: the increasing-batch conversion, or the
      hybrid one when max_batch_size caps it; the run decides when to climb
      (ibs/adaptive.py). For 'measured_batch' and 'plateau' it is the schedule before
      any decision (ibs/measured/): the recipe at B₀, and one phase at (ε₀, B₀).
    num_epochs, warmup_epochs (optional, default 0).
    learning_rate, batch_size, momentum, milestones, decay_factor (a number or one per
      milestone), max_batch_size (hybrid): the step-decay recipe to convert.
    scale_batch_with_learning_rate (optional, default 1): B ∝ ε, multiply the recipe's
      initial ε and B by this before converting.
    scale_batch_with_momentum (optional, default None): B ∝ 1/(1 − m), set the recipe's
      momentum to this and rescale its B before converting.
    phases: for 'explicit', a sequence of (start_epoch, batch_size, learning_rate,
      momentum).
    adam_b2, adam_eps, sqrt_scaling_b1 (optional, defaults 0.999, 1e-8, True): Adam's β2
      and epsilon term that 'sqrt_scaling' scales, and whether it scales β1 (= momentum).
    scale_weight_decay (optional, default False): λ per phase from config.weight_decay,
      keeping τ = B/(ε·λ·N) constant (`scale_weight_decay`).
  """
  s = config.schedule
  kind = s.kind
  if kind not in SCHEDULE_KINDS:
    raise ScheduleError(
      f'Unknown config.schedule.kind={kind!r}. Choose one of {list(SCHEDULE_KINDS)}.'
    )
  lr_factor = s.get('scale_batch_with_learning_rate')
  lr_factor = 1.0 if lr_factor is None else float(lr_factor)
  target_momentum = s.get('scale_batch_with_momentum')
  warmup_epochs = float(s.get('warmup_epochs') or 0.0)
  if kind == 'explicit':
    if lr_factor != 1 or target_momentum is not None:
      raise ScheduleError(
        'config.schedule.scale_batch_with_learning_rate / scale_batch_with_momentum '
        "scale a step-decay recipe; with kind='explicit' write the scaled phases."
      )
    for i, row in enumerate(s.phases):
      if len(row) != 4:
        raise ScheduleError(
          f'config.schedule.phases[{i}]={tuple(row)!r} must be (start_epoch, '
          'batch_size, learning_rate, momentum).'
        )
    phases = tuple(
      Phase(float(e), _config_integer(b, f'phases[{i}] batch size'), float(lr), float(m))
      for i, (e, b, lr, m) in enumerate(s.phases)
    )
    phases = _weight_decay_rule(config, phases)
    return Schedule(phases, float(s.num_epochs), num_train_examples, warmup_epochs)
  recipe = recipe_from_config(config)
  if lr_factor != 1:
    recipe = scale_batch_with_learning_rate(recipe, lr_factor)
  if target_momentum is not None:
    recipe = scale_batch_with_momentum(recipe, float(target_momentum))
  if kind == 'adaptive':  # The ladder it climbs, at the recipe's milestones.
    kind = 'hybrid' if s.get('max_batch_size') else 'increasing_batch'
  if kind == 'plateau':  # Before its first climb: ε₀ and B₀ to the end.
    recipe = dataclasses.replace(recipe, milestones=(), factors=())
  if kind in ('measured_batch', 'plateau'):  # Before any decision: the recipe at B₀.
    kind = 'decaying_lr'
  cap = s.get('max_batch_size') if kind == 'hybrid' else None
  if isinstance(cap, float) and cap.is_integer():
    cap = int(cap)
  phases = convert(
    recipe,
    kind,
    cap,
    adam_b2=float(s.get('adam_b2', 0.999)),
    adam_eps=float(s.get('adam_eps', 1e-8)),
    sqrt_scaling_b1=bool(s.get('sqrt_scaling_b1', True)),
  )
  return Schedule(
    _weight_decay_rule(config, phases),
    float(recipe.num_epochs),
    num_train_examples,
    warmup_epochs,
  )


def _weight_decay_rule(config: Any, phases: tuple[Phase, ...]) -> tuple[Phase, ...]:
  """`phases` with λ per phase if config.schedule.scale_weight_decay, else unchanged."""
  if not config.schedule.get('scale_weight_decay'):
    return phases
  return scale_weight_decay(phases, float(config.get('weight_decay', 0.0)))


def _phase_of_step(first_steps: np.ndarray, step: Any) -> Any:
  """Index of the phase `step` belongs to, traceable; steps past the end stay in the
  last."""
  import jax.numpy as jnp

  index = jnp.searchsorted(first_steps, jnp.asarray(step), side='right') - 1
  return jnp.clip(index, 0, len(first_steps) - 1)


def _first_steps(schedule: Schedule) -> np.ndarray:
  return np.array([s.first_step for s in clock.phase_spans(schedule)], np.int32)


def learning_rate_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → ε, traceable under jit; use with `optax.inject_hyperparams`.

  The step is mapped to examples seen through the phase table, so warm-up stays keyed to
  examples while B changes: step k, which ends at E examples, uses ε·min(1, E / W) for a
  warm-up of W examples (the first step already moves the weights, and ε is reached by
  the step that completes the warm-up).
  """
  import jax.numpy as jnp

  first_steps = _first_steps(schedule)
  lrs = np.array([p.learning_rate for p in schedule.phases], np.float32)
  batches = np.array([p.batch_size for p in schedule.phases], np.float32)
  # Examples seen before step k of phase i are offsets[i] + k·B_i.
  offsets = np.array(
    [
      s.start_examples - s.first_step * p.batch_size
      for s, p in zip(clock.phase_spans(schedule), schedule.phases, strict=True)
    ],
    np.float32,
  )
  warmup = schedule.warmup_epochs * schedule.num_train_examples

  def schedule_fn(step):
    i = _phase_of_step(first_steps, step)
    lr = jnp.asarray(lrs)[i]
    if warmup > 0:
      batch = jnp.asarray(batches)[i]
      examples_after = (
        jnp.asarray(offsets)[i] + (jnp.asarray(step, jnp.float32) + 1) * batch
      )
      lr = lr * jnp.clip(examples_after / warmup, 0.0, 1.0)
    return lr

  return schedule_fn


def momentum_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → m, traceable under jit; use with `optax.inject_hyperparams`."""
  return _per_phase(schedule, [p.momentum for p in schedule.phases], np.float32)


def weight_decay_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → λ, traceable; for phases that carry λ (`scale_weight_decay`).

  Use with `optax.inject_hyperparams(optax.adamw)(..., weight_decay=...)`, as ε and m.
  """
  return _per_phase(schedule, _optional_values(schedule, 'weight_decay'), np.float32)


def adam_b2_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → Adam's β2, traceable; for phases that carry it (`sqrt_scaling`)."""
  return _per_phase(schedule, _optional_values(schedule, 'adam_b2'), np.float32)


def adam_eps_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → Adam's epsilon term ε̂, traceable; for phases that carry it
  (`sqrt_scaling`)."""
  return _per_phase(schedule, _optional_values(schedule, 'adam_eps'), np.float32)


def _optional_values(schedule: Schedule, field: str) -> list[float]:
  values = [getattr(p, field) for p in schedule.phases]
  if any(v is None for v in values):
    raise ScheduleError(
      f'The phases do not set {field} (it is constant); pass the constant to the '
      'optimizer instead.'
    )
  return values


def batch_size_schedule(schedule: Schedule) -> Callable[[Any], Any]:
  """step → B (int32), traceable under jit; for the host, use
  `host_batch_size_schedule`."""
  return _per_phase(schedule, [p.batch_size for p in schedule.phases], np.int32)


def host_batch_size_schedule(schedule: Schedule) -> Callable[[int], int]:
  """step → B as a Python int, for data loaders: a bisect, no JAX (a jnp function called
  from the host dispatches to the device on every call).

  Same values as `batch_size_schedule`; steps past the end stay in the last phase.
  """
  import bisect

  first_steps = [s.first_step for s in clock.phase_spans(schedule)]
  sizes = [p.batch_size for p in schedule.phases]
  last = len(sizes) - 1

  def batch_size(step: int) -> int:
    return sizes[min(max(bisect.bisect_right(first_steps, step) - 1, 0), last)]

  return batch_size


def _per_phase(schedule: Schedule, values: Sequence[Any], dtype) -> Callable[[Any], Any]:
  import jax.numpy as jnp

  first_steps, table = _first_steps(schedule), np.array(values, dtype)
  return lambda step: jnp.asarray(table)[_phase_of_step(first_steps, step)]
