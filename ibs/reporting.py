"""What a run tells its reader: config.json, hparams, progress, throughput, summary.json.

Everything here is host-side bookkeeping without JAX, called from the training loop at a
few clearly separated places (ibs.train):

* `write_config_json` once at start (after the checkpoint check), so a workdir says
  which resolved config produced it; `flatten_hparams` gives TensorBoard's HParams the
  nested fields too (`schedule.kind`, `schedule.learning_rate`, ...).
* `Progress` after every dispatch: progress and ETA counted in examples seen, the
  trainer's own clock (steps are the wrong clock under a growing batch), a console line
  at least every `every_secs`, examples/s and step time per log period, and the
  throughput of every phase for the summary. Time spent inside `progress.timed(...)`
  (evaluation, checkpoints) is not training time.
* `cumulative_time` + the checkpoint position's `train_time_s`: training time summed
  over resumes; `finish_summary` writes summary.json and never replaces the timings of a
  finished summary by those of a rerun that trained nothing.
* `quiet_logging`: other libraries' INFO lines (orbax, TFDS, JAX) and the warnings a
  user cannot act on stay out of a default run's log.
* `run_command`, `parse_flags`, `one_line_errors`: the one error path of every command
  line (ibs.main, ibs.calculator, ibs.tools.probe, ibs.tools.compare, ibs.data.prepare):
  a mistake a user can fix (a misspelled flag, config field or variant, a missing flag or
  file, a config training refuses) ends in one line naming it and the fix, exit status 2,
  the traceback only with --verbosity=1; `~` and `$VARS` in path flags are expanded.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging as std_logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging

# The exit status of a command that a user's mistake ended (after its one-line error).
EXIT_USER_ERROR = 2
# Scalars of a log period that measure time, not training (tests leave them out).
TIME_SCALARS = ('examples_per_sec', 'step_time_ms')
# Timing fields of summary.json that a rerun of a finished workdir must not replace.
TIMING_FIELDS = (
  'wall_clock_s',
  'compile_s',
  'session_wall_clock_s',
  'throughput',
)


# Config → JSON, flat hparams, differences.


def _plain(value: Any) -> Any:
  """ConfigDicts, tuples and other values as JSON-able Python (tuples become lists)."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, bool | int | float | str):
    return value
  return repr(value)


def config_dict(config: Any) -> dict[str, Any]:
  """The resolved config as a plain, JSON-able dict."""
  return _plain(config)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'schedule': {'kind': 'x'}} → {'schedule.kind': 'x'}; lists stay values."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, f'{name}.'))
    else:
      flat[name] = value
  return flat


def flatten_hparams(config: Any) -> dict[str, bool | int | float | str]:
  """Every config field under its dotted name, as a value TensorBoard's HParams takes.

  Sequences, None and empty dicts become their text (`(30.0, 60.0, 80.0)`), so that two
  runs differing only in a nested field (schedule.kind, schedule.milestones) differ in
  the HParams dashboard too.
  """
  out = {}
  for key, value in flatten(config_dict(config)).items():
    if isinstance(value, bool | int | float | str):
      out[key] = value
    elif isinstance(value, list):
      out[key] = str(tuple(value))
    else:
      out[key] = str(value)
  return out


def write_config_json(config: Any, workdir: str) -> str:
  """Writes the resolved config to `workdir`/config.json (local or gs://)."""
  from etils import epath  # imported where used: command-line errors stay fast

  path = epath.Path(workdir) / 'config.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + '\n')
  return os.fspath(path)


def read_config_json(workdir: str) -> dict[str, Any] | None:
  from etils import epath  # imported where used: command-line errors stay fast

  path = epath.Path(workdir) / 'config.json'
  return json.loads(path.read_text()) if path.exists() else None


_MISSING = '<absent>'


def config_differences(
  configs: list[Mapping[str, Any]], fields: Iterator[str] | None = None
) -> dict[str, list[Any]]:
  """{dotted field: [value in each config]} for the fields whose values differ."""
  flats = [flatten(c) for c in configs]
  keys = sorted(set().union(*flats)) if fields is None else list(fields)
  out = {}
  for key in keys:
    values = [f.get(key, _MISSING) for f in flats]
    if any(v != values[0] for v in values[1:]):
      out[key] = values
  return out


def describe_config_change(workdir: str, config: Any, fields: tuple[str, ...]) -> str:
  """'schedule.kind: increasing_batch → decaying_lr; ...' against workdir/config.json.

  Only fields under `fields` (the trajectory fields of the fingerprint) are named; ''
  when the workdir has no config.json (runs older than it).
  """
  saved = read_config_json(workdir)
  if saved is None:
    return ''
  new = config_dict(config)
  differences = config_differences(
    [
      {k: v for k, v in saved.items() if k in fields},
      {k: v for k, v in new.items() if k in fields},
    ]
  )
  return '; '.join(f'{k}: {a!r} → {b!r}' for k, (a, b) in differences.items())


# Time.


def format_duration(seconds: float) -> str:
  seconds = max(0, round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def cumulative_time(previous_s: float, session_start: float) -> float:
  """Training time across resumes: the checkpointed time plus this session's so far."""
  return float(previous_s) + (time.perf_counter() - session_start)


class Progress:
  """Progress, ETA and throughput in examples seen, the trainer's clock.

  Call `update(step, examples, phase)` after every dispatch; wrap evaluation and
  checkpointing in `with progress.timed('eval'):` so that they do not count as training
  time. `period_scalars()` at each log gives examples/s and step time since the last
  log; `throughput()` the per-phase numbers for the summary.
  """

  def __init__(
    self,
    *,
    total_examples: int,
    num_train_examples: int,
    total_steps: int | None,
    start_examples: int = 0,
    start_step: int = 0,
    every_secs: float = 10.0,
    window_secs: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
    log: Callable[..., None] = logging.info,
  ):
    self.total_examples = total_examples
    self.n = num_train_examples
    self.total_steps = total_steps
    self.every_secs = every_secs
    self.window_secs = window_secs
    self._clock = clock
    self._log = log
    now = clock()
    self._start = now
    self._last_report = now
    self._last_update = now
    self._excluded = 0.0  # timed() seconds since the last update
    self._timed_totals: dict[str, float] = collections.defaultdict(float)
    self._window = collections.deque([(now, start_examples)])
    self._period = [0, 0]  # examples, steps since period_scalars()
    self._period_start, self._period_excluded = now, 0.0
    self._phases: dict[int, list] = {}  # phase → [examples, steps, seconds]
    self._batch_sizes: dict[int, int] = {}
    self._step, self._examples = start_step, start_examples

  @contextlib.contextmanager
  def timed(self, name: str):
    start = self._clock()
    try:
      yield
    finally:
      elapsed = self._clock() - start
      self._excluded += elapsed
      self._period_excluded += elapsed
      self._timed_totals[name] += elapsed

  def update(self, step: int, examples: int, phase: int, batch_size: int) -> None:
    """After a dispatch that ended at `step`, `examples`, in `phase` of `batch_size`."""
    now = self._clock()
    seconds = max(0.0, now - self._last_update - self._excluded)
    self._last_update, self._excluded = now, 0.0
    d_examples, d_steps = examples - self._examples, step - self._step
    self._step, self._examples = step, examples
    self._period[0] += d_examples
    self._period[1] += d_steps
    self._batch_sizes[phase] = batch_size
    totals = self._phases.setdefault(phase, [0, 0, 0.0])
    totals[0] += d_examples
    totals[1] += d_steps
    totals[2] += seconds
    self._window.append((now, examples))
    while len(self._window) > 2 and now - self._window[1][0] >= self.window_secs:
      self._window.popleft()
    if now - self._last_report >= self.every_secs:
      self._last_report = now
      self._log('%s', self.line())

  def rate(self) -> float:
    """Recent examples per second of wall-clock (evaluation included), for the ETA."""
    (t0, e0), (t1, e1) = self._window[0], self._window[-1]
    return (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0

  def line(self) -> str:
    done, total = self._examples, self.total_examples
    rate = self.rate()
    remaining = max(0, total - done)
    eta = format_duration(remaining / rate) if rate > 0 else '?'
    steps = f'{self._step:,}' + (f'/{self.total_steps:,}' if self.total_steps else '')
    return (
      f'epoch {done / self.n:.2f}/{total / self.n:g} ({100 * done / total:.1f}% of '
      f'examples), step {steps}, {rate:,.0f} examples/s, '
      f'elapsed {format_duration(self._clock() - self._start)}, ETA {eta}'
    )

  def period_scalars(self) -> dict[str, float]:
    """examples_per_sec and step_time_ms of training since the previous call.

    Call it after the step's results were fetched (the metrics of the period), so that
    the time of dispatched but unfinished steps is not left out.
    """
    now = self._clock()
    (examples, steps), self._period = self._period, [0, 0]
    seconds = now - self._period_start - self._period_excluded
    self._period_start, self._period_excluded = now, 0.0
    if not steps or seconds <= 0:
      return {}
    return dict(
      zip(TIME_SCALARS, (examples / seconds, 1e3 * seconds / steps), strict=True)
    )

  def throughput(self) -> list[dict[str, Any]]:
    """Per phase trained in this session: examples, steps, seconds, examples/s,
    step time."""
    rows = []
    for phase, (examples, steps, seconds) in sorted(self._phases.items()):
      row = {
        'phase': phase,
        'batch_size': self._batch_sizes[phase],
        'examples': examples,
        'steps': steps,
        'train_s': seconds,
      }
      if seconds > 0 and steps:
        row['examples_per_sec'] = examples / seconds
        row['step_time_ms'] = 1e3 * seconds / steps
      rows.append(row)
    return rows

  def timed_totals(self) -> dict[str, float]:
    return dict(self._timed_totals)


def log_phase(segment: Any, plan: Any, step: int, end: int, decides: bool) -> None:
  """The phase that begins, in one line: its ibs.segments.Segment's batch split (its
  sharding.MicroBatchPlan `plan`), ε, m and steps (for a schedule that decides, its end
  is the budget's unless a decision comes first)."""
  p = segment.phase
  steps = (
    f'steps from {step} until a decision or, at most, {end}'
    if decides
    else f'steps {step}–{end}'
  )
  logging.info(
    f'Phase {segment.index}: batch {p.batch_size} = {plan.num_devices} devices × '
    f'{plan.accumulation} accumulation × {plan.micro_batch_size} micro-batch, lr '
    f'{p.learning_rate:g}, momentum {p.momentum:g}, {steps}.'
  )


def format_throughput(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return ''
  lines = [
    'throughput (this session)',
    f'{"phase":>5} {"batch":>7} {"steps":>9} {"train s":>9} {"examples/s":>12} '
    f'{"step ms":>9}',
  ]
  for r in rows:
    lines.append(
      f'{r["phase"]:>5} {r.get("batch_size", ""):>7} {r["steps"]:>9,} '
      f'{r["train_s"]:>9.1f} {r.get("examples_per_sec", 0):>12,.0f} '
      f'{r.get("step_time_ms", 0):>9.3f}'
    )
  return '\n'.join(lines)


# summary.json


def finish_summary(
  workdir: str, summary: dict[str, Any], trained_steps: int, write: bool = True
) -> dict[str, Any]:
  """Writes `summary` to workdir/summary.json; returns what was written.

  A rerun of a finished workdir (no step trained in this session) keeps the timings of
  the summary already there: its `wall_clock_s` is the time that produced the result,
  not the seconds the rerun took to evaluate it.
  """
  from etils import epath

  path = epath.Path(workdir) / 'summary.json'
  if trained_steps == 0 and path.exists():
    try:
      old = json.loads(path.read_text())
    except json.JSONDecodeError:
      old = {}
    if old.get('finished'):
      summary = {**summary, **{k: old[k] for k in TIMING_FIELDS if k in old}}
  if write:
    path.write_text(json.dumps(summary, indent=2))
  return summary


# Metric lines: short and grouped in the log, every scalar in TensorBoard.

# The longest metric log line (characters after the step): the full set is in
# TensorBoard, the log is for reading.
MAX_LINE = 150
# (group, [(tag, short name, format)]) in the order a reader looks for them.
_GROUPS = (
  ('', [('epoch', 'epoch', '.2f')]),
  ('train', [('train_loss', 'loss', '.4f'), ('train_accuracy', 'acc', '.4f')]),
  ('test', [('test_loss', 'loss', '.4f'), ('test_accuracy', 'acc', '.4f')]),
  (
    '',
    [
      ('learning_rate', 'ε', '.4g'),
      ('momentum', 'm', '.4g'),
      ('batch_size', 'B', ',.0f'),
      ('g_sgd', 'g', '.4g'),
      ('phase', 'phase', '.0f'),
    ],
  ),
  ('', [('examples_per_sec', 'examples/s', ',.0f'), ('step_time_ms', 'ms/step', '.3g')]),
)
# Shown only where they say something, or written out by `_gns_group`.
_QUIET = {
  'examples_seen',
  'parameter_updates',
  'nonfinite_updates',
  'gns/b_simple',
  'gns/grad_sq_norm',
  'gns/trace_cov',
}


class Unresolved:
  """How many logged noise-scale measurements left |G|² unresolved (estimate ≤ 0)."""

  def __init__(self):
    self.unresolved, self.measured = 0, 0


def _gns_group(scalars: Mapping[str, float], counter: Unresolved) -> str:
  """B_simple with its two terms; where |G|² is not resolved, that and the count."""
  if 'gns/b_simple' not in scalars:
    return ''
  g2, trace = scalars.get('gns/grad_sq_norm'), scalars.get('gns/trace_cov')
  if g2 is None or not math.isfinite(g2):
    return 'B_simple – (not measured yet)'
  counter.measured += 1
  if not g2 > 0:
    counter.unresolved += 1
    return (
      f'B_simple unresolved (|G|² estimate {g2:.3g} ≤ 0: noise dominates; '
      f'{counter.unresolved} of {counter.measured} logs)'
    )
  return f'B_simple {scalars["gns/b_simple"]:,.0f} (|G|² {g2:.3g}, tr(Σ) {trace:.3g})'


def metric_lines(
  step: int, scalars: Mapping[str, Any], counter: Unresolved | None = None
) -> list[str]:
  """The log lines of one write: `[step] group | group`, each ≤ MAX_LINE characters."""
  counter = counter or Unresolved()
  groups, used = [], set(_QUIET)
  for title, fields in _GROUPS:
    items = []
    for tag, short, spec in fields:
      if tag in scalars:
        used.add(tag)
        value = format(float(scalars[tag]), spec)
        items.append(f'{value} {short}' if '/' in short else f'{short} {value}')
    if items:
      groups.append(' '.join(([title] if title else []) + items))
  gns_text = _gns_group(scalars, counter)
  if gns_text:
    groups.append(gns_text)
  if scalars.get('nonfinite_updates'):
    groups.append(f'non-finite updates {int(scalars["nonfinite_updates"])}')
  for key in sorted(set(scalars) - used):
    value = scalars[key]
    groups.append(f'{key} {value:.4g}' if isinstance(value, float) else f'{key} {value}')
  prefix = f'[{step:,}] '
  lines, line = [], ''
  for group in groups:
    joined = f'{line} | {group}' if line else group
    if line and len(prefix) + len(joined) > MAX_LINE:
      lines.append(prefix + line)
      joined = group
    line = joined
  if line:
    lines.append(prefix + line)
  return lines


# The hyperparameters a reader identifies a run by (short names); all go to TensorBoard.
_KEY_HPARAMS = (
  ('dataset', ''),
  ('model', ''),
  ('optimizer', ''),
  ('schedule.kind', ''),
  ('schedule.learning_rate', 'ε '),
  ('schedule.batch_size', 'B '),
  ('schedule.momentum', 'm '),
  ('schedule.num_epochs', 'epochs '),
)


def hparams_line(hparams: Mapping[str, Any]) -> str:
  """One short line: the identifying fields; the rest are in config.json and HParams."""
  shown = ', '.join(f'{name}{hparams[k]}' for k, name in _KEY_HPARAMS if k in hparams)
  return f'hyperparameters: {shown} (all {len(hparams)} in config.json, HParams)'


# Logging.

# Warnings other libraries print on every normal run that the user can do nothing about.
_UNACTIONABLE_WARNINGS = (
  'Using custom data configuration',  # TFDS, for every builder config (MNIST-1D's)
  'has no dataset_info.json',  # TFDS, before a dataset is generated
)


class _QuietFilter(std_logging.Filter):
  """Keeps ibs's own INFO lines (the metric lines among them); others' only from
  WARNING up."""

  def __init__(self, own_dirs: tuple[str, ...]):
    super().__init__()
    self.own_dirs = own_dirs

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname or ''
    if record.levelno >= std_logging.WARNING:
      message = record.getMessage()
      return not any(s in message for s in _UNACTIONABLE_WARNINGS)
    return path.startswith(self.own_dirs)


def quiet_logging(verbosity: int = 0) -> None:
  """Other libraries below WARNING unless `verbosity` >= 1 (absl's --verbosity).

  Also sets the environment that keeps TensorFlow's and XLA's C++ start-up lines out
  (call before importing them): oneDNN's notice only concerns TensorFlow's own ops,
  which ibs uses for file I/O, not for arithmetic.
  """
  if verbosity >= 1:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  here = os.path.dirname(os.path.abspath(__file__))
  own = (here + os.sep, os.path.join(os.path.dirname(here), 'experiments') + os.sep)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietFilter) for f in handler.filters):
    handler.addFilter(_QuietFilter(own))


# Command lines: one error path for every entry point (ibs.main, ibs.calculator,
# ibs.tools.probe, ibs.tools.compare, ibs.data.prepare).

# Flags (and config fields) that name files or directories: `~` and `$VARS` in them are
# expanded, since bash leaves a `--flag=~/x` word alone (it would create a directory
# named `~` in the working directory).
PATH_FLAGS = (
  'config',
  'workdir',
  'data_dir',
  'manual_dir',
  'out',
  'plot',
  'root',
  'config.data_dir',
  'config.compilation_cache_dir',
)
# The directory holding ibs/ and configs/ (a checkout, or an editable install of one).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HINT = '(run with --verbosity=1 for the traceback)'


def is_remote(path: str) -> bool:
  """A path on another file system (gs://, s3://), not a local directory."""
  return '://' in os.fspath(path)


def expand_path(path: str) -> str:
  """`~` and `$VARS` expanded; gs:// and other URLs are left as they are."""
  return path if is_remote(path) else os.path.expandvars(os.path.expanduser(path))


def expand_path_arguments(argv: list[str], names=PATH_FLAGS) -> list[str]:
  """argv with `~` and `$VARS` expanded in the values of the path flags `names`."""
  out = list(argv)
  for i, arg in enumerate(out):
    name, sep, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or name not in names:
      continue
    if sep:
      out[i] = arg[: len(arg) - len(value)] + expand_path(value)
    elif i + 1 < len(out) and not out[i + 1].startswith('-'):
      out[i + 1] = expand_path(out[i + 1])
  return out


def resolve_config_path(argv: list[str]) -> list[str]:
  """argv with a relative --config path that is not under the working directory but is
  under the checkout (`configs/cifar10_wrn.py`) made absolute: configs load from any
  working directory."""
  out = list(argv)
  for i, arg in enumerate(out):
    prefix = '--config=' if arg.startswith('--config=') else None
    if arg == '--config' and i + 1 < len(out):
      i, prefix, arg = i + 1, '', out[i + 1]
    if prefix is None:
      continue
    path, sep, rest = arg[len(prefix) :].partition(':')
    candidate = os.path.join(_CHECKOUT, path)
    if (
      path
      and not os.path.isabs(path)
      and not os.path.exists(path)
      and os.path.exists(candidate)
    ):
      out[i] = f'{prefix}{candidate}{sep}{rest}'
  return out


def requested_verbosity(argv: list[str]) -> int:
  """absl's --verbosity (or -v) as written in argv, for errors before flags are parsed."""
  for i, arg in enumerate(argv):
    name, sep, value = arg.lstrip('-').partition('=')
    if arg.startswith('-') and name in ('verbosity', 'v'):
      value = value if sep else (argv[i + 1] if i + 1 < len(argv) else '0')
      try:
        return int(value)
      except ValueError:
        return 0
  return 0


def _config_argument(argv: list[str]) -> str:
  """The raw --config argument (the flag keeps it only once the file has loaded)."""
  for i, arg in enumerate(argv):
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        return arg[len(prefix) :]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def config_file_message(argv: list[str], cause: BaseException) -> str:
  """Why --config did not load: no such file (with the nearest name), or its error."""
  import difflib

  path = _config_argument(argv).split(':', 1)[0]
  if path and not os.path.exists(path):
    folder = os.path.dirname(path) or '.'
    names = os.listdir(folder) if os.path.isdir(folder) else []
    close = difflib.get_close_matches(os.path.basename(path), names, n=1)
    hint = (
      f'Did you mean {os.path.join(os.path.dirname(path), close[0])}?'
      if close
      else f'The configs are in {os.path.join(_CHECKOUT, "configs")}.'
    )
    return f'--config={path}: no such file. {hint}'
  while cause.__cause__ is not None:
    cause = cause.__cause__
  last = str(cause).strip().splitlines()[-1:] or ['']
  return f'--config={path} could not be loaded: {type(cause).__name__}: {last[0]}'


def _override_message(argv: list[str], text: str) -> str | None:
  """A misspelled `--config.a.b=v` field: its name, ml_collections' nearest, the fix."""
  import re

  match = re.search(r'(\w+)', text)  # KeyError text: "'batchsize'\nDid you mean ..."
  if not match:
    return None
  wrong = match.group(1)
  suggestion = re.search(r'Did you mean "(\w+)" instead of', text)
  for arg in argv:
    name, sep, value = arg.lstrip('-').partition('=')
    parts = name.split('.')
    if not (arg.startswith('-') and parts[0] == 'config' and wrong in parts[1:]):
      continue
    parent = '.'.join(parts[: parts.index(wrong)])
    message = f'--{name}: {parent} has no field {wrong!r}.'
    if suggestion:
      fixed = '.'.join(suggestion.group(1) if p == wrong else p for p in parts)
      return f'{message} Did you mean --{fixed}{sep}{value}?'
    return f'{message} The fields are in the file given to --config.'
  return None


def user_error_message(e: BaseException, argv: list[str]) -> str | None:
  """The one line for a mistake made on the command line, or None if `e` is not one.

  absl's flag errors (a missing required flag, an unknown flag, a value of the wrong
  type), ml_collections' (a misspelled --config.field, a config file that is not there
  or fails to load, a variant it refuses) and absl's UsageError.
  """
  import re

  from absl import app, flags

  text = str(e).strip()
  if isinstance(e, KeyError | AttributeError):  # ml_collections: an unknown field
    return _override_message(argv, text)
  if isinstance(e, OSError) and (
    'Configuration is not available' in text or 'Failed loading config file' in text
  ):
    return config_file_message(argv, e)
  if isinstance(e, app.UsageError):
    return text
  if not isinstance(e, flags.Error):
    return None
  missing = re.findall(r'Flag --(\w+) must have a value other than None', text)
  if missing:
    if len(missing) == 1:
      return f'missing --{missing[0]}: {flags.FLAGS[missing[0]].help}'
    return (
      f'missing {", ".join(f"--{m}" for m in missing)} (--helpshort says what each is)'
    )
  if 'Error whilst parsing config file' in text:
    # A ValueError or TypeError of get_config (a variant it refuses): its own message.
    last = text.splitlines()[-1].strip()
    reason = re.sub(r'^\w+(Error|Exception): ', '', last)
    return f'--config={_config_argument(argv)}: {reason}'
  if isinstance(e, flags.UnrecognizedFlagError):
    return f'{text.splitlines()[0]} (--helpshort lists the flags)'
  return ' '.join(text.split())


def _exit_with(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  print(_HINT, file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (app.run's `flags_parser`) with the one error path.

  Paths are expanded first (`expand_path_arguments`); a mistake in the flags ends in
  `error: <one line>` and exit status 2, the traceback only with --verbosity=1.
  """
  from absl import flags

  typed = expand_path_arguments(argv)
  try:
    return flags.FLAGS(resolve_config_path(typed))
  except Exception as e:
    message = user_error_message(e, typed)
    if message is None or requested_verbosity(argv) >= 1:
      raise
    _exit_with(message)
    raise  # unreachable: for type checkers


@contextlib.contextmanager
def one_line_errors(
  verbosity: int, is_user_error: Callable[[BaseException], bool] = lambda e: False
) -> Iterator[None]:
  """A mistake the user can fix (`is_user_error`, or a command-line mistake that
  `user_error_message` knows) raised inside ends the command with `error: <message>`, a
  hint, and exit status 2; the traceback only at --verbosity >= 1. Anything else
  propagates with its traceback: it is ibs's bug or the machine's. An error marked
  `exit_at_once` (ibs.durability.checkpoint.SaveError) exits without the interpreter's
  teardown, so that its line stays the last."""
  try:
    yield
  except Exception as e:
    if verbosity >= 1:
      raise
    message = user_error_message(e, sys.argv)
    if message is None:
      if not is_user_error(e):
        raise
      message = str(e).strip()
    if getattr(e, 'exit_at_once', False):  # a full disk: the teardown's writes would fail
      print(f'error: {message}', file=sys.stderr, flush=True)
      print(_HINT, file=sys.stderr, flush=True)
      logging.flush()
      sys.stdout.flush()
      os._exit(EXIT_USER_ERROR)
    _exit_with(message)


def run_command(
  main: Callable[[list[str]], Any],
  is_user_error: Callable[[BaseException], bool] = lambda e: False,
  argv: list[str] | None = None,
) -> None:
  """absl's app.run of `main` on the one error path: flags parsed by `parse_flags`,
  `main` run inside `one_line_errors`, after `quiet_logging`."""
  from absl import app, flags

  def wrapped(args):
    verbosity = flags.FLAGS.verbosity
    quiet_logging(verbosity)
    with one_line_errors(verbosity, is_user_error):
      return main(args)

  app.run(wrapped, argv=sys.argv if argv is None else argv, flags_parser=parse_flags)


def format_switches(switches: list[dict[str, Any]] | None) -> list[str]:
  """The schedule's switches, one line each (none for a fixed schedule)."""
  if not switches:
    return []
  lines = ['', f'{len(switches)} switch(es) decided by measurement']
  lines += [
    f'  step {s["step"]:,} at epoch {s["epoch"]:.2f} ({s["examples"]:,} examples): batch '
    f'{s["batch_size"]}, lr {s["learning_rate"]:g}'
    + (f' ({s["why"]})' if 'why' in s else '')
    for s in switches
  ]
  return lines


def format_summary(summary: dict[str, Any], phase_table: str) -> str:
  """The summary a finished run prints: final metrics, the phases as run (`phase_table`,
  ibs.noise_scale.format_table), the switches a schedule decided, throughput."""
  lines = [
    '',
    '=' * 78,
    f'final test accuracy {summary["test_accuracy"]:.4f}  (test loss '
    f'{summary["test_loss"]:.4f})',
    f'parameter updates {summary["parameter_updates"]:,}   examples seen '
    f'{summary["examples_seen"]:,} ({summary["epoch"]:.2f} epochs)',
    f'wall-clock {summary["wall_clock_s"]:.1f} s '
    f'(compilation {summary["compile_s"]:.1f} s)',
    '',
    phase_table,
    *format_switches(summary.get('switches')),
    '',
    format_throughput(summary.get('throughput', [])),
    '=' * 78,
  ]
  return '\n'.join(lines)
