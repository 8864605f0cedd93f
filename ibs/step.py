"""The train and eval steps: exact gradient accumulation, sharded over a `data` mesh axis.

Global batch B = devices × A × b (DESIGN.md decision 3): b, the per-device micro-batch,
is a multiple of the ghost batch size and at most `max_micro_batch_size`; the
accumulation count A grows with the phase. With ghost batch norm the loss of the batch is
the mean of its ghost-batch losses, so the mean of the A micro-batch gradients *is* the
gradient of the whole batch, and memory does not grow with A (`lax.scan`).

Sharding is jit + NamedSharding (DESIGN.md decision 6): parameters replicated, batches
split over the `data` axis. A training batch has shape (A, devices·b, ...); device d
holds a contiguous run of A·b stream positions, so process p's share of each global
batch is one contiguous slice of positions (see `global_train_batch`).
"""


import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import struct
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the batch-norm running statistics."""

  batch_stats: Any


@struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


@struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
  """How a global batch is split: B = devices × accumulation × micro_batch_size."""

  batch_size: int
  num_devices: int
  accumulation: int  # A
  micro_batch_size: int  # b, per device

  @property
  def shape(self) -> tuple[int, int]:
    """Leading shape of the training batch array: (A, devices · b)."""
    return (self.accumulation, self.num_devices * self.micro_batch_size)


def plan_micro_batches(
    batch_size: int, num_devices: int, ghost_batch_size: int, max_micro_batch_size: int
) -> MicroBatchPlan:
  """The fewest accumulation steps A whose per-device micro-batch b fits the cap.

  b must divide B/devices and be a multiple of the ghost batch size; raises ValueError
  naming the config field to change when no such split exists.
  """
  if ghost_batch_size > max_micro_batch_size:
    raise ValueError(
        f'config.ghost_batch_size={ghost_batch_size} exceeds config.max_micro_batch_size='
        f'{max_micro_batch_size}; raise the cap or lower the ghost batch size.'
    )
  unit = num_devices * ghost_batch_size
  if batch_size % unit:
    raise ValueError(
        f'Batch size {batch_size} is not divisible by devices × ghost_batch_size = '
        f'{num_devices} × {ghost_batch_size} = {unit}. Make every phase batch size a '
        f'multiple of {unit} (config.schedule.batch_size and the factors that grow it), '
        'or change config.ghost_batch_size.'
    )
  per_device = batch_size // num_devices
  accumulation = -(-per_device // max_micro_batch_size)
  while per_device % accumulation or (per_device // accumulation) % ghost_batch_size:
    accumulation += 1
  return MicroBatchPlan(batch_size, num_devices, accumulation, per_device // accumulation)


def make_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over all devices, with Auto axes (Explicit breaks optax's CE)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh(
      (len(devices),),
      (DATA_AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices,
  )


def train_batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(None, DATA_AXIS))


def eval_batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_train_batch(local: dict[str, np.ndarray], plan: MicroBatchPlan, mesh) -> dict:
  """This process's contiguous slice of a global batch → the sharded (A, D·b, ...) array.

  The process holds its local devices' positions in order: device-major, then A, then b.
  Swapping the first two axes puts micro-batch a of every device at index a.
  """
  sharding = train_batch_sharding(mesh)
  local_devices = plan.num_devices // jax.process_count()

  def to_global(x: np.ndarray) -> jax.Array:
    x = x.reshape((local_devices, plan.accumulation, plan.micro_batch_size, *x.shape[1:]))
    x = np.swapaxes(x, 0, 1).reshape(
        (plan.accumulation, local_devices * plan.micro_batch_size, *x.shape[3:])
    )
    return jax.make_array_from_process_local_data(
        sharding, x, (plan.accumulation, plan.shape[1], *x.shape[2:])
    )

  return {k: to_global(v) for k, v in local.items()}


def global_eval_batch(local: dict[str, np.ndarray], mesh) -> dict:
  sharding = eval_batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(
          sharding, v, (v.shape[0] * jax.process_count(), *v.shape[1:])
      )
      for k, v in local.items()
  }


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(
    state: TrainState, batch: dict[str, jax.Array]
) -> tuple[TrainState, TrainMetrics]:
  """One parameter update on a batch of shape (A, devices·b, ...).

  Scans over the A micro-batches, threading the BN statistics through them in order and
  summing gradients; the update uses their mean, the whole batch's gradient.
  """

  def micro_step(carry, micro):
    grad_sum, batch_stats = carry

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {'params': params, 'batch_stats': batch_stats},
          micro['input'],
          train=True,
          mutable=['batch_stats'],
      )
      losses = cross_entropy_loss(logits, micro['label'])
      return jnp.mean(losses), (updates['batch_stats'], losses, logits)

    (_, (batch_stats, losses, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    correct = jnp.argmax(logits, -1) == micro['label']
    return (grad_sum, batch_stats), (losses, correct)

  accumulation = batch['label'].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grad_sum, batch_stats), (losses, correct) = jax.lax.scan(
      micro_step, (zeros, state.batch_stats), batch
  )
  grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, TrainMetrics.single_from_model_output(loss=losses, accuracy=correct)


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> EvalMetrics:
  """Metrics summed over the real (mask = 1) examples of a padded batch."""
  logits = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats}, batch['input'], train=False
  )
  return EvalMetrics.single_from_model_output(
      loss=cross_entropy_loss(logits, batch['label']),
      accuracy=jnp.argmax(logits, -1) == batch['label'],
      mask=batch['mask'],
  )


def jit_train_step(mesh) -> Callable:
  """train_step jitted for the mesh: state replicated (and donated), batch sharded."""
  return jax.jit(
      train_step,
      in_shardings=(replicated(mesh), train_batch_sharding(mesh)),
      out_shardings=(replicated(mesh), replicated(mesh)),
      donate_argnums=0,
  )


def jit_eval_step(mesh) -> Callable:
  return jax.jit(
      eval_step,
      in_shardings=(replicated(mesh), eval_batch_sharding(mesh)),
      out_shardings=replicated(mesh),
  )


def batch_shapes(plan: MicroBatchPlan, example: dict[str, np.ndarray]) -> dict:
  """Abstract training batch of `plan`'s shape, for ahead-of-time compilation."""
  return {
      k: jax.ShapeDtypeStruct((*plan.shape, *v.shape[1:]), v.dtype) for k, v in example.items()
  }


def compile_train_steps(
    mesh, state: TrainState, plans: list[MicroBatchPlan], example: dict[str, np.ndarray]
) -> dict[tuple[int, int], Any]:
  """One ahead-of-time compiled step per distinct (A, devices·b) (DESIGN.md decision 4).

  Compiling every phase's shape before training means a phase that cannot fit fails at
  step 0, not at epoch 160, and a phase switch never stalls. Returns {shape: compiled}.
  """
  jitted = jit_train_step(mesh)
  state_shapes = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), state
  )
  compiled = {}
  for plan in plans:
    if plan.shape not in compiled:
      compiled[plan.shape] = jitted.lower(state_shapes, batch_shapes(plan, example)).compile()
  return compiled
