r"""Learning curves from a workdir's TensorBoard event files: reading and plotting.

`read_scalars(workdir)` is the one reader of ibs's logs (ibs.tools.compare,
experiments/plots.py and the notebooks use it); `plot_runs` draws runs against epochs and
against parameter updates, like the paper's Figure 2; `save_paper_figure` writes such a
figure sized for one column of a two-column paper, as PDF or PNG.
"""

from __future__ import annotations

import os

import numpy as np

from ibs import reporting

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


def _records(path: str):
  """The records of one TFRecord file, read by TensorBoard's own pure-Python reader (its
  TensorFlow stub): importing TensorFlow to read a few kilobytes of events took most of
  the time and memory of a plot (docs/BENCHMARKS.md)."""
  from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

  reader = pywrap_tensorflow.PyRecordReader_New(path)
  while True:
    try:
      reader.GetNext()
    except errors.OutOfRangeError:
      return
    yield reader.record()


def read_scalars(workdir: str) -> Scalars:
  """Every scalar of `workdir`'s event files: {tag: (steps, values)}, sorted by step.

  The TensorBoard step is the parameter-update count. clu writes TF2 summaries, which
  TensorBoard exposes as tensors, not scalars; both are read. A resumed run rewrites the
  steps after its last checkpoint: as TensorBoard's EventAccumulator does, a value whose
  step goes back drops that tag's values from that step on, and a step logged twice
  keeps its last value. Files in subdirectories (checkpoints/) are not read. Empty if
  there are no event files. Reads local files without importing TensorFlow; other file
  systems (gs://) through epath.
  """
  from etils import epath
  from tensorboard.compat.proto import event_pb2
  from tensorboard.util import tensor_util

  folder = epath.Path(workdir)
  files = (
    sorted(p for p in folder.glob('*tfevents*') if p.is_file()) if folder.is_dir() else []
  )
  by_tag: dict[str, dict[int, float]] = {}
  for path in files:
    if reporting.is_remote(path):  # TensorBoard's stub reads local files only
      import tensorflow as tf

      records = (r.numpy() for r in tf.data.TFRecordDataset(os.fspath(path)))
    else:
      records = _records(os.fspath(path))
    for record in records:
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('tensor'):
          array = tensor_util.make_ndarray(value.tensor)
          if array.size != 1 or array.dtype.kind not in 'fiub':
            continue  # the hparams plugin's session markers, text summaries
          number = float(array.reshape(()))
        elif value.HasField('simple_value'):
          number = float(value.simple_value)
        else:
          continue
        values = by_tag.setdefault(value.tag, {})
        if values and event.step < max(values):  # a resumed run's rewritten steps
          for step in [s for s in values if s >= event.step]:
            del values[step]
        values[event.step] = number
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


# Axes drawn on a log scale: parameter updates span decades between schedules (23,100
# against 62,500 on the default run) and the phases of one schedule differ by 5× each.
LOG_X = ('parameter_updates', 'examples_seen')


def short_count(value: float, _=None) -> str:
  """300, 3k, 30k, 3M: a count as a tick label."""
  for unit, size in (('M', 1e6), ('k', 1e3)):
    if value >= size:
      return f'{value / size:g}{unit}'
  return f'{value:g}'


def plot_runs(
  runs: dict[str, list[Scalars]],
  panels=LEARNING_CURVES,
  title: str = '',
  figsize: tuple[float, float] | None = None,
  seed_counts: bool = True,
):
  """A matplotlib Figure, one panel per (tag, axis) and one line per label of `runs`.

  `runs` maps a label (a schedule) to the scalars of its seeds. Panels are lettered
  (a), (b), ...; panels of one metric share their y-range, which holds every plotted
  value (no curve is clipped); accuracy is drawn on a logit axis, which spreads 0.9,
  0.99 and 0.999 evenly, so the late differences the paper's claims are about show
  without cutting away the first epochs; parameter updates are on a log axis. The
  figure is made without pyplot, so scripts leak no global state; a notebook shows it
  with display().
  """
  from matplotlib import ticker
  from matplotlib.figure import Figure

  columns = 2 if len(panels) == 4 else len(panels)
  rows = -(-len(panels) // columns)
  figsize = figsize or (5.2 * columns, 3.8 * rows)
  fig = Figure(figsize=figsize, layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for index, (ax, (tag, axis)) in enumerate(zip(axes, panels, strict=False)):
    piecewise = tag in PIECEWISE_CONSTANT
    for label, seeds in runs.items():
      x, mean, low, high = seed_band(seeds, tag, axis)
      if not len(x):
        continue
      if piecewise and x[0] > 0 and axis not in LOG_X:
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
    ax.set_title(f'({chr(ord("a") + index)})', loc='left', fontweight='bold')
    ax.grid(alpha=0.3, which='both')
    if not ax.lines:
      continue
    if axis in LOG_X:
      ax.set_xscale('log')
      # 1k 3k 10k 30k: two labelled ticks a decade, short enough for a paper column.
      ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 3.0)))
      ax.xaxis.set_major_formatter(ticker.FuncFormatter(short_count))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if tag in LOG_SCALE:
      ax.set_yscale('log')
      ax.yaxis.set_major_formatter(plain_log_formatter())
      ax.yaxis.set_minor_formatter(plain_log_formatter(minor_thresholds=(2, 0.5)))
    if 'accuracy' in tag:
      ax.set_yscale('logit')
      ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if tag == 'batch_size':
      # Label the batch sizes in use: log ticks at powers of ten would hide 128 or 16384.
      sizes = sorted({int(b) for line in ax.lines for b in line.get_ydata()})
      ax.set_yticks(sizes, [f'{b:,}' for b in sizes])
      ax.minorticks_off()
  share_y_ranges(axes, panels)
  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  if any(ax.lines for ax in axes):
    next(ax for ax in axes if ax.lines).legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return fig


def share_y_ranges(axes, panels) -> None:
  """Panels of one metric get one y-range: every value of every curve, padded.

  The padding is 4% of the range in the axis's own scale (log, logit or linear), so a
  curve's lowest and highest points stay inside the frame.
  """
  by_tag: dict[str, list] = {}
  for ax, (tag, _) in zip(axes, panels, strict=False):
    if ax.lines:
      by_tag.setdefault(tag, []).append(ax)
  for tag, group in by_tag.items():
    if tag == 'batch_size':
      continue
    values = np.concatenate(
      [np.asarray(line.get_ydata(), float) for ax in group for line in ax.lines]
    )
    scale = group[0].get_yscale()
    if scale == 'log':
      values = values[values > 0]
    if scale == 'logit':
      values = values[(values > 0) & (values < 1)]
    values = values[np.isfinite(values)]
    if not len(values):
      continue
    forward, inverse = {
      'log': (np.log10, lambda v: 10**v),
      'logit': (lambda v: np.log(v / (1 - v)), lambda v: 1 / (1 + np.exp(-v))),
    }.get(scale, (lambda v: v, lambda v: v))
    low, high = forward(values.min()), forward(values.max())
    pad = 0.04 * (high - low) if high > low else 0.05 * max(abs(high), 1.0)
    for ax in group:
      ax.set_ylim(inverse(low - pad), inverse(high + pad))


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
  runs: dict[str, list[Scalars]],
  path: str,
  panels=LEARNING_CURVES,
  title: str = '',
  column: bool = True,
) -> str:
  """Writes `plot_runs` to `path` (.pdf, .png or .svg): the one way ibs saves a figure
  of runs (ibs.tools.compare --plot, experiments/plots.py).

  `column`: sized for one column of a two-column paper at 300 dpi, the legend above the
  panels; else screen-sized at 110 dpi with the seed counts in the legend.
  """
  import matplotlib

  if not column:
    plot_runs(runs, panels, title).savefig(path, dpi=110)
    return path
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
