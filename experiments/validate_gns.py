r"""The measured gradient noise scale against its closed form (ibs/gns.py, ibs/step.py).

Linear regression with Gaussian noise, at a fixed parameter point: inputs x ~ N(0, I_d),
targets y = x·w* + ξ with ξ ~ N(0, σ²), loss ℓ = ½(x·w − y)². With Δ = w − w* the
per-example gradient is x(x·Δ − ξ), so

    G = E[x xᵀ] Δ = Δ                              |G|² = |Δ|²
    E[g gᵀ] = |Δ|² I + 2 Δ Δᵀ + σ² I               (Gaussian fourth moments)
    tr(Σ) = tr E[g gᵀ] − |G|² = (d + 1)|Δ|² + d σ²

and B_simple = tr(Σ)/|G|² is known exactly. ibs's own compiled train step runs with a
learning rate of 0 (so the point stays fixed) on fresh samples, in three layouts of the
same global batch: 8 devices with one micro-batch each (per-device norms), one device
accumulating 4 micro-batches (per-micro-batch norms), and one device with one
micro-batch (the batch split in halves). Prints one JSON line; `rel_error` is the
largest relative error of B_simple over the layouts.

  python experiments/validate_gns.py   # sets JAX_NUM_CPU_DEVICES=8 itself
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
from flax import linen as nn

from ibs import gns, sharding
from ibs import step as step_lib

DIM = 16
SIGMA = 2.0
DELTA_SQ = 1.0  # |w − w*|²
BATCH = 256
STEPS = 1500
STEPS_PER_DISPATCH = 50
HORIZON = 400 * BATCH  # examples: the averages span ~400 updates


def closed_form() -> dict[str, float]:
  trace = (DIM + 1) * DELTA_SQ + DIM * SIGMA**2
  return {'grad_sq_norm': DELTA_SQ, 'trace_cov': trace, 'b_simple': trace / DELTA_SQ}


def squared_error(prediction: jax.Array, target: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(prediction[:, 0] - target)


def measure(num_devices: int, max_micro_batch_size: int, seed: int) -> dict[str, float]:
  """B_simple measured by the train step over STEPS updates in one layout."""
  mesh = sharding.make_mesh(jax.devices()[:num_devices])
  model = nn.Dense(1, use_bias=False)
  w_star = np.zeros(DIM, np.float32)
  w = np.zeros(DIM, np.float32)
  w[0] = np.sqrt(DELTA_SQ)  # |Δ|² = DELTA_SQ
  params = {'kernel': jnp.asarray(w)[:, None]}  # nn.Dense(1)'s parameters, set by hand

  def apply(variables, x, train, mutable):
    del train, mutable
    return model.apply({'params': variables['params']}, x), {}

  state = step_lib.TrainState.create(
    apply_fn=apply, params=params, batch_stats={}, tx=optax.sgd(0.0)
  )
  state = jax.device_put(state, sharding.replicated(mesh))
  # Every micro-batch is one "ghost batch": the model has no batch norm.
  plan = sharding.plan_micro_batches(BATCH, num_devices, 1, max_micro_batch_size)
  example = {'input': np.zeros((1, DIM), np.float32), 'label': np.zeros(1, np.float32)}
  options = step_lib.StepOptions(
    gns_horizon_examples=HORIZON, per_example_loss=squared_error
  )
  (train_step,) = step_lib.compile_train_steps(
    mesh,
    state,
    [plan],
    example,
    ghost_batch_size=1,
    steps_per_dispatch=STEPS_PER_DISPATCH,
    options=options,
  ).values()
  rng = np.random.default_rng(seed)
  metrics = step_lib.empty_metrics(mesh)
  for _ in range(STEPS // STEPS_PER_DISPATCH):
    batches = []
    for _ in range(STEPS_PER_DISPATCH):
      x = rng.normal(size=(BATCH, DIM)).astype(np.float32)
      y = (x @ w_star + SIGMA * rng.normal(size=BATCH)).astype(np.float32)
      batches.append({'input': x, 'label': y})
    state, metrics = train_step(state, batches, metrics)
  measured = gns.estimates(state.gns)
  return {
    'layout': f'{num_devices} device(s) × A = {plan.accumulation} × b = '
    f'{plan.micro_batch_size}',
    **{k.removeprefix('gns/'): v for k, v in measured.items()},
  }


def main() -> int:
  if jax.device_count() < 8:
    print('Needs 8 devices: run with JAX_NUM_CPU_DEVICES=8.', file=sys.stderr)
    return 2
  expected = closed_form()
  layouts = [
    measure(8, BATCH // 8, seed=1),  # 8 devices, A = 1
    measure(1, BATCH // 4, seed=2),  # one device, A = 4
    measure(1, BATCH, seed=3),  # one device, A = 1: the batch split in halves
  ]
  for layout in layouts:
    layout['rel_error'] = abs(layout['b_simple'] / expected['b_simple'] - 1)
  print(
    json.dumps(
      {
        'problem': f'linear regression, d={DIM}, sigma={SIGMA}, |delta|^2={DELTA_SQ}, '
        f'B={BATCH}, {STEPS} updates, horizon {HORIZON} examples',
        'expected': expected,
        'layouts': layouts,
        'rel_error': max(layout['rel_error'] for layout in layouts),
      }
    )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
