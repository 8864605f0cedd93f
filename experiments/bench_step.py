r"""Examples/s of the ibs train step against a bare `jax.jit` step of the same model.

The ibs step is what `ibs.train` runs, built as training builds it (`ibs.setup.build`
in its BENCH mode, from the model's config): ahead-of-time compiled by
`step.compile_train_steps` with `setup.step_options(config)`, a `shard_map` over the
`data` mesh with the accumulation loop (when A > 1), the optimizer's injected
hyperparameters (ε and m read from the schedule inside the step), the gradient noise
scale measured in the step (`--gns`; on one device at A = 1 every
`config.gns.split_every`-th update back-propagates the batch's halves apart), the
non-finite guard, state donation, clu metrics merged into running totals inside the
step, and `config.steps_per_dispatch` K updates per call (configs/default.py: 8). The
bare step is the same model and the same arithmetic written the shortest way: `jax.jit`
of value_and_grad + `optax.chain(add_decayed_weights, sgd(momentum))`, one batch per
call, no loop, no injection, no sharding, no donation, no noise scale, the loss as its
only metric. "ibs, K = 1" is the ibs step one update per call; "bare donated" is the
bare step donating its parameters and optimizer state, as ibs does. `--model=wrn` times
a network of real convolutions, where on XLA:CPU ibs accumulates in a host loop
(`TrainStep.host_loop`) and runs one step per call; the one-executable form is timed
beside it.

All variants run in one process, interleaved: each repetition times the same number of
steps (about `--seconds`) of every variant, in a shuffled order, so load from other
processes hits all alike. Rates are totals over all repetitions; "paired median" is the
median of the per-repetition ratios, "CPU time" the ratio of this process's CPU time
(less sensitive to other processes on a shared machine). Batches are already on the
device: the ibs step's executable is called with the batches `sharding.
train_batches_to_device` laid out once, bypassing the layout a `TrainStep` call does
(this reaches into TrainStep's `_run` and `_counts`). `--with_transfer` also times the
host → device copy of each batch: the ibs step called as ibs.train calls it,
`train_step(state, local_batches, metrics)` with K host batches, against
`jax.device_put` of each batch for the bare step.

  python -m experiments.bench_step                      # default cnn1d, B = 32 … 4000
  python -m experiments.bench_step --batch_sizes=32,160 --repetitions=5 --gns=off
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import cifar10_wrn, default
from ibs import setup, sharding
from ibs.data import catalog

# Models: 'cnn1d' is configs/default.py's; 'wrn' the CPU smoke model of
# configs/cifar10_wrn.py:data=fake (WRN-10-1, ghost batch 16), a network of real
# convolutions.
MODELS = {
  'cnn1d': default.get_config,
  'wrn': lambda: cifar10_wrn.get_config('data=fake'),
}


def make_batch(batch_size: int, shape, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    'input': rng.normal(size=(batch_size, *shape)).astype(np.float32),
    'label': rng.integers(0, 10, size=batch_size).astype(np.int32),
  }


def ibs_runner(
  config,
  batch,
  max_micro_batch_size,
  with_transfer,
  steps_per_dispatch,
  host_loop=None,
):
  """A closure running n ibs steps (n a multiple of K); with A, K, the form used and
  the run (its model and initial variables serve the bare step).

  The step is built as training builds it (`ibs.setup.build`, BENCH mode) with
  config.max_micro_batch_size and config.steps_per_dispatch set to these; `host_loop`
  goes to `step.compile_train_steps`, which falls back to K = 1 and the host loop for a
  conv net on XLA:CPU (`host_loop` None: its automatic choice), as in ibs.train.
  """
  batch_size = len(batch['label'])
  config = copy.deepcopy(config)
  config.max_micro_batch_size = max_micro_batch_size
  config.steps_per_dispatch = steps_per_dispatch
  run = setup.build(
    config, None, setup.Mode.BENCH, batch_sizes=[batch_size], host_loop=host_loop
  )
  compiled, mesh = run.steps[batch_size], run.mesh
  # A copy: the step donates its state, and the bare step starts from the same values.
  state = jax.device_put(jax.tree.map(jnp.copy, run.state), sharding.replicated(mesh))
  plan = compiled.plan
  k = compiled.steps_per_dispatch
  local_batches = [batch] * k
  # Batches already on the device: the executable behind the TrainStep, called with the
  # layout done once (TrainStep.__call__ does it on every call).
  on_device = sharding.train_batches_to_device(local_batches, plan, mesh, k)
  count = compiled._counts[k]
  holder = {'state': state, 'metrics': run.metrics}

  def runner(n):
    state, metrics = holder['state'], holder['metrics']
    for _ in range(n // k):
      if with_transfer:  # As the loop (ibs/train.py) calls it.
        state, metrics = compiled(state, local_batches, metrics)
      else:
        state, metrics = compiled._run(state, on_device, metrics, count)
    jax.block_until_ready((state, metrics))
    holder['state'], holder['metrics'] = state, metrics

  return runner, plan.accumulation, k, compiled.host_loop, run


def bare_runner(config, model, variables, batch, with_transfer, donate=False):
  """The bare step; `donate` donates its parameters and optimizer state, as ibs does."""
  tx = optax.chain(
    optax.add_decayed_weights(config.weight_decay), optax.sgd(0.1, momentum=0.9)
  )

  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates['batch_stats']

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())
  params = jax.tree.map(jnp.copy, variables['params'])  # Donation would delete them.
  batch_stats = jax.tree.map(jnp.copy, variables['batch_stats'])
  carry = [params, batch_stats, tx.init(params)]
  x, y = jax.device_put(batch['input']), jax.device_put(batch['label'])
  carry[:] = step(*carry, x, y)[:3]  # compile

  def run(n):
    params, batch_stats, opt_state = carry
    for _ in range(n):
      if with_transfer:
        xs, ys = jax.device_put(batch['input']), jax.device_put(batch['label'])
      else:
        xs, ys = x, y
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, xs, ys)
    jax.block_until_ready((params, loss))
    carry[:] = [params, batch_stats, opt_state]

  return run


def bench(batch_size, args, config):
  cap, k = args.max_micro_batch_size, args.steps_per_dispatch
  shape = catalog.dataset_spec(config).input_shape
  batch = make_batch(batch_size, shape, seed=batch_size)
  runner, accumulation, k, host_loop, run = ibs_runner(
    config, batch, cap, args.with_transfer, k
  )
  variables = {'params': run.state.params, 'batch_stats': run.state.batch_stats}
  common = (config, run.model, variables, batch)
  runners = {
    'bare': bare_runner(*common, args.with_transfer),
    'bare donated': bare_runner(*common, args.with_transfer, donate=True),
    'ibs': runner,
  }
  runners['ibs K=1'], *_ = ibs_runner(config, batch, cap, args.with_transfer, 1)
  if accumulation > 1:
    runners['ibs A=1'], *_ = ibs_runner(config, batch, batch_size, args.with_transfer, k)
  if host_loop:
    runners['ibs one executable'], *_ = ibs_runner(
      config, batch, cap, args.with_transfer, 1, host_loop=False
    )
  for run in runners.values():
    run(3 * k)  # warm-up
  # Enough steps that one timing covers about `--seconds` at this batch size.
  start = time.perf_counter()
  runners['bare'](3)
  steps = max(3, round(args.seconds / ((time.perf_counter() - start) / 3)))
  steps = -(-steps // k) * k  # Whole dispatches of the ibs step.
  times = {name: [] for name in runners}
  cpu_times = {name: [] for name in runners}
  order = list(runners)
  rng = random.Random(batch_size)
  for _ in range(args.repetitions):
    rng.shuffle(order)  # No variant always runs right after another.
    for name in order:
      start, cpu_start = time.perf_counter(), time.process_time()
      runners[name](steps)
      times[name].append(time.perf_counter() - start)
      cpu_times[name].append(time.process_time() - cpu_start)
  # Totals over the interleaved repetitions: every variant saw the same mix of load.
  rates = {name: len(t) * steps * batch_size / sum(t) for name, t in times.items()}
  cpu_ratios = {name: sum(cpu_times['bare']) / sum(t) for name, t in cpu_times.items()}
  bare = times['bare']
  paired = {  # Median of per-repetition ratios: robust to a disturbed repetition.
    name: statistics.median(b / t for b, t in zip(bare, ts, strict=True))
    for name, ts in times.items()
  }
  return rates, paired, cpu_ratios, accumulation, k, host_loop


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch_sizes', default='32,160,800,4000')
  parser.add_argument('--repetitions', type=int, default=40)
  parser.add_argument('--seconds', type=float, default=0.25, help='per timing')
  parser.add_argument(
    '--max_micro_batch_size',
    type=int,
    default=None,
    help="per-device cap; default: the model's config (cnn1d: 800, wrn: 256)",
  )
  parser.add_argument('--with_transfer', action='store_true')
  parser.add_argument('--model', choices=sorted(MODELS), default='cnn1d')
  parser.add_argument(
    '--steps_per_dispatch',
    type=int,
    default=None,
    help="K of the ibs step; default: the model's config (cnn1d: 8, wrn: 1)",
  )
  parser.add_argument(
    '--gns',
    choices=('on', 'off'),
    default='on',
    help='measure the gradient noise scale in the ibs step (config.gns.enabled)',
  )
  parser.add_argument(
    '--data_dir', default='/tmp/ibs_bench_tfds', help='where MNIST-1D is generated, once'
  )
  args = parser.parse_args()
  config = MODELS[args.model]()
  config.data_dir = args.data_dir
  config.gns.enabled = args.gns == 'on'
  if args.max_micro_batch_size is None:
    args.max_micro_batch_size = config.max_micro_batch_size
  if args.steps_per_dispatch is None:
    args.steps_per_dispatch = config.steps_per_dispatch
  print(
    f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} '
    f'device(s), model {config.model} {dict(config.model_kwargs)}, ghost batch '
    f'{config.ghost_batch_size}, transfer '
    f'{"included" if args.with_transfer else "excluded"}, noise scale {args.gns}'
  )
  print(
    '| B | A | K | bare ex/s | ibs ex/s | ibs / bare | ibs / bare, paired median '
    '| ibs / bare, CPU time | ibs K = 1 / bare | ibs K = 1 / bare donated '
    '| ibs at A = 1, ex/s |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  scans = []
  for batch_size in (int(b) for b in args.batch_sizes.split(',')):
    rates, paired, cpu_ratios, accumulation, k, host_loop = bench(
      batch_size, args, config
    )
    a1 = f'{rates["ibs A=1"]:,.0f}' if 'ibs A=1' in rates else '(A = 1)'
    print(
      f'| {batch_size} | {accumulation}{" (host loop)" if host_loop else ""} | {k} | '
      f'{rates["bare"]:,.0f} | {rates["ibs"]:,.0f} | '
      f'{rates["ibs"] / rates["bare"]:.3f} | {paired["ibs"]:.3f} | '
      f'{cpu_ratios["ibs"]:.3f} '
      f'| {rates["ibs K=1"] / rates["bare"]:.3f} '
      f'| {rates["ibs K=1"] / rates["bare donated"]:.3f} | {a1} |',
      flush=True,
    )
    if host_loop:
      scans.append(f'B = {batch_size}: {rates["ibs one executable"]:,.0f} examples/s')
  if scans:
    print(
      'The same steps as one executable, the accumulation loop inside it: '
      + '; '.join(scans)
    )
  print(f'load average after the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')


if __name__ == '__main__':
  main()
