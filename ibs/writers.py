"""The run's metric writer: short log lines, and every scalar in TensorBoard.

`create_writer` builds it: the log lines through absl (`MetricLines`, formatted by
ibs/reporting.py) and, on the process that writes, TensorBoard event files: through
tensorboardX in a local workdir, with no TensorFlow in the process, or clu's
SummaryWriter in a remote one (docs/DESIGN.md decision 9). `StartingWriter` builds it
in a thread beside training, so that nothing it imports is on the run's path.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from ibs import tf_setup
from ibs.reporting import Unresolved, hparams_line, is_remote, metric_lines


class StartingWriter:
  """The run's metric writer (`create_writer`), built in a thread; writes made before it
  is ready wait, in order, and reach it as soon as it is.

  Built before training, a writer that imports TensorFlow (clu's, for a remote
  workdir: `create_writer`; 2.3 to 3.0 s on 2 cores, ibs/tf_setup.py) put that import
  on the path of every run; built here, it happens beside training (docs/BENCHMARKS.md,
  "No compile in the loop"). The log lines written meanwhile appear when the writer is
  ready, none lost. A writer that fails to build raises its error at the next call. Two
  threads must not import the same modules at once (they can see them
  half-initialised): the loop's thread imports nothing of the writers' while this one
  does.
  """

  def __init__(self, create: Callable[[], Any]):
    self._lock = threading.Lock()
    self._waiting: list[tuple[str, tuple[Any, ...]]] = []
    self._writer: Any = None
    self._error: BaseException | None = None
    self._thread = threading.Thread(
      target=self._build, args=(create,), name='ibs_start_writer', daemon=True
    )
    self._thread.start()

  def _build(self, create: Callable[[], Any]) -> None:
    try:
      writer = create()
    except BaseException as e:  # raised in the loop's thread, at its next call
      with self._lock:
        self._error = e
      return
    with self._lock:
      for name, args in self._waiting:
        getattr(writer, name)(*args)
      self._waiting.clear()
      self._writer = writer

  def _ready(self) -> Any:
    """The built writer, waiting for it (or raising the error of its build)."""
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._writer

  def _write(self, name: str, *args: Any) -> None:
    with self._lock:
      if self._error is not None:
        raise self._error
      if self._writer is None:
        self._waiting.append((name, args))
        return
    getattr(self._writer, name)(*args)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write('write_scalars', step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._write('write_hparams', hparams)

  def flush(self) -> None:
    self._ready().flush()

  def close(self) -> None:
    self._ready().close()


class MetricLines:
  """The short log lines (`metric_lines`, `hparams_line`) through absl logging."""

  def __init__(self):
    self.counter = Unresolved()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for line in metric_lines(step, scalars, self.counter):
      logging.info('%s', line)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info('%s', hparams_line(hparams))

  def flush(self) -> None:
    """Nothing buffered: absl writes each line."""

  def close(self) -> None:
    """Nothing to release."""


class TensorBoardX:
  """Every scalar and the hparams, in TensorBoard event files written by tensorboardX.

  tensorboardX writes the event files without TensorFlow, whose import is the largest
  of a run (2.05 s against 0.02 s for tensorboardX on 2 cores, `python -m
  experiments.trace_startup --tensorflow`; docs/BENCHMARKS.md, "TensorBoard without
  TensorFlow"). Its own thread writes the events (a queue, flushed every 120 s, as
  TensorFlow's writer, and at `flush` and `close`). Scalars are `simple_value`s, which
  TensorBoard and ibs/tools/curves.py read as they read clu's tensor summaries; the
  hparams are the HParams plugin's summaries in the run's own event file, as clu
  writes them.
  """

  def __init__(self, workdir: str):
    import tensorboardX

    self._writer = tensorboardX.SummaryWriter(workdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, float(value), step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboardX import summary

    experiment, session_start, _ = summary.hparams(dict(hparams), {})
    for part in (experiment, session_start):  # as clu: no end, the run goes on
      self._writer.file_writer.add_summary(part)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class Writers:
  """Several writers written, flushed and closed together, in order: clu's MultiWriter,
  which a local run cannot import without TensorFlow (`clu.metric_writers` imports it
  for every class of the package)."""

  def __init__(self, writers: list[Any]):
    self.writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def create_writer(workdir: str, just_logging: bool = False) -> Writers:
  """The log lines and (on the process that writes) every scalar in TensorBoard.

  A local workdir gets tensorboardX's event files, with no TensorFlow in the process
  (`TensorBoardX`). A remote one (gs://, s3://) gets clu's asynchronous SummaryWriter:
  TensorFlow's file system writes there with appends, where tensorboardX would upload
  the whole file again at every flush.
  """
  writers: list[Any] = [MetricLines()]
  if just_logging:
    return Writers(writers)
  if not is_remote(workdir):
    return Writers([*writers, TensorBoardX(os.fspath(workdir))])
  tf_setup.import_tensorflow()  # before clu's writer runs TensorFlow's first operation
  from clu import metric_writers  # imports TensorFlow

  summary = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir)))
  return Writers([*writers, summary])
