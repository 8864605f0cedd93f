"""Short branches from a run's checkpoints, for the critical-batch probe (tools/probe.py).

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
`setup.step_options`), the same data and the same arithmetic, so it ends on the run's
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
import orbax.checkpoint as ocp

from ibs import clock, reporting, schedules, setup, sharding
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
  """The run's checkpoints, opened read-only (checkpoint.open_read_only)."""
  return checkpoint.open_read_only(workdir)


def read_positions(
  manager: ocp.CheckpointManager, fingerprint: str
) -> dict[int, checkpoint.CheckpointRecord]:
  """{step: record} of every checkpoint whose record reads and matches the config.

  A record of another config means config.json and checkpoints/ come from different
  runs; nothing can be branched then, and this says so.
  """
  try:
    return checkpoint.read_records(manager, fingerprint)
  except checkpoint.ConfigMismatchError as e:
    raise BranchError(
      f'{e} (config.json and checkpoints/ come from different runs.)'
    ) from None


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  position: checkpoint.CheckpointRecord,
  abstract_state: Any,
  mesh,
) -> Any:
  """The state saved at `step`, verified against its checksum, replicated on `mesh`.

  Restored by step through checkpoint.restore_verified, never `restore_latest`, which
  moves a damaged checkpoint aside: a damaged one is refused here instead.
  """
  metrics = step_lib.empty_metrics(mesh)
  try:
    restored = checkpoint.restore_verified(
      manager, step, position, abstract_state, metrics
    )
  except checkpoint.Damaged as e:
    raise BranchError(
      f'The checkpoint of step {step} cannot be branched from ({e}); a running run '
      'may have just replaced it: probe again, or name other --points.'
    ) from e
  return sharding.replicate(restored.state, mesh)


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
  run_schedule = setup.run_schedule(config, schedule)  # The phases decided by then.
  schedule = run_schedule.realized(run_schedule.from_record(position))
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

  Built once per probe (`create`, through ibs.setup.build in its read-only BRANCH
  mode): the data, the model, the compiled steps (one per batch of `batch_sizes`), the
  evaluation step.
  """

  run: setup.Run

  @classmethod
  def create(cls, config: Any, batch_sizes: list[int]) -> Prober:
    """Validates the run's config, loads its data and compiles every B's step before
    any branch runs, so that a B that cannot be split or compiled fails first."""
    return cls(
      setup.build(config, None, setup.Mode.BRANCH, batch_sizes=list(batch_sizes))
    )

  @property
  def config(self) -> Any:
    return self.run.config

  @property
  def schedule(self) -> schedules.Schedule:
    return self.run.segments.schedule  # as configured (an adaptive one: not yet grown)

  @property
  def mesh(self) -> Any:
    return self.run.mesh

  @property
  def tx(self) -> Any:
    return self.run.compiled_for.tx  # every injected value a number (branch_state)

  @property
  def steps(self) -> dict[int, step_lib.TrainStep]:
    return self.run.steps

  @property
  def compile_s(self) -> float:
    return self.run.compile_s

  @property
  def train_source(self) -> Any:
    return self.run.data.train

  @property
  def test_source(self) -> Any:
    return self.run.data.test

  def restore(self, manager, step: int, position: checkpoint.CheckpointRecord) -> Any:
    return restore(manager, step, position, self.run.state, self.mesh)

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

    `num_examples` L is a multiple of B (ibs/tools/probe.py checks): L/B updates. After
    each update count in `measure_after`, `measure(state)` is recorded (a dispatch ends
    there). The running train loss (train mode, the step's own metric) is kept over
    the updates after the first `window_start`.
    """
    start = time.perf_counter()
    train_step = self.steps[batch_size]
    state = branch_state(run_state, self.tx, hyperparams, self.mesh)
    num_steps = num_examples // batch_size
    marks = sorted({m for m in measure_after if 0 < m <= num_steps})
    window = min(window_start, num_steps - 1)  # the last update at least
    stops = sorted({*marks, window, num_steps} - {0})
    batches = pipeline.train_batches(
      self.run.data.train,
      self.run.data.preprocess,
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
    """Loss and accuracy over `source`, each example once, in eval mode: the loop's
    evaluation (setup.Run.evaluate) with any source."""
    return self.run.evaluate(state, source)


@dataclasses.dataclass
class Branch:
  state: Any
  halted_at_step: int | None  # the step of the first non-finite update, if any
  measured: list[float]  # measure(state) after each update of measure_after
  train_loss: float  # running train loss after `window_start` updates
  seconds: float
