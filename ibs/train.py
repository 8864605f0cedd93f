"""train_and_evaluate(config, workdir): the phase loop.

Reads top to bottom (the flax examples' style): validate → data → init or restore →
compile every phase's step → for each phase, for each dispatch: step, then the events
that are due (log, evaluate, checkpoint) → summary. Everything is keyed to examples seen
(docs/DESIGN.md decision 1, ibs/cadence.py), whatever the batch size of the phase.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from ibs import (
  adaptive,
  cadence,
  clock,
  config_checks,
  gns,
  measured,
  models,
  noise_scale,
  optim,
  reporting,
  schedules,
  sharding,
)
from ibs import step as step_lib
from ibs.data import catalog, pipeline
from ibs.durability import checkpoint, divergence, lock, preemption


def create_model(config: Any, num_classes: int):
  return models.create_model(
    config.model,
    num_classes=num_classes,
    ghost_batch_size=config.ghost_batch_size,
    half_precision=config.half_precision,
    **config.model_kwargs,
  )


def create_train_state(
  config: Any, model, schedule: schedules.Schedule, input_shape: tuple[int, ...], mesh
) -> step_lib.TrainState:
  """Initialises parameters (seeded by config.seed), BN statistics and the optimizer."""
  mask = models.weight_decay_mask if config.weight_decay_mask == 'kernels' else None
  tx = optim.create_optimizer(
    config.optimizer,
    schedule,
    weight_decay=config.weight_decay,
    decoupled_weight_decay=config.decoupled_weight_decay,
    weight_decay_mask=mask,
    host_set=config.schedule.kind in schedules.DECIDED_KINDS,  # ε set at its switches
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


def batch_sizes_to_come(schedule, growth_rules, growth, start_step) -> list[int]:
  """The batch of every phase still to run: the rest of a fixed schedule, or every rung
  from the current one up for an adaptive one (its switches cannot wait on a compile)."""
  if isinstance(growth_rules, adaptive.AdaptiveSchedule):
    return [p.batch_size for p in growth_rules.ladder[growth.rung :]]
  if growth_rules is not None:  # a measured kind (ibs/measured/)
    return growth_rules.batch_sizes(growth)
  return [
    phase.batch_size
    for phase, span in zip(schedule.phases, clock.phase_spans(schedule), strict=True)
    if span.first_step + span.num_steps > start_step and span.num_steps
  ]


def compile_steps(
  config, mesh, state, data, batch_sizes
) -> dict[int, step_lib.TrainStep]:
  """The train step of every batch size to come, compiled ahead of time, its memory
  logged and checked against the device's (a batch that cannot fit fails now, not at
  its phase)."""
  logging.info('Compiling the train step for every phase shape ahead of time...')
  plans = {
    b: sharding.plan_micro_batches(
      b, jax.device_count(), config.ghost_batch_size, config.max_micro_batch_size
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
    options=step_options(config),
  )
  for b, plan in plans.items():
    train_step = compiled[plan.shape]
    analysis = train_step.memory_analysis()
    logging.info(
      'Step for batch %d, shape (accumulation, devices × micro-batch) = %s, compiled: '
      '%d update(s) per call; %s',
      b,
      plan.shape,
      train_step.steps_per_dispatch,
      'no memory analysis'
      if analysis is None
      else (
        f'temp {analysis.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
        f'{analysis.argument_size_in_bytes / 2**20:.1f} MiB'
      ),
    )
    check_memory(b, analysis)
  return {b: compiled[plan.shape] for b, plan in plans.items()}


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


def evaluate(eval_step, state, source, preprocess, config, mesh) -> dict[str, float]:
  """Loss and accuracy over the whole test split, each example counted once."""
  total = None
  one_at_a_time = preemption.dispatch_one_at_a_time()
  for local in pipeline.eval_batches(
    source,
    preprocess,
    batch_size=config.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch_metrics = eval_step(state, sharding.eval_batch_to_device(local, mesh))
    if one_at_a_time:  # A lost peer must not leave a collective behind (preemption.py).
      jax.block_until_ready(batch_metrics)
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {f'test_{k}': float(v) for k, v in total.compute().items()}


def hyperparameter_scalars(
  state: step_lib.TrainState,
  config: Any,
  phase: schedules.Phase,
  phase_index: int,
  n: int,
) -> dict[str, float]:
  """ε and m of the last update (from the optimizer state), B, the paper's g, the
  measured noise scale, and the count of updates that were not finite."""
  hyperparams = state.opt_state.hyperparams
  lr = float(hyperparams['learning_rate'])
  momentum = float(hyperparams.get('momentum', 0.0))
  scalars = {
    'learning_rate': lr,
    'momentum': momentum,
    'batch_size': phase.batch_size,
    'phase': phase_index,
    'noise_scale': noise_scale.noise_scale(lr, n, phase.batch_size, momentum),
    'nonfinite_updates': int(state.nonfinite_updates),
  }
  if config.gns.enabled:
    scalars.update(gns.estimates(state.gns))
  return scalars


def check_restored(position, state, schedule, config) -> None:
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


def check_finite(state, schedule, manager) -> None:
  """Raises divergence.Diverged if the step halted on a non-finite update ('stop').

  The step itself never applies such an update and freezes the state at the first one
  (ibs/step.py), so checking before every event is enough: no log, evaluation or
  checkpoint ever sees a non-finite state.
  """
  halted = int(state.halted_at_step)
  if halted < 0:
    return
  manager.wait_until_finished()
  where = clock.position(schedule, halted)
  raise divergence.Diverged(
    divergence.message(
      first_step=halted,
      last_step=halted,
      count=1,
      phase_index=where.phase,
      examples_seen=where.examples_seen,
      epoch=where.epoch,
      learning_rate=float(state.opt_state.hyperparams['learning_rate']),
      batch_size=schedule.phases[where.phase].batch_size,
      last_good=checkpoint.last_good(manager),
    )
  )


def format_switches(switches: list[dict[str, Any]] | None) -> list[str]:
  """The adaptive schedule's switches, one line each (none for a fixed schedule)."""
  if switches is None:
    return []
  lines = [
    '',
    f'decided schedule: {len(switches)} switch(es) decided by measurement',
  ]
  lines += [
    f'  step {s["step"]:,} at epoch {s["epoch"]:.2f} ({s["examples"]:,} examples): batch '
    f'{s["batch_size"]}, lr {s["learning_rate"]:g}'
    + (f' ({s["why"]})' if 'why' in s else '')
    for s in switches
  ]
  return lines


def format_summary(summary: dict[str, Any], schedule) -> str:
  lines = [
    '',
    '=' * 78,
    f'final test accuracy {summary["test_accuracy"]:.4f}  (test loss '
    f'{summary["test_loss"]:.4f})',
    f'parameter updates {summary["parameter_updates"]:,}   examples seen '
    f'{summary["examples_seen"]:,} ({summary["epoch"]:.2f} epochs)',
    f'wall-clock {summary["wall_clock_s"]:.1f} s (compilation {summary["compile_s"]:.1f} s)',
    '',
    noise_scale.format_table(schedule, title='phases'),
    *format_switches(summary.get('switches')),
    '',
    reporting.format_throughput(summary.get('throughput', [])),
    '=' * 78,
  ]
  return '\n'.join(lines)


class Data(NamedTuple):
  """The run's train and test sources and its preprocessing."""

  train: Any
  test: Any
  preprocess: Any

  @classmethod
  def load(cls, config: Any, spec: catalog.DatasetSpec) -> Data:
    return cls(
      pipeline.load_source(config, spec, 'train'),
      pipeline.load_source(config, spec, 'test'),
      pipeline.preprocess_fn(config, spec),
    )

  def example(self) -> Any:
    """One preprocessed training example: the shapes and dtypes to compile for."""
    index = np.zeros(1, np.int64)
    return self.preprocess(self.train.get(index), index, True)

  def train_batches(self, config, start_examples, batch_size, num_steps, prefetch):
    """This process's share of `num_steps` batches from `start_examples` on."""
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


def use_compilation_cache(directory: str) -> None:
  """A persistent XLA cache in `directory` ('' leaves it off)."""
  if directory:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


class Start(NamedTuple):
  """Where this session starts: fresh, or from the newest intact checkpoint."""

  state: step_lib.TrainState
  metrics: step_lib.Metrics  # the running train metrics since the last log
  growth: adaptive.Growth  # an adaptive schedule's decisions (empty otherwise)
  schedule: schedules.Schedule  # as run so far, for an adaptive schedule
  previous_train_s: float  # training time of earlier sessions


def restore_or_start(config, manager, state, mesh, schedule, growth_rules) -> Start:
  """Restores the newest intact checkpoint (ibs/durability/checkpoint.py) and checks it, or starts.

  The running train metrics are checkpointed too: a resume between two logs logs what an
  uninterrupted run logs.
  """
  metrics = step_lib.empty_metrics(mesh)
  growth = adaptive.Growth()
  if growth_rules is not None and not isinstance(growth_rules, adaptive.AdaptiveSchedule):
    growth = growth_rules.initial()  # a measured kind's empty record
  if growth_rules is not None:
    schedule = growth_rules.realized(growth)
  fingerprint = checkpoint.config_fingerprint(config)
  restored = checkpoint.restore_latest(manager, state, fingerprint, metrics)
  if not restored:
    return Start(state, metrics, growth, schedule, 0.0)
  state, record, saved_metrics = restored
  state = sharding.replicate(state, mesh)
  if saved_metrics is not None:
    metrics = sharding.replicate(saved_metrics, mesh)
  if isinstance(growth_rules, adaptive.AdaptiveSchedule):
    growth = adaptive.Growth.from_record(record.switches, record.ready_since)
    check_growth(growth_rules, growth, record)
  elif growth_rules is not None:
    growth = restored_decisions(growth_rules, record)
  if growth_rules is not None:
    schedule = growth_rules.realized(growth)
  check_restored(record, state, schedule, config)
  logging.info(
    'Resumed at step %d (%d examples seen).', record.step, record.examples_seen
  )
  return Start(state, metrics, growth, schedule, record.train_time_s)


def restored_decisions(rules, record):
  """A measured kind's record of decisions from the checkpoint, checked against `rules`."""
  saved = record.decisions
  problems = (
    [f'no decisions of kind {rules.kind!r}']
    if not saved or saved.get('kind') != rules.kind
    else None
  )
  decisions = None if problems else rules.from_record(saved)
  problems = problems or rules.check_growth(decisions, record.examples_seen)
  if problems:
    raise checkpoint.CheckpointError(
      f'The checkpoint of step {record.step} records decisions that this config cannot '
      f'have taken: {", ".join(problems)}. Resume it with the config that wrote it, or '
      'use a new --workdir.'
    )
  return decisions


def decision_inputs(rules, state, report) -> measured.base.Inputs:
  """What a measured kind's decision point reads: the step's noise-scale averages, and
  the training loss on its fixed slice when the kind judges a plateau."""
  estimates = gns.estimates(state.gns)
  loss = float('nan')
  if rules.needs_loss:
    loss = report.train_slice_loss(state, rules.loss_examples)
  return measured.base.Inputs(
    estimates['gns/trace_cov'], estimates['gns/grad_sq_norm'], loss
  )


def apply_measured_decision(decision, rules, report, step, examples):
  """A measured kind's decision point: logs what it read and chose (every point) and
  the change (when one begins). Returns the schedule as run so far."""
  schedule = rules.realized(decision.decisions)
  if decision.changed:
    logging.info('Step %d: %s.', step, decision.message)
    report.progress.set_totals(
      clock.num_steps(schedule), clock.phase_spans(schedule)[-1].end_examples
    )
  position = {'epoch': examples / report.n, 'examples_seen': examples}
  report.writer.write_scalars(
    step, {**decision.scalars, **position, 'parameter_updates': step}
  )
  return schedule


class Head:
  """The first `n` examples of a data source: the plateau kind's fixed training slice."""

  def __init__(self, source, n: int):
    self.source, self.n = source, n

  def __len__(self) -> int:
    return self.n

  def get(self, indices):
    return self.source.get(indices)


def check_growth(growth_rules, growth, record) -> None:
  problems = growth_rules.check_growth(growth, record.examples_seen)
  if problems:
    raise checkpoint.CheckpointError(
      f'The checkpoint of step {record.step} records adaptive switches that this '
      f"config's ladder cannot have taken: {', '.join(problems)}. Resume it with the "
      'config that wrote it, or use a new --workdir.'
    )


def stop_step(config: Any, schedule: schedules.Schedule) -> int:
  """The step this session trains to: the end, or config.stop_after_steps before it."""
  total = clock.num_steps(schedule)
  return min(total, config.stop_after_steps or total)


def phase_end(config: Any, schedule: schedules.Schedule, phase: int) -> int:
  span = clock.phase_spans(schedule)[phase]
  return min(span.first_step + span.num_steps, stop_step(config, schedule))


def log_phase(index, phase, plan, step, end) -> None:
  logging.info(
    'Phase %d: batch %d = %d devices × %d accumulation × %d micro-batch, lr %g, '
    'momentum %g, steps %d–%d.',
    index,
    phase.batch_size,
    plan.num_devices,
    plan.accumulation,
    plan.micro_batch_size,
    phase.learning_rate,
    phase.momentum,
    step,
    end,
  )


def apply_decision(decision, growth_rules, report, step, examples):
  """An adaptive decision point: logs what it saw and, at a switch, the new rung.
  Returns the schedule as run so far (the new rung's ε and m are set in the optimizer
  state when its phase begins: `set_phase_hyperparams`)."""
  schedule = growth_rules.realized(decision.growth)
  rung = decision.growth.rung
  scalars = {
    'adaptive/b_simple': decision.b_simple,
    'adaptive/ready_at': decision.ready_at,
    'adaptive/rung': rung,
    'epoch': examples / report.n,
    'examples_seen': examples,
    'parameter_updates': step,
  }
  if decision.switched:
    phase = growth_rules.ladder[rung]
    scalars['adaptive/switch_to_batch'] = phase.batch_size
    logging.info(
      'Adaptive schedule: B_simple %.4g >= %.4g held; rung %d from step %d: batch %d, '
      'lr %g.',
      decision.b_simple,
      decision.ready_at,
      rung,
      step,
      phase.batch_size,
      phase.learning_rate,
    )
    report.progress.set_totals(
      clock.num_steps(schedule), clock.phase_spans(schedule)[-1].end_examples
    )
  report.writer.write_scalars(step, scalars)
  return schedule


def set_phase_hyperparams(state, phase: schedules.Phase):
  """`state` with `phase`'s ε and m in the optimizer state: an adaptive run sets them
  from the host when a phase begins, since its step cannot know when it switches
  (optim.create_optimizer's `host_set`). Idempotent, so a resume does the same."""
  values = {'learning_rate': phase.learning_rate, 'momentum': phase.momentum}
  values = {k: v for k, v in values.items() if k in state.opt_state.hyperparams}
  return state.replace(opt_state=optim.set_hyperparams(state.opt_state, **values))


class Reporter:
  """The events the loop runs when they are due (log, evaluate, checkpoint) and the
  session's end (the last save waited for, a preemption said).

  Opening it writes the workdir's config.json (and the hparams of a fresh run) and logs
  the schedule; it keeps the metric writer, the progress line and the last evaluation.
  """

  def __init__(self, config, workdir, mesh, manager, data, schedule, start, wall_start):
    self.config, self.mesh, self.manager, self.data = config, mesh, manager, data
    self.wall_start, self.previous_train_s = wall_start, start.previous_train_s
    self.n = schedule.num_train_examples
    self.fingerprint = checkpoint.config_fingerprint(config)
    self.eval_step = step_lib.jit_eval_step(mesh)
    self.eval_results: dict[str, float] = {}
    self.saved_step: int | None = None  # the step of the last checkpoint saved
    self.preempted = False
    primary = jax.process_index() == 0
    self.writer = reporting.create_writer(workdir, just_logging=not primary)
    start_step = int(start.state.step)
    if primary:  # The workdir says what produced it.
      reporting.write_config_json(config, workdir)
    if start_step == 0:
      self.writer.write_hparams(reporting.flatten_hparams(config))
    logging.info('\n%s', noise_scale.format_table(schedule, title='schedule'))
    self.progress = reporting.Progress(  # progress, ETA and throughput in examples
      total_examples=clock.phase_spans(schedule)[-1].end_examples,
      num_train_examples=self.n,
      total_steps=clock.num_steps(schedule),
      start_examples=clock.position(schedule, start_step).examples_seen,
      start_step=start_step,
      log=logging.info if primary else lambda *a: None,
    )

  def __call__(self, due, state, metrics, schedule, step, examples, growth):
    """Runs the `due` events after step `step`; returns the running train metrics."""
    position = {
      'epoch': examples / self.n,
      'examples_seen': examples,
      'parameter_updates': step,
    }
    phase_index = clock.position(schedule, step - 1).phase  # of the last update
    if 'log' in due:
      scalars = {f'train_{k}': float(v) for k, v in metrics.compute().items()}
      phase = schedule.phases[phase_index]
      scalars.update(
        hyperparameter_scalars(state, self.config, phase, phase_index, self.n)
      )
      scalars.update(self.progress.period_scalars())  # examples/s and step time
      self.writer.write_scalars(step, {**scalars, **position})
      metrics = step_lib.empty_metrics(self.mesh)
    if 'eval' in due:
      with self.progress.timed('eval'):
        self.evaluate(state)
      self.writer.write_scalars(step, {**self.eval_results, **position})
    if 'checkpoint' in due:
      with self.progress.timed('checkpoint'):
        record = checkpoint.CheckpointRecord(
          step,
          examples,
          phase_index,
          self.config.data_seed,
          self.fingerprint,
          train_time_s=self.train_time_s(),
          skipped_updates=int(state.nonfinite_updates),
          **growth.to_record(),
        )
        checkpoint.save(self.manager, state, record, metrics=metrics)
      self.saved_step = step
    return metrics

  def evaluate(self, state) -> None:
    self.eval_results = evaluate(
      self.eval_step, state, self.data.test, self.data.preprocess, self.config, self.mesh
    )

  def train_slice_loss(self, state, num_examples: int) -> float:
    """Mean cross-entropy over the first `num_examples` training examples (eval mode)."""
    source = Head(self.data.train, num_examples)
    results = evaluate(
      self.eval_step, state, source, self.data.preprocess, self.config, self.mesh
    )
    return results['test_loss']

  def train_time_s(self) -> float:
    return reporting.cumulative_time(self.previous_train_s, self.wall_start)

  def finish(self, preempt, step, schedule) -> None:
    """Waits for the last save (a failure in one line); says if a signal stopped the run."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # a failed background save, in one line
      raise checkpoint.save_error(self.manager, self.saved_step, e) from None
    self.manager.close()
    # A signal in the last dispatch: done, not preempted.
    self.preempted = preempt.signal_name is not None and step < clock.num_steps(schedule)
    if self.preempted:
      logging.warning(
        '%s: stopped at step %d with a checkpoint of it; rerun the same command to '
        'resume.',
        preempt.signal_name,
        step,
      )


def summarize(
  report, state, schedule, growth, step, compile_s, rules=None
) -> dict[str, Any]:
  """The session's summary (see `train_and_evaluate`)."""
  total_steps = clock.num_steps(schedule)
  examples_seen = (
    clock.position(schedule, step).examples_seen
    if step < total_steps
    else clock.phase_spans(schedule)[-1].end_examples
  )
  summary = {
    **report.eval_results,
    'parameter_updates': step,
    'examples_seen': examples_seen,
    'epoch': examples_seen / report.n,
    'wall_clock_s': report.train_time_s(),
    'session_wall_clock_s': time.perf_counter() - report.wall_start,
    'compile_s': compile_s,
    'throughput': report.progress.throughput(),
    'finished': step == total_steps,
    'preempted': report.preempted,
    'skipped_updates': int(state.nonfinite_updates),
  }
  if report.config.schedule.kind == 'adaptive':
    summary['switches'] = [
      {
        'examples': s.examples,
        'epoch': s.examples / report.n,
        'step': clock.step_at_examples(schedule, s.examples),
        'batch_size': schedule.phases[i + 1].batch_size,
        'learning_rate': schedule.phases[i + 1].learning_rate,
      }
      for i, s in enumerate(growth.switches)
    ]
  elif report.config.schedule.kind in measured.KINDS:
    summary['switches'] = [
      {**s, 'step': clock.step_at_examples(schedule, s['examples'])}
      for s in rules.switches(growth)
    ]
  return summary


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns a summary.

  The summary holds the final test metrics, parameter updates, examples seen, epoch,
  training time (summed over resumes), per-phase throughput and, for an adaptive
  schedule, its switches. When `config.stop_after_steps` > 0 training stops (with a
  checkpoint) after that many parameter updates, as a preemption would; SIGTERM or SIGINT
  does the same at the end of the dispatch in flight (summary['preempted'];
  docs/RELIABILITY.md). One process owns a workdir (ibs/durability/lock.py).
  """
  spec, schedule = config_checks.check_config(
    config, jax.device_count(), jax.process_count(), workdir=workdir
  )
  workdir_lock = (
    lock.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  )
  with workdir_lock, preemption.PreemptionHandler(jax.process_count()) as preempt:
    return _train_and_evaluate(config, spec, schedule, workdir, preempt)


def _train_and_evaluate(config, spec, schedule, workdir, preempt) -> dict[str, Any]:
  wall_start = time.perf_counter()
  mesh = sharding.make_mesh()
  use_compilation_cache(config.compilation_cache_dir)
  data = Data.load(config, spec)  # Before compiling: a missing dataset fails at once.
  growth_rules = None  # An adaptive schedule decides its phases as it runs.
  if config.schedule.kind == 'adaptive':
    growth_rules = adaptive.AdaptiveSchedule.from_config(config, spec.num_train_examples)
  if config.schedule.kind in measured.KINDS:
    growth_rules = measured.from_config(config, spec.num_train_examples)

  model = create_model(config, spec.num_classes)
  state = create_train_state(config, model, schedule, spec.input_shape, mesh)
  manager = checkpoint.create_manager(workdir)
  start = restore_or_start(config, manager, state, mesh, schedule, growth_rules)
  state, train_metrics, growth, schedule = start[:4]
  step = start_step = int(state.step)

  compile_start = time.perf_counter()
  to_come = batch_sizes_to_come(schedule, growth_rules, growth, start_step)
  compiled = compile_steps(config, mesh, state, data, to_come)
  compile_s = time.perf_counter() - compile_start
  report = Reporter(config, workdir, mesh, manager, data, schedule, start, wall_start)

  events = cadence.Cadence.from_config(config, spec.num_train_examples)
  if growth_rules is not None:  # Its decision points are one more event.
    period = getattr(growth_rules, 'check_every_examples', None) or (
      growth_rules.rules.check_every_examples
    )
    events = events.with_period('adapt', period)
  dispatch, preempted = 0, False  # dispatches: counted alike on every process
  # Across processes on XLA:CPU, each dispatch ends before the next (ibs/durability/preemption.py).
  one_at_a_time = preemption.dispatch_one_at_a_time()
  with metric_writers.ensure_flushes(report.writer):
    while step < stop_step(config, schedule) and not preempted:
      where = clock.position(schedule, step)
      phase, examples = schedule.phases[where.phase], where.examples_seen
      end = phase_end(config, schedule, where.phase)
      train_step = compiled[phase.batch_size]
      if growth_rules is not None:  # Its ε and m, set on the host (decision 14).
        state = set_phase_hyperparams(state, phase)
      log_phase(where.phase, phase, train_step.plan, step, end)
      batches = data.train_batches(
        config,
        examples,
        phase.batch_size,
        end - step,
        prefetch=2 * train_step.steps_per_dispatch,
      )
      switched = False
      with contextlib.closing(batches):
        while step < end and not preempted and not switched:
          # Up to K updates in one dispatch, ending where an event is due, so that
          # events happen at the same steps whatever K is.
          num_steps = min(
            train_step.steps_per_dispatch,
            end - step,
            events.steps_until_next(examples, phase.batch_size),
          )
          chunk = [next(batches) for _ in range(num_steps)]
          state, train_metrics = train_step(state, chunk, train_metrics)
          if one_at_a_time:  # A lost peer must not leave a collective behind.
            jax.block_until_ready((state, train_metrics))
          before, examples = examples, examples + num_steps * phase.batch_size
          step, dispatch = step + num_steps, dispatch + 1
          report.progress.update(step, examples, where.phase, phase.batch_size)
          checkpoint.check_save_errors(manager, report.saved_step)  # A failed save.
          preempted = preempt.should_stop(dispatch)
          due = events.due(before, examples)
          if step == clock.num_steps(schedule):
            due |= set(cadence.EVENTS)
          if step == stop_step(config, schedule) or preempted:
            due.add('checkpoint')
          if not due:
            continue
          check_finite(state, schedule, manager)
          if 'adapt' in due and config.schedule.kind in measured.KINDS:
            decision = growth_rules.decide(
              growth, examples, decision_inputs(growth_rules, state, report)
            )
            growth, switched = decision.decisions, decision.changed
            schedule = apply_measured_decision(
              decision, growth_rules, report, step, examples
            )
          elif 'adapt' in due:  # Before the checkpoint, which records the decision.
            decision = growth_rules.decide(growth, examples, gns.b_simple(state.gns))
            growth, switched = decision.growth, decision.switched
            schedule = apply_decision(decision, growth_rules, report, step, examples)
          train_metrics = report(
            due, state, train_metrics, schedule, step, examples, growth
          )

  report.finish(preempt, step, schedule)
  if step == clock.num_steps(schedule) and not report.eval_results:
    report.evaluate(state)  # Rerun of a finished workdir.
  summary = summarize(report, state, schedule, growth, step, compile_s, growth_rules)
  if summary['finished'] and jax.process_index() == 0:
    summary = reporting.finish_summary(workdir, summary, step - start_step)
    print(format_summary(summary, schedule), flush=True)
  return summary
