r"""Train-step throughput with the gradient noise scale measured against not measured.

The default config's model and K (updates per dispatch) on one device, at each of its
phase batches (32, 160, 800, 4000: A = 1, 1, 1, 5 with its cap of 800). At A = 1 on one
device measuring needs the batch's two halves back-propagated apart (ibs/step.py); at
A = 5 it costs a squared norm per micro-batch. The two executables alternate, repetition
by repetition, so machine load falls on both alike; each repetition times
`--dispatches` dispatches of K updates on pre-built host batches (the layout included,
as train.py runs it). Both steps are built as training builds them (`ibs.setup.build`
in its BENCH mode, on one device, with `config.gns.enabled` on and off). Prints per
batch the median updates/s of each and the median of the per-repetition ratios (on /
off).

  python -m experiments.bench_gns --repetitions=15
"""

import copy
import json
import time

import jax
import numpy as np
from absl import app, flags

from configs import default
from ibs import setup

_REPETITIONS = flags.DEFINE_integer('repetitions', 15, 'Interleaved repetitions.')
_DISPATCHES = flags.DEFINE_integer('dispatches', 20, 'Dispatches timed per repetition.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32', '160', '800', '4000'], 'Batches.')
_SPLIT_EVERY = flags.DEFINE_integer(
  'split_every', None, 'config.gns.split_every to measure with (default: the config).'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, "Where MNIST-1D is generated, once (default: the config's)."
)


def main(argv):
  del argv
  config = default.get_config()
  if _SPLIT_EVERY.value is not None:
    config.gns.split_every = _SPLIT_EVERY.value
  if _DATA_DIR.value is not None:
    config.data_dir = _DATA_DIR.value
  rng = np.random.default_rng(0)
  for batch_size in map(int, _BATCHES.value):
    runs = {}  # the run as training builds it, on one device, measuring or not
    for name, enabled in (('on', True), ('off', False)):
      variant = copy.deepcopy(config)
      variant.gns.enabled = enabled
      runs[name] = setup.build(
        variant,
        None,
        setup.Mode.BENCH,
        batch_sizes=[batch_size],
        devices=jax.devices()[:1],
      )
    steps = {name: run.steps[batch_size] for name, run in runs.items()}
    plan, k = steps['on'].plan, steps['on'].steps_per_dispatch
    shape = runs['on'].spec.input_shape
    host = [
      {
        'input': rng.normal(size=(batch_size, *shape)).astype(np.float32),
        'label': rng.integers(0, 10, batch_size).astype(np.int32),
      }
      for _ in range(k)
    ]
    states = {name: run.state for name, run in runs.items()}
    metrics = {name: run.metrics for name, run in runs.items()}
    times = {name: [] for name in steps}
    for repetition in range(_REPETITIONS.value + 1):  # the first warms up
      for name, train_step in steps.items():
        start = time.perf_counter()
        for _ in range(_DISPATCHES.value):
          states[name], metrics[name] = train_step(states[name], host, metrics[name])
        jax.block_until_ready(states[name].params)
        if repetition:
          times[name].append(time.perf_counter() - start)
    updates = _DISPATCHES.value * k
    ratios = [off / on for on, off in zip(times['on'], times['off'], strict=True)]
    print(
      json.dumps(
        {
          'batch_size': batch_size,
          'accumulation': plan.accumulation,
          'updates_per_s_on': updates / float(np.median(times['on'])),
          'updates_per_s_off': updates / float(np.median(times['off'])),
          'ratio_on_over_off': float(np.median(ratios)),
          'repetitions': _REPETITIONS.value,
        }
      ),
      flush=True,
    )


if __name__ == '__main__':
  app.run(main)
