r"""Train-step memory against the accumulation count A (docs/DESIGN.md decision 3).

At a fixed per-device micro-batch b the ibs step for A micro-batches loops over them
(`lax.fori_loop`, indexing the batch in place), so its temporary memory — activations,
gradients, the gradient sum — must not grow with A; only the batch argument (A·b
examples of input) does. For contrast the script also compiles a bare whole-batch step
(one `value_and_grad` over all A·b examples, what a step without accumulation needs).
The ibs steps are built as training builds them (`ibs.setup.build` in its BENCH mode)
from the model's config: configs/default.py (cnn1d; mlp with its model swapped in) or
configs/cifar10_wrn.py (wide_resnet: WRN-16-4, in float32), on synthetic data of the
dataset's size and shape. No step is run: the numbers are XLA's
`TrainStep.memory_analysis()` of ahead-of-time compiled steps (for a host-loop step, the
XLA:CPU form for models with convolutions, those of its micro-batch step). `--gns=off`
compiles the step without the gradient-noise-scale measurement (config.gns.enabled).

  python -m experiments.memory_accumulation                       # cnn1d, b = 800
  python -m experiments.memory_accumulation --model=wide_resnet --micro_batch_size=128 \
      --accumulations=1,5,25
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import cifar10_wrn, default
from ibs import setup
from ibs.data import catalog


def cnn1d_config() -> ml_collections.ConfigDict:
  return default.get_config()


def mlp_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = 'mlp'
  config.model_kwargs = ml_collections.ConfigDict(dict(hidden=(100, 100)))
  return config


def wide_resnet_config() -> ml_collections.ConfigDict:
  config = cifar10_wrn.get_config()  # WRN-16-4, ghost batch 128
  config.half_precision = False
  return config


# The run config of each model. Nothing is trained, so its data is synthetic, of the
# dataset's size and shape (the step needs only shapes): no dataset to generate or read.
MODELS = {'cnn1d': cnn1d_config, 'mlp': mlp_config, 'wide_resnet': wide_resnet_config}


def make_config(name: str) -> ml_collections.ConfigDict:
  config = MODELS[name]()
  spec = catalog.dataset_spec(config)
  config.dataset = 'fake'
  config.fake = ml_collections.ConfigDict(
    dict(
      num_train=spec.num_train_examples,
      num_test=spec.num_test_examples,
      num_classes=spec.num_classes,
      shape=spec.input_shape,
    )
  )
  return config


def bare_step(model, tx):
  """The whole batch in one value_and_grad: memory grows with the batch."""

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply(
        {'params': p, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def mib(n: int) -> str:
  return f'{n / 2**20:,.1f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='cnn1d', choices=sorted(MODELS))
  parser.add_argument(
    '--micro_batch_size',
    type=int,
    default=800,
    help='b per device, a multiple of the ghost batch (32; 128 for wide_resnet)',
  )
  parser.add_argument('--accumulations', default='1,4,16')
  parser.add_argument('--no_bare', action='store_true', help='skip the whole-batch step')
  parser.add_argument(
    '--host_loop',
    choices=('auto', 'on', 'off'),
    default='auto',
    help='accumulate in a Python loop (TrainStep.host_loop); auto: XLA:CPU and '
    'convolutions',
  )
  parser.add_argument(
    '--steps_per_dispatch',
    type=int,
    default=1,
    help='K updates per call (config.steps_per_dispatch): K batches in the arguments; '
    'falls back to 1 with the host loop',
  )
  parser.add_argument(
    '--gns',
    choices=('on', 'off'),
    default='on',
    help='measure the gradient noise scale in the step (as configs/default.py)',
  )
  args = parser.parse_args()

  config = make_config(args.model)
  ghost, b = config.ghost_batch_size, args.micro_batch_size
  if b % ghost:
    parser.error(
      f'--micro_batch_size={b} is not a multiple of the ghost batch size {ghost} of '
      f'{args.model}; use e.g. --micro_batch_size={ghost * max(1, b // ghost)}.'
    )
  config.gns.enabled = args.gns == 'on'
  config.max_micro_batch_size = b
  config.steps_per_dispatch = args.steps_per_dispatch
  accumulations = [int(a) for a in args.accumulations.split(',')]
  batches = {a: a * b * jax.device_count() for a in accumulations}
  # The steps as training builds them (ibs.setup.build, BENCH mode): its model, state
  # and optimizer, every batch compiled ahead of time, its memory checked.
  run = setup.build(
    config,
    None,
    setup.Mode.BENCH,
    batch_sizes=list(batches.values()),
    host_loop={'auto': None, 'on': True, 'off': False}[args.host_loop],
  )
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  input_shape, tx = run.spec.input_shape, run.state.tx
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  print(
    f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); '
    f'{args.model} ({num_params:,} parameters), micro-batch b = {b} per device, '
    f'{args.steps_per_dispatch} step(s) per dispatch, noise scale {args.gns}'
  )
  print(
    '| A | B | ibs step | ibs temp MiB | ibs arguments MiB | ibs output MiB '
    '| bare temp MiB |'
  )
  print('|---|---|---|---|---|---|---|')
  for a in accumulations:
    batch = batches[a]
    compiled = run.steps[batch]
    assert compiled.plan.micro_batch_size == b, compiled.plan
    form = 'host loop' if compiled.host_loop else 'one executable'
    if compiled.steps_per_dispatch != args.steps_per_dispatch:
      form += f', K = {compiled.steps_per_dispatch}'
    m = compiled.memory_analysis()
    bare = '–'
    if not args.no_bare:
      opt_state = jax.eval_shape(tx.init, variables['params'])
      x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
      y = jax.ShapeDtypeStruct((batch,), jnp.int32)
      lowered = bare_step(run.model, tx).lower(
        variables['params'], variables['batch_stats'], opt_state, x, y
      )
      bare = mib(lowered.compile().memory_analysis().temp_size_in_bytes)
    print(
      f'| {a} | {batch} | {form} | {mib(m.temp_size_in_bytes)} '
      f'| {mib(m.argument_size_in_bytes)} '
      f'| {mib(m.output_size_in_bytes)} | {bare} |',
      flush=True,
    )


if __name__ == '__main__':
  main()
