r"""Compares finished (or running) workdirs: final metrics, cost, and what differs.

  python -m ibs.tools.compare /tmp/increasing_batch /tmp/decaying_lr
  python -m ibs.tools.compare /tmp/increasing_batch /tmp/decaying_lr --plot=/tmp/fig2.pdf

Prints one row per workdir — final test accuracy and loss, final training loss,
parameter updates, examples seen, epochs, wall-clock (summed over resumes) — and the
config fields whose values differ between the runs (from each workdir's config.json).
With --plot, writes a figure of training loss and test accuracy against epochs and
against parameter updates (the paper's Figure 2), one column of a paper wide, as PDF,
PNG or SVG by the file's extension, from the TensorBoard event files; --labels names the
runs (`--labels="increasing batch,decaying LR"`). Mistakes end in one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ibs import reporting

# Config fields that never explain a difference in results.
IGNORED_FIELDS = ('data_dir', 'compilation_cache_dir')


class CompareError(Exception):
  """A workdir that cannot be compared; the message says why."""


def load_run(workdir: str, read_events: bool = True) -> dict[str, Any]:
  """{'workdir', 'summary', 'config', 'scalars'} of one workdir (missing parts empty)."""
  if not os.path.isdir(workdir):
    raise CompareError(f'{workdir} is not a directory.')
  summary_path = os.path.join(workdir, 'summary.json')
  summary = {}
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
  config = reporting.read_config_json(workdir) or {}
  has_events = any(n.startswith('events.out.tfevents.') for n in os.listdir(workdir))
  if not (summary or config or has_events):
    raise CompareError(
      f'{workdir} holds no summary.json, config.json or event files: not an ibs workdir.'
    )
  scalars = {}
  if read_events and has_events:
    from ibs.tools import curves

    scalars = curves.read_scalars(workdir)
  return {'workdir': workdir, 'summary': summary, 'config': config, 'scalars': scalars}


def _last(scalars: dict, tag: str) -> float | None:
  if tag not in scalars or not len(scalars[tag][1]):
    return None
  return float(scalars[tag][1][-1])


def final_metrics(run: dict[str, Any]) -> dict[str, Any]:
  """The numbers of a row: summary.json's, else the last logged values."""
  s, scalars = run['summary'], run['scalars']
  out = {
    'test_accuracy': s.get('test_accuracy', _last(scalars, 'test_accuracy')),
    'test_loss': s.get('test_loss', _last(scalars, 'test_loss')),
    'train_loss': _last(scalars, 'train_loss'),
    'parameter_updates': s.get('parameter_updates', _last(scalars, 'parameter_updates')),
    'examples_seen': s.get('examples_seen', _last(scalars, 'examples_seen')),
    'epoch': s.get('epoch', _last(scalars, 'epoch')),
    'wall_clock_s': s.get('wall_clock_s'),
    'finished': bool(s.get('finished')),
  }
  return out


def labels(workdirs: list[str]) -> list[str]:
  """Short names: the last path component, or more of the path where those clash."""
  parts = [os.path.normpath(os.path.abspath(w)).split(os.sep) for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = [os.path.join(*p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return list(workdirs)


def _fmt(value: Any, spec: str) -> str:
  return '–' if value is None else format(value, spec)


def table(runs: list[dict[str, Any]], names: list[str] | None = None) -> str:
  names = names or labels([r['workdir'] for r in runs])
  width = max(12, *(len(n) for n in names))
  header = (
    f'{"run":<{width}} {"test acc":>9} {"test loss":>9} {"train loss":>10} '
    f'{"updates":>9} {"examples":>11} {"epochs":>7} {"wall-clock":>10}'
  )
  lines = [header, '-' * len(header)]
  for name, run in zip(names, runs, strict=True):
    m = final_metrics(run)
    wall = '–' if m['wall_clock_s'] is None else f'{m["wall_clock_s"]:.1f} s'
    lines.append(
      f'{name:<{width}} {_fmt(m["test_accuracy"], ".4f"):>9} '
      f'{_fmt(m["test_loss"], ".4f"):>9} {_fmt(m["train_loss"], ".4f"):>10} '
      f'{_fmt(m["parameter_updates"], ",.0f"):>9} {_fmt(m["examples_seen"], ",.0f"):>11} '
      f'{_fmt(m["epoch"], ".2f"):>7} {wall:>10}'
      + ('' if m['finished'] else '  (running)')
    )
  return '\n'.join(lines)


def differences_table(runs: list[dict[str, Any]], names: list[str] | None = None) -> str:
  names = names or labels([r['workdir'] for r in runs])
  with_config = [r for r in runs if r['config']]
  if len(with_config) < len(runs):
    missing = [n for n, r in zip(names, runs, strict=True) if not r['config']]
    note = (
      f'(no config.json in {", ".join(missing)}: config.json is written by newer ibs)'
    )
    if len(with_config) < 2:
      return note
  else:
    note = ''
  configs = [
    {k: v for k, v in r['config'].items() if k not in IGNORED_FIELDS} for r in with_config
  ]
  diff = reporting.config_differences(configs)
  if not diff:
    return 'config: identical' + (f' {note}' if note else '')
  shown = [n for n, r in zip(names, runs, strict=True) if r['config']]
  cells = {
    k: [json.dumps(v) if not isinstance(v, str) else v for v in vs]
    for k, vs in diff.items()
  }
  field_width = max(len('field'), *(len(k) for k in diff))
  col = [max(len(n), *(len(c[i]) for c in cells.values())) for i, n in enumerate(shown)]
  lines = [
    'config fields that differ',
    f'{"field":<{field_width}}  '
    + '  '.join(f'{n:<{w}}' for n, w in zip(shown, col, strict=True)),
  ]
  for key, values in cells.items():
    lines.append(
      f'{key:<{field_width}}  '
      + '  '.join(f'{v:<{w}}' for v, w in zip(values, col, strict=True))
    )
  return '\n'.join(line.rstrip() for line in lines + ([note] if note else []))


def compare(
  workdirs: list[str], plot: str | None = None, names: list[str] | None = None
) -> str:
  """The report for `workdirs`; with `plot`, also writes the figure there, its curves
  labelled `names` (default: the workdirs' last path components)."""
  workdirs = [reporting.expand_path(w) for w in workdirs]
  if names is not None and len(names) != len(workdirs):
    raise CompareError(
      f'--labels gives {len(names)} labels for {len(workdirs)} workdirs; give one per '
      'workdir, in the same order, separated by commas.'
    )
  runs = [load_run(w) for w in workdirs]
  report = table(runs, names) + '\n\n' + differences_table(runs, names)
  if plot:
    from ibs.tools import curves

    plot = reporting.expand_path(plot)
    ext = os.path.splitext(plot)[1].lower()
    if ext not in ('.pdf', '.png', '.svg'):
      raise CompareError(f'--plot={plot}: give a .pdf, .png or .svg file name.')
    names = names or labels(workdirs)
    figure_runs = {
      n: [r['scalars']] for n, r in zip(names, runs, strict=True) if r['scalars']
    }
    if not figure_runs:
      raise CompareError('No event files in these workdirs: nothing to plot.')
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    curves.save_paper_figure(figure_runs, plot)
    report += f'\n\nwrote {plot}'
  return report


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes go the one error path (one line, exit status 2)."""

  def error(self, message):
    raise CompareError(f'{message} (--help describes the arguments)')


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(
    prog='python -m ibs.tools.compare', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('workdirs', nargs='+', help='ibs workdirs (--workdir of ibs.main)')
  parser.add_argument(
    '--plot', default=None, help='write loss/accuracy curves to this .pdf/.png/.svg'
  )
  parser.add_argument(
    '--labels',
    default=None,
    help='comma-separated names of the runs in the table and the figure, one per workdir',
  )
  parser.add_argument('--verbosity', type=int, default=0, help='1: tracebacks of errors')
  argv = sys.argv[1:] if argv is None else argv
  verbosity = reporting.requested_verbosity(argv)
  reporting.quiet_logging(verbosity)
  with reporting.one_line_errors(verbosity, lambda e: isinstance(e, CompareError)):
    args = parser.parse_args(argv)
    names = None if args.labels is None else [n.strip() for n in args.labels.split(',')]
    print(compare(args.workdirs, args.plot, names))
  return 0


if __name__ == '__main__':
  sys.exit(main())
