"""train_and_evaluate(config, workdir): the phase loop.

Reads top to bottom (the flax examples' style): validate → data → init or restore →
compile every phase's step → for each phase, for each dispatch: step, then the events
that are due (log, evaluate, checkpoint) → summary. Everything is keyed to examples seen
(docs/DESIGN.md decision 1, ibs/cadence.py), whatever the batch size of the phase.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from ibs import (
  cadence,
  checkpoint,
  clock,
  config_checks,
  divergence,
  gns,
  input_pipeline,
  lock,
  models,
  noise_scale,
  optim,
  preemption,
  reporting,
  schedules,
  sharding,
)
from ibs import step as step_lib
from ibs.datasets import catalog


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
  )

  @jax.jit
  def init(rng):
    dummy = jnp.zeros((config.ghost_batch_size, *input_shape), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    return step_lib.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=tx,
    )

  return jax.device_put(init(jax.random.key(config.seed)), sharding.replicated(mesh))


def step_options(config: Any) -> step_lib.StepOptions:
  return step_lib.StepOptions(
    gns_horizon_examples=config.gns.horizon_examples if config.gns.enabled else 0.0,
    gns_split_every=config.gns.split_every,
    nonfinite=config.nonfinite,
  )


def compile_phases(config, mesh, state, plans, spans, start_step, example):
  """Every remaining phase's step, compiled ahead of time, its memory logged."""
  remaining = [
    plan
    for plan, span in zip(plans, spans, strict=True)
    if span.first_step + span.num_steps > start_step and span.num_steps
  ]
  compiled = step_lib.compile_train_steps(
    mesh,
    state,
    remaining,
    example,
    ghost_batch_size=config.ghost_batch_size,
    steps_per_dispatch=config.steps_per_dispatch,
    options=step_options(config),
  )
  for shape, train_step in compiled.items():
    analysis = train_step.memory_analysis()
    logging.info(
      'Step for batch shape (accumulation, devices × micro-batch) = %s compiled, %d '
      'update(s) per call; %s',
      shape,
      train_step.steps_per_dispatch,
      analysis
      if analysis is None
      else (
        f'temp {analysis.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
        f'{analysis.argument_size_in_bytes / 2**20:.1f} MiB'
      ),
    )
  return compiled


def evaluate(eval_step, state, source, preprocess, config, mesh) -> dict[str, float]:
  """Loss and accuracy over the whole test split, each example counted once."""
  total = None
  one_at_a_time = preemption.dispatch_one_at_a_time()
  for local in input_pipeline.eval_batches(
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
    '',
    reporting.format_throughput(summary.get('throughput', [])),
    '=' * 78,
  ]
  return '\n'.join(lines)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns a summary.

  The summary holds the final test metrics, parameter updates, examples seen, epoch,
  training time (summed over resumes) and per-phase throughput. When
  `config.stop_after_steps` > 0 training stops (with a checkpoint) after that many
  parameter updates, as a preemption would; SIGTERM or SIGINT does the same at the end of
  the dispatch in flight (summary['preempted']; docs/RELIABILITY.md). One process owns a
  workdir (ibs/lock.py).
  """
  schedule = config_checks.check_config(
    config, jax.device_count(), jax.process_count(), workdir=workdir
  )
  workdir_lock = (
    lock.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  )
  with workdir_lock, preemption.PreemptionHandler(jax.process_count()) as preempt:
    return _train_and_evaluate(config, schedule, workdir, preempt)


def _train_and_evaluate(config, schedule, workdir, preempt) -> dict[str, Any]:
  wall_start = time.perf_counter()
  mesh = sharding.make_mesh()
  spec = catalog.dataset_spec(config)
  n = spec.num_train_examples
  spans = clock.phase_spans(schedule)
  plans = [
    sharding.plan_micro_batches(
      p.batch_size,
      jax.device_count(),
      config.ghost_batch_size,
      config.max_micro_batch_size,
    )
    for p in schedule.phases
  ]
  if config.compilation_cache_dir:
    jax.config.update(
      'jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir)
    )
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

  # Data first: a dataset that is not prepared must fail before any compilation.
  train_source = input_pipeline.load_source(config, 'train')
  test_source = input_pipeline.load_source(config, 'test')
  preprocess = input_pipeline.preprocess_fn(config)

  # Init, or restore the newest intact checkpoint (ibs/checkpoint.py). The running train
  # metrics are checkpointed too: a resume between two logs logs what an uninterrupted
  # run logs.
  model = create_model(config, spec.num_classes)
  state = create_train_state(config, model, schedule, spec.input_shape, mesh)
  manager = checkpoint.create_manager(workdir)
  fingerprint = checkpoint.config_fingerprint(config)
  train_metrics = step_lib.empty_metrics(mesh)
  restored = checkpoint.restore_latest(manager, state, fingerprint, train_metrics)
  previous_train_s = 0.0  # training time of earlier sessions
  if restored:
    state, position, metrics = restored
    state = jax.device_put(state, sharding.replicated(mesh))
    if metrics is not None:
      train_metrics = jax.device_put(metrics, sharding.replicated(mesh))
    previous_train_s = position.train_time_s
    check_restored(position, state, schedule, config)
    logging.info(
      'Resumed at step %d (%d examples seen).', position.step, position.examples_seen
    )
  step = start_step = int(state.step)
  total_steps = clock.num_steps(schedule)

  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  if jax.process_index() == 0:  # The workdir says what produced it.
    reporting.write_config_json(config, workdir)
  if start_step == 0:
    writer.write_hparams(reporting.flatten_hparams(config))
  logging.info('\n%s', noise_scale.format_table(schedule, title='schedule'))

  logging.info('Compiling the train step for every phase shape ahead of time...')
  compile_start = time.perf_counter()
  example = preprocess(
    train_source.get(np.zeros(1, np.int64)), np.zeros(1, np.int64), True
  )
  compiled = compile_phases(config, mesh, state, plans, spans, start_step, example)
  eval_step = step_lib.jit_eval_step(mesh)
  compile_s = time.perf_counter() - compile_start

  events = cadence.Cadence.from_config(config, n)
  stop_at = min(total_steps, config.stop_after_steps or total_steps)
  progress = reporting.Progress(  # progress, ETA and throughput in examples
    total_examples=spans[-1].end_examples,
    num_train_examples=n,
    total_steps=total_steps,
    start_examples=clock.position(schedule, start_step).examples_seen,
    start_step=start_step,
    batch_sizes=tuple(p.batch_size for p in schedule.phases),
    log=logging.info if jax.process_index() == 0 else lambda *a: None,
  )
  eval_results: dict[str, float] = {}
  # Dispatches so far (counted alike on every process: the preemption sync point), the
  # step of the last checkpoint saved, whether a signal asked to stop.
  dispatch, saved_step, preempted = 0, None, False
  # Across processes on XLA:CPU, each dispatch ends before the next (ibs/preemption.py).
  one_at_a_time = preemption.dispatch_one_at_a_time()
  with metric_writers.ensure_flushes(writer):
    for phase_index, (phase, span, plan) in enumerate(
      zip(schedule.phases, spans, plans, strict=True)
    ):
      end = min(span.first_step + span.num_steps, stop_at)
      if step >= end or preempted:
        continue
      train_step = compiled[plan.shape]
      logging.info(
        'Phase %d: batch %d = %d devices × %d accumulation × %d micro-batch, lr %g, '
        'momentum %g, steps %d–%d.',
        phase_index,
        phase.batch_size,
        plan.num_devices,
        plan.accumulation,
        plan.micro_batch_size,
        phase.learning_rate,
        phase.momentum,
        step,
        end,
      )
      examples = span.start_examples + (step - span.first_step) * phase.batch_size
      local_batches = input_pipeline.train_batches(
        train_source,
        preprocess,
        seed=config.data_seed,
        start_examples=examples,
        batch_size=phase.batch_size,
        num_steps=end - step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=2 * train_step.steps_per_dispatch,
      )
      while step < end and not preempted:
        # Up to K updates in one dispatch, ending where an event is due, so that events
        # happen at the same steps whatever K is.
        num_steps = min(
          train_step.steps_per_dispatch,
          end - step,
          events.steps_until_next(examples, phase.batch_size),
        )
        chunk = [next(local_batches) for _ in range(num_steps)]
        state, train_metrics = train_step(state, chunk, train_metrics)
        if one_at_a_time:  # A lost peer must not leave a collective behind.
          jax.block_until_ready((state, train_metrics))
        before, examples = examples, examples + num_steps * phase.batch_size
        step += num_steps
        dispatch += 1
        progress.update(step, examples, phase_index)
        checkpoint.check_save_errors(manager, saved_step)  # A failed background save.
        preempted = preempt.should_stop(dispatch)
        done = step == total_steps
        due = set(cadence.EVENTS) if done else events.due(before, examples)
        if step == stop_at or preempted:
          due.add('checkpoint')
        if not due:
          continue
        check_finite(state, schedule, manager)
        position = {
          'epoch': examples / n,
          'examples_seen': examples,
          'parameter_updates': step,
        }
        if 'log' in due:
          scalars = {f'train_{k}': float(v) for k, v in train_metrics.compute().items()}
          scalars.update(hyperparameter_scalars(state, config, phase, phase_index, n))
          scalars.update(progress.period_scalars())  # examples/s and step time
          writer.write_scalars(step, {**scalars, **position})
          train_metrics = step_lib.empty_metrics(mesh)
        if 'eval' in due:
          with progress.timed('eval'):
            eval_results = evaluate(
              eval_step, state, test_source, preprocess, config, mesh
            )
          writer.write_scalars(step, {**eval_results, **position})
        if 'checkpoint' in due:
          with progress.timed('checkpoint'):
            record = checkpoint.Position(
              step,
              examples,
              phase_index,
              config.data_seed,
              fingerprint,
              train_time_s=reporting.cumulative_time(previous_train_s, wall_start),
              skipped_updates=int(state.nonfinite_updates),
            )
            checkpoint.save(manager, state, record, metrics=train_metrics)
          saved_step = step
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - a failed background save, in one line
    raise checkpoint.save_error(manager, saved_step, e) from None
  manager.close()
  preempted = preempted and step < total_steps  # A signal in the last dispatch: done.
  if preempted:
    logging.warning(
      '%s: stopped at step %d with a checkpoint of it; rerun the same command to resume.',
      preempt.signal_name,
      step,
    )
  if step == total_steps and not eval_results:  # Rerun of a finished workdir.
    eval_results = evaluate(eval_step, state, test_source, preprocess, config, mesh)

  final = clock.position(schedule, step) if step < total_steps else None
  examples_seen = final.examples_seen if final else spans[-1].end_examples
  summary = {
    **eval_results,
    'parameter_updates': step,
    'examples_seen': examples_seen,
    'epoch': examples_seen / n,
    'wall_clock_s': reporting.cumulative_time(previous_train_s, wall_start),
    'session_wall_clock_s': time.perf_counter() - wall_start,
    'compile_s': compile_s,
    'throughput': progress.throughput(),
    'finished': step == total_steps,
    'preempted': preempted,
    'skipped_updates': int(state.nonfinite_updates),
  }
  if summary['finished'] and jax.process_index() == 0:
    summary = reporting.finish_summary(workdir, summary, step - start_step)
    print(format_summary(summary, schedule), flush=True)
  return summary
