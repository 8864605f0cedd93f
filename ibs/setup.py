"""Build a run: everything a loop needs, in one place (`build`).

check the config → dataset spec → mesh → data → model → state (initialised, or restored
and verified through ibs/durability/checkpoint.py) → every phase's compiled step, its
memory checked → the cadence of events. The trainer (ibs/train.py), the probe's
branches (ibs/tools/branch.py) and the benchmarks (experiments/) all build a run here;
none repeats the sequence. Named for what it does once, before the first step; the loop
itself is ibs/train.py.

`Mode.TRAIN` resumes the workdir's newest intact checkpoint (or initialises) and
compiles the batches still to come; `Mode.BRANCH` builds the run's initial state as the
target to restore checkpoints into, read-only, and compiles the probe's batches for an
optimizer whose injected values are numbers set from the host; `Mode.BENCH` (the
benchmarks in experiments/) initialises the state in no workdir and compiles the
training step, as `Mode.TRAIN` would, for the batches it is given, on the `devices` it
is given and, where a benchmark compares the two, in the accumulation form it forces
(`host_loop`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ibs import (
  adaptive,
  aot,
  cadence,
  clock,
  config_checks,
  measured,
  models,
  optim,
  schedules,
  segments,
  sharding,
)
from ibs import step as step_lib
from ibs.data import catalog, pipeline, resident, sources
from ibs.durability import checkpoint, preemption


class Mode(enum.Enum):
  TRAIN = 'train'  # resume or initialise in a workdir this process owns
  BRANCH = 'branch'  # read another run's checkpoints, write nothing there
  BENCH = 'bench'  # no workdir: an initialised state and training's steps, to time


# ----------------------------------------------------------------------- the parts


class Data(NamedTuple):
  """The run's train and test sources and its preprocessing; the train split on the
  devices too where it fits (`resident`, ibs/data/resident.py): then the train batches
  are keys that the compiled step materialises."""

  train: Any
  test: Any
  preprocess: Any
  resident: resident.Resident | None = None

  @classmethod
  def load(cls, config: Any, spec: catalog.DatasetSpec, mesh: Any = None) -> Data:
    """The sources; given `mesh`, the train split placed on it where
    `config.resident_data` chooses so, the choice logged in one line."""
    train = pipeline.load_source(config, spec, 'train')
    on_device = None
    if mesh is not None:
      choice = resident.choose(config, spec)
      if choice.resident:
        on_device = resident.Resident.place(config, train, mesh)
      logging.info('%s', choice.describe())
    return cls(
      train,
      pipeline.load_source(config, spec, 'test'),
      pipeline.preprocess_fn(config, spec),
      on_device,
    )

  def example(self) -> Any:
    """One preprocessed training example: the shapes and dtypes to compile for."""
    index = np.zeros(1, np.int64)
    return self.preprocess(self.train.get(index), index, True)

  def train_batches(
    self,
    config: Any,
    start_examples: int,
    batch_size: int,
    num_steps: int,
    prefetch: int,
  ) -> Any:
    """This process's share of `num_steps` batches from `start_examples` on (their keys,
    with resident data)."""
    if self.resident is not None:
      return self.resident.train_batches(
        start_examples=start_examples,
        batch_size=batch_size,
        num_steps=num_steps,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
    return pipeline.train_batches(
      self.train,
      self.preprocess,
      seed=config.data_seed,
      start_examples=start_examples,
      batch_size=batch_size,
      num_steps=num_steps,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      prefetch=prefetch,
    )


def create_model(config: Any, num_classes: int) -> Any:
  return models.create_model(
    config.model,
    num_classes=num_classes,
    ghost_batch_size=config.ghost_batch_size,
    half_precision=config.half_precision,
    **config.model_kwargs,
  )


def create_train_state(
  config: Any,
  model: Any,
  schedule: schedules.Schedule,
  input_shape: tuple[int, ...],
  mesh: Any,
  host_set: bool = False,
) -> step_lib.TrainState:
  """Initialises parameters (seeded by config.seed), BN statistics and the optimizer
  (`host_set`: its injected values are numbers the host sets, optim.create_optimizer)."""
  mask = models.weight_decay_mask if config.weight_decay_mask == 'kernels' else None
  tx = optim.create_optimizer(
    config.optimizer,
    schedule,
    weight_decay=config.weight_decay,
    decoupled_weight_decay=config.decoupled_weight_decay,
    weight_decay_mask=mask,
    host_set=host_set,
  )

  # Built on the mesh, every array replicated (sharding.replicate says why not moved).
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def init(rng):
    dummy = jnp.zeros((config.ghost_batch_size, *input_shape), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    return step_lib.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=tx,
    )

  return init(jax.random.key(config.seed))


def step_options(config: Any) -> step_lib.StepOptions:
  return step_lib.StepOptions(
    gns_horizon_examples=config.gns.horizon_examples if config.gns.enabled else 0.0,
    gns_split_every=config.gns.split_every,
    nonfinite=config.nonfinite,
  )


def run_schedule(config: Any, schedule: schedules.Schedule) -> segments.RunSchedule:
  """The schedule the loop drives (ibs/segments.py): adaptive, a kind decided by
  measurement (ibs/measured/), or the fixed `schedule`."""
  if config.schedule.kind == 'adaptive':
    return adaptive.AdaptiveSchedule.from_config(config, schedule.num_train_examples)
  if config.schedule.kind in measured.KINDS:
    return measured.run_schedule(config, schedule.num_train_examples)
  return segments.Fixed(schedule)


def compile_steps(
  config: Any,
  mesh: Any,
  state: step_lib.TrainState,
  data: Data,
  batch_sizes: list[int],
  options: step_lib.StepOptions | None = None,
  host_loop: bool | None = None,
) -> dict[int, step_lib.TrainStep]:
  """The train step of every batch size in `batch_sizes` (in the order of use), each
  compiled ahead of its phase, its memory logged and checked against the device's.

  Returns once the first batch size's step is compiled and checked: training starts
  while the later phases' steps compile beside it (`step.compile_train_steps`). Their
  check runs as each finishes, within seconds of the start; a batch that cannot fit
  (or a program that fails to compile) stops the run at its next dispatch, not at its
  phase. `host_loop` None: step.compile_train_steps chooses the accumulation form.
  """
  logging.info('Compiling the train step for every phase shape ahead of time...')
  plans = {
    b: sharding.plan_micro_batches(
      b, mesh.size, config.ghost_batch_size, config.max_micro_batch_size
    )
    for b in dict.fromkeys(batch_sizes)
  }
  compiled = step_lib.compile_train_steps(
    mesh,
    state,
    list(plans.values()),
    data.example(),
    ghost_batch_size=config.ghost_batch_size,
    steps_per_dispatch=config.steps_per_dispatch,
    options=options or step_options(config),
    host_loop=host_loop,
    wait_for=1,
    resident=data.resident,
  )
  for i, (b, plan) in enumerate(plans.items()):
    train_step = compiled[plan.shape]
    if i == 0:  # compiled: checked now, before any training
      _check_compiled(b, train_step)
    else:
      train_step.add_done_callback(functools.partial(_check_in_background, b))
  return {b: compiled[plan.shape] for b, plan in plans.items()}


def _check_compiled(batch_size: int, train_step: step_lib.TrainStep) -> None:
  analysis = train_step.memory_analysis()
  logging.info(
    'Step for batch %d, shape (accumulation, devices × micro-batch) = %s, compiled: '
    '%d update(s) per call; %s',
    batch_size,
    train_step.plan.shape,
    train_step.steps_per_dispatch,
    'no memory analysis'
    if analysis is None
    else (
      f'temp {analysis.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
      f'{analysis.argument_size_in_bytes / 2**20:.1f} MiB'
    ),
  )
  check_memory(batch_size, analysis)


def _check_in_background(batch_size: int, train_step: step_lib.TrainStep) -> None:
  """`_check_compiled` of a step compiled beside training: its error (a failed
  compile, or a batch that cannot fit) is raised by the run's next dispatch."""
  try:
    _check_compiled(batch_size, train_step)
  except Exception as e:  # any error: the loop's thread raises it
    if train_step.background is None:  # compiled in this thread (the host loop)
      raise
    train_step.background.add(e)


def check_memory(batch_size: int, analysis: Any) -> None:
  """Raises MemoryError when the step's buffers exceed what the device can hold.

  Devices that report a limit (GPU, TPU; `memory_stats()['bytes_limit']`) are checked;
  XLA:CPU reports none and is not.
  """
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  if analysis is None or not limit:
    return
  need = (
    analysis.temp_size_in_bytes
    + analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
  )
  if need > limit:
    raise MemoryError(
      f'The train step for batch {batch_size} needs {need / 2**30:.2f} GiB per device, '
      f'more than the {limit / 2**30:.2f} GiB the device has. Lower '
      'config.max_micro_batch_size (more accumulation), or use more devices.'
    )


def use_compilation_cache(directory: str) -> None:
  """A persistent XLA cache in `directory` ('' leaves it off)."""
  if directory:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def evaluate(
  state: step_lib.TrainState,
  source: Any,
  preprocess: Any,
  *,
  eval_step: Any,
  mesh: Any,
  batch_size: int,
) -> dict[str, float]:
  """Loss and accuracy over all of `source`, each example counted once, in eval mode (BN
  running statistics, no augmentation): the loop's test metrics and the probe's.

  The batches' sums are added on the host (float32, as on the device) after the last
  batch is dispatched: no program but `eval_step` runs, so an evaluation compiles
  nothing once `eval_step` is compiled, and no batch waits for the one before.
  """
  sums = []
  one_at_a_time = preemption.dispatch_one_at_a_time()
  for local in pipeline.eval_batches(
    source,
    preprocess,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch_metrics = eval_step(state, sharding.eval_batch_to_device(local, mesh))
    if one_at_a_time:  # A lost peer must not leave a collective behind (preemption.py).
      jax.block_until_ready(batch_metrics)
    sums.append(batch_metrics)
  total = functools.reduce(lambda a, b: a.merge(b), map(step_lib.on_host, sums))
  return {k: float(v) for k, v in total.compute().items()}


def eval_batch_shapes(data: Data, mesh: Any, batch_size: int) -> dict[str, Any]:
  """The abstract global batch that `evaluate` passes its `eval_step`, to compile for."""
  index = np.zeros(1, np.int64)
  example = data.preprocess(data.test.get(index), index, False)
  example = {**example, 'mask': np.ones(1, np.float32)}
  placed = sharding.eval_batch_sharding(mesh)
  return {
    k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=placed)
    for k, v in example.items()
  }


# ----------------------------------------------------------------------- restoring


def check_restored(position: Any, state: Any, schedule: Any, config: Any) -> None:
  """The restored record agrees with the restored state and with this config's clock.

  The fingerprint covers the config; this covers the record itself: a position whose
  step and examples do not follow from the schedule would resume the data stream
  somewhere else than the parameters stand. (Its phase is the one that ran last, which
  at a phase boundary is not the one the next step starts.)
  """
  where = clock.position(schedule, position.step)
  problems = [
    f'{name} {got} (expected {want})'
    for name, got, want in (
      ('step', int(state.step), position.step),
      ('examples seen', position.examples_seen, where.examples_seen),
      ('data seed', position.data_seed, config.data_seed),
    )
    if got != want
  ]
  if problems:
    raise checkpoint.CheckpointError(
      f'The checkpoint of step {position.step} does not agree with itself or with this '
      f'config: {", ".join(problems)}. Resume it with the config that wrote it, or '
      'use a new --workdir.'
    )


def decisions_of(run_sched: segments.RunSchedule, record: Any) -> Any:
  """The schedule's decisions a checkpoint's record holds, checked against its rules."""
  decisions = run_sched.from_record(record)
  problems = run_sched.problems(decisions, record.examples_seen)
  if problems:
    raise checkpoint.CheckpointError(
      f'The checkpoint of step {record.step} records schedule decisions that this '
      f"config's schedule cannot have taken: {', '.join(problems)}. Resume it with the "
      'config that wrote it, or use a new --workdir.'
    )
  return decisions


# ----------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """Everything a loop needs, built by `build`."""

  config: Any
  spec: catalog.DatasetSpec
  schedule: segments.RunSchedule  # what the loop asks: segments, decisions
  decisions: Any  # what the schedule decided so far (restored, or its initial)
  segments: segments.Segments  # the phases as known now
  mesh: Any
  data: Data
  model: Any
  state: step_lib.TrainState  # restored or initialised (BRANCH: the restore target)
  metrics: step_lib.Metrics  # the running train metrics since the last log
  steps: dict[int, step_lib.TrainStep]  # compiled, by batch size
  compiled_for: step_lib.TrainState  # the state the steps were compiled for
  cadence: cadence.Cadence  # log, eval, checkpoint and decision points, in examples
  manager: Any  # the checkpoint manager (BRANCH: read-only, or None)
  previous_train_s: float  # training time of earlier sessions
  compile_s: float
  eval_step: Any  # step.jit_eval_step on the mesh, compiling beside training (aot.py)
  leaf_sums: Any  # the checkpoints' checksum program, compiling beside training (TRAIN)

  def evaluate(self, state: step_lib.TrainState, source: Any = None) -> dict[str, float]:
    """Loss and accuracy of `state` over `source` (the test split if None), in eval
    mode: the loop's evaluation and the probe's, one function (`evaluate`)."""
    return evaluate(
      state,
      self.data.test if source is None else source,
      self.data.preprocess,
      eval_step=self.eval_step,
      mesh=self.mesh,
      batch_size=self.config.eval_batch_size,
    )

  def train_slice_loss(self, state: step_lib.TrainState, num_examples: int) -> float:
    """Mean loss over the first `num_examples` training examples, in eval mode: the
    same slice at every decision point, so its changes are the model's, not the
    batches'."""
    return self.evaluate(state, sources.Prefix(self.data.train, num_examples))['loss']


def check(
  config: Any, workdir: str | None, mode: Mode = Mode.TRAIN, devices: Any = None
) -> Any:
  """(dataset spec, schedule) of a valid config, or a one-line ConfigError: before any
  lock, data or compile."""
  processes = jax.process_count() if mode is Mode.TRAIN else 1
  num_devices = jax.device_count() if devices is None else len(devices)
  return config_checks.check_config(config, num_devices, processes, workdir=workdir)


def build(
  config: Any,
  workdir: str | None,
  mode: Mode = Mode.TRAIN,
  batch_sizes: list[int] | None = None,
  checked: Any = None,
  *,
  devices: Any = None,
  host_loop: bool | None = None,
) -> Run:
  """The run of `config` (see the module docstring); `batch_sizes` are the probe's
  (BRANCH) or a benchmark's (BENCH; default: the schedule's), `checked` the result of
  `check` when the caller checked first. BENCH only: `devices` (default: all) and
  `host_loop` (default: chosen by step.compile_train_steps)."""
  if mode is not Mode.BENCH and (devices is not None or host_loop is not None):
    raise ValueError('devices and host_loop are options of Mode.BENCH only.')
  spec, schedule = checked or check(config, workdir, mode, devices)
  mesh = sharding.make_mesh(devices)
  use_compilation_cache(config.compilation_cache_dir)
  # Before compiling: a missing dataset fails at once. A benchmark feeds its steps
  # batches of its own, so its data stays on the host.
  data = Data.load(config, spec, None if mode is Mode.BENCH else mesh)
  run_sched = run_schedule(config, schedule)
  model = create_model(config, spec.num_classes)
  init = functools.partial(create_train_state, config, model, schedule, spec.input_shape)
  state = init(mesh, host_set=run_sched.host_sets_hyperparams)
  metrics = step_lib.empty_metrics(mesh)
  decisions, previous_train_s = run_sched.initial(), 0.0
  compile_start = time.perf_counter()
  if mode is Mode.TRAIN:
    manager = checkpoint.create_manager(workdir)

    def validate(record: Any, restored_state: Any) -> None:  # a record that fails: damage
      realized = run_sched.realized(decisions_of(run_sched, record))
      check_restored(record, restored_state, realized, config)

    restored = checkpoint.restore_latest(
      manager, state, checkpoint.config_fingerprint(config), metrics, validate
    )
    if restored:
      state, record, saved_metrics = restored
      state = sharding.replicate(state, mesh)
      if saved_metrics is not None:
        metrics = sharding.replicate(saved_metrics, mesh)
      decisions = decisions_of(run_sched, record)
      previous_train_s = record.train_time_s
      logging.info(
        'Resumed at step %d (%d examples seen).', record.step, record.examples_seen
      )
    compile_start = time.perf_counter()
    compiled_for = state
    batch_sizes = run_sched.batch_sizes(decisions, int(state.step))
    steps = compile_steps(config, mesh, state, data, batch_sizes)
  elif mode is Mode.BENCH:
    manager, compiled_for = None, state
    batch_sizes = batch_sizes or run_sched.batch_sizes(decisions, 0)
    steps = compile_steps(config, mesh, state, data, batch_sizes, host_loop=host_loop)
  else:
    manager = checkpoint.open_read_only(workdir) if workdir else None
    compile_start = time.perf_counter()
    # Every injected value a number, set per branch (branch.branch_state).
    compiled_for = init(mesh, host_set=True)
    options = dataclasses.replace(step_options(config), nonfinite='stop')
    steps = compile_steps(config, mesh, compiled_for, data, batch_sizes, options)
  events = cadence.Cadence.from_config(config, spec.num_train_examples).with_period(
    'decide', run_sched.decide_every_examples
  )
  # The events' programs compile beside training too: no event compiles in the loop.
  eval_step = aot.Precompiled(
    step_lib.jit_eval_step(mesh),
    compiled_for,
    eval_batch_shapes(data, mesh, config.eval_batch_size),
  )
  leaf_sums = None  # only training writes checkpoints
  if mode is Mode.TRAIN:
    leaf_sums = checkpoint.checksum_program((state, metrics))
  return Run(
    config=config,
    spec=spec,
    schedule=run_sched,
    decisions=decisions,
    segments=segments.Segments.of(run_sched.realized(decisions)),
    mesh=mesh,
    data=data,
    model=model,
    state=state,
    metrics=metrics,
    steps=steps,
    compiled_for=compiled_for,
    cadence=events,
    manager=manager,
    previous_train_s=previous_train_s,
    compile_s=time.perf_counter() - compile_start,
    eval_step=eval_step,
    leaf_sums=leaf_sums,
  )
