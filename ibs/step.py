"""The train step: per-device accumulation, one gradient reduction, noise scale measured.

Every compiled train step is called one way, `step(state, local_batches, metrics) →
(state, metrics)`, with 1 ≤ n ≤ K host batches (this process's slices of n consecutive
global batches): the step lays them out on the mesh (ibs/sharding.py), runs n updates in
one dispatch and merges their metrics into the running ones.

One update, per device (a `shard_map` over the mesh's `data` axis; docs/DESIGN.md
decisions 3 and 11). Device d holds A micro-batches of b examples and sums their
gradients itself; then

    G_B = mean_d G_d                          one all-reduce of the gradient per update
    |G_b|² = mean_d |G_d|²,  b = A·b_micro    a scalar all-reduce (devices > 1), or
    |G_b|² = mean_a |G_a|²,  b = b_micro      over micro-batches on one device (A > 1)

and the two squared norms feed McCandlish et al.'s estimators and their moving averages
(ibs/gns.py). One device with one micro-batch has only one batch size, so there a
measuring update splits its batch into halves (at a ghost-batch boundary, which ghost
BN does not couple) and back-propagates the forward pass once more with cotangents
+1/n₁ and −1/n₂: the halves' difference D = G₁ − G₂, from which w₁|G₁|² + w₂|G₂|² =
|G|² + w₁w₂|D|² (`halves_sq_norm`). The update itself stays the plain one. That extra
backward pass costs most of an update (0.8 of one at B = 800 on XLA:CPU,
docs/BENCHMARKS.md), so such steps measure on every
`config.gns.split_every`-th update only (and a few times per horizon at least,
`measure_every`): one `lax.cond` on the step holds it, in the same program as the
plain update.
`config.gns.enabled=False` turns the measurement off everywhere.

With ghost batch norm the loss of a batch is the mean of its ghost-batch losses, so the
mean of the micro-batch gradients *is* the whole batch's gradient (docs/PAPER.md, "Batch
norm"), and memory does not grow with A (a `fori_loop` indexing the batch in place). The
BN running averages move once per ghost batch, in order: for micro-batch a, device 0's
ghost batches, then device 1's, ... Each device carries its closed-form share of those
updates over its micro-batches and the shares are summed in the update's one all-reduce
(ibs/models/ghost_batch_norm.py): 2F floats per BN layer, whatever B; on one device this
is the sequential update itself.

Non-finite updates (docs/DESIGN.md decision 12): an update whose loss or gradient is not
finite, or that would leave a parameter, BN statistic or optimizer moment non-finite (a
finite gradient times a large ε), is never applied. With `nonfinite='stop'` the state
then freezes (every later update is a no-op) and records the step; the loop stops and
never checkpoints a non-finite state. With 'skip' the update is dropped, counted, and
training goes on.

Compilation (docs/DESIGN.md decision 4): `compile_train_steps` compiles one executable
per distinct batch shape ahead of time; ε and m are values in the optimizer state, so
phases that share a shape share the executable, and it never recompiles. The choice of
K (updates per dispatch), of the XLA:CPU host loop and of the split measurement is made
once, in `_loop_structure`; the first phase's program compiles before training, the
others beside it.
"""

import concurrent.futures
import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from flax import struct
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from ibs import aot, sharding
from ibs import gns as gns_lib
from ibs.durability import divergence
from ibs.models import ghost_batch_norm

NONFINITE_POLICIES = divergence.POLICIES


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BN statistics, the noise-scale averages and the guard.

  `nonfinite_updates` counts updates that were not applied because their loss or
  gradient was not finite; `halted_at_step` is the step of the first one under the
  'stop' policy (−1 while training is healthy).
  """

  batch_stats: Any
  gns: gns_lib.GNSState
  nonfinite_updates: jax.Array
  halted_at_step: jax.Array

  @classmethod
  def create(
    cls, *, apply_fn: Any, params: Any, tx: Any, batch_stats: Any, **kwargs: Any
  ) -> 'TrainState':
    return super().create(
      apply_fn=apply_fn,
      params=params,
      tx=tx,
      batch_stats=batch_stats,
      gns=gns_lib.GNSState.empty(),
      nonfinite_updates=jnp.zeros((), jnp.int32),
      halted_at_step=jnp.full((), -1, jnp.int32),
      **kwargs,
    )


@struct.dataclass
class Metrics(clu_metrics.Collection):
  """Mean loss and accuracy, for training (running, per log period) and evaluation."""

  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Average.from_output('accuracy')


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a compiled step measures and guards; static, part of the executable.

  gns_horizon_examples: horizon H of the noise-scale averages; 0 turns the measurement
    off (config.gns.enabled=False).
  gns_split_every: on one device with one micro-batch, measure on every this-many-th
    update only (config.gns.split_every, at most `measure_every`'s cap): a split of
    the batch costs more than a plain update (see `measure_every`). 1: every update.
    0: no split measurement on one device with one micro-batch (chosen for
    convolutional models on XLA:CPU, see `_loop_structure`).
  nonfinite: 'stop' or 'skip' (see the module docstring).
  per_example_loss: (model output, labels) → per-example losses; cross-entropy with
    integer labels for every ibs model (experiments/validate_gns.py passes a squared
    error). Accuracy is counted as argmax(output) == label either way.
  """

  gns_horizon_examples: float = 0.0
  gns_split_every: int = 1
  nonfinite: str = 'stop'
  per_example_loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy_loss

  def __post_init__(self):
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(
        f'config.nonfinite={self.nonfinite!r}; choose one of {NONFINITE_POLICIES}.'
      )


def _per_example_losses(state: TrainState, batch_stats: Any, micro: dict, loss_fn):
  """params → per-example losses, with (BN statistics, logits) as aux."""

  def losses(params):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': batch_stats},
      micro['input'],
      train=True,
      mutable=['batch_stats'],
    )
    new_stats = updates.get('batch_stats', batch_stats)  # None for a model without BN
    return loss_fn(logits, micro['label']), (new_stats, logits)

  return losses


def _forward(state: TrainState, batch_stats: Any, micro: dict, loss_fn) -> tuple:
  """One forward pass: (per-example losses, their VJP in the parameters, BN statistics,
  hits). Every gradient of the micro-batch is a backward pass of this VJP."""
  losses, vjp, (batch_stats, logits) = jax.vjp(
    _per_example_losses(state, batch_stats, micro, loss_fn), state.params, has_aux=True
  )
  return losses, vjp, batch_stats, jnp.argmax(logits, -1) == micro['label']


def _mean_gradient(vjp, losses: jax.Array) -> Any:
  """G = ∇ (1/n) Σ_i ℓ_i: the backward pass of cotangent 1/n for every example."""
  (grads,) = vjp(jnp.full_like(losses, 1.0 / losses.shape[0]))
  return grads


def micro_batch_gradients(
  state: TrainState,
  batch_stats: Any,
  micro: dict,
  loss_fn: Callable[..., Any] = cross_entropy_loss,
) -> tuple[Any, ...]:
  """Gradient of one micro-batch's mean loss, its BN statistics, losses and hits."""
  losses, vjp, batch_stats, hits = _forward(state, batch_stats, micro, loss_fn)
  return _mean_gradient(vjp, losses), batch_stats, losses, hits


def split_point(batch_size: int, ghost_batch_size: int) -> int:
  """Where a one-micro-batch step splits its batch for the noise scale.

  At the ghost-batch boundary nearest the middle, so each half is a batch of its own
  under ghost BN; a batch of one ghost batch splits at its middle.
  """
  ghosts = batch_size // ghost_batch_size
  if ghosts >= 2:
    return (ghosts // 2) * ghost_batch_size
  return batch_size // 2


def halves_sq_norm(vjp, losses: jax.Array, grads: Any, split: int) -> jax.Array:
  """The halves' n-weighted mean squared norm, from one more backward pass.

  With halves of n₁ = `split` and n₂ examples (w_i = n_i/n), G = w₁G₁ + w₂G₂, and the
  backward pass of cotangent +1/n₁ on the first half and −1/n₂ on the second is
  D = G₁ − G₂. Then G₁ = G + w₂D, G₂ = G − w₁D and

      w₁|G₁|² + w₂|G₂|² = |G|² + w₁w₂|D|²,

  whose expectation is |G_true|² + tr(Σ)/(n/2): one estimate of |G_b|² at b = n/2 for
  ibs/gns.py's estimators, whatever the split. Where the halves are whole
  ghost batches, ghost BN couples none of their examples and D is exactly G₁ − G₂; a
  batch of one ghost batch splits at its middle, and the halves share BN statistics (a
  slight bias of tr(Σ)). The update's own gradient G is the plain one either way: a
  run trains the same with the measurement on or off.
  """
  n = losses.shape[0]
  first = jnp.arange(n) < split
  signed = jnp.where(first, 1.0 / split, -1.0 / (n - split)).astype(losses.dtype)
  (difference,) = vjp(signed)
  w1, w2 = split / n, (n - split) / n
  return _sq_norm(grads) + w1 * w2 * _sq_norm(difference)


def _flat_floats(tree: Any) -> jax.Array:
  """Every float of `tree` as one float32 vector, for a reduction over all of them.

  XLA fuses the concatenation into the reduction: one kernel, where a reduction per
  leaf was one kernel per leaf. At B = 32 on XLA:CPU an update is small enough that
  kernels, not FLOPs, set its time: the guard's and the gradient norm's reductions over
  one vector took the default program from 175 to 138 kernels per update and made the
  update 7% faster (docs/BENCHMARKS.md, "No compile in the loop").
  """
  leaves = [
    x.astype(jnp.float32).ravel()
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.concatenate(leaves) if leaves else jnp.zeros(0, jnp.float32)


def _sq_norm(tree: Any) -> jax.Array:
  return jnp.sum(jnp.square(_flat_floats(tree)))


@struct.dataclass
class _Accumulated:
  """One device's sums over the micro-batches of an update."""

  grad_sum: Any
  small_sq_sum: jax.Array  # Σ_a |G_a|², for the one-device noise scale
  metrics: Metrics  # this device's loss and accuracy sums
  batch_stats: Any  # this device's share of the BN running averages (ghost_batch_norm)


def _local_metrics(losses, correct) -> Metrics:
  # Float32 totals, the dtype of Metrics.empty(): running metrics keep one signature.
  return Metrics.single_from_model_output(
    loss=losses, accuracy=correct.astype(jnp.float32)
  )


def device_share(batch_stats: Any) -> Any:
  """Where this device's share of the BN running averages starts: r on device 0, 0 on
  the others, so that their sum over devices after the update is the new r
  (ibs/models/ghost_batch_norm.py)."""
  first = jax.lax.axis_index(sharding.DATA_AXIS) == 0
  return jax.tree.map(lambda r: jnp.where(first, r, jnp.zeros_like(r)), batch_stats)


def _accumulate(state, batch_stats, acc: '_Accumulated | None', micro, options):
  """Adds micro-batch `micro`'s gradient to `acc` (None: the first micro-batch).

  `batch_stats` is this device's share of the running averages so far.
  """
  grads, batch_stats, losses, correct = micro_batch_gradients(
    state, batch_stats, micro, options.per_example_loss
  )
  measure = bool(options.gns_horizon_examples)
  small_sq = _sq_norm(grads) if measure else jnp.zeros((), jnp.float32)
  local = _Accumulated(grads, small_sq, _local_metrics(losses, correct), batch_stats)
  if acc is None:
    return local
  return _Accumulated(
    jax.tree.map(jnp.add, acc.grad_sum, local.grad_sum),
    acc.small_sq_sum + local.small_sq_sum,
    acc.metrics.merge(local.metrics),
    batch_stats,
  )


def _finish(
  state: TrainState,
  acc: _Accumulated,
  running: Metrics,
  plan: sharding.MicroBatchPlan,
  options: StepOptions,
  split: tuple[jax.Array, float] | None = None,
) -> tuple[TrainState, Metrics]:
  """The one reduction over devices, the noise scale, the guard and the update.

  `split` is (|G_b|², b) from `halves_sq_norm` when the batch was split.
  """
  local_grads = jax.tree.map(lambda g: g / plan.accumulation, acc.grad_sum)
  measure = bool(options.gns_horizon_examples)
  # The update's one all-reduce: the gradient, with the metric sums, the squared norm
  # of this device's gradient and its share of the BN running averages (2F floats per
  # layer) riding along, all float32 so that XLA makes one collective of them
  # (independent collectives may run in different orders on different devices, which
  # gloo on CPU cannot match).
  payload = {
    'grads': local_grads,
    'batch_stats': acc.batch_stats,
    'metrics': jax.tree.map(lambda x: x.astype(jnp.float32), acc.metrics),
    'small_sq': _sq_norm(local_grads) if measure else jnp.zeros((), jnp.float32),
  }
  summed = jax.lax.psum(payload, sharding.DATA_AXIS)
  grads = jax.tree.map(lambda g: g / plan.num_devices, summed['grads'])  # the mean
  batch_stats = summed['batch_stats']
  batch_metrics = jax.tree.map(
    lambda total, local: total.astype(local.dtype), summed['metrics'], acc.metrics
  )
  big_sq = _sq_norm(grads)
  gns_state = state.gns
  if measure:
    if plan.num_devices > 1:
      small_sq = summed['small_sq'] / plan.num_devices
      small_b = plan.accumulation * plan.micro_batch_size
    elif plan.accumulation > 1:
      small_sq = acc.small_sq_sum / plan.accumulation
      small_b = plan.micro_batch_size
    else:
      small_sq, small_b = split  # NaN for an update that did not measure
    gns_state = gns_lib.update(
      gns_state, small_sq, big_sq, small_b, plan.batch_size, options.gns_horizon_examples
    )

  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats, gns=gns_state)
  # Finite loss and gradient, and finite parameters, BN statistics and optimizer state
  # after the update: a finite gradient times a large ε can still overflow them.
  finite = (
    jnp.isfinite(big_sq)
    & jnp.isfinite(batch_metrics.loss.total)
    & _all_finite((updated.params, updated.batch_stats, updated.opt_state))
  )
  healthy = state.halted_at_step < 0
  apply = finite & healthy if options.nonfinite == 'stop' else finite
  # Not applied: everything as it was but the clock (step, and the optimizer's count so
  # that ε and m stay on schedule), which must follow the data.
  opt_state = state.opt_state
  if isinstance(
    opt_state, optax.InjectHyperparamsState | optax.InjectStatefulHyperparamsState
  ):
    opt_state = opt_state._replace(count=opt_state.count + 1)
  dropped = state.replace(step=state.step + 1, opt_state=opt_state)
  # One conditional, not a select per leaf: XLA:CPU fuses the scalar `apply` (one
  # reduction per leaf and a chain of adds) into every leaf's select, which doubled the
  # optimised program and its compile time (docs/BENCHMARKS.md, "Compilation"). The
  # same values either way.
  new_state = jax.lax.cond(
    apply, lambda new, _: new, lambda _, old: old, updated, dropped
  )
  new_state = new_state.replace(
    nonfinite_updates=state.nonfinite_updates + (~finite).astype(jnp.int32),
    halted_at_step=jnp.where(healthy & ~finite, state.step, state.halted_at_step)
    if options.nonfinite == 'stop'
    else state.halted_at_step,
  )
  return new_state, running.merge(batch_metrics)


def _all_finite(tree: Any) -> jax.Array:
  """Whether every float in `tree` is finite: Σ 0·x is 0, or NaN if any x is NaN or ±inf
  (one fused reduction, `_flat_floats`; unlike Σ x, it cannot overflow)."""
  return jnp.isfinite(jnp.sum(_flat_floats(tree) * 0))


def _update(
  state: TrainState,
  batch: dict,
  running: Metrics,
  plan: sharding.MicroBatchPlan,
  options: StepOptions,
  ghost_batch_size: int,
  every: int = 1,
) -> tuple[TrainState, Metrics]:
  """One update on this device's (A, b, ...) share of a global batch.

  `every` (`measure_every`) matters only to one device with one micro-batch, where
  measuring the noise scale costs more than a plain update (`_one_micro_batch`).
  """
  start = device_share(state.batch_stats)
  if plan.accumulation == 1:
    micro = jax.tree.map(lambda x: x[0], batch)
    if options.gns_horizon_examples and plan.num_devices == 1:
      return _one_micro_batch(
        state, micro, running, plan, options, ghost_batch_size, every
      )
    # No loop for a batch that fits: the step is then a plain step.
    acc = _accumulate(state, start, None, micro, options)
    return _finish(state, acc, running, plan, options)

  def micro_batch(index):
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, False), batch)

  def body(index, acc):
    return _accumulate(state, acc.batch_stats, acc, micro_batch(index), options)

  # The first micro-batch starts the sums (no zeros to add to); the loop indexes the
  # batch in place, so memory does not grow with A.
  acc = _accumulate(state, start, None, micro_batch(0), options)
  acc = jax.lax.fori_loop(1, plan.accumulation, body, acc)
  return _finish(state, acc, running, plan, options)


def _one_micro_batch(state, micro, running, plan, options, ghost_batch_size, every):
  """One update of one device with one micro-batch, the noise scale measured in it on
  the steps that are multiples of `every`.

  Every update's gradient is the plain one, the backward pass of cotangent 1/n. A
  measuring update back-propagates its forward pass once more (`halves_sq_norm`, the
  batch's two halves). With `every` > 1 one `lax.cond` on the step picks between the
  two, and each branch runs its own forward pass: a forward outside whose residuals fed
  the measuring branch made every update slower on XLA:CPU, measuring or not (on / off
  0.94, 0.94 and 0.80 at B = 32, 160 and 800, against 1.00, 1.02 and 0.88 this way;
  docs/BENCHMARKS.md, "The noise scale from the halves' difference").
  `options.gns_split_every == 0` (a convolutional model on XLA:CPU, `_loop_structure`)
  measures never.
  """
  start = device_share(state.batch_stats)
  split = split_point(plan.micro_batch_size, ghost_batch_size)

  def measured():
    losses, vjp, stats, correct = _forward(state, start, micro, options.per_example_loss)
    grads = _mean_gradient(vjp, losses)
    return grads, halves_sq_norm(vjp, losses, grads, split), stats, losses, correct

  def unmeasured():  # NaN: an update that did not measure.
    grads, stats, losses, correct = micro_batch_gradients(
      state, start, micro, options.per_example_loss
    )
    return grads, jnp.full((), jnp.nan, jnp.float32), stats, losses, correct

  if not options.gns_split_every:
    grads, small_sq, stats, losses, correct = unmeasured()
  elif every == 1:
    grads, small_sq, stats, losses, correct = measured()
  else:
    grads, small_sq, stats, losses, correct = jax.lax.cond(
      state.step % every == 0, measured, unmeasured
    )
  acc = _Accumulated(grads, small_sq, _local_metrics(losses, correct), stats)
  return _finish(
    state, acc, running, plan, options, split=(small_sq, plan.micro_batch_size / 2)
  )


# At least this many measurements per horizon of the moving averages, whatever
# config.gns.split_every says (at B = 800 and H = 20,000 examples: every 6th update).
MEASUREMENTS_PER_HORIZON = 4


def measure_every(plan: sharding.MicroBatchPlan, options: StepOptions) -> int:
  """Every how many updates a step of `plan` measures the noise scale: 1 (every update)
  or n > 1 (the updates whose step is a multiple of n, `_one_micro_batch`).

  Devices or micro-batches give the two batch sizes of the estimate for free: every
  update. One device with one micro-batch must back-propagate its batch once more
  (`halves_sq_norm`), which costs more than a plain update. It measures on every
  `gns_split_every`-th update, and at least `MEASUREMENTS_PER_HORIZON` times per horizon
  of H examples.
  """
  if not options.gns_horizon_examples or plan.num_devices * plan.accumulation > 1:
    return 1
  if options.gns_split_every <= 1:
    return 1
  per_horizon = options.gns_horizon_examples / (
    MEASUREMENTS_PER_HORIZON * plan.batch_size
  )
  return max(1, min(options.gns_split_every, int(per_horizon)))


def materialise(batch: dict, data: dict, resident: Any) -> dict:
  """The update's batch: `batch` itself, or with device-resident data
  (ibs/data/resident.py) the examples its keys name, gathered and augmented here."""
  return batch if resident is None else resident.materialise(data, batch)


def _updates(
  state,
  batches,
  running,
  num_steps,
  data,
  *,
  plan,
  options,
  ghost_batch_size,
  every,
  resident=None,
):
  """`num_steps` ≤ K updates on this device's (K, A, b, ...) batches, in order.

  The trip count is a value, not a shape: one executable serves every count (the
  layout pads the unused slots). K = 1 runs its one update without a loop. Whether an
  update measures the noise scale is read off its step (`every`, `_one_micro_batch`),
  so dispatches need not be cut around the measuring updates. With `resident` data the
  batches are keys, materialised one update at a time (`materialise`).
  """
  _update_of = functools.partial(
    _update,
    plan=plan,
    options=options,
    ghost_batch_size=ghost_batch_size,
    every=every,
  )

  def update(state, batch, running):
    return _update_of(state, materialise(batch, data, resident), running)

  def body(index, carry):
    batch = jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, False), batches
    )
    return update(carry[0], batch, carry[1])

  with ghost_batch_norm.running_statistics_across(sharding.DATA_AXIS):
    if jax.tree.leaves(batches)[0].shape[0] == 1:
      return update(state, jax.tree.map(lambda x: x[0], batches), running)
    return jax.lax.fori_loop(0, num_steps, body, (state, running))


def _per_device(fn, mesh, in_specs, out_specs):
  """`fn` as a shard_map over the data axis. Collectives are written out (pmean, psum,
  all_gather), so the replication check is off: it would otherwise turn the gradient
  with respect to the replicated parameters into an implicit all-reduce per micro-batch.
  """
  return jax.shard_map(
    fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
  )


class TrainStep:
  """A compiled train step: `(state, local_batches, metrics) → (state, metrics)`.

  Owns the host → device layout of its batches and holds the step counts 1…K on the
  device, so a call transfers nothing but the batches. `memory_analysis()` is that of
  the executable that runs per micro-batch or per dispatch.

  A step may still be compiling (`compile_train_steps(..., wait_for=...)`): its first
  call, `result()` or `memory_analysis()` waits for it. Every call first raises the
  error of any program of its run that failed to compile beside training (`Background`).
  """

  def __init__(
    self,
    run,
    plan,
    mesh,
    steps_per_dispatch: int,
    analysed,
    *,
    pending: concurrent.futures.Future | None = None,
    background: 'Background | None' = None,
    data=None,
  ):
    self._run = run
    self._data = data or {}  # device-resident arrays (ibs/data/resident.py), if any
    self.host_loop = isinstance(run, _HostLoop)
    self.plan = plan
    self.mesh = mesh
    self.steps_per_dispatch = steps_per_dispatch
    self._analysed = analysed
    self._pending = pending  # the future of the program while it compiles
    self._callbacks_done: list[threading.Event] = []
    self.background = background
    self._counts = [
      jax.device_put(np.int32(n), sharding.replicated(mesh))
      for n in range(steps_per_dispatch + 1)
    ]

  def result(self) -> 'TrainStep':
    """This step, its program compiled: waits for it, raises its compile error."""
    if self._pending is not None:
      self._run = self._analysed = self._pending.result()
      self._pending = None
    return self

  def add_done_callback(self, fn: Callable[['TrainStep'], None]) -> None:
    """Calls `fn(self)` once its program is compiled (at once if it is), in the
    compiling thread; the step's first call waits for it to return."""
    if self._pending is None:
      fn(self)
      return
    done = threading.Event()
    self._callbacks_done.append(done)

    def when_compiled(_):
      try:
        fn(self)
      finally:
        done.set()

    self._pending.add_done_callback(when_compiled)

  def __call__(
    self, state: TrainState, local_batches: list[Any], running_metrics: Metrics
  ) -> tuple[TrainState, Metrics]:
    """Runs the updates of `local_batches` in one dispatch."""
    self.result()
    while self._callbacks_done:
      self._callbacks_done.pop().wait()
    if self.background is not None:
      self.background.raise_error()
    batches = sharding.train_batches_to_device(
      local_batches, self.plan, self.mesh, self.steps_per_dispatch
    )
    count = self._counts[len(local_batches)]
    return self._run(state, batches, running_metrics, count, self._data)

  def memory_analysis(self) -> Any:
    return self.result()._analysed.memory_analysis()

  def as_text(self) -> str:
    """The HLO of the executable that `memory_analysis` describes."""
    return self.result()._analysed.as_text()


class Background:
  """What went wrong beside training: the first error of a program compiling in the
  background (or of its checks), raised by the next call of any step of the run."""

  def __init__(self):
    self._errors: list[BaseException] = []

  def add(self, error: BaseException) -> None:
    self._errors.append(error)

  def raise_error(self) -> None:
    if self._errors:
      raise self._errors[0]


# The host-loop form of the same update, for XLA:CPU. XLA:CPU rewrites convolutions into
# the layouts its fast kernels take only in the entry computation, not inside a while
# loop: in a `lax.scan` the gradient convolutions of a conv net fall back to a naive
# loop nest, ~20x slower (WRN-10-1 on 2 cores: 0.1 s a step at A = 1, 2.1 s at A = 2;
# docs/BENCHMARKS.md). Unrolling the scan would let memory grow with A. So on CPU a
# model with convolutions accumulates in a Python loop over one compiled micro-batch
# step, then one compiled update: A + 1 dispatches, the same arithmetic in the same
# order, memory that does not grow with A. Each device's sums live between the calls
# as arrays with a leading device axis, sharded over `data`.


def _host_loop_micro(state, acc, batch, index, data, *, options, resident):
  micro = jax.tree.map(
    lambda x: jax.lax.dynamic_index_in_dim(x[0], index, 0, False), batch
  )
  micro = materialise(micro, data, resident)
  old = jax.tree.map(lambda x: x[0], acc)
  # Micro-batch 0 starts the sums and the BN share afresh; the others add to them, as
  # the scan does.
  first = index == 0
  start = jax.tree.map(
    lambda r, a: jnp.where(first, r, a), device_share(state.batch_stats), old.batch_stats
  )
  with ghost_batch_norm.running_statistics_across(sharding.DATA_AXIS):
    fresh = _accumulate(state, start, None, micro, options)
  summed = _Accumulated(
    *(
      jax.tree.map(
        lambda o, n: jnp.where(first, n, o + n), getattr(old, f), getattr(fresh, f)
      )
      for f in ('grad_sum', 'small_sq_sum', 'metrics')
    ),
    fresh.batch_stats,
  )
  return jax.tree.map(lambda x: x[None], summed)


def _host_loop_finish(state, acc, running, *, plan, options):
  local = jax.tree.map(lambda x: x[0], acc)
  return _finish(state, local, running, plan, options)


class _HostLoop:
  """Runs A compiled micro-batch steps and one compiled update (see above)."""

  def __init__(self, micro, finish, plan, mesh, acc):
    self._micro, self._finish, self._acc = micro, finish, acc
    self._indices = [
      jax.device_put(np.int32(a), sharding.replicated(mesh))
      for a in range(plan.accumulation)
    ]

  def __call__(self, state, batches, running, num_steps, data):
    del num_steps  # Always 1: a loop around the host loop would be K dispatches anyway.
    acc = self._acc
    for index in self._indices:
      acc = self._micro(state, acc, batches, index, data)
    self._acc = acc  # Not donated to the update: reused by the next step.
    return self._finish(state, acc, running)


def _slow_in_a_loop(state: Any, plan: sharding.MicroBatchPlan, example: dict) -> bool:
  """Whether the backend is XLA:CPU and the model convolves (see the host loop)."""
  if jax.default_backend() != 'cpu':
    return False
  micro = {
    k: jax.ShapeDtypeStruct((plan.micro_batch_size, *v.shape[1:]), v.dtype)
    for k, v in example.items()
  }

  def any_loss(outputs, labels):  # The model's operations decide; the loss does not.
    del labels
    return jnp.sum(outputs.reshape(outputs.shape[0], -1), axis=1)

  jaxpr = jax.make_jaxpr(functools.partial(micro_batch_gradients, loss_fn=any_loss))(
    state, state.batch_stats, micro
  )
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


def _loop_structure(
  requested_k: int, host_loop: bool | None, options: StepOptions, state, plans, example
) -> tuple[int, bool, StepOptions]:
  """(K, host loop, options): the one place that decides how updates are looped.

  K updates per dispatch run in a loop, the micro-batches of an accumulated update too;
  on XLA:CPU a convolutional model is ~20× slower inside either (its convolutions lose
  their fast layouts outside the entry computation). There, K falls back to 1,
  accumulation to the host loop, and the one-micro-batch split measurement is left out
  (the noise scale is then measured only where devices or micro-batches give it): its
  extra backward pass runs in a conditional, outside the entry computation, where
  those convolutions are slow. `host_loop` forces the choice (tests).
  """
  slow = bool(plans) and _slow_in_a_loop(state, plans[0], example)
  host_loop = slow if host_loop is None else host_loop
  if host_loop and requested_k > 1:
    logging.warning(
      'config.steps_per_dispatch=%d ignored: on XLA:CPU a convolutional model runs '
      'much slower inside a loop; one step per dispatch instead.',
      requested_k,
    )
  if slow and options.gns_horizon_examples and options.gns_split_every > 1:
    logging.warning(
      'On XLA:CPU a convolutional model: the noise scale is not measured on steps '
      'with one device and one micro-batch.'
    )
    options = dataclasses.replace(options, gns_split_every=0)
  return (1 if host_loop else requested_k), host_loop, options


def batch_shapes(
  plan: sharding.MicroBatchPlan, example: dict, steps_per_dispatch: int
) -> dict:
  """Abstract (K, A, D·b, ...) training batches of `plan`, for
  ahead-of-time compilation."""
  return {
    k: jax.ShapeDtypeStruct((steps_per_dispatch, *plan.shape, *v.shape[1:]), v.dtype)
    for k, v in example.items()
  }


def compile_train_steps(
  mesh: jax.sharding.Mesh,
  state: TrainState,
  plans: list[sharding.MicroBatchPlan],
  example: dict[str, np.ndarray],
  *,
  ghost_batch_size: int,
  steps_per_dispatch: int = 1,
  options: StepOptions = StepOptions(),
  host_loop: bool | None = None,
  wait_for: int | None = None,
  resident: Any = None,
) -> dict[tuple[int, int], TrainStep]:
  """One ahead-of-time compiled TrainStep per distinct (A, devices·b) (decision 4).

  Compiling every phase's shape before its phase means a phase that cannot fit fails
  within seconds of the start, not at epoch 160, and a phase switch never stalls. A
  compiled step never recompiles: called with another shape, dtype or sharding it
  raises. `state` may be concrete or abstract (`jax.eval_shape`); `example` is one
  example per input key, as the model sees it. With `resident` data
  (ibs/data/resident.py) the steps are called with its keys instead of batches, and its
  arrays are arguments of every program.

  The programs compile in the order of `plans`, side by side where there are cores. This
  returns once those of the first `wait_for` plans are compiled (all when None); the
  others are traced, lowered and compiled in a thread beside the first compiles and
  then beside training, and each step waits for its own program at its first call
  (`TrainStep.result`); an error of theirs is raised by the run's next dispatch
  (`Background`). XLA compiles outside the GIL, in threads of its own: where the
  host's cores are few (XLA:CPU on a laptop) that is CPU the training would have used,
  and it still ends the whole run sooner than compiling every phase first
  (docs/BENCHMARKS.md, "Phase 0 and the compile beside it"). Each waited-for program
  starts compiling as soon as it is lowered, while the next is traced.
  """
  rep = sharding.replicated(mesh)
  data = resident.arrays if resident is not None else {}
  data_shapes = aot.abstract(data, None)
  sent = resident.example_keys() if resident is not None else example  # per dispatch
  state_shapes = aot.abstract(state, rep)
  metric_shapes = aot.abstract(Metrics.empty(), rep)
  count_shape = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  k, host_loop, options = _loop_structure(
    steps_per_dispatch, host_loop, options, state_shapes, plans, example
  )
  batch_spec = P(None, None, sharding.DATA_AXIS)
  # XLA compiles one program on one core, outside the GIL. Each waited-for program's
  # compile starts as soon as it is lowered, so the next one's tracing and lowering
  # (Python) overlap it: first those waited for, on every core, then the others on all
  # cores but one, which the training has, each traced and lowered in that pool too, so
  # that the build does not wait for them. The pools' threads end when their queue is
  # empty; the interpreter waits for them at exit.
  cores = os.cpu_count() or 1
  now = concurrent.futures.ThreadPoolExecutor(cores, thread_name_prefix='ibs_compile')
  later = concurrent.futures.ThreadPoolExecutor(
    max(1, cores - 1), thread_name_prefix='ibs_compile_later'
  )
  first: list[concurrent.futures.Future] = []

  def after_first(lower):
    program = lower()  # traced and lowered while the first programs compile
    concurrent.futures.wait(first)
    return program.compile()

  background = Background()
  compiled, waited = {}, []
  for plan in plans:
    if plan.shape in compiled:
      continue
    batch = batch_shapes(plan, sent, k)
    if host_loop and plan.accumulation > 1:
      compiled[plan.shape] = _compile_host_loop(
        mesh, state_shapes, metric_shapes, batch, plan, options, data_shapes, resident
      )
      continue

    updates = functools.partial(
      _updates,
      plan=plan,
      options=options,
      ghost_batch_size=ghost_batch_size,
      every=measure_every(plan, options),
      resident=resident,
    )
    in_specs = (P(), batch_spec, P(), P(), P())
    per_device = _per_device(updates, mesh, in_specs, (P(), P()))
    lower = functools.partial(
      jax.jit(per_device, donate_argnums=(0, 2)).lower,
      state_shapes,
      batch,
      metric_shapes,
      count_shape,
      data_shapes,
    )
    if wait_for is None or len(waited) < wait_for:
      pending = now.submit(lower().compile)
      first.append(pending)
      waited.append(plan.shape)
    else:
      pending = later.submit(after_first, lower)
    compiled[plan.shape] = TrainStep(
      None, plan, mesh, k, None, pending=pending, background=background, data=data
    )
  now.shutdown(wait=False)
  later.shutdown(wait=False)
  for shape in waited:
    compiled[shape].result()
  return {plan.shape: compiled[plan.shape] for plan in plans}


def _compile_host_loop(
  mesh, state_shapes, metric_shapes, batch, plan, options, data_shapes, resident
):
  rep = sharding.replicated(mesh)
  per_device_spec = P(sharding.DATA_AXIS)
  local_acc = _Accumulated(
    state_shapes.params,
    jnp.zeros((), jnp.float32),
    Metrics.empty(),
    state_shapes.batch_stats,
  )
  acc = jax.tree.map(lambda x: np.zeros((plan.num_devices, *x.shape), x.dtype), local_acc)
  acc = jax.device_put(acc, jax.sharding.NamedSharding(mesh, per_device_spec))
  batch_spec = P(None, None, sharding.DATA_AXIS)
  index_shape = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  micro = _per_device(
    functools.partial(_host_loop_micro, options=options, resident=resident),
    mesh,
    (P(), per_device_spec, batch_spec, P(), P()),
    per_device_spec,
  )
  micro = (
    jax.jit(micro, donate_argnums=(1,))
    .lower(state_shapes, aot.abstract(acc, None), batch, index_shape, data_shapes)
    .compile()
  )
  finish = _per_device(
    functools.partial(_host_loop_finish, plan=plan, options=options),
    mesh,
    (P(), per_device_spec, P()),
    (P(), P()),
  )
  finish = (
    jax.jit(finish, donate_argnums=(0, 2))
    .lower(state_shapes, aot.abstract(acc, None), metric_shapes)
    .compile()
  )
  host = _HostLoop(micro, finish, plan, mesh, acc)
  data = resident.arrays if resident is not None else {}
  return TrainStep(host, plan, mesh, 1, micro, data=data)


def on_host(metrics: Metrics) -> Metrics:
  """The same metrics as numpy values (this process's copy of each replicated sum):
  merged and computed on the host, they run no program, so compile none."""
  return jax.tree.map(sharding.host_value, metrics)


def empty_metrics(mesh: jax.sharding.Mesh) -> Metrics:
  """Zero running metrics on the mesh, to start a log period (built there, not moved
  there: sharding.replicate says why)."""
  return _empty_metrics_on(mesh)()


@functools.cache
def _empty_metrics_on(mesh):
  return jax.jit(Metrics.empty, out_shardings=sharding.replicated(mesh))


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> Metrics:
  """Metrics summed over the real (mask = 1) examples of a padded batch."""
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['input'],
    train=False,
  )
  return Metrics.single_from_model_output(
    loss=cross_entropy_loss(logits, batch['label']),
    accuracy=jnp.argmax(logits, -1) == batch['label'],
    mask=batch['mask'],
  )


def jit_eval_step(mesh: jax.sharding.Mesh) -> Callable[..., Metrics]:
  return jax.jit(
    eval_step,
    in_shardings=(sharding.replicated(mesh), sharding.eval_batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
