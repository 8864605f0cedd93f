r"""Learning curves from a workdir's TensorBoard event files: reading and plotting.

`read_scalars(workdir)` is the one reader of ibs's logs (ibs.tools.compare, experiments/plots.py
and the notebooks use it); `plot_runs` draws runs against epochs and against parameter
updates, like the paper's Figure 2; `save_paper_figure` writes such a figure sized for
one column of a two-column paper, as PDF or PNG.
"""

from __future__ import annotations

import numpy as np

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
  ('g_sgd', 'epoch'),
)
NAMES = {
  'train_loss': 'training cross-entropy',
  'train_accuracy': 'training accuracy',
  'test_loss': 'test cross-entropy',
  'test_accuracy': 'test accuracy',
  'learning_rate': 'learning rate ε',
  'momentum': 'momentum m',
  'batch_size': 'batch size B',
  'g_sgd': 'noise scale g (SGD formula)',
  'epoch': 'epochs',
  'examples_seen': 'examples seen',
  'parameter_updates': 'parameter updates',
}
# Quantities spanning decades (cross-entropy, and ε, B, g falling ×5 per phase).
LOG_SCALE = ('train_loss', 'test_loss', 'learning_rate', 'batch_size', 'g_sgd')
# ε, B, m, g logged at a step are those of the period just ended: draw them as steps.
PIECEWISE_CONSTANT = ('learning_rate', 'momentum', 'batch_size', 'g_sgd', 'phase')

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]


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
  if 'noise_scale' in by_tag:  # the name of g_sgd in runs before it was renamed
    by_tag.setdefault('g_sgd', by_tag.pop('noise_scale'))
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


def plain_log_formatter(**kwargs):
  """LogFormatter's choice of ticks to label, written 0.2 and 30 rather than 2e-01."""
  from matplotlib import ticker

  class PlainLogFormatter(ticker.LogFormatter):
    def __call__(self, x, pos=None):
      return f'{x:g}' if super().__call__(x, pos) else ''

  return PlainLogFormatter(**kwargs)


def zoom_accuracy(ax, skip_fraction: float = 0.25) -> None:
  """Limits an accuracy axis to the range its curves span after the first part of x.

  Accuracy climbs from chance in the first epochs; an axis from 0 to 1 hides the
  differences of a few tenths of a point that the paper's claims are about.
  """
  ys = []
  for line in ax.lines:
    x, y = (np.asarray(v, float) for v in line.get_data())
    if len(x):
      later = x >= skip_fraction * x.max()  # x runs from 0 (epochs, updates)
      ys.append(y[later] if later.any() else y)
  if not ys:
    return
  values = np.concatenate(ys)
  values = values[np.isfinite(values)]
  if not len(values):
    return
  low, high = float(values.min()), float(values.max())
  pad = max(0.08 * (high - low), 0.002)
  ax.set_ylim(max(low - pad, 0.0), min(high + pad, 1.0))


def plot_runs(
  runs: dict[str, list[Scalars]],
  panels=LEARNING_CURVES,
  title: str = '',
  figsize: tuple[float, float] | None = None,
  seed_counts: bool = True,
):
  """A matplotlib Figure, one panel per (tag, axis) and one line per label of `runs`.

  `runs` maps a label (a schedule) to the scalars of its seeds. Accuracy axes are
  zoomed to the later epochs (`zoom_accuracy`). The figure is made without pyplot, so
  scripts leak no global state; a notebook shows it with display().
  """
  from matplotlib.figure import Figure

  columns = 2 if len(panels) == 4 else len(panels)
  rows = -(-len(panels) // columns)
  figsize = figsize or (5.2 * columns, 3.8 * rows)
  fig = Figure(figsize=figsize, layout='constrained')
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
        label=f'{label} ({len(seeds)} seed{"s" * (len(seeds) > 1)})'
        if seed_counts
        else label,
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
      ax.yaxis.set_major_formatter(plain_log_formatter())
      ax.yaxis.set_minor_formatter(plain_log_formatter(minor_thresholds=(2, 0.5)))
    if 'accuracy' in tag and ax.lines:
      zoom_accuracy(ax)
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


# One column of a two-column paper (ICLR, NeurIPS: 3.25–3.5 in); 2 × 2 panels.
COLUMN_WIDTH_IN = 3.4
PAPER_RC = {
  'font.size': 6.5,
  'axes.titlesize': 6.5,
  'axes.labelsize': 6.5,
  'xtick.labelsize': 5.5,
  'ytick.labelsize': 5.5,
  'legend.fontsize': 5.5,
  'lines.linewidth': 1.0,
  'axes.linewidth': 0.5,
  'grid.linewidth': 0.4,
}


def save_paper_figure(
  runs: dict[str, list[Scalars]], path: str, panels=LEARNING_CURVES, title: str = ''
) -> str:
  """Writes `plot_runs` sized for one paper column to `path` (.pdf, .png or .svg)."""
  import matplotlib

  columns = 2 if len(panels) == 4 else len(panels)
  rows = -(-len(panels) // columns)
  size = (COLUMN_WIDTH_IN, COLUMN_WIDTH_IN * 0.42 * rows * 2 / columns)
  with matplotlib.rc_context(PAPER_RC):
    fig = plot_runs(runs, panels, title, figsize=size, seed_counts=False)
    handles, names = [], []
    for ax in fig.axes:
      for line in ax.lines:
        line.set_linewidth(PAPER_RC['lines.linewidth'])
      if ax.get_legend():
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
    if handles:  # above the panels, clear of the curves
      fig.legend(handles, names, loc='outside upper center', ncols=min(len(names), 3))
    fig.savefig(path, dpi=300)
  return path
