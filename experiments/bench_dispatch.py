r"""Time per update of the default run's step against K, the updates per dispatch.

`config.steps_per_dispatch` K sets how many updates one call of the compiled step runs
(a `lax.fori_loop`). At a small batch an update is short on CPU, and what a call costs
the host (the layout of K batches, the executable's argument handling, the return) is a
visible share of it. This builds the default config's step for one batch size once per
K (`ibs.setup.build`, `Mode.BENCH`, one device, as training builds it, the noise scale
on), then times every K in turn, repetition by repetition, in one process, so that
load from other processes falls on all alike. Each timing runs about `--updates`
updates as training calls the step, `step(state, K host batches, metrics)`, and waits
for the last. Prints per K the median milliseconds per update and the median of the
per-repetition ratios to the first K.

  python -m experiments.bench_dispatch --steps_per_dispatch=8,32,64 --batch_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import numpy as np

from configs import default
from ibs import setup


def build(batch_size: int, steps_per_dispatch: int):
  """The default run's compiled step for `batch_size` with K updates per dispatch."""
  config = default.get_config()
  config.steps_per_dispatch = steps_per_dispatch
  run = setup.build(
    config,
    None,
    setup.Mode.BENCH,
    batch_sizes=[batch_size],
    devices=jax.devices()[:1],
  )
  return run.steps[batch_size].result(), run.state, run.metrics, run.spec.input_shape


def main(argv=None) -> dict[int, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps_per_dispatch', default='8,32,64', help='the K to time')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--updates', type=int, default=3200, help='per timing')
  parser.add_argument('--repetitions', type=int, default=9)
  args = parser.parse_args(argv)
  ks = [int(k) for k in args.steps_per_dispatch.split(',')]
  rng = np.random.default_rng(0)
  runs = {}
  for k in ks:
    step, state, metrics, shape = build(args.batch_size, k)
    batches = [
      {
        'input': rng.normal(size=(args.batch_size, *shape)).astype(np.float32),
        'label': rng.integers(0, 10, args.batch_size).astype(np.int32),
      }
      for _ in range(k)
    ]
    runs[k] = [step, state, metrics, batches]
  times = {k: [] for k in ks}
  for repetition in range(args.repetitions + 1):  # the first warms up
    for k, run in runs.items():
      step, state, metrics, batches = run
      dispatches = max(1, args.updates // k)
      start = time.perf_counter()
      for _ in range(dispatches):
        state, metrics = step(state, batches, metrics)
      jax.block_until_ready(state.params)
      run[1], run[2] = state, metrics
      if repetition:
        times[k].append((time.perf_counter() - start) / (dispatches * k))
  first = ks[0]
  result = {}
  for k in ks:
    ratio = statistics.median(t / f for t, f in zip(times[k], times[first], strict=True))
    result[k] = ratio
    print(
      json.dumps(
        {
          'batch_size': args.batch_size,
          'steps_per_dispatch': k,
          'ms_per_update': 1e3 * statistics.median(times[k]),
          f'ratio_to_k{first}': ratio,
          'repetitions': args.repetitions,
        }
      ),
      flush=True,
    )
  return result


if __name__ == '__main__':
  main()
