r"""Figures of a grid from its workdirs' TensorBoard event files (the paper's Figs. 1–5).

For every optimizer of the experiment one figure of learning curves, one line per
schedule (mean over the seeds found, shaded from the lowest to the highest seed):
training cross-entropy and test accuracy, each against epochs and against parameter
updates; and one figure of the schedules that ran, ε, B and g against epochs, read from
the same logs. Per epoch the schedules should overlap; per update, increasing the batch
should get there in far fewer steps.

  python experiments/plots.py --experiment=mnist1d_5_1 --root=workdirs --out=docs/figures

`read_scalars(workdir)` is the one reader of ibs's logs; the notebooks use it too.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

# (tag, x axis) per panel; x axes are tags logged at the same steps as every metric.
LEARNING_CURVES = (
  ('train_loss', 'epoch'),
  ('train_loss', 'parameter_updates'),
  ('test_accuracy', 'epoch'),
  ('test_accuracy', 'parameter_updates'),
)
SCHEDULES = (
  ('learning_rate', 'epoch'),
  ('batch_size', 'epoch'),
  ('noise_scale', 'epoch'),
)
NAMES = {
  'train_loss': 'training cross-entropy',
  'train_accuracy': 'training accuracy',
  'test_loss': 'test cross-entropy',
  'test_accuracy': 'test accuracy',
  'learning_rate': 'learning rate ε',
  'momentum': 'momentum m',
  'batch_size': 'batch size B',
  'noise_scale': 'noise scale g',
  'epoch': 'epochs',
  'examples_seen': 'examples seen',
  'parameter_updates': 'parameter updates',
}
# Quantities spanning decades (cross-entropy, and ε, B, g falling ×5 per phase).
LOG_SCALE = ('train_loss', 'test_loss', 'learning_rate', 'batch_size', 'noise_scale')
# ε, B, m, g logged at a step are those of the period just ended: draw them as steps.
PIECEWISE_CONSTANT = ('learning_rate', 'momentum', 'batch_size', 'noise_scale', 'phase')

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]

# --experiment, --root and --seeds are reproduce.py's.
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Directory for the PNG files.')


def read_scalars(workdir: str) -> Scalars:
  """Every scalar of `workdir`'s event files: {tag: (steps, values)}, sorted by step.

  The TensorBoard step is the parameter-update count. clu writes TF2 summaries, which
  TensorBoard exposes as tensors, not scalars; both are read. A resumed run rewrites the
  steps after its last checkpoint: EventAccumulator drops the superseded events when a
  step goes backwards, and a step logged twice keeps its last value. Files in
  subdirectories (checkpoints/) are not read. Empty if there are no event files.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  accumulator = event_accumulator.EventAccumulator(
    workdir,
    size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0},
  )
  accumulator.Reload()
  tags = accumulator.Tags()
  by_tag: dict[str, dict[int, float]] = {}
  for tag in tags.get(event_accumulator.TENSORS, []):
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.size == 1:  # Skips the hparams plugin's empty session markers.
        by_tag.setdefault(tag, {})[event.step] = float(value.reshape(()))
  for tag in tags.get(event_accumulator.SCALARS, []):
    for event in accumulator.Scalars(tag):
      by_tag.setdefault(tag, {})[event.step] = float(event.value)
  return {
    tag: (
      np.array(sorted(values), np.int64),
      np.array([values[s] for s in sorted(values)]),
    )
    for tag, values in by_tag.items()
  }


def against(scalars: Scalars, tag: str, axis: str) -> tuple[np.ndarray, np.ndarray]:
  """(x, y): `tag`'s values against `axis` (epoch, examples_seen, parameter_updates...).

  The trainer logs epoch, examples seen and parameter updates with every metric, so each
  of `tag`'s steps has its x; steps without one (clu's own timing scalars) are dropped.
  """
  if tag not in scalars or axis not in scalars:
    return np.zeros(0), np.zeros(0)
  steps, values = scalars[tag]
  axis_steps, axis_values = scalars[axis]
  keep = np.isin(steps, axis_steps)
  return axis_values[np.searchsorted(axis_steps, steps[keep])], values[keep]


def seed_band(
  runs: list[Scalars], tag: str, axis: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x, mean, lowest, highest) of `tag` over the seeds in `runs`, at each logged step.

  Seeds of one schedule log at the same steps (the schedule fixes them); a seed still
  running contributes the steps it has reached.
  """
  curves = [dict(zip(*against(s, tag, axis), strict=True)) for s in runs]
  xs = np.array(sorted(set().union(*curves)))
  if not len(xs):
    return xs, xs, xs, xs
  table = np.array([[c.get(x, np.nan) for x in xs] for c in curves])
  return xs, np.nanmean(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def _plain_log_formatter(**kwargs):
  """LogFormatter's choice of ticks to label, written 0.2 and 30 rather than 2e-01."""
  from matplotlib import ticker

  class PlainLogFormatter(ticker.LogFormatter):
    def __call__(self, x, pos=None):
      return f'{x:g}' if super().__call__(x, pos) else ''

  return PlainLogFormatter(**kwargs)


def plot_runs(runs: dict[str, list[Scalars]], panels=LEARNING_CURVES, title: str = ''):
  """A matplotlib Figure, one panel per (tag, axis) and one line per label of `runs`.

  `runs` maps a label (a schedule) to the scalars of its seeds. The figure is made
  without pyplot, so scripts leak no global state; a notebook shows it with display().
  """
  from matplotlib.figure import Figure

  columns = 2 if len(panels) == 4 else len(panels)
  rows = -(-len(panels) // columns)
  fig = Figure(figsize=(5.2 * columns, 3.8 * rows), layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for ax, (tag, axis) in zip(axes, panels, strict=False):
    piecewise = tag in PIECEWISE_CONSTANT
    for label, seeds in runs.items():
      x, mean, low, high = seed_band(seeds, tag, axis)
      if not len(x):
        continue
      if piecewise and x[0] > 0:
        # A value logged at x holds over the period ending there; the first from 0.
        x = np.r_[0.0, x]
        mean, low, high = (np.r_[v[0], v] for v in (mean, low, high))
      (line,) = ax.plot(
        x,
        mean,
        label=f'{label} ({len(seeds)} seed{"s" * (len(seeds) > 1)})',
        drawstyle='steps-pre' if piecewise else 'default',
        linewidth=1.6,
      )
      if len(seeds) > 1:
        step = 'pre' if piecewise else None
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, step=step)
    ax.set_xlabel(NAMES.get(axis, axis))
    ax.set_ylabel(NAMES.get(tag, tag))
    ax.grid(alpha=0.3, which='both')
    if tag in LOG_SCALE and ax.lines:
      ax.set_yscale('log')
      ax.yaxis.set_major_formatter(_plain_log_formatter())
      ax.yaxis.set_minor_formatter(_plain_log_formatter(minor_thresholds=(2, 0.5)))
    if tag == 'batch_size' and ax.lines:
      # Label the batch sizes in use: log ticks at powers of ten would hide 128 or 16384.
      sizes = sorted({int(b) for line in ax.lines for b in line.get_ydata()})
      ax.set_yticks(sizes, [f'{b:,}' for b in sizes])
      ax.minorticks_off()
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  if any(ax.lines for ax in axes):
    next(ax for ax in axes if ax.lines).legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return fig


def experiment_groups(experiment: str) -> dict[str, dict[str, tuple[str, str]]]:
  """{optimizer: {schedule label: (config path, argument)}} of a reproduce experiment.

  Groups and labels as `reproduce.group_and_label` gives them.
  """
  groups: dict[str, dict[str, tuple[str, str]]] = {}
  for path, arg in reproduce.EXPERIMENTS[experiment]:
    optimizer, label = reproduce.group_and_label(arg)
    groups.setdefault(optimizer, {})[label] = (path, arg)
  return groups


def load_group(
  runs: dict[str, tuple[str, str]], root: str, seeds: list[int]
) -> dict[str, list[Scalars]]:
  """{label: [scalars of each seed whose workdir has event files]}; empty labels dropped.

  `root` may be a bucket (gs://...), as reproduce.py --print_commands writes there.
  """
  from etils import epath

  loaded = {}
  for label, (path, arg) in runs.items():
    seed_scalars = []
    for seed in seeds:
      workdir = epath.Path(reproduce.run_workdir(root, path, arg, seed))
      if workdir.is_dir() and any(workdir.glob('events.out.tfevents.*')):
        seed_scalars.append(read_scalars(str(workdir)))
    if seed_scalars:
      loaded[label] = seed_scalars
  return loaded


def plot_experiment(experiment: str, root: str, seeds: list[int], out: str) -> list[str]:
  """Writes every figure of `experiment` into `out`; returns the files written.

  Per optimizer: <experiment>_<optimizer>.png (learning curves) and
  <experiment>_<optimizer>_schedules.png (ε, B, g). Optimizers with no runs are skipped.
  """
  os.makedirs(out, exist_ok=True)
  written = []
  for optimizer, runs in experiment_groups(experiment).items():
    loaded = load_group(runs, root, seeds)
    if not loaded:
      print(f'{experiment} {optimizer}: no event files under {root}, skipped')
      continue
    name = experiment if optimizer == 'all' else f'{experiment}_{optimizer}'
    title = experiment if optimizer == 'all' else f'{experiment}: {optimizer}'
    for suffix, panels in (('', LEARNING_CURVES), ('_schedules', SCHEDULES)):
      path = os.path.join(out, f'{name}{suffix}.png')
      plot_runs(loaded, panels, title).savefig(path, dpi=110)
      written.append(path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  seeds = [int(s) for s in values.seeds]
  for path in plot_experiment(values.experiment, values.root, seeds, _OUT.value):
    print(f'wrote {path}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['experiment'])
  app.run(main)
