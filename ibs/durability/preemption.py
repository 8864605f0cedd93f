"""Preemption and lost peers: exit statuses, signal handling, the peer watchdog.

Exit statuses of `python -m ibs.main` (README.md, docs/RELIABILITY.md):

  0    finished
  75   preempted (SIGTERM or SIGINT): a checkpoint of the step reached was saved; rerun
       the same command to resume (EX_TEMPFAIL: retry)
  76   a peer process was lost (multi-process runs); rerunning resumes from the last
       checkpoint
  128 + signal number (130, 143)   a second SIGINT/SIGTERM: exited at once, no save

Before training (imports, restoring, compiling): SIGTERM and SIGINT exit 75 at once
with one line; nothing new was trained, the last checkpoint is kept.

Single process: SIGTERM and SIGINT set a flag; the loop ends the dispatch in flight,
saves that step, waits for the save and returns `preempted`; main exits 75. A second
signal exits at once.

Multi-process: JAX's distributed runtime owns SIGTERM (its preemption notifier tells the
coordination service, which tells every process). The loop asks
`multihost_utils.reached_preemption_sync_point` once per dispatch with the dispatch
count; the runtime picks a count every process reaches, so every process saves the same
step. SIGINT is forwarded to the runtime as SIGTERM (a second SIGINT exits at once).

A lost peer: a watchdog thread in every process bumps a counter in the coordination
service's key-value store once a second and reads the others'; a peer whose counter
stands still for PEER_TIMEOUT_S (30 s; IBS_PEER_TIMEOUT_S) is lost: the watchdog prints
one line naming it and exits 76, before the runtime's heartbeat timeout (100 s) would
abort the process with a C++ stack dump (its Python callback for that cannot be used:
jaxlib cannot pass it the status). A collective that fails because its peer is gone
(gloo: "Connection reset by peer") waits for the watchdog's verdict (main). On XLA:CPU
the loops wait for each dispatch before issuing the next (`dispatch_one_at_a_time`):
a collective queued behind the interrupted one would abort the process in gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging

EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76


def _client():
  from jax._src import distributed  # the runtime's client, if any

  return distributed.global_state.client


class PreemptionHandler:
  """Turns SIGTERM/SIGINT into a save-and-exit at the end of the current dispatch."""

  def __init__(self, process_count: int = 1):
    self.multiprocess = process_count > 1
    self.signal_name: str | None = None
    # False until the loop's first dispatch is issued: before it (restoring, compiling)
    # there is nothing new to save, and a signal exits at once (`exit_before_training`).
    self.training = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> PreemptionHandler:
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals reach only the main thread: leave them alone.
    signals = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():  # Trained: not start-up any more.
      start_up = previous is None or previous is _exit_before_training
      signal.signal(sig, signal.SIG_DFL if start_up else previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      print(
        f'{name} again: exiting at once without saving (status {128 + signum}); a rerun '
        'resumes from the last checkpoint.',
        file=sys.stderr,
        flush=True,
      )
      os._exit(128 + signum)
    if not self.training:
      exit_before_training(name)
    self.signal_name = name
    print(
      f'{name} received: finishing the current dispatch, then saving a checkpoint '
      f'and exiting with status {EXIT_PREEMPTED}. Send it again to exit at once.',
      file=sys.stderr,
      flush=True,
    )
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # To the runtime's preemption notifier.

  def should_stop(self, dispatch: int) -> bool:
    """Whether to save and stop after `dispatch` (counted alike on every process)."""
    if self.multiprocess:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(dispatch):
        self.signal_name = self.signal_name or 'SIGTERM'
        return True
      return False
    return self.signal_name is not None


def exit_before_training(name: str) -> None:
  """A signal during start-up (imports, restore, compilation): nothing was trained since
  the last checkpoint, which stays as it was; exits EXIT_PREEMPTED at once (a compile
  can take minutes, more than a preemption's grace period)."""
  print(
    f'{name} received before training began: nothing new to save (the last checkpoint '
    f'is kept); exiting with status {EXIT_PREEMPTED}. Rerun the same command to resume.',
    file=sys.stderr,
    flush=True,
  )
  logging.flush()
  os._exit(EXIT_PREEMPTED)


def exit_on_signals_until_training() -> None:
  """Until train_and_evaluate's PreemptionHandler takes over: SIGTERM and SIGINT exit
  at once with EXIT_PREEMPTED and one line (main calls it first; before it, a signal
  ends the process with Python's default: -15, or a KeyboardInterrupt traceback)."""
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, _exit_before_training)


def _exit_before_training(signum: int, frame: Any) -> None:
  exit_before_training(signal.Signals(signum).name)


def exit_preempted() -> None:
  """Exits EXIT_PREEMPTED once the checkpoint is saved and the logs are flushed.

  One process: at once (os._exit), skipping the interpreter's teardown of TensorFlow and
  XLA, seconds a preemption's grace period can use better. Several: through sys.exit,
  whose atexit handler takes the runtime's shutdown barrier with the other processes.
  """
  import jax

  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.process_count() == 1:
    os._exit(EXIT_PREEMPTED)
  sys.exit(EXIT_PREEMPTED)


# ----------------------------------------------------------------------- lost peers


# A peer silent this long is lost. JAX's runtime declares a task dead after its heartbeat
# timeout (jax.distributed.initialize's default: 100 s; seen at 0.65 of it) and then
# aborts the survivors with a C++ stack dump: this must come well before.
PEER_TIMEOUT_S = float(os.environ.get('IBS_PEER_TIMEOUT_S', '30'))


class _Watchdog:
  """Each process bumps a counter in the coordination service's key-value store every
  `period_s`; a peer whose counter stands still for PEER_TIMEOUT_S is lost."""

  def __init__(self, process_index: int, process_count: int, period_s: float):
    self.index, self.count, self.period_s = process_index, process_count, period_s
    self.stopped = threading.Event()
    self.thread = threading.Thread(
      target=self._run, name='ibs-peer-watchdog', daemon=True
    )

  def _run(self) -> None:
    client = _client()
    peers = [p for p in range(self.count) if p != self.index]
    last: dict[int, tuple[str | None, float]] = {
      p: (None, time.monotonic()) for p in peers
    }
    beat = 0
    while not self.stopped.wait(self.period_s):
      beat += 1
      try:
        client.key_value_set(
          f'ibs/heartbeat/{self.index}', str(beat), allow_overwrite=True
        )
      except Exception as e:  # the coordinator itself is gone
        if self.stopped.is_set():
          return
        exit_peer_lost({0}, f'the coordination service is unreachable: {_short(e)}')
      now = time.monotonic()
      for p in peers:
        try:
          value = client.key_value_try_get(f'ibs/heartbeat/{p}')
        except Exception:  # not written yet
          value = None
        if value != last[p][0]:
          last[p] = (value, now)
      lost = {
        p
        for p, (_, seen) in last.items()
        if now - seen > PEER_TIMEOUT_S and not _finished(client, p)
      }
      if lost and not self.stopped.is_set():
        exit_peer_lost(lost, f'silent for over {PEER_TIMEOUT_S:g} s')


_watchdog: _Watchdog | None = None


def start_peer_watchdog(period_s: float = 1.0) -> None:
  """Watches the other processes of a jax.distributed run (no-op for one process)."""
  global _watchdog
  import jax

  if jax.process_count() == 1 or _client() is None or _watchdog is not None:
    return
  _watchdog = _Watchdog(jax.process_index(), jax.process_count(), period_s)
  _watchdog.thread.start()


def stop_peer_watchdog() -> None:
  """Marks this process finished (its exit is not a loss) and stops watching."""
  global _watchdog
  if _watchdog is None:
    return
  with contextlib.suppress(Exception):
    _client().key_value_set(f'ibs/finished/{_watchdog.index}', '1', allow_overwrite=True)
  _watchdog.stopped.set()
  _watchdog = None


def _finished(client, process: int) -> bool:
  try:
    return client.key_value_try_get(f'ibs/finished/{process}') == '1'
  except Exception:  # not set
    return False


def _short(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return text if len(text) < 160 else text[:157] + '...'


_PEER_FAILURE = ('gloo', 'connection reset', 'connection closed', 'unavailable', 'socket')


def await_peer_watchdog(error: BaseException) -> None:
  """After an error in a multi-process run: lets the watchdog name a lost peer first.

  A collective whose peer died fails at once (gloo: "Connection reset by peer"), long
  before the peer's heartbeats are missed: for such an error, wait for the watchdog's
  verdict (it exits the process with one line). Returns, for the caller to re-raise,
  when the error is another, or no peer was lost.
  """
  if _watchdog is not None and any(k in str(error).lower() for k in _PEER_FAILURE):
    logging.vlog(1, 'A collective failed, waiting for the peer watchdog: %s', error)
    _watchdog.stopped.wait(PEER_TIMEOUT_S + 5 * _watchdog.period_s)


def dispatch_one_at_a_time() -> bool:
  """Whether the loops must wait for each dispatch to finish before issuing the next.

  True across processes on XLA:CPU, whose cross-process collectives go through gloo
  (XLA gives every gloo collective the same tag). With dispatches queued behind the
  one a peer's death interrupts, the survivor aborted in gloo's own thread
  (`gloo::EnforceNotMet ... Received data size doesn't match expected size. 8 vs 4`,
  rc -6, a C++ stack dump) 0.2-0.3 s after the kill, in most kills inside training,
  long before the watchdog could speak. With nothing queued, the interrupted collective
  either fails as a Python exception (gloo: "Connection reset by peer"; main then waits
  for the watchdog) or blocks, and the watchdog names the lost peer and exits 76, in
  every kill measured (docs/RELIABILITY.md). Single process, TPU, GPU: False, nothing
  waits.
  """
  import jax  # noqa: PLC0415

  return jax.process_count() > 1 and jax.default_backend() == 'cpu'


def exit_peer_lost(lost: set[int], why: str = '') -> None:
  """Prints one line naming the lost processes and exits EXIT_PEER_LOST at once.

  os._exit: the runtime's own shutdown would wait on the dead peer and then abort.
  """
  import jax

  names = ', '.join(str(p) for p in sorted(lost))
  print(
    f'ibs: process {jax.process_index()} lost peer process(es) {names}'
    f'{f" ({why})" if why else ""}; stopping. Rerunning the same command resumes from '
    f'the last checkpoint (exit status {EXIT_PEER_LOST}).',
    file=sys.stderr,
    flush=True,
  )
  logging.flush()
  time.sleep(0.1)
  os._exit(EXIT_PEER_LOST)
