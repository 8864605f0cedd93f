r"""Bytes sent between devices per update, read from ibs's compiled step on 8 devices.

What one update sends between devices is a property of its compiled program, so this
reads it there: for each model and phase batch B it builds ibs's train step the way a
run does (the config from configs/, the model, state and step options of ibs/setup.py,
the micro-batch plan of ibs/sharding.py, `ibs.step.compile_train_steps`), compiles it
for 8 CPU devices from abstract shapes only (no state or batch is ever allocated, no
step runs), and counts the collectives in its HLO (`ibs/tools/hlo.py`: one inside the
micro-batch loop counts as many times as XLA's loop runs).

The step all-reduces once per update (ibs/step.py): the gradient, each device's share of
the ghost-BN running averages (2F floats per BN layer of F features, in closed form,
whatever the number of ghost batches; ibs/models/ghost_batch_norm.py) and a few scalars
(the metric sums, the noise-scale norm). So "all-reduced − gradient" must be 4 bytes ×
(BN floats + scalars), the same at every B of a model, and nothing is all-gathered.

  python -m experiments.bench_collectives           # sets 8 CPU devices itself
  python -m experiments.bench_collectives --models=wrn   # one model

Models, batches and micro-batches:
  cnn1d     configs/default.py, B = 32, 160, 800, 4000. Ghost batches of 4, not the
            config's 32: B = 32 over 8 devices is 4 examples per device.
  wrn       configs/cifar10_wrn.py (WRN-16-4, bfloat16 compute), B = 128, 640, 3200,
            16000, ghost batches of 16 (§5.1's schedule; the config's 128 does not split
            B = 128 over 8 devices).
  resnet50  configs/resnet50_tpu.py (224×224, bfloat16 compute), B = 4096 and 65536
            (the paper's §5.4 batch), ghost batches of 128.
The per-device micro-batch b is what ibs plans (`sharding.plan_micro_batches`) under each
config's cap `max_micro_batch_size` (800, 1024, 256), A = B/(8·b). The step is compiled
in the form accelerators run (`host_loop=False`: the micro-batch loop inside the
program; XLA:CPU's host loop sends the same all-reduce from a second program) with one
update per dispatch (K = 1; K > 1 loops over whole updates, each with its own
all-reduce).
"""

import os
import sys

# Before JAX starts: it fixes the device count then.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import dataclasses
import json
import time

import jax
import numpy as np
from absl import app, flags

from configs import cifar10_wrn, default, resnet50_tpu
from ibs import config_checks, sharding
from ibs import setup as setup_lib
from ibs import step as step_lib
from ibs.tools import hlo

DEVICES = 8
GATHERS = ('all-gather', 'all-gather-start')
OTHERS = (
  'reduce-scatter',
  'collective-permute',
  'collective-permute-start',
  'all-to-all',
)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  get_config: object
  ghost_batch_size: int
  batch_sizes: tuple[int, ...]


CASES = {
  'cnn1d': Case('cnn1d', default.get_config, 4, (32, 160, 800, 4000)),
  'wrn': Case('WRN-16-4', cifar10_wrn.get_config, 16, (128, 640, 3200, 16000)),
  'resnet50': Case('ResNet-50', resnet50_tpu.get_config, 128, (4096, 65536)),
}

FLAGS = flags.FLAGS
flags.DEFINE_list('models', list(CASES), f'Which of {list(CASES)} to compile.')
flags.DEFINE_string('json_out', '', 'Also write the rows to this JSON file.')


def abstract_run(config):
  """(mesh, abstract state, one example) of `config` on this process's devices, built
  with ibs/setup.py's parts; `jax.eval_shape` keeps every array abstract."""
  spec, schedule = config_checks.check_config(config, jax.device_count())
  mesh = sharding.make_mesh()
  model = setup_lib.create_model(config, spec.num_classes)
  state = jax.eval_shape(
    lambda: setup_lib.create_train_state(config, model, schedule, spec.input_shape, mesh)
  )
  # What every preprocessing returns (ibs/data/augment.py): float32 inputs, int labels.
  example = {
    'input': np.zeros((1, *spec.input_shape), np.float32),
    'label': np.zeros(1, np.int32),
  }
  return mesh, state, example


def count(step):
  """Collective bytes per update of a compiled step (one update per call), read off
  its HLO: each collective times the runs of the loops around it."""
  text = step.as_text()
  reduces = hlo.collectives(text)
  return {
    'all_reduced_bytes': hlo.bytes_per_call(text),
    'all_reduces': len(reduces),
    'all_reduces_in_loop': sum(c.in_loop for c in reduces),
    'all_gathered_bytes': hlo.bytes_per_call(text, GATHERS),
    'other_collective_bytes': hlo.bytes_per_call(text, OTHERS),
  }


def measure(case: Case) -> list[dict]:
  config = case.get_config()
  config.ghost_batch_size = case.ghost_batch_size
  mesh, state, example = abstract_run(config)
  plans = [
    sharding.plan_micro_batches(
      b, jax.device_count(), config.ghost_batch_size, config.max_micro_batch_size
    )
    for b in case.batch_sizes
  ]
  start = time.perf_counter()
  steps = step_lib.compile_train_steps(
    mesh,
    state,
    plans,
    example,
    ghost_batch_size=config.ghost_batch_size,
    steps_per_dispatch=1,
    options=setup_lib.step_options(config),
    host_loop=False,
  )
  compile_s = time.perf_counter() - start
  gradient = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  bn_floats = sum(x.size for x in jax.tree.leaves(state.batch_stats))
  rows = []
  for plan in plans:
    row = {
      'model': case.name,
      'ghost_batch_size': case.ghost_batch_size,
      'batch_size': plan.batch_size,
      'accumulation': plan.accumulation,
      'micro_batch': plan.micro_batch_size,
      'gradient_bytes': gradient,
      'bn_floats': bn_floats,
      **count(steps[plan.shape]),
    }
    row['all_reduced_minus_gradient'] = row['all_reduced_bytes'] - gradient
    # The scalars, less any operand XLA found to duplicate another (docs/BENCHMARKS.md).
    row['rest_bytes'] = row['all_reduced_minus_gradient'] - 4 * bn_floats
    rows.append(row)
  print(
    f'{case.name}: {len(steps)} step(s) compiled in {compile_s:.0f} s', file=sys.stderr
  )
  return rows


def markdown(rows: list[dict]) -> str:
  lines = [
    '| model | B | A × b per device | gradient bytes | BN floats (2F) | all-reduced '
    '/ update | all-reduced − gradient | all-gathered / update |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f'| {r["model"]}, ghost {r["ghost_batch_size"]} | {r["batch_size"]:,} | '
      f'{r["accumulation"]} × {r["micro_batch"]} | {r["gradient_bytes"]:,} | '
      f'{r["bn_floats"]:,} | {r["all_reduced_bytes"]:,} '
      f'({r["all_reduces"]} op, {r["all_reduces_in_loop"]} in loop) | '
      f'{r["all_reduced_minus_gradient"]:,} | {r["all_gathered_bytes"]:,} |'
    )
  return '\n'.join(lines)


def main(argv):
  del argv
  if jax.device_count() != DEVICES:
    print(
      f'{jax.device_count()} devices; run with JAX_NUM_CPU_DEVICES={DEVICES} '
      '(unset XLA_FLAGS=--xla_force_host_platform_device_count).',
      file=sys.stderr,
    )
    return 2
  unknown = sorted(set(FLAGS.models) - set(CASES))
  if unknown:
    print(f'--models: unknown {unknown}; choose from {list(CASES)}.', file=sys.stderr)
    return 2
  start = time.perf_counter()
  rows = []
  for name in FLAGS.models:
    print(f'{CASES[name].name}: compiling B = {CASES[name].batch_sizes}', file=sys.stderr)
    for row in measure(CASES[name]):
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(markdown(rows))
  print(f'total {time.perf_counter() - start:.0f} s', file=sys.stderr)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == '__main__':
  app.run(main)
