"""The SGD noise scale g and the schedule calculator (docs/PAPER.md, "The idea").

    g = ε (N/B − 1) / (1 − m)   ≈   ε N / (B (1 − m))      (B ≪ N)

ε learning rate, N training-set size, B batch size, m momentum. Decaying ε by α or growing
B by α lowers g by the same α; that equivalence is the paper's whole argument.

Run as a calculator:

    python -m ibs.noise_scale --config=configs/default.py
    python -m ibs.noise_scale --config=configs/resnet50_tpu.py --baseline --plot=/tmp/fig1.png

It prints one row per phase and the totals; `--baseline` compares with the decaying-LR
version of the same recipe (before any scaling rule), and `--plot` draws ε, B and g
against epochs (the paper's Figure 1). It never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
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
      )
    )
  return rows


def format_table(schedule: schedules.Schedule, title: str = '') -> str:
  """A fixed-width table of the phases and their totals, for logs and the CLI."""
  header = (
    f'{"phase":>5} {"epochs":>11} {"lr":>9} {"momentum":>8} {"batch":>7} '
    f'{"g":>8} {"g approx":>8} {"updates":>10} {"cumulative":>10} {"steps":>8}'
  )
  lines = [title] if title else []
  lines += [header, '-' * len(header)]
  rows = phase_table(schedule)
  for r in rows:
    lines.append(
      f'{r.phase:>5} {f"{r.start_epoch:g}–{r.end_epoch:g}":>11} {r.learning_rate:>9.4g} '
      f'{r.momentum:>8.4g} {r.batch_size:>7d} {r.noise_scale:>8.4g} '
      f'{r.approximate_noise_scale:>8.4g} {r.updates:>10,.1f} '
      f'{r.cumulative_updates:>10,.1f} {r.steps:>8,d}'
    )
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
  return '\n'.join(lines)


def baseline_schedule(config: Any, num_train_examples: int) -> schedules.Schedule:
  """The decaying-LR schedule of `config.schedule`'s recipe, without scaling rules.

  This is what the paper compares against: the original step-decay training (§5.1,
  §5.2's "original").
  """
  if config.schedule.kind == 'explicit':
    raise schedules.ScheduleError(
      '--baseline needs a step-decay recipe (config.schedule.kind decaying_lr, '
      'increasing_batch or hybrid), not an explicit phase list.'
    )
  return schedules.from_step_decay(
    schedules.recipe_from_config(config),
    'decaying_lr',
    num_train_examples,
    warmup_epochs=float(config.schedule.get('warmup_epochs') or 0.0),
  )


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


def report(config: Any, baseline: bool = False, plot: str | None = None) -> str:
  """The calculator's output for `config`: table, optional baseline, optional plot."""
  from ibs.datasets import catalog

  n = catalog.dataset_spec(config).num_train_examples
  schedule = schedules.from_config(config, n)
  title = f'{config.schedule.kind} schedule on {config.dataset}'
  parts = [format_table(schedule, title=title)]
  reference = None
  if baseline:
    reference = baseline_schedule(config, n)
    parts += [format_table(reference, title='baseline: decaying learning rate')]
    parts += [format_comparison(schedule, reference)]
  if plot:
    plot_schedule(schedule, plot, reference, title=title)
    parts += [f'wrote {plot}']
  return '\n\n'.join(parts)


def main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  try:
    print(report(values.config, baseline=values.baseline, plot=values.plot))
  except schedules.ScheduleError as e:
    raise app.UsageError(str(e)) from None


def _define_flags() -> None:
  """Flags only when run as a program: ibs.main defines its own --config."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_bool(
    'baseline', False, 'Also print the decaying-LR version of the recipe.'
  )
  flags.DEFINE_string('plot', None, 'Write ε, B and g against epochs to this PNG.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
