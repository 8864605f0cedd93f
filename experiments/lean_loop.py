r"""The leanest loop we could write for the default run: the yardstick of ibs's speed.

configs/default.py's job without ibs's loop or step: the same 1-D CNN (ghost batch
norm over 32 examples), the same MNIST-1D split, heavy-ball momentum 0.9 at ε = 0.1 with
L2 5e-4 added to the gradient, the batch growing 32 → 160 → 800 → 4000 at epochs 30, 60
and 80 of 100, the test split evaluated every 5 epochs. What it leaves out is what a
research run needs and a speed floor does not: no host pipeline (the whole train set
lives on the device), one epoch per dispatch as a `lax.scan` that gathers its batch by
index from a permutation drawn on the device, no accumulation (B = 4000 is one batch),
no noise scale, no checkpoints, no metrics but the test accuracy, no logging.

It imports only the model and the dataset generator from ibs. Its data order is its own
(`jax.random.permutation` per epoch), so its accuracy is comparable to ibs's, not equal.

  python -m experiments.lean_loop --out=/tmp/lean.json

prints and writes {'train_s', 'phase_train_s', 'compile_s', 'test_accuracy', ...}:
training is the time of the epoch dispatches (each waited for; per phase too),
compilation the ahead-of-time compiles of the four epoch functions and the evaluation.
experiments/bench_end_to_end.py runs it beside `python -m ibs.main`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jax.numpy as jnp
import optax

from configs import default
from ibs import models
from ibs.data import mnist1d


def phases(config) -> list[tuple[int, int]]:
  """(batch size, epochs) of each phase: the increasing-batch schedule of the config."""
  s = config.schedule
  edges = (0.0, *s.milestones, s.num_epochs)
  return [
    (int(s.batch_size * s.decay_factor**i), int(edges[i + 1] - edges[i]))
    for i in range(len(edges) - 1)
  ]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='', help='write the result here as JSON')
  args = parser.parse_args(argv)
  config = default.get_config()
  n, n_test = config.mnist1d.num_train, config.mnist1d.num_test

  train = mnist1d.load_split(n, n_test, 'train', config.data_dir or None)
  test = mnist1d.load_split(n, n_test, 'test', config.data_dir or None)
  x_train, y_train = jax.device_put((train.inputs, train.labels))
  x_test, y_test = jax.device_put((test.inputs, test.labels))

  model = models.create_model(
    config.model,
    num_classes=10,
    ghost_batch_size=config.ghost_batch_size,
    **config.model_kwargs,
  )
  variables = model.init(
    jax.random.key(config.seed), jnp.zeros((config.ghost_batch_size, 40)), train=False
  )
  tx = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(config.schedule.learning_rate, momentum=config.schedule.momentum),
  )
  carry = (variables['params'], variables['batch_stats'], tx.init(variables['params']))

  def epoch(carry, key, x, y, *, batch_size):
    """One epoch: a permutation drawn on the device, one update per batch of it."""

    def update(carry, indices):
      params, stats, opt_state = carry

      def loss_fn(p):
        logits, new = model.apply(
          {'params': p, 'batch_stats': stats},
          x[indices],
          train=True,
          mutable=['batch_stats'],
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y[indices])
        return losses.mean(), new['batch_stats']

      grads, stats = jax.grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), stats, opt_state), None

    order = jax.random.permutation(key, n).reshape(-1, batch_size)
    return jax.lax.scan(update, carry, order)[0]

  def accuracy(params, stats, x, y):
    logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  key = jax.random.key(config.data_seed)
  compile_start = time.perf_counter()
  epochs = {
    b: jax.jit(functools.partial(epoch, batch_size=b), donate_argnums=(0,))
    .lower(carry, key, x_train, y_train)
    .compile()
    for b, _ in phases(config)
  }
  evaluate = jax.jit(accuracy).lower(carry[0], carry[1], x_test, y_test).compile()
  compile_s = time.perf_counter() - compile_start

  phase_train_s, epoch_index, test_accuracy = [], 0, float('nan')
  for batch_size, num_epochs in phases(config):
    phase_train_s.append(0.0)
    for _ in range(num_epochs):
      start = time.perf_counter()
      carry = epochs[batch_size](
        carry, jax.random.fold_in(key, epoch_index), *(x_train, y_train)
      )
      jax.block_until_ready(carry)
      phase_train_s[-1] += time.perf_counter() - start
      epoch_index += 1
      if epoch_index % int(config.eval_every_epochs) == 0:
        test_accuracy = float(evaluate(carry[0], carry[1], x_test, y_test))
  result = {
    'train_s': sum(phase_train_s),
    'phase_train_s': phase_train_s,
    'compile_s': compile_s,
    'test_accuracy': test_accuracy,
    'epochs': epoch_index,
  }
  print(json.dumps(result))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f)
  return result


if __name__ == '__main__':
  main()
