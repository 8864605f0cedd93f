"""Mesh, micro-batch plans and the host → device layout of batches (one device order).

Global batch B = devices × A × b (docs/DESIGN.md decision 3): b, the per-device
micro-batch, is a multiple of the ghost batch size and at most `max_micro_batch_size`;
the accumulation count A grows with the phase.

One device order threads through input and step (big_vision's habit): the order of the
mesh's `data` axis. A training batch has the global shape (K, A, D·b, ...), sharded on
its third axis, so the device at mesh position i holds rows [i·b, (i+1)·b) of every
micro-batch: (K, A, b, ...) for the per-device step (ibs/step.py). Each process reads one
contiguous slice of the global batch's stream positions (ibs/data/pipeline.py) and
hands it to its own devices in their mesh order, device-major: local device j gets the
j-th run of A·b consecutive positions, micro-batch a being the a-th chunk of that run. On
one process this makes mesh position i hold positions [i·A·b, (i+1)·A·b), whatever
order `jax.make_mesh` chose for the devices (tests/test_multidevice.py builds a mesh from
a permuted device list).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
  """How a global batch is split: B = devices × accumulation × micro_batch_size."""

  batch_size: int
  num_devices: int
  accumulation: int  # A
  micro_batch_size: int  # b, per device

  @property
  def shape(self) -> tuple[int, int]:
    """Leading shape of one step's global batch: (A, devices · b)."""
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
  """A 1-D `data` mesh with Auto axes (Explicit breaks optax's integer-label CE).

  Without `devices`, `jax.make_mesh` orders all devices for the hardware's topology;
  given a list, the mesh keeps its order.
  """
  if devices is None:
    return jax.make_mesh(
      (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )
  return jax.sharding.Mesh(
    np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh) -> Any:
  """`tree` with every array replicated on every device of `mesh`, in any process layout.

  The one way ibs places a state, metrics or a hyperparameter on the mesh. Arrays that
  already have that layout are returned as they are; any other value goes through this
  process's copy on the host. Not `jax.device_put` of a device array: onto a mesh over
  several processes whose local part is one device (one process per GPU, the usual
  cluster layout), JAX builds an array whose shards cannot be read ('... must have one
  shard each'), and orbax fails to save it. Values built on the device should be built
  on the mesh instead (`jax.jit(..., out_shardings=replicated(mesh))`).
  """
  target = replicated(mesh)

  def put(x: Any) -> jax.Array:
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(target, x.ndim):
        return x
      x = x.addressable_data(0)  # replicated: any local copy is the value
    return jax.device_put(np.asarray(x), target)

  return jax.tree.map(put, tree)


def host_value(x: Any) -> np.ndarray:
  """A replicated (possibly multi-process) array's value, from this process's copy; a
  host value as it is."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


# Cached: asked for on every dispatch (meshes are hashable).
@functools.cache
def train_batch_sharding(mesh) -> NamedSharding:
  """(K, A, D·b, ...) split over devices on its third axis."""
  return NamedSharding(mesh, P(None, None, DATA_AXIS))


@functools.cache
def eval_batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


@functools.cache
def local_mesh_devices(mesh) -> tuple[Any, ...]:
  """This process's devices in the order they appear on the mesh's `data` axis."""
  me = jax.process_index()
  return tuple(d for d in mesh.devices.flat if d.process_index == me)


def train_batches_to_device(
  local_batches: list[dict[str, np.ndarray]],
  plan: MicroBatchPlan,
  mesh,
  steps_per_dispatch: int,
) -> dict[str, jax.Array]:
  """n ≤ K consecutive local batches → one sharded (K, A, D·b, ...) global array.

  Slots n…K−1 are zeros that the step never reads: one shape, so one executable, serves
  a dispatch cut short by a phase end or a log, evaluation or checkpoint boundary.
  """
  n = len(local_batches)
  if not 1 <= n <= steps_per_dispatch:
    raise ValueError(f'{n} batches for a dispatch of at most {steps_per_dispatch} steps.')

  def stack(key: str) -> np.ndarray:
    arrays = [local[key] for local in local_batches]
    padding = [np.zeros_like(arrays[0])] * (steps_per_dispatch - n)
    return _arrange(np.stack(arrays + padding), plan)

  return _to_global(
    {k: stack(k) for k in local_batches[0]}, train_batch_sharding(mesh), axis=2
  )


def _arrange(x: np.ndarray, plan: MicroBatchPlan) -> np.ndarray:
  """(K, local examples, ...) → (K, A, local devices · b, ...), device-major positions.

  Local device j holds positions [j·A·b, (j+1)·A·b) of the process's slice; swapping the
  device and accumulation axes puts micro-batch a of every device at index a.
  """
  local_devices = plan.num_devices // jax.process_count()
  k, rest = x.shape[0], x.shape[2:]
  x = x.reshape((k, local_devices, plan.accumulation, plan.micro_batch_size, *rest))
  x = np.swapaxes(x, 1, 2)
  return x.reshape((k, plan.accumulation, local_devices * plan.micro_batch_size, *rest))


def eval_batch_to_device(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's slice of an evaluation batch → the batch sharded over devices."""
  return _to_global(local, eval_batch_sharding(mesh), axis=0)


def _to_global(local: dict[str, np.ndarray], sharding: NamedSharding, axis: int) -> dict:
  """Process-local arrays, split along `axis` over this process's devices in mesh order.

  One transfer call per batch on one process (half the host time of building arrays key
  by key, which matters at small batches); on one device, the device itself as target,
  another 30 µs a batch cheaper than the equivalent NamedSharding. On several processes
  each local device receives its own chunk, placed by `make_array_from_single_device_
  arrays`, so the layout follows the mesh even where a process's devices are not one
  contiguous block of it.
  """
  mesh = sharding.mesh
  if jax.process_count() == 1:
    if mesh.size == 1:
      return jax.device_put(local, mesh.devices.flat[0])
    return jax.device_put(local, sharding)
  devices = local_mesh_devices(mesh)

  def to_global(x: np.ndarray) -> jax.Array:
    chunks = np.split(x, len(devices), axis=axis)
    shape = (*x.shape[:axis], x.shape[axis] * jax.process_count(), *x.shape[axis + 1 :])
    arrays = [jax.device_put(c, d) for c, d in zip(chunks, devices, strict=True)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return {k: to_global(v) for k, v in local.items()}
