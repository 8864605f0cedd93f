"""The coordination service in its own process, so that losing process 0 is a lost peer.

`jax.distributed.initialize` starts JAX's coordination service inside process 0. When
process 0 dies, every other process's client sees the service's socket close within
milliseconds and its error-polling thread calls the runtime's missed-heartbeat callback,
whose default is a fatal log: the survivor aborts (rc −6, a C++ stack dump), long before
the peer watchdog (ibs/durability/preemption.py) can say which peer was lost. That
callback cannot be replaced from Python in jaxlib 0.10: the runtime calls it with an
`absl::Status` that nanobind cannot convert, and the conversion's `std::bad_cast`
terminates the process the same way. Nor can error polling be turned off from Python.

So the service must outlive process 0's training. `initialize` lets jax.distributed do
everything it does (cluster detection, the client, the preemption notifier) except
start the service in-process: the service starts in a child process with the same
arguments, and jax gets a handle whose `shutdown` stops the child. The child ignores
SIGINT and SIGTERM (a preemption signal is the runtime's to handle; the child must live
until every process has saved and passed the shutdown barrier) and ends:

- when process 0 shuts the runtime down (its normal exit, after the shutdown barrier
  every process takes): at once, as the in-process service would;
- when process 0 dies (its end of the pipe closes without a word): after
  LINGER_S, time for the survivors' watchdogs to find process 0 silent and exit 76
  with one line. The service itself declares process 0 dead only after the heartbeat
  timeout (100 s), later still.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from ibs.durability import preemption

# How long the service outlives a process 0 that died: the watchdog's timeout and its
# margin (main waits PEER_TIMEOUT_S + 5 periods for its verdict).
LINGER_S = preemption.PEER_TIMEOUT_S + 15.0
_STOP = b'stop\n'


class ServiceProcess:
  """Handle of the child that hosts the coordination service; jax calls `shutdown`."""

  def __init__(self, process: subprocess.Popen):
    self.process = process

  def shutdown(self) -> None:
    with contextlib.suppress(OSError, ValueError):
      self.process.stdin.write(_STOP)
      self.process.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
      self.process.wait(timeout=30)


def _start_service(
  address: str,
  num_nodes: int,
  heartbeat_timeout: int | None = None,
  shutdown_timeout: int | None = None,
  recoverable: bool | None = None,
  **unknown,
) -> ServiceProcess:
  """Starts the service in a child with jax's arguments; returns once it listens."""
  if unknown:  # A jaxlib that passes more than this version: the arguments are its own.
    raise TypeError(f'unexpected service arguments {sorted(unknown)}')
  args = [
    address,
    str(num_nodes),
    str(heartbeat_timeout or 100),
    str(shutdown_timeout or 300),
    '1' if recoverable else '0',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}  # never the accelerators
  process = subprocess.Popen(
    [sys.executable, '-m', 'ibs.durability.coordinator', *args],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=None,
    env=env,
  )
  line = process.stdout.readline()
  if line.strip() != b'ready':
    process.wait()
    raise RuntimeError(
      f'The coordination service could not start on {address} (exit status '
      f'{process.returncode}); is the port in use?'
    )
  return ServiceProcess(process)


def initialize(**kwargs) -> None:
  """jax.distributed.initialize(**kwargs), with process 0's service in a child process."""
  import jax
  from jax._src import distributed

  runtime = distributed._jax
  in_process = runtime.get_distributed_runtime_service
  runtime.get_distributed_runtime_service = _start_service
  try:
    jax.distributed.initialize(**kwargs)
  finally:
    runtime.get_distributed_runtime_service = in_process


def _serve(argv: list[str]) -> None:
  """The child: hosts the service until told to stop, or LINGER_S after the
  parent dies."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  from jax._src.lib import _jax

  address, num_nodes, heartbeat, shutdown, recoverable = argv
  service = _jax.get_distributed_runtime_service(
    address,
    int(num_nodes),
    heartbeat_timeout=int(heartbeat),
    shutdown_timeout=int(shutdown),
    recoverable=recoverable == '1',
  )
  sys.stdout.buffer.write(b'ready\n')
  sys.stdout.flush()
  word = sys.stdin.buffer.readline()  # b'' when the parent died
  if word != _STOP:
    time.sleep(LINGER_S)
  service.shutdown()
  os._exit(0)


if __name__ == '__main__':
  _serve(sys.argv[1:])
