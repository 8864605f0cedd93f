r"""Train-step throughput with the gradient noise scale measured against not measured.

The default config's model and K (updates per dispatch) on one device, at each of its
phase batches (32, 160, 800, 4000: A = 1, 1, 1, 5 with its cap of 800). At A = 1 on one
device measuring needs the batch's two halves back-propagated apart (ibs/step.py); at
A = 5 it costs a squared norm per micro-batch. The two executables alternate, repetition
by repetition, so machine load falls on both alike; each repetition times
`--dispatches` dispatches of K updates on pre-built host batches (the layout included,
as train.py runs it). Prints per batch the median updates/s of each and the median of
the per-repetition ratios (on / off).

  python experiments/bench_gns.py --repetitions=15
"""

import json
import time

import jax
import numpy as np
from absl import app, flags

from configs import default
from ibs import schedules, setup, sharding
from ibs import step as step_lib
from ibs.data import catalog

_REPETITIONS = flags.DEFINE_integer('repetitions', 15, 'Interleaved repetitions.')
_DISPATCHES = flags.DEFINE_integer('dispatches', 20, 'Dispatches timed per repetition.')
_BATCHES = flags.DEFINE_list('batch_sizes', ['32', '160', '800', '4000'], 'Batches.')
_SPLIT_EVERY = flags.DEFINE_integer(
  'split_every', None, 'config.gns.split_every to measure with (default: the config).'
)


def main(argv):
  del argv
  config = default.get_config()
  spec = catalog.dataset_spec(config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = setup.create_model(config, spec.num_classes)
  schedule = schedules.from_config(config, spec.num_train_examples)
  state = setup.create_train_state(config, model, schedule, spec.input_shape, mesh)
  k = config.steps_per_dispatch
  if _SPLIT_EVERY.value is not None:
    config.gns.split_every = _SPLIT_EVERY.value
  rng = np.random.default_rng(0)
  for batch_size in map(int, _BATCHES.value):
    plan = sharding.plan_micro_batches(
      batch_size, 1, config.ghost_batch_size, config.max_micro_batch_size
    )
    example = {
      'input': np.zeros((1, *spec.input_shape), np.float32),
      'label': np.zeros(1, np.int32),
    }
    steps = {}
    for name, horizon in (('on', config.gns.horizon_examples), ('off', 0.0)):
      options = step_lib.StepOptions(
        gns_horizon_examples=horizon, gns_split_every=config.gns.split_every
      )
      (steps[name],) = step_lib.compile_train_steps(
        mesh,
        state,
        [plan],
        example,
        ghost_batch_size=config.ghost_batch_size,
        steps_per_dispatch=k,
        options=options,
      ).values()
    host = [
      {
        'input': rng.normal(size=(batch_size, *spec.input_shape)).astype(np.float32),
        'label': rng.integers(0, 10, batch_size).astype(np.int32),
      }
      for _ in range(k)
    ]
    states = {name: jax.tree.map(lambda x: x.copy(), state) for name in steps}
    metrics = {name: step_lib.empty_metrics(mesh) for name in steps}
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
