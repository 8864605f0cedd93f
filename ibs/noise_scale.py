r"""The SGD noise scale g and the schedule calculator (PAPER.md, "The idea in four lines").

    g = ε (N/B − 1) / (1 − m)   ≈   ε N / (B (1 − m))      (B ≪ N)

ε learning rate, N training-set size, B batch size, m momentum. Decaying ε by α or growing
B by α lowers g by the same α; that equivalence is the paper's whole argument.

Run as a calculator:

    python -m ibs.noise_scale --config=configs/cifar10_wrn.py:schedule=increasing_batch
    python -m ibs.noise_scale --config=configs/default.py --baseline --plot=/tmp/fig1.png

It prints one row per phase and the totals; `--baseline` compares with the decaying-LR
version of the same recipe. It never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def noise_scale(learning_rate, num_train_examples, batch_size, momentum):
  """Exact g = ε (N/B − 1) / (1 − m) (Smith et al. 2018, eq. 4 with momentum, §4)."""
  return learning_rate * (num_train_examples / batch_size - 1) / (1 - momentum)


def approximate_noise_scale(learning_rate, num_train_examples, batch_size, momentum):
  """g ≈ ε N / (B (1 − m)), valid for B ≪ N (the paper's working form)."""
  return learning_rate * num_train_examples / (batch_size * (1 - momentum))


@dataclasses.dataclass(frozen=True)
class PhaseRow:
  """One line of the calculator's table."""

  phase: int
  start_epoch: float
  end_epoch: float
  learning_rate: float
  momentum: float
  batch_size: int
  noise_scale: float
  updates: float  # fractional, as the paper counts them
  cumulative_updates: float
  steps: int  # integer steps the trainer takes (see ibs.schedules rounding rule)


def phase_table(schedule) -> list[PhaseRow]:
  """The per-phase rows of `schedule` (an ibs.schedules.Schedule)."""
  from ibs import schedules  # Deferred: schedules imports this module.

  n = schedule.num_train_examples
  ends = [p.start_epoch for p in schedule.phases[1:]] + [schedule.num_epochs]
  rows, total = [], 0.0
  for i, (phase, end, updates, span) in enumerate(
      zip(
          schedule.phases,
          ends,
          schedules.nominal_updates(schedule),
          schedules.phase_spans(schedule),
          strict=True,
      )
  ):
    total += updates
    rows.append(
        PhaseRow(
            i, phase.start_epoch, end, phase.learning_rate, phase.momentum,
            phase.batch_size,
            noise_scale(phase.learning_rate, n, phase.batch_size, phase.momentum),
            updates, total, span.num_steps,
        )
    )
  return rows


def format_table(schedule, title: str = '') -> str:
  """A fixed-width table of the phases and their totals, for logs and the CLI."""
  header = (
      f'{"phase":>5} {"epochs":>15} {"lr":>10} {"momentum":>8} {"batch":>7} '
      f'{"g":>10} {"updates":>11} {"cumulative":>11} {"steps":>8}'
  )
  lines = [title] if title else []
  lines += [header, '-' * len(header)]
  rows = phase_table(schedule)
  for r in rows:
    lines.append(
        f'{r.phase:>5} {f"{r.start_epoch:g}–{r.end_epoch:g}":>15} {r.learning_rate:>10.4g} '
        f'{r.momentum:>8.4g} {r.batch_size:>7d} {r.noise_scale:>10.4g} '
        f'{r.updates:>11,.1f} {r.cumulative_updates:>11,.1f} {r.steps:>8,d}'
    )
  lines.append('-' * len(header))
  lines.append(
      f'total: {schedule.num_epochs:g} epochs of N={schedule.num_train_examples:,}, '
      f'{rows[-1].cumulative_updates:,.1f} parameter updates '
      f'({sum(r.steps for r in rows):,} integer steps)'
  )
  if schedule.warmup_epochs:
    lines.append(f'linear warm-up over the first {schedule.warmup_epochs:g} epochs')
  return '\n'.join(lines)


def baseline_schedule(config: Any, num_train_examples: int):
  """The decaying-LR schedule of the same recipe as `config.schedule`."""
  from ibs import schedules

  if config.schedule.kind == 'explicit':
    raise ValueError(
        '--baseline needs a step-decay recipe (config.schedule.kind decaying_lr, '
        'increasing_batch or hybrid), not an explicit phase list.'
    )
  baseline = config.copy_and_resolve_references()
  baseline.schedule.kind = 'decaying_lr'
  return schedules.from_config(baseline, num_train_examples)


def plot_schedule(schedule, path: str, baseline=None) -> None:
  """LR, batch size and g against epochs (the paper's Figure 1), written to `path`."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  series = [('this schedule', schedule)] + ([('decaying LR', baseline)] if baseline else [])
  for label, sched in series:
    rows = phase_table(sched)
    epochs = [r.start_epoch for r in rows] + [rows[-1].end_epoch]
    for ax, values in zip(
        axes,
        (
            [r.learning_rate for r in rows],
            [r.batch_size for r in rows],
            [r.noise_scale for r in rows],
        ),
        strict=True,
    ):
      ax.stairs(values, epochs, label=label, linewidth=2, baseline=None)
  for ax, name in zip(axes, ('learning rate ε', 'batch size B', 'noise scale g'), strict=True):
    ax.set_xlabel('epochs')
    ax.set_ylabel(name)
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from ibs import schedules
  from ibs.datasets import catalog

  config = _CONFIG.value
  n = catalog.dataset_spec(config).num_train_examples
  schedule = schedules.from_config(config, n)
  print(format_table(schedule, title=f'{config.schedule.kind} schedule on {config.dataset}'))
  baseline = None
  if _BASELINE.value:
    baseline = baseline_schedule(config, n)
    print()
    print(format_table(baseline, title='baseline: decaying learning rate'))
    ours = sum(schedules.nominal_updates(schedule))
    theirs = sum(schedules.nominal_updates(baseline))
    print(
        f'\nupdates: {ours:,.1f} vs {theirs:,.1f} for decaying LR; '
        f'{theirs - ours:,.1f} saved, {theirs / ours:.2f}x fewer'
    )
  if _PLOT.value:
    plot_schedule(schedule, _PLOT.value, baseline)
    print(f'\nwrote {_PLOT.value}')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  _BASELINE = flags.DEFINE_bool(
      'baseline', False, 'Also print the decaying-LR schedule of the same recipe.'
  )
  _PLOT = flags.DEFINE_string('plot', None, 'Write LR, B and g against epochs to this PNG.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
