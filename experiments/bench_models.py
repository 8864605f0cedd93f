r"""Forward + backward examples/s of each ibs model on this machine.

One training-mode gradient step per call (`jax.value_and_grad` of the softmax
cross-entropy, batch statistics updated, no optimizer), jitted, on random inputs already
on the device. The big networks run as tiny variants (narrow, few blocks, small images):
on CPU, XLA's convolution makes the full-size ones take seconds per step, so their
numbers here only say what a CPU test or smoke run costs.
The MNIST-1D models run at their real size.

Each repetition times steps after a warm-up step until `--min_seconds` have passed;
the table gives the median examples/s over `--repetitions`, so load from other
processes shows as spread (min–max), not as bias.

  python -m experiments.bench_models
  python -m experiments.bench_models --models=cnn1d,mlp --min_seconds=3 --repetitions=5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ibs import models

# label: (registry name, model kwargs, input shape without batch, batch, ghost batch)
CASES = {
  'wrn-16-1': ('wide_resnet', dict(depth=16, widen_factor=1), (32, 32, 3), 128, 128),
  'resnet18/8': (
    'resnet',
    dict(stage_sizes=(2, 2, 2, 2), bottleneck=False, width=8),
    (32, 32, 3),
    32,
    32,
  ),
  'resnet50/8': ('resnet50', dict(width=8), (64, 64, 3), 32, 32),
  'irv2-tiny': (
    'inception_resnet_v2',
    dict(repeats=(1, 1, 1), width_multiplier=0.125),
    (75, 75, 3),
    32,
    32,
  ),
  'cnn1d': ('cnn1d', dict(width=32, depth=3), (40,), 128, 128),
  'cnn1d-b1024': ('cnn1d', dict(width=32, depth=3), (40,), 1024, 128),
  'mlp': ('mlp', dict(hidden=(100, 100)), (40,), 128, 128),
}
NUM_CLASSES = 10


def random_variables(model, input_shape, seed=0):
  """Variables of the right shapes filled by numpy, skipping `model.init`'s compile.

  Compiling the threefry draws of a deep init takes XLA on 2 CPU cores longer than the
  benchmark; speed does not depend on the values, only on their shapes.
  """
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if leaf.ndim > 1:
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def measure(label: str, min_seconds: float, repetitions: int) -> dict:
  name, kwargs, example_shape, batch, ghost = CASES[label]
  model = models.create_model(
    name, num_classes=NUM_CLASSES, ghost_batch_size=ghost, **kwargs
  )
  input_shape = (batch, *example_shape)
  variables = random_variables(model, input_shape)
  params, batch_stats = variables['params'], variables['batch_stats']
  key_x, key_y = jax.random.split(jax.random.key(1))
  x = jax.random.normal(key_x, input_shape)
  labels = jax.random.randint(key_y, (batch,), 0, NUM_CLASSES)

  def loss_fn(params, batch_stats, x, labels):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates['batch_stats']

  grad_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  start = time.perf_counter()
  compiled = grad_step.lower(params, batch_stats, x, labels).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(params, batch_stats, x, labels))  # warm-up

  rates = []
  for _ in range(repetitions):
    start, steps, elapsed = time.perf_counter(), 0, 0.0
    while elapsed < min_seconds:
      (_, batch_stats), grads = compiled(params, batch_stats, x, labels)
      jax.block_until_ready(grads)
      steps += 1
      elapsed = time.perf_counter() - start
    rates.append(steps * batch / elapsed)
  return dict(
    model=label,
    params=sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)),
    input='×'.join(map(str, example_shape)),
    batch=batch,
    compile_s=compile_s,
    examples_per_s=statistics.median(rates),
    spread=(min(rates), max(rates)),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(CASES), help='comma-separated labels')
  parser.add_argument(
    '--min_seconds', type=float, default=1.0, help='timed seconds per repetition'
  )
  parser.add_argument('--repetitions', type=int, default=3)
  args = parser.parse_args()
  labels = [label for label in args.models.split(',') if label]
  unknown = sorted(set(labels) - set(CASES))
  if unknown:
    parser.error(f'unknown --models {unknown}; choose from {list(CASES)}')

  print(f'{jax.devices()[0].platform} × {jax.device_count()}, {os.cpu_count()} CPU cores')
  print('| model | params | input | batch | compile s | examples/s (min–max) |')
  print('|---|---:|---|---:|---:|---:|')
  for label in labels:
    row = measure(label, args.min_seconds, args.repetitions)
    low, high = row['spread']
    print(
      f'| {row["model"]} | {row["params"]:,} | {row["input"]} | {row["batch"]} '
      f'| {row["compile_s"]:.1f} | {row["examples_per_s"]:,.0f} '
      f'({low:,.0f}–{high:,.0f}) |',
      flush=True,
    )


if __name__ == '__main__':
  main()
