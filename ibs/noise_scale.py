"""The SGD noise scale g and the schedule calculator (docs/PAPER.md, "The idea").

    g = ε (N/B − 1) / (1 − m)   ≈   ε N / (B (1 − m))      (B ≪ N)

ε learning rate, N training-set size, B batch size, m momentum. Decaying ε by α or growing
B by α lowers g by the same α; that equivalence is the paper's whole argument.

Here: g itself, the per-phase table (`format_table`: one row per phase and the totals),
the decaying-LR baseline of a recipe and its plot (the paper's Figure 1), and the
scalars the run logs. The calculator that prints them for a config is
`python -m ibs.calculator` (ibs/calculator.py).

Where the phases carry them the table also shows the decoupled weight decay λ and
AdamW's timescale τ = B/(ε·λ·N) in epochs (`scale_weight_decay`), and Adam's β2 and
epsilon term ε̂ (`sqrt_scaling`). With optimizer 'adam' the g columns are headed as the
SGD formula they are, and a column ε·√(N/B) is added: Adam's update is normalised, so
its noise falls with ε/√B (Malladi et al. 2022), the quantity `sqrt_scaling` and
`seesaw` lower by α at each milestone as decaying ε does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ibs import clock, schedules


def noise_scale(learning_rate, num_train_examples, batch_size, momentum):
  """Exact g = ε (N/B − 1) / (1 − m) (Smith et al. 2018, §2; momentum §4)."""
  return learning_rate * (num_train_examples / batch_size - 1) / (1 - momentum)


def approximate_noise_scale(learning_rate, num_train_examples, batch_size, momentum):
  """g ≈ ε N / (B (1 − m)), valid for B ≪ N (the paper's working form, §2 and §4)."""
  return learning_rate * num_train_examples / (batch_size * (1 - momentum))


def adam_noise(learning_rate, num_train_examples, batch_size):
  """ε·√(N/B): what Adam's noise is proportional to under the square-root rule.

  Not a noise scale with a derivation like g's: a batch κB with ε√κ leaves it unchanged
  (Malladi et al. 2022), and decaying ε by α lowers it by α, as Seesaw's B·α with ε/√α
  does (Meterez et al. 2025). Compare it between schedules, not with g.
  """
  return learning_rate * np.sqrt(num_train_examples / batch_size)


def timescale(learning_rate, num_train_examples, batch_size, weight_decay):
  """AdamW's τ = B/(ε·λ·N) in epochs (Wang & Aitchison 2024); inf without decay."""
  if not weight_decay:
    return np.inf
  return batch_size / (learning_rate * weight_decay * num_train_examples)


def noise_scale_schedule(
  schedule: schedules.Schedule, exact: bool = True
) -> Callable[[Any], Any]:
  """step → g at that step (warm-up included), traceable under jit like ε and m."""
  lr_fn = schedules.learning_rate_schedule(schedule)
  momentum_fn = schedules.momentum_schedule(schedule)
  batch_fn = schedules.batch_size_schedule(schedule)
  formula = noise_scale if exact else approximate_noise_scale
  n = schedule.num_train_examples
  return lambda step: formula(lr_fn(step), n, batch_fn(step), momentum_fn(step))


@dataclasses.dataclass(frozen=True)
class PhaseRow:
  """One line of the calculator's table."""

  phase: int
  start_epoch: float
  end_epoch: float
  learning_rate: float
  momentum: float
  batch_size: int
  noise_scale: float  # exact
  approximate_noise_scale: float
  updates: float  # fractional, as the paper counts them
  cumulative_updates: float
  steps: int  # integer steps the trainer takes (ibs.clock's rounding rule)
  adam_noise: float = math.nan  # ε·√(N/B)
  weight_decay: float | None = None  # per phase, where the schedule carries λ
  timescale: float | None = None  # τ = B/(ε·λ·N) epochs, with λ
  adam_b2: float | None = None
  adam_eps: float | None = None


def phase_table(schedule: schedules.Schedule) -> list[PhaseRow]:
  """The per-phase rows of `schedule`, at each phase's full learning rate."""
  n = schedule.num_train_examples
  rows, total = [], 0.0
  for i, (phase, end, updates, span) in enumerate(
    zip(
      schedule.phases,
      clock.due_epochs(schedule),
      clock.nominal_updates(schedule),
      clock.phase_spans(schedule),
      strict=True,
    )
  ):
    total += updates
    lr, b, m = phase.learning_rate, phase.batch_size, phase.momentum
    rows.append(
      PhaseRow(
        phase=i,
        start_epoch=phase.start_epoch,
        end_epoch=end,
        learning_rate=lr,
        momentum=m,
        batch_size=b,
        noise_scale=noise_scale(lr, n, b, m),
        approximate_noise_scale=approximate_noise_scale(lr, n, b, m),
        updates=updates,
        cumulative_updates=total,
        steps=span.num_steps,
        adam_noise=float(adam_noise(lr, n, b)),
        weight_decay=phase.weight_decay,
        timescale=None
        if phase.weight_decay is None
        else timescale(lr, n, b, phase.weight_decay),
        adam_b2=phase.adam_b2,
        adam_eps=phase.adam_eps,
      )
    )
  return rows


def _epoch(epoch: float) -> str:
  """An epoch for a table: as given when it is round to 2 decimals, else to 2 decimals."""
  return f'{epoch:g}' if round(epoch, 2) == epoch else f'{epoch:.2f}'


def format_table(
  schedule: schedules.Schedule, title: str = '', optimizer: str | None = None
) -> str:
  """A fixed-width table of the phases and their totals, for logs and the CLI.

  Columns for λ and τ, and for Adam's β2 and ε̂, appear where the phases carry them; with
  `optimizer` 'adam' the g columns say they are the SGD formula, and ε·√(N/B) is added.
  """
  rows = phase_table(schedule)
  adam = optimizer == 'adam'
  decay = rows[0].weight_decay is not None
  betas = rows[0].adam_b2 is not None
  g_names = ('g SGD', 'g≈ SGD') if adam else ('g', 'g approx')
  # A decided switch falls between epochs (8.5008): two decimals keep the column whole.
  spans = [f'{_epoch(r.start_epoch)}–{_epoch(r.end_epoch)}' for r in rows]
  width = max(11, *map(len, spans))
  header = f'{"phase":>5} {"epochs":>{width}} {"lr":>9} {"momentum":>8} {"batch":>7} '
  header += f'{"λ":>9} {"τ epochs":>9} ' if decay else ''
  header += f'{"beta2":>8} {"adam eps":>9} ' if betas else ''
  header += f'{g_names[0]:>8} {g_names[1]:>8} '
  header += f'{"ε√(N/B)":>9} ' if adam else ''
  header += f'{"updates":>10} {"cumulative":>10} {"steps":>8}'
  lines = [title] if title else []
  lines += [header, '-' * len(header)]
  for r, span in zip(rows, spans, strict=True):
    line = (
      f'{r.phase:>5} {span:>{width}} {r.learning_rate:>9.4g} '
      f'{r.momentum:>8.4g} {r.batch_size:>7d} '
    )
    line += f'{r.weight_decay:>9.4g} {r.timescale:>9.4g} ' if decay else ''
    line += f'{r.adam_b2:>8.4g} {r.adam_eps:>9.3g} ' if betas else ''
    line += f'{r.noise_scale:>8.4g} {r.approximate_noise_scale:>8.4g} '
    line += f'{r.adam_noise:>9.4g} ' if adam else ''
    line += f'{r.updates:>10,.1f} {r.cumulative_updates:>10,.1f} {r.steps:>8,d}'
    lines.append(line)
  lines.append('-' * len(header))
  lines.append(
    f'total: {rows[-1].cumulative_updates:,.1f} parameter updates over '
    f'{schedule.num_epochs:g} epochs of N={schedule.num_train_examples:,} (as the paper '
    'counts them)'
  )
  lines.append(
    f'trainer: {sum(r.steps for r in rows):,} integer steps, '
    f'{clock.phase_spans(schedule)[-1].end_examples:,} examples seen'
  )
  if schedule.warmup_epochs:
    lines.append(
      f'linear warm-up over the first {schedule.warmup_epochs:g} epochs '
      '(lr and g above are after warm-up)'
    )
  if adam:
    lines += [
      "g SGD: the SGD noise scale εN/(B(1 − m)), not Adam's. Adam's update is "
      'normalised;',
      'its noise falls with ε√(N/B) (square-root rule, Malladi et al. 2022), which',
      'sqrt_scaling and seesaw lower by α per milestone, as decaying ε does.',
    ]
  if decay:
    lines += [
      'λ: decoupled weight decay per phase; τ = B/(ε·λ·N): the epochs over which it',
      'shrinks the weights by a factor e (Wang & Aitchison 2024).',
    ]
  return '\n'.join(lines)


def baseline_schedule(config: Any, num_train_examples: int) -> schedules.Schedule:
  """The decaying-LR schedule of `config.schedule`'s recipe, without scaling rules.

  This is what the paper compares against: the original step-decay training (§5.1,
  §5.2's "original").
  """
  if config.schedule.kind == 'explicit':
    raise schedules.ScheduleError(
      '--baseline needs a step-decay recipe (config.schedule.kind decaying_lr, '
      'increasing_batch, hybrid, sqrt_scaling or seesaw), not an explicit phase list.'
    )
  baseline = schedules.from_step_decay(
    schedules.recipe_from_config(config),
    'decaying_lr',
    num_train_examples,
    warmup_epochs=float(config.schedule.get('warmup_epochs') or 0.0),
  )
  if config.schedule.get('scale_weight_decay'):
    # Decaying LR with the constant λ of the recipe, to show its τ beside the scaled one.
    phases = tuple(
      dataclasses.replace(p, weight_decay=float(config.weight_decay))
      for p in baseline.phases
    )
    baseline = dataclasses.replace(baseline, phases=phases)
  return baseline


def format_comparison(schedule: schedules.Schedule, baseline: schedules.Schedule) -> str:
  """Parameter updates saved against the baseline."""
  ours = sum(clock.nominal_updates(schedule))
  theirs = sum(clock.nominal_updates(baseline))
  return (
    f'parameter updates: {ours:,.1f} vs {theirs:,.1f} with decaying LR; '
    f'{theirs - ours:,.1f} saved, {theirs / ours:.2f}× fewer'
  )


def _curves(schedule: schedules.Schedule) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """ε, B and g against epochs (nominal phase boundaries), warm-up included."""
  phases = schedule.phases
  starts = np.array([p.start_epoch for p in phases])
  epochs = np.unique(
    np.concatenate([np.linspace(0, schedule.num_epochs, 2001), starts, starts - 1e-9])
  )
  epochs = epochs[(epochs >= 0) & (epochs <= schedule.num_epochs)]
  index = np.searchsorted(starts, epochs, side='right') - 1
  lr = np.array([p.learning_rate for p in phases])[index]
  if schedule.warmup_epochs:
    lr = lr * np.minimum(1.0, epochs / schedule.warmup_epochs)
  batch = np.array([p.batch_size for p in phases])[index]
  momentum = np.array([p.momentum for p in phases])[index]
  g = noise_scale(lr, schedule.num_train_examples, batch, momentum)
  return epochs, {
    'learning rate ε': lr,
    'batch size B': batch,
    'noise scale g (exact)': g,
  }


def plot_schedule(
  schedule: schedules.Schedule,
  path: str,
  baseline: schedules.Schedule | None = None,
  title: str = '',
) -> None:
  """ε, B and g against epochs (the paper's Figure 1), written to `path`."""
  # A bare Figure, not pyplot: no GUI backend, and no change to a notebook's backend.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(13, 3.8))
  axes = fig.subplots(1, 3)
  series = [('this schedule', schedule, '-')]
  if baseline is not None:
    series.append(('decaying LR', baseline, '--'))
  for label, sched, style in series:
    epochs, curves = _curves(sched)
    for ax, (name, values) in zip(axes, curves.items(), strict=True):
      ax.plot(epochs[values > 0], values[values > 0], style, label=label, linewidth=2)
      ax.set_ylabel(name)
  for ax in axes:
    ax.set_xlabel('epochs')
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')
  # Label the batch sizes in use: log ticks at powers of ten would hide 128 or 16384.
  sizes = sorted({p.batch_size for _, sched, _ in series for p in sched.phases})
  axes[1].set_yticks(sizes, [f'{b:,}' for b in sizes])
  axes[1].minorticks_off()
  axes[0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def logged_scalars(hyperparams: Any, batch_size: int, n: int) -> dict[str, float]:
  """ε and m of the last update (an optimizer state's injected `hyperparams`), B, and
  the paper's g of SGD they make, for the run's log.

  `g_sgd` = εN/(B(1 − m)): SGD's noise scale (docs/PAPER.md). Under Adam m is β1 and
  this is the formula, not Adam's noise: Adam's update is normalised, and its noise falls
  with ε√(N/B) (`format_table` with optimizer 'adam').
  """
  lr = float(hyperparams['learning_rate'])
  momentum = float(hyperparams.get('momentum', 0.0))
  return {
    'learning_rate': lr,
    'momentum': momentum,
    'batch_size': batch_size,
    'g_sgd': noise_scale(lr, n, batch_size, momentum),
  }
