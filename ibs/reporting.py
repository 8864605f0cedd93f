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
* `one_line_errors`: the command lines' (ibs.main, ibs.tools.probe) mistakes a user can fix
  end in one line and exit status 2.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging as std_logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
from etils import epath

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
  path = epath.Path(workdir) / 'config.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + '\n')
  return os.fspath(path)


def read_config_json(workdir: str) -> dict[str, Any] | None:
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
    total_steps: int,
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

  def set_totals(self, total_steps: int, total_examples: int) -> None:
    """New totals for the progress line: an adaptive schedule's switch changes them."""
    self.total_steps, self.total_examples = total_steps, total_examples

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
    remaining = total - done
    eta = format_duration(remaining / rate) if rate > 0 else '?'
    return (
      f'epoch {done / self.n:.2f}/{total / self.n:g} ({100 * done / total:.1f}% of '
      f'examples), step {self._step:,}/{self.total_steps:,}, {rate:,.0f} examples/s, '
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
    """Per phase trained in this session: examples, steps, seconds, examples/s, step time."""
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


# Logging.

# Warnings other libraries print on every normal run that the user can do nothing about.
_UNACTIONABLE_WARNINGS = (
  'Using custom data configuration',  # TFDS, for every builder config (MNIST-1D's)
  'has no dataset_info.json',  # TFDS, before a dataset is generated
)


class _QuietFilter(std_logging.Filter):
  """Keeps ibs's own INFO lines and the metric lines; others' only from WARNING up."""

  def __init__(self, own_dirs: tuple[str, ...]):
    super().__init__()
    self.own_dirs = own_dirs

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname or ''
    if record.levelno >= std_logging.WARNING:
      message = record.getMessage()
      return not any(s in message for s in _UNACTIONABLE_WARNINGS)
    if path.startswith(self.own_dirs):
      return True
    # clu's LoggingWriter: the scalars of every log period and evaluation.
    return path.endswith(os.path.join('metric_writers', 'logging_writer.py'))


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


@contextlib.contextmanager
def one_line_errors(
  verbosity: int, is_user_error: Callable[[BaseException], bool]
) -> Iterator[None]:
  """A mistake the user can fix (`is_user_error`) raised inside ends the command with
  `error: <message>`, a hint, and exit status 2; the traceback only at --verbosity >= 1.
  Anything else propagates with its traceback: it is ibs's bug or the machine's. An
  error marked `exit_at_once` (ibs.durability.checkpoint.SaveError) exits without the
  interpreter's teardown, so that its line stays the last."""
  try:
    yield
  except Exception as e:
    if verbosity >= 1 or not is_user_error(e):
      raise
    print(f'error: {str(e).strip()}', file=sys.stderr, flush=True)
    print('(run with --verbosity=1 for the traceback)', file=sys.stderr, flush=True)
    if getattr(e, 'exit_at_once', False):  # a full disk: the teardown's writes would fail
      logging.flush()
      sys.stdout.flush()
      os._exit(EXIT_USER_ERROR)
    sys.exit(EXIT_USER_ERROR)
