"""Short branches from a run's checkpoints, for the critical-batch probe (ibs/tools/probe.py).

A branch starts from the state a run saved at step k (parameters, BN statistics, the
momentum buffer, the noise-scale averages, the update count), trains it for L examples
at batch B with its own constant ε and the run's m, and reports where it ended. It reads
the source run and writes nothing there:

* The checkpoints are opened with orbax's `read_only` manager and restored by step,
  never through `checkpoint.restore_latest`, which moves a damaged checkpoint aside; a
  damaged one is refused here instead. Every restored state is verified against the
  checksum saved with it.
* The data continue from the checkpoint's position: the branch's batch i covers stream
  positions [E_k + iB, E_k + (i+1)B) (ibs/data/order.py), so every B of a point sees the
  same L examples in the same order, the run's own continuation, only cut differently.
* ε is a value in the optimizer state, not a function of the step: the optimizer is the
  run's (same chain, same static arguments) with every injected hyperparameter made a
  number (optax's `inject_hyperparams` then reads it from `opt_state.hyperparams`). So
  one compiled step per batch shape serves every point and every ε
  (`compile_train_steps`), as the run's phases share theirs.
* The step always stops at a non-finite update (`nonfinite='stop'`): a branch whose ε
  is too large for its B is reported as diverged, never as the frozen state it left.

At the run's own B and ε a branch is the run's continuation: the same executable
structure (K, host loop, noise-scale options come from the run's config through
`train.step_options`), the same data and the same arithmetic, so it ends on the run's
later checkpoint bit for bit when no phase boundary or warm-up falls inside it
(tests/test_probe.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from ibs import (
  adaptive,
  clock,
  config_checks,
  measured,
  models,
  optim,
  reporting,
  schedules,
  sharding,
  train,
)
from ibs import step as step_lib
from ibs.data import pipeline
from ibs.durability import checkpoint


class BranchError(RuntimeError):
  """A source run that cannot be branched from; the message is one line."""


# ----------------------------------------------------------------------- the source run


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's resolved config, from the config.json it wrote at start-up.

  JSON turns tuples into lists; every reader of the config takes either, and the
  fingerprint (JSON of the trajectory fields) is the same, which `read_positions`
  checks against the checkpoints.
  """
  saved = reporting.read_config_json(workdir)
  if saved is None:
    raise BranchError(
      f'{workdir} has no config.json: not an ibs workdir, or one from before ibs wrote '
      'it.'
    )
  return ml_collections.ConfigDict(saved)


def open_checkpoints(workdir: str) -> ocp.CheckpointManager:
  """The run's checkpoints, opened read-only: orbax creates, deletes and writes nothing."""
  return ocp.CheckpointManager(
    checkpoint.checkpoints_dir(workdir),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )


def read_positions(
  manager: ocp.CheckpointManager, fingerprint: str
) -> dict[int, checkpoint.CheckpointRecord]:
  """{step: Position} of every checkpoint whose record reads and matches the config.

  A record of another config means config.json and checkpoints/ come from different
  runs; nothing can be branched then, and this says so.
  """
  positions = {}
  for step in sorted(manager.all_steps()):
    try:
      record = manager.restore(
        step, args=ocp.args.Composite(position=ocp.args.JsonRestore())
      )['position']
    except Exception:  # a checkpoint being written or damaged: skip it
      continue
    position = checkpoint.CheckpointRecord.from_json(record)
    if position.config_fingerprint != fingerprint:
      raise BranchError(
        f'The checkpoint of step {step} was written by another config (fingerprint '
        f"{position.config_fingerprint}) than the workdir's config.json ({fingerprint})."
      )
    positions[step] = position
  return positions


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  position: checkpoint.CheckpointRecord,
  abstract_state: Any,
  mesh,
) -> Any:
  """The state saved at `step`, verified against its checksum, replicated on `mesh`."""
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if position.with_metrics:  # the checksum covers the running metrics too
    items['train_metrics'] = ocp.args.StandardRestore(step_lib.empty_metrics(mesh))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise BranchError(
      f'The checkpoint of step {step} could not be read ({type(e).__name__}); a '
      'running run may have just replaced it: probe again, or name other --points.'
    ) from e
  state, metrics = restored['state'], restored.get('train_metrics')
  if position.checksum:
    got, _ = checkpoint.state_checksum(state if metrics is None else (state, metrics))
    if got != position.checksum:
      raise BranchError(
        f'The checkpoint of step {step} does not match its checksum (recorded '
        f'{position.checksum}, read {got}); it is damaged. Probe at other --points.'
      )
  return sharding.replicate(state, mesh)


@dataclasses.dataclass(frozen=True)
class RunPoint:
  """The run at a checkpoint: where it stands and the update it would take next.

  `batch_size`, `hyperparams` (ε as 'learning_rate', m as 'momentum', and λ, Adam's β2
  and ε̂ where the schedule injects them per phase) are those of step `step`, the first
  update after the checkpoint: the run's own continuation.
  """

  step: int
  examples_seen: int
  epoch: float
  batch_size: int
  hyperparams: dict[str, float]


def run_point(
  schedule: schedules.Schedule, config: Any, position: checkpoint.CheckpointRecord
) -> RunPoint:
  """The run's B and injected hyperparameters for the update after `position`.

  For an adaptive run the schedule is the one its record says it had decided
  (ibs/adaptive.py): the switches so far, the current rung to the end.

  The optimizer evaluates its schedules at the update count, which is the step
  (ibs/step.py keeps it so even for skipped updates); B is the batch of the phase that
  step belongs to (at a phase boundary, the new phase).
  """
  step = position.step
  if config.schedule.kind == 'adaptive':  # The phases it had decided by then.
    growth = adaptive.Growth.from_record(position.switches, position.ready_since)
    rules = adaptive.AdaptiveSchedule.from_config(config, schedule.num_train_examples)
    schedule = rules.realized(growth)
  if config.schedule.kind in measured.KINDS:  # likewise, from its record
    rules = measured.from_config(config, schedule.num_train_examples)
    schedule = rules.realized(rules.from_record(position.decisions))
  where = clock.position(schedule, step)
  values = {'learning_rate': schedules.learning_rate_schedule(schedule)(step)}
  if config.optimizer != 'sgd':
    values['momentum'] = schedules.momentum_schedule(schedule)(step)
  first = schedule.phases[0]
  if first.weight_decay is not None:
    values['weight_decay'] = schedules.weight_decay_schedule(schedule)(step)
  if first.adam_b2 is not None or first.adam_eps is not None:
    values['b2'] = schedules.adam_b2_schedule(schedule)(step)
    values['eps'] = schedules.adam_eps_schedule(schedule)(step)
  return RunPoint(
    step=step,
    examples_seen=position.examples_seen,
    epoch=position.examples_seen / schedule.num_train_examples,
    batch_size=schedule.phases[where.phase].batch_size,
    hyperparams={k: float(v) for k, v in values.items()},
  )


# ----------------------------------------------------------------------- the optimizer


def probe_optimizer(config: Any, hyperparams: dict[str, float]) -> Any:
  """The run's optimizer with its injected hyperparameters as numbers, not schedules.

  optax's `inject_hyperparams` reads a numeric hyperparameter from
  `opt_state.hyperparams` at every update, so a branch sets its ε there (`branch_state`)
  and the compiled step serves any ε. The chain (and so the inner state: momentum,
  Adam's moments) is the run's: same factory, same static arguments
  (train.create_train_state builds the run's).
  """
  mask = models.weight_decay_mask if config.weight_decay_mask == 'kernels' else None
  kwargs = {**hyperparams, 'decoupled': config.decoupled_weight_decay, 'mask': mask}
  static = ['decoupled', 'mask']
  if 'weight_decay' not in hyperparams:  # a constant λ is static in the run, too
    kwargs['weight_decay'] = config.weight_decay
    static.append('weight_decay')
  factory = optim.factory(config.optimizer)  # the run's own chain
  return optax.inject_hyperparams(factory, static_args=tuple(static))(**kwargs)


def branch_state(run_state: Any, tx: Any, hyperparams: dict[str, float], mesh) -> Any:
  """`run_state` (a restored checkpoint) with the probe optimizer and these values.

  Everything the run saved carries over (parameters, BN statistics, the momentum
  buffer, the update count, the noise-scale averages); only ε and the other injected
  values become the branch's. A fresh copy every time: the compiled step donates it.
  """
  fresh = tx.init(run_state.params)
  restored = run_state.opt_state
  if jax.tree.structure(fresh.inner_state) != jax.tree.structure(restored.inner_state):
    raise BranchError(
      "The checkpoint's optimizer state does not have the structure of the run's "
      'config.optimizer; was it written by another version of ibs?'
    )
  values = {
    name: jnp.asarray(hyperparams[name], fresh.hyperparams[name].dtype)
    for name in fresh.hyperparams
  }
  opt_state = fresh._replace(
    count=restored.count, hyperparams=values, inner_state=restored.inner_state
  )
  state = run_state.replace(tx=tx, opt_state=opt_state)
  return sharding.replicate(jax.tree.map(jnp.copy, state), mesh)


# ----------------------------------------------------------------------- the branches


@dataclasses.dataclass
class Prober:
  """Everything a branch needs that does not change between branches.

  Built once per probe (`create`): the data, the model, the compiled steps (one per
  batch shape of `batch_sizes`), the evaluation step.
  """

  config: Any
  schedule: schedules.Schedule
  mesh: Any
  init_state: Any  # the restore target: the run's TrainState at initialisation
  tx: Any
  plans: dict[int, sharding.MicroBatchPlan]
  compiled: dict[tuple[int, int], step_lib.TrainStep]
  eval_step: Any
  train_source: Any
  test_source: Any
  preprocess: Any
  compile_s: float

  @classmethod
  def create(cls, config: Any, batch_sizes: list[int]) -> Prober:
    """Validates the run's config, loads its data and compiles every B's step before
    any branch runs, so that a B that cannot be split or compiled fails first."""
    spec, schedule = config_checks.check_config(config, jax.device_count(), 1)
    mesh = sharding.make_mesh()
    data = train.Data.load(config, spec)
    train_source, test_source, preprocess = data
    model = train.create_model(config, spec.num_classes)
    init_state = train.create_train_state(config, model, schedule, spec.input_shape, mesh)
    # The values at step 0 only give the compiled step its shapes and dtypes; every
    # branch sets its own (branch_state).
    at_start = run_point(schedule, config, checkpoint.CheckpointRecord(0, 0, 0, 0, ''))
    tx = probe_optimizer(config, at_start.hyperparams)
    template = branch_state(init_state, tx, at_start.hyperparams, mesh)
    plans = {
      b: sharding.plan_micro_batches(
        b, jax.device_count(), config.ghost_batch_size, config.max_micro_batch_size
      )
      for b in batch_sizes
    }
    example = data.example()
    start = time.perf_counter()
    options = dataclasses.replace(train.step_options(config), nonfinite='stop')
    compiled = step_lib.compile_train_steps(
      mesh,
      template,
      list(plans.values()),
      example,
      ghost_batch_size=config.ghost_batch_size,
      steps_per_dispatch=config.steps_per_dispatch,
      options=options,
    )
    compile_s = time.perf_counter() - start
    return cls(
      config,
      schedule,
      mesh,
      init_state,
      tx,
      plans,
      compiled,
      step_lib.jit_eval_step(mesh),
      train_source,
      test_source,
      preprocess,
      compile_s,
    )

  def restore(self, manager, step: int, position: checkpoint.CheckpointRecord) -> Any:
    return restore(manager, step, position, self.init_state, self.mesh)

  def branch(
    self,
    run_state: Any,
    start_examples: int,
    batch_size: int,
    hyperparams: dict[str, float],
    num_examples: int,
    measure_after: Sequence[int] = (),
    measure: Callable[[Any], float] | None = None,
    window_start: int = 0,
  ) -> Branch:
    """Trains a copy of `run_state` on examples [start, start + L) at batch B.

    `num_examples` L is a multiple of B (ibs/tools/probe.py checks): L/B updates. After each
    update count in `measure_after`, `measure(state)` is recorded (a dispatch ends
    there). The running train loss (train mode, the step's own metric) is kept over
    the updates after the first `window_start`.
    """
    start = time.perf_counter()
    train_step = self.compiled[self.plans[batch_size].shape]
    state = branch_state(run_state, self.tx, hyperparams, self.mesh)
    num_steps = num_examples // batch_size
    marks = sorted({m for m in measure_after if 0 < m <= num_steps})
    window = min(window_start, num_steps - 1)  # the last update at least
    stops = sorted({*marks, window, num_steps} - {0})
    batches = pipeline.train_batches(
      self.train_source,
      self.preprocess,
      seed=self.config.data_seed,
      start_examples=start_examples,
      batch_size=batch_size,
      num_steps=num_steps,
      prefetch=2 * train_step.steps_per_dispatch,
    )
    metrics = step_lib.empty_metrics(self.mesh)
    measured, done = [], 0
    for stop in stops:
      while done < stop:
        n = min(train_step.steps_per_dispatch, stop - done)
        state, metrics = train_step(state, [next(batches) for _ in range(n)], metrics)
        done += n
      if done == window:
        metrics = step_lib.empty_metrics(self.mesh)
      if done in marks and measure is not None and int(state.halted_at_step) < 0:
        measured.append(measure(state))
    halted = int(state.halted_at_step)
    return Branch(
      state=state,
      halted_at_step=halted if halted >= 0 else None,
      measured=measured,
      train_loss=float(metrics.compute()['loss']),
      seconds=time.perf_counter() - start,
    )

  def mean_metrics(self, state: Any, source: Any) -> dict[str, float]:
    """Loss and accuracy over `source`, each example once, in eval mode (train.evaluate
    with any source: BN running statistics, no augmentation)."""
    total = None
    for local in pipeline.eval_batches(
      source, self.preprocess, batch_size=self.config.eval_batch_size
    ):
      batch = self.eval_step(state, sharding.eval_batch_to_device(local, self.mesh))
      total = batch if total is None else total.merge(batch)
    return {k: float(v) for k, v in total.compute().items()}


@dataclasses.dataclass
class Branch:
  state: Any
  halted_at_step: int | None  # the step of the first non-finite update, if any
  measured: list[float]  # measure(state) after each update of measure_after
  train_loss: float  # running train loss after `window_start` updates
  seconds: float


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
  """The first `size` examples of a source, by index: a fixed slice of the training set
  that every branch is measured on."""

  source: Any
  size: int

  def __len__(self) -> int:
    return self.size

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.source.get(indices)
