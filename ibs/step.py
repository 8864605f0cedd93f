"""The train and eval steps: exact gradient accumulation, sharded over a `data` mesh axis.

Global batch B = devices × A × b (DESIGN.md decision 3): b, the per-device micro-batch,
is a multiple of the ghost batch size and at most `max_micro_batch_size`; the
accumulation count A grows with the phase. With ghost batch norm the loss of the batch is
the mean of its ghost-batch losses, so the mean of the A micro-batch gradients *is* the
gradient of the whole batch, and memory does not grow with A (`lax.scan`; a batch that
fits, A = 1, runs without the loop; on XLA:CPU a model with convolutions loops in Python
instead, see `HostLoopStep`).

Sharding is jit + NamedSharding (DESIGN.md decision 6): parameters replicated, batches
split over the `data` axis. A training batch has shape (A, devices·b, ...); device d
holds a contiguous run of A·b stream positions, so process p's share of each global
batch is one contiguous slice of positions (see `global_train_batch`). Micro-batch a is
the a-th chunk of every device, so the BN running statistics see the ghost batches in
stream order unless both A > 1 and devices > 1; then in the order (a, device, ghost
batch). Parameters do not depend on that order. XLA all-reduces the gradient once per
micro-batch, inside the loop (docs/BENCHMARKS.md, "Train step").

Compilation (DESIGN.md decision 4): `compile_train_steps` compiles one executable per
distinct batch shape ahead of time; ε and m are values in the optimizer state, so phases
that share a shape share the executable, and an executable never recompiles.

Several steps per dispatch (`train_steps`): where a step lasts a few hundred
microseconds (small models, small batches, a laptop CPU), the host's work per call is a
visible share of it; K steps in one executable pay it once per K.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
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
class NonFiniteCount(metrics.Metric):
  """[issue16] Updates whose loss or gradient was NaN or inf, summed (a float32)."""

  total: jax.Array

  @classmethod
  def empty(cls) -> 'NonFiniteCount':
    return cls(total=jnp.array(0, jnp.float32))

  @classmethod
  def from_model_output(cls, *, nonfinite: jax.Array, **_) -> 'NonFiniteCount':
    return cls(total=jnp.sum(nonfinite).astype(jnp.float32))

  def merge(self, other: 'NonFiniteCount') -> 'NonFiniteCount':
    return type(self)(total=self.total + other.total)

  def compute(self) -> jax.Array:
    return self.total


@struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  nonfinite: NonFiniteCount  # [issue16]


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


# Cached: the batch shardings are asked for on every dispatch (meshes are hashable).
@functools.cache
def train_batch_sharding(mesh, steps_per_dispatch: int = 1) -> NamedSharding:
  """(A, D·b, ...) sharded on its second axis; with K > 1 steps, (K, A, D·b, ...)."""
  leading = (None,) if steps_per_dispatch > 1 else ()
  return NamedSharding(mesh, P(*leading, None, DATA_AXIS))


@functools.cache
def eval_batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_train_batch(local: dict[str, np.ndarray], plan: MicroBatchPlan, mesh) -> dict:
  """This process's contiguous slice of a global batch → the sharded (A, D·b, ...) array."""
  arranged = {k: _arrange(v, plan, leading_axes=0) for k, v in local.items()}
  return _to_global(arranged, train_batch_sharding(mesh), axis=1)


def global_train_batches(
  local_batches: list[dict[str, np.ndarray]],
  plan: MicroBatchPlan,
  mesh,
  steps_per_dispatch: int,
) -> dict:
  """n ≤ K consecutive local batches → one sharded (K, A, D·b, ...) array for `train_steps`.

  Slots n…K−1 are zeros that the step never reads: one shape, so one executable, serves
  a dispatch cut short by a phase end or a log, evaluation or checkpoint boundary.
  """
  n = len(local_batches)
  if not 1 <= n <= steps_per_dispatch:
    raise ValueError(f'{n} batches for a dispatch of at most {steps_per_dispatch} steps.')

  def stack(key: str) -> np.ndarray:
    arrays = [local[key] for local in local_batches]
    padding = [np.zeros_like(arrays[0])] * (steps_per_dispatch - n)
    return _arrange(np.stack(arrays + padding), plan, leading_axes=1)

  sharding = train_batch_sharding(mesh, steps_per_dispatch)
  return _to_global({k: stack(k) for k in local_batches[0]}, sharding, axis=2)


def _arrange(x: np.ndarray, plan: MicroBatchPlan, leading_axes: int) -> np.ndarray:
  """(..., local examples, ...) → (..., A, local devices · b, ...), for the mesh.

  The process holds its local devices' positions in order: device-major, then A, then b.
  Swapping those two axes puts micro-batch a of every device at index a.
  """
  local_devices = plan.num_devices // jax.process_count()
  lead, rest = x.shape[:leading_axes], x.shape[leading_axes + 1 :]
  x = x.reshape((*lead, local_devices, plan.accumulation, plan.micro_batch_size, *rest))
  x = np.swapaxes(x, leading_axes, leading_axes + 1)
  return x.reshape(
    (*lead, plan.accumulation, local_devices * plan.micro_batch_size, *rest)
  )


def global_eval_batch(local: dict[str, np.ndarray], mesh) -> dict:
  """This process's slice of an evaluation batch → the batch sharded over devices."""
  return _to_global(local, eval_batch_sharding(mesh), axis=0)


def _to_global(local: dict[str, np.ndarray], sharding: NamedSharding, axis: int) -> dict:
  """Process-local arrays, concatenated over processes along `axis`, as global arrays."""
  if jax.process_count() == 1:
    # One transfer call for the whole batch: about half the host time per step of
    # make_array_from_process_local_data per key, which matters at small batches. On
    # one device, its own sharding (equivalent, accepted by the compiled step) is
    # another 30 µs a batch cheaper than the NamedSharding.
    if sharding.mesh.size == 1:
      return jax.device_put(local, sharding.mesh.devices.flat[0])
    return jax.device_put(local, sharding)

  def to_global(x: np.ndarray) -> jax.Array:
    shape = (*x.shape[:axis], x.shape[axis] * jax.process_count(), *x.shape[axis + 1 :])
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return {k: to_global(v) for k, v in local.items()}


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def micro_batch_gradients(
  state: TrainState, batch_stats: Any, micro: dict[str, jax.Array]
):
  """Gradient of one micro-batch's mean loss, its BN statistics, losses and hits."""

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
  correct = jnp.argmax(logits, -1) == micro['label']
  return grads, batch_stats, losses, correct


def _merged_metrics(
  losses, correct, running_metrics: TrainMetrics | None, nonfinite=False
) -> TrainMetrics:
  # Float32 totals, the dtype of TrainMetrics.empty(): running metrics keep one signature.
  batch_metrics = TrainMetrics.single_from_model_output(
    loss=losses,
    accuracy=correct.astype(jnp.float32),
    nonfinite=jnp.asarray(nonfinite, jnp.float32),
  )
  return (
    batch_metrics if running_metrics is None else running_metrics.merge(batch_metrics)
  )


def _nonfinite_guard(state, new_state, grads, losses, skip_nonfinite: bool):
  """[issue16] Whether the update's loss or gradient is not finite; with
  `skip_nonfinite`, such an update leaves params, BN statistics and optimizer state as
  they were (the step counter still advances)."""
  bad = ~(jnp.all(jnp.isfinite(losses)) & jnp.isfinite(optax.global_norm(grads)))
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, old)  # noqa: E731
    new_state = new_state.replace(
      params=keep(new_state.params, state.params),
      opt_state=keep(new_state.opt_state, state.opt_state),
      batch_stats=keep(new_state.batch_stats, state.batch_stats),
    )
  return new_state, bad


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  running_metrics: TrainMetrics | None = None,
  skip_nonfinite: bool = False,
) -> tuple[TrainState, TrainMetrics]:
  """One parameter update on a batch of shape (A, devices·b, ...).

  Scans over the A micro-batches, threading the BN statistics through them in order and
  summing gradients; the update uses their mean, the whole batch's gradient. The
  micro-batch loss is the mean over all devices' examples, so under jit the gradient is
  already all-reduced over the `data` axis: no explicit collective is written here.

  Returns the new state and this batch's metrics, or, given `running_metrics`, those
  merged with this batch's: one dispatch per step instead of a step and a merge.
  """
  accumulation = batch['label'].shape[0]
  if accumulation == 1:
    # No loop for a batch that fits: the step is then exactly a plain jitted step.
    grads, batch_stats, losses, correct = micro_batch_gradients(
      state, state.batch_stats, jax.tree.map(lambda x: x[0], batch)
    )
  else:

    def body(carry, micro):
      grad_sum, batch_stats = carry
      grads, batch_stats, losses, correct = micro_batch_gradients(
        state, batch_stats, micro
      )
      return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), (losses, correct)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, batch_stats), (losses, correct) = jax.lax.scan(
      body, (zeros, state.batch_stats), batch
    )
    grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state, bad = _nonfinite_guard(state, new_state, grads, losses, skip_nonfinite)
  return new_state, _merged_metrics(losses, correct, running_metrics, bad)


def train_steps(
  state: TrainState,
  batches: dict[str, jax.Array],
  running_metrics: TrainMetrics,
  num_steps: jax.Array,
  skip_nonfinite: bool = False,
) -> tuple[TrainState, TrainMetrics]:
  """`num_steps` ≤ K updates, on batches[0], …, batches[num_steps − 1], in one dispatch.

  `batches` has shape (K, A, devices·b, ...). Each iteration is `train_step`, so the
  result is that of `num_steps` single steps; the trip count is a value, not a shape, so
  the executable is the same for every count (`global_train_batches` pads).
  """

  def body(index, carry):
    state, running_metrics = carry
    batch = jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, False), batches
    )
    return train_step(state, batch, running_metrics, skip_nonfinite)

  return jax.lax.fori_loop(0, num_steps, body, (state, running_metrics))


class MultiStep:
  """A compiled `train_steps` for K batches, called as `(state, batches, metrics, n)`.

  Holds the step counts 1…K on the device, so a call transfers nothing but the batches.
  """

  def __init__(self, compiled, steps_per_dispatch: int, mesh):
    self._compiled = compiled
    self.steps_per_dispatch = steps_per_dispatch
    self._counts = [
      jax.device_put(np.int32(n), replicated(mesh)) for n in range(steps_per_dispatch + 1)
    ]

  def __call__(self, state, batches, running_metrics, num_steps: int):
    return self._compiled(state, batches, running_metrics, self._counts[num_steps])

  def memory_analysis(self):
    return self._compiled.memory_analysis()


# The host-loop form of the same step, for XLA:CPU. XLA:CPU rewrites convolutions into
# the layouts its fast kernels take only in the entry computation, not inside a while
# loop: in a `lax.scan` the gradient convolutions of a conv net fall back to a naive
# loop nest, ~20x slower (WRN-10-1 on 2 cores: 0.1 s a step at A = 1, 2.1 s at A = 2;
# docs/BENCHMARKS.md). Unrolling the scan would let memory grow with A. So on CPU a
# model with convolutions accumulates in a Python loop over one compiled micro-batch
# step, then one compiled update: A + 1 dispatches, the same arithmetic in the same
# order, memory that does not grow with A. Matmul-only models (cnn1d, MLP) and other
# backends keep the scan.


def accumulate_micro_batch(
  state: TrainState,
  batch_stats: Any,
  grad_sum: Any,
  running_metrics: TrainMetrics,
  batch: dict[str, jax.Array],
  index: jax.Array,
):
  """Micro-batch `index` of `batch`: its gradient added to `grad_sum` (reset at 0)."""
  micro = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, False), batch)
  grads, batch_stats, losses, correct = micro_batch_gradients(state, batch_stats, micro)
  grad_sum = jax.tree.map(lambda s, g: jnp.where(index == 0, g, s + g), grad_sum, grads)
  return batch_stats, grad_sum, _merged_metrics(losses, correct, running_metrics)


def apply_accumulated(
  state: TrainState,
  grad_sum: Any,
  batch_stats: Any,
  running_metrics: TrainMetrics,
  accumulation: int,
  skip_nonfinite: bool = False,
):
  """The update with the mean of the accumulated micro-batch gradients.

  [issue16] Also counts it in `running_metrics.nonfinite` when the gradient is not
  finite (a non-finite loss makes a non-finite gradient).
  """
  grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state, bad = _nonfinite_guard(
    state, new_state, grads, jnp.zeros(()), skip_nonfinite
  )
  counted = running_metrics.replace(
    nonfinite=running_metrics.nonfinite.merge(
      NonFiniteCount.from_model_output(nonfinite=bad)
    )
  )
  return new_state, counted


class HostLoopStep:
  """A compiled train step that loops over micro-batches in Python (see above).

  Called like the compiled `train_step`: `(state, batch)` or, compiled with
  running metrics, `(state, batch, running_metrics)`. Keeps one gradient-sum buffer
  between calls, so it is not thread-safe; `memory_analysis()` is the micro-batch
  step's, the part that runs A times.
  """

  def __init__(self, micro, update, plan: MicroBatchPlan, mesh, state, running_metrics):
    self._micro, self._update = micro, update
    self._running = running_metrics
    self._mesh = mesh
    self._indices = [
      jax.device_put(np.int32(a), replicated(mesh)) for a in range(plan.accumulation)
    ]
    self._grad_sum = jax.device_put(
      jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.params), replicated(mesh)
    )

  def __call__(self, state, batch, running_metrics=None):
    metrics = running_metrics if self._running else empty_train_metrics(self._mesh)
    batch_stats, grad_sum = state.batch_stats, self._grad_sum
    for index in self._indices:
      batch_stats, grad_sum, metrics = self._micro(
        state, batch_stats, grad_sum, metrics, batch, index
      )
    self._grad_sum = grad_sum  # Not donated to the update: reused by the next step.
    return self._update(state, grad_sum, batch_stats, metrics)

  def memory_analysis(self):
    return self._micro.memory_analysis()


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> EvalMetrics:
  """Metrics summed over the real (mask = 1) examples of a padded batch."""
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['input'],
    train=False,
  )
  return EvalMetrics.single_from_model_output(
    loss=cross_entropy_loss(logits, batch['label']),
    accuracy=jnp.argmax(logits, -1) == batch['label'],
    mask=batch['mask'],
  )


def jit_train_step(
  mesh,
  running_metrics: bool = False,
  steps_per_dispatch: int = 1,
  skip_nonfinite: bool = False,
):
  """train_step jitted for the mesh: state replicated (and donated), batch sharded.

  With `running_metrics` the step takes the running TrainMetrics as a third argument
  (replicated, donated) and returns them merged. With `steps_per_dispatch` K > 1 it is
  `train_steps` (running metrics, a fourth argument: the number of steps).
  """
  rep, batch = replicated(mesh), train_batch_sharding(mesh, steps_per_dispatch)
  skip = {'skip_nonfinite': skip_nonfinite}  # [issue16]
  if steps_per_dispatch > 1:
    return jax.jit(
      functools.partial(train_steps, **skip),
      in_shardings=(rep, batch, rep, rep),
      out_shardings=(rep, rep),
      donate_argnums=(0, 2),
    )
  if running_metrics:
    return jax.jit(
      functools.partial(train_step, **skip),
      in_shardings=(rep, batch, rep),
      out_shardings=(rep, rep),
      donate_argnums=(0, 2),
    )
  return jax.jit(
    functools.partial(train_step, **skip),
    in_shardings=(rep, batch),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )


def empty_train_metrics(mesh) -> TrainMetrics:
  """Zero running metrics on the mesh, to pass to a step compiled with running_metrics."""
  return jax.device_put(TrainMetrics.empty(), replicated(mesh))


def jit_eval_step(mesh) -> Callable:
  return jax.jit(
    eval_step,
    in_shardings=(replicated(mesh), eval_batch_sharding(mesh)),
    out_shardings=replicated(mesh),
  )


def batch_shapes(
  plan: MicroBatchPlan, example: dict[str, np.ndarray], steps_per_dispatch: int = 1
) -> dict:
  """Abstract training batch of `plan`'s shape, for ahead-of-time compilation."""
  leading = (steps_per_dispatch,) if steps_per_dispatch > 1 else ()
  return {
    k: jax.ShapeDtypeStruct((*leading, *plan.shape, *v.shape[1:]), v.dtype)
    for k, v in example.items()
  }


def compile_train_steps(
  mesh,
  state: TrainState,
  plans: list[MicroBatchPlan],
  example: dict[str, np.ndarray],
  *,
  running_metrics: bool = False,
  host_loop: bool | None = None,
  steps_per_dispatch: int = 1,
  skip_nonfinite: bool = False,
) -> dict[tuple[int, int], Any]:
  """One ahead-of-time compiled step per distinct (A, devices·b) (DESIGN.md decision 4).

  Compiling every phase's shape before training means a phase that cannot fit fails at
  step 0, not at epoch 160, and a phase switch never stalls. Returns {shape: compiled}.
  A compiled step never recompiles: called with another shape, dtype or sharding it
  raises, so a phase switch cannot silently trigger a compilation. ε and m are values in
  the optimizer state, so phases that differ only in them share one compiled step.
  `state` may be concrete or abstract (`jax.eval_shape`); `example` is one example per
  input key. With `running_metrics` see `jit_train_step`. `host_loop` (None: only on
  XLA:CPU for a model with convolutions) compiles shapes with A > 1 as a HostLoopStep:
  two executables, the micro-batch step and the update. `steps_per_dispatch` K > 1
  compiles `train_steps` as a MultiStep (needs running metrics and no host loop; see
  `resolve_steps_per_dispatch`).
  """
  rep = replicated(mesh)
  state_shapes = _abstract(state, rep)
  metric_shapes = _abstract(TrainMetrics.empty(), rep)
  if steps_per_dispatch > 1:
    if not running_metrics or host_loop:
      raise ValueError(
        'steps_per_dispatch > 1 needs running_metrics=True and no host loop.'
      )
    host_loop = False
  jitted = jit_train_step(mesh, running_metrics, steps_per_dispatch, skip_nonfinite)
  accumulating = [plan for plan in plans if plan.accumulation > 1]
  if host_loop is None:
    host_loop = bool(accumulating) and _slow_in_a_loop(
      state_shapes, accumulating[0], example
    )
  compiled = {}
  for plan in plans:
    if plan.shape in compiled:
      continue
    batch = batch_shapes(plan, example, steps_per_dispatch)
    if steps_per_dispatch > 1:
      count = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
      executable = jitted.lower(state_shapes, batch, metric_shapes, count).compile()
      compiled[plan.shape] = MultiStep(executable, steps_per_dispatch, mesh)
    elif host_loop and plan.accumulation > 1:
      micro = jax.jit(
        accumulate_micro_batch,
        in_shardings=(rep, rep, rep, rep, train_batch_sharding(mesh), rep),
        out_shardings=(rep, rep, rep),
        donate_argnums=(2, 3),
      ).lower(
        state_shapes,
        state_shapes.batch_stats,
        state_shapes.params,
        metric_shapes,
        batch,
        jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
      )
      update = jax.jit(
        functools.partial(
          apply_accumulated,
          accumulation=plan.accumulation,
          skip_nonfinite=skip_nonfinite,
        ),
        in_shardings=(rep, rep, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0, 3),
      ).lower(state_shapes, state_shapes.params, state_shapes.batch_stats, metric_shapes)
      compiled[plan.shape] = HostLoopStep(
        micro.compile(), update.compile(), plan, mesh, state_shapes, running_metrics
      )
    else:
      args = (
        (state_shapes, batch, metric_shapes) if running_metrics else (state_shapes, batch)
      )
      compiled[plan.shape] = jitted.lower(*args).compile()
  return compiled


def resolve_steps_per_dispatch(
  requested: int, state: Any, plans: list[MicroBatchPlan], example: dict[str, np.ndarray]
) -> int:
  """`requested`, or 1 where a loop around the step would be slow (see HostLoopStep).

  K steps run in a loop; on XLA:CPU a model with convolutions is ~20× slower in one.
  """
  if requested > 1 and _slow_in_a_loop(_abstract(state, None), plans[0], example):
    logging.warning(
      'config.steps_per_dispatch=%d ignored: on XLA:CPU a convolutional model runs '
      'much slower inside a loop; one step per dispatch instead.',
      requested,
    )
    return 1
  return requested


def _slow_in_a_loop(
  state: Any, plan: MicroBatchPlan, example: dict[str, np.ndarray]
) -> bool:
  """Whether the backend is XLA:CPU and the model convolves (see HostLoopStep)."""
  if jax.default_backend() != 'cpu':
    return False
  micro = {
    k: jax.ShapeDtypeStruct((plan.shape[1], *v.shape[1:]), v.dtype)
    for k, v in example.items()
  }
  jaxpr = jax.make_jaxpr(micro_batch_gradients)(state, state.batch_stats, micro)
  return _convolves(jaxpr.jaxpr)


def _convolves(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      return True
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        inner = getattr(sub, 'jaxpr', sub)  # A ClosedJaxpr holds its Jaxpr.
        if hasattr(inner, 'eqns') and _convolves(inner):
          return True
  return False


def _abstract(tree: Any, sharding: NamedSharding | None) -> Any:
  """Shapes and dtypes of `tree` (arrays, abstract values or Python scalars) on `sharding`."""

  def spec(x):
    x = x if hasattr(x, 'shape') else jnp.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(spec, tree)
