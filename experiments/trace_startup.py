r"""Where the default run's start-up goes: every program's trace, lowering and compile.

Builds configs/default.py's run as training builds it (`setup.build` in its BENCH mode:
the first phase's programs waited for, the later phases' compiling beside), waits for
every program, and prints one line per stage of JAX's compile pipeline, from its own
events (`jax.monitoring` time spans): start and end in seconds from the build's start,
the thread, the stage (trace: Python tracing to a jaxpr; lower: jaxpr to an MLIR module,
both holding the GIL; compile: XLA's backend compile) and the program. The last line
gives when the build returned, which is when training could start. The imports of the
two TensorBoard writers (clu's, which imports TensorFlow, for a remote workdir, and
tensorboardX for a local one) are timed apart, each in a fresh process (`--tensorflow`).

  python -m experiments.trace_startup
  python -m experiments.trace_startup --gns=off
  python -m experiments.trace_startup --tensorflow
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
from jax import monitoring

from configs import default
from ibs import setup

STAGES = {
  '/jax/core/compile/jaxpr_trace_duration': 'trace',
  '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
  '/jax/core/compile/backend_compile_duration': 'compile',
}
_spans: list[tuple[float, float, str, str, str]] = []


def _record(event: str, start: float, end: float, **kwargs) -> None:
  if event in STAGES:
    name = threading.current_thread().name
    _spans.append((start, end, name, STAGES[event], str(kwargs.get('fun_name', ''))))


def timeline(gns: bool, batch_sizes: list[int] | None = None):
  """One build of the default run's steps (every phase's, or `batch_sizes`'), waited
  for: (its compile-pipeline spans, seconds from its start, as (start, end, thread,
  stage, program); when the build returned; the run)."""
  config = default.get_config()
  config.gns.enabled = gns
  _spans.clear()
  monitoring.register_event_time_span_listener(_record)
  start = time.time()  # the events' clock
  run = setup.build(config, None, setup.Mode.BENCH, batch_sizes=batch_sizes)
  returned = time.time() - start
  for train_step in run.steps.values():
    train_step.result()
  monitoring.unregister_event_time_span_listener(_record)
  spans = [(s - start, e - start, *rest) for s, e, *rest in sorted(_spans)]
  return spans, returned, run


def import_s(module: str) -> float:
  """Seconds to import `module` in a fresh process that has imported JAX and flax, as
  `ibs.main` has by then."""
  code = (
    'import time, jax, flax; t = time.perf_counter(); '
    f'import {module}; print(time.perf_counter() - t)'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=True
  )
  return float(out.stdout.split()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gns', default='on', choices=('on', 'off'))
  parser.add_argument('--tensorflow', action='store_true', help='time its import')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs')
  if args.tensorflow:
    # clu's writers (a remote workdir) import TensorFlow; tensorboardX (a local one) not.
    for module in ('clu.metric_writers', 'tensorboardX'):
      print(f'import {module}: {import_s(module):.2f} s')
    return
  spans, returned, _ = timeline(args.gns == 'on')
  print(f'{"start":>6} {"end":>6}  {"thread":<20} {"stage":<8} program')
  for start, end, thread, stage, fun in spans:
    if end - start >= 0.05:  # the stages worth reading
      print(f'{start:6.2f} {end:6.2f}  {thread:<20} {stage:<8} {fun}')
  print(f'{returned:6.2f}         the build returns: training could start')


if __name__ == '__main__':
  main()
