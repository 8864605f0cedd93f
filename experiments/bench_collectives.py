r"""Bytes all-reduced per update, read from the compiled HLO: ibs's step against the
plain jit step it replaced.

The plain step (ibs's design before the per-device step, and what `jax.jit` with a
sharded batch gives anyone who writes accumulation the obvious way): the mean loss of a
micro-batch over every device's examples, `lax.scan` over the A micro-batches, gradients
summed in the carry. XLA then all-reduces the gradient inside the loop, once per
micro-batch. ibs's step (`ibs/step.py`) sums each device's micro-batch gradients itself
and all-reduces once per update. Both are compiled (not run) for the same model, batch
and 8 CPU devices; `ibs.tools.hlo` counts each all-reduce's payload, times A when it sits
in the loop. ibs's batch-norm statistics travel by all-gather instead (per micro-batch, a
mean and a variance per feature and ghost batch); their bytes are reported apart.

  JAX_NUM_CPU_DEVICES=8 python experiments/bench_collectives.py

Models: the default config's cnn1d at B = 4000, with ghost batches of 20 and 100 examples
per device and micro-batch (4000 does not split over 8 devices in ghost batches of 32;
A = 5, as the default run accumulates on one device), and WRN-16-4 at §5.1's batches 128,
640, 3200, 16000 with ghost batches of 16 and at most 256 per device and micro-batch (128
does not split over 8 devices in ghost batches of 128). The grouping does not change what
is all-reduced.
"""

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ibs import models, sharding
from ibs import step as step_lib
from ibs.tools import hlo


def plain_accumulating_step(state, batch):
  """The obvious jit step: scan over (A, D·b) micro-batches, loss over all devices."""

  def body(carry, micro):
    grad_sum, batch_stats = carry

    def loss_fn(params):
      logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats},
        micro['input'],
        train=True,
        mutable=['batch_stats'],
      )
      loss = step_lib.cross_entropy_loss(logits, micro['label']).mean()
      return loss, updates['batch_stats']

    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(state.params)
    return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grad_sum, batch_stats), _ = jax.lax.scan(body, (zeros, state.batch_stats), batch)
  grads = jax.tree.map(lambda g: g / batch['label'].shape[0], grad_sum)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


def measure(name, model, input_shape, batch_size, ghost, cap):
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((ghost, *input_shape)), train=False)
  )
  state = jax.eval_shape(
    lambda: step_lib.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=optax.sgd(0.1, momentum=0.9),
    )
  )
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  plan = sharding.plan_micro_batches(batch_size, jax.device_count(), ghost, cap)
  example = {
    'input': np.zeros((1, *input_shape), np.float32),
    'label': np.zeros(1, np.int32),
  }
  (ibs_step,) = step_lib.compile_train_steps(
    mesh,
    state,
    [plan],
    example,
    ghost_batch_size=ghost,
    options=step_lib.StepOptions(gns_horizon_examples=1e6),
    host_loop=False,  # the scan form: what accelerators run
  ).values()
  after = hlo.all_reduce_bytes_per_update(ibs_step.as_text(), plan.accumulation)
  gathers = hlo.collectives(ibs_step.as_text(), ('all-gather', 'all-gather-start'))
  gathered = sum(c.bytes * (plan.accumulation if c.in_loop else 1) for c in gathers)
  batch = {
    k: jax.ShapeDtypeStruct(
      (*plan.shape, *v.shape[1:]), v.dtype, sharding=NamedSharding(mesh, P(None, 'data'))
    )
    for k, v in example.items()
  }
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state
  )
  plain = (
    jax.jit(plain_accumulating_step, out_shardings=rep).lower(abstract, batch).compile()
  )
  before = hlo.all_reduce_bytes_per_update(plain.as_text(), plan.accumulation)
  return {
    'model': name,
    'batch_size': batch_size,
    'devices': plan.num_devices,
    'accumulation': plan.accumulation,
    'micro_batch': plan.micro_batch_size,
    'param_bytes': param_bytes,
    'plain_bytes_per_update': before,
    'ibs_bytes_per_update': after,
    'ibs_bn_all_gather_bytes_per_update': gathered,
    'ratio': before / after,
  }


def main() -> int:
  if jax.device_count() != 8:
    print('Run with JAX_NUM_CPU_DEVICES=8.', file=sys.stderr)
    return 2
  cnn = models.create_model(
    'cnn1d', num_classes=10, ghost_batch_size=20, width=32, depth=3
  )
  rows = [measure('cnn1d', cnn, (40,), 4000, 20, 100)]
  wrn = models.create_model(
    'wide_resnet', num_classes=10, ghost_batch_size=16, depth=16, widen_factor=4
  )
  for batch_size in (128, 640, 3200, 16000):
    rows.append(measure('wrn-16-4', wrn, (32, 32, 3), batch_size, 16, 256))
  for row in rows:
    print(json.dumps(row), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
