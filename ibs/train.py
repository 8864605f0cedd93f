"""train_and_evaluate(config, workdir): the phase loop.

Reads top to bottom (flax examples' style): validate → data → model and optimizer →
restore → compile every phase's step → for each phase, for each step: batch, step, log,
evaluate, checkpoint → summary. Everything is keyed to examples seen (DESIGN.md
decision 1): logging, evaluation and checkpoints happen when the example count crosses a
multiple of their period in epochs, whatever the batch size of the phase.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers

from ibs import (
  checkpoint,
  clock,
  config_checks,
  input_pipeline,
  models,
  noise_scale,
  optim,
  reporting,
  schedules,
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

  return jax.device_put(init(jax.random.key(config.seed)), step_lib.replicated(mesh))


def _crossed(before: int, after: int, period: int) -> bool:
  """Whether the example count passed a multiple of `period` going from before to after."""
  return before // period < after // period


def _steps_to_cross(examples: int, batch_size: int, period: int) -> int:
  """Steps of `batch_size` from `examples` until the count passes a multiple of `period`."""
  next_multiple = (examples // period + 1) * period
  return -(-(next_multiple - examples) // batch_size)


def evaluate(eval_step, state, source, preprocess, config, mesh) -> dict[str, float]:
  """Loss and accuracy over the whole test split, each example counted once."""
  total = None
  for local in input_pipeline.eval_batches(
    source,
    preprocess,
    batch_size=config.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch_metrics = eval_step(state, step_lib.global_eval_batch(local, mesh))
    total = batch_metrics if total is None else total.merge(batch_metrics)
  return {f'test_{k}': float(v) for k, v in total.compute().items()}


def _phase_scalars(schedule, phase_index: int, lr: float) -> dict[str, float]:
  phase = schedule.phases[phase_index]
  n = schedule.num_train_examples
  return {
    'learning_rate': lr,
    'momentum': phase.momentum,
    'batch_size': phase.batch_size,
    'noise_scale': noise_scale.noise_scale(lr, n, phase.batch_size, phase.momentum),
    'phase': phase_index,
  }


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

  The summary holds the final test metrics, parameter updates, examples seen, epoch and
  wall-clock. When `config.stop_after_steps` > 0 training stops (with a checkpoint) after
  that many parameter updates, as a preemption would.
  """
  wall_start = time.perf_counter()
  mesh = step_lib.make_mesh()
  schedule = config_checks.check_config(config, jax.device_count(), jax.process_count())
  spec = catalog.dataset_spec(config)
  spans = clock.phase_spans(schedule)
  plans = [
    step_lib.plan_micro_batches(
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

  model = create_model(config, spec.num_classes)
  state = create_train_state(config, model, schedule, spec.input_shape, mesh)
  manager = checkpoint.create_manager(workdir)
  fingerprint = checkpoint.config_fingerprint(config)
  restored = checkpoint.restore_latest(manager, state, fingerprint)
  previous_train_s = 0.0  # reporting: training time of earlier sessions
  if restored:
    state, position = restored
    previous_train_s = position.train_time_s
    state = jax.device_put(state, step_lib.replicated(mesh))
    logging.info(
      'Resumed at step %d (%d examples seen).', position.step, position.examples_seen
    )
  start_step = int(state.step)
  total_steps = clock.num_steps(schedule)
  if jax.process_index() == 0:  # reporting: the workdir says what produced it
    reporting.write_config_json(config, workdir)

  writer = metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0
  )
  if start_step == 0:
    writer.write_hparams(reporting.flatten_hparams(config))
  logging.info('\n%s', noise_scale.format_table(schedule, title='schedule'))

  logging.info('Compiling the train step for every phase shape ahead of time...')
  compile_start = time.perf_counter()
  example = preprocess(
    train_source.get(np.zeros(1, np.int64)), np.zeros(1, np.int64), True
  )
  remaining = [
    plan
    for plan, span in zip(plans, spans, strict=True)
    if span.first_step + span.num_steps > start_step and span.num_steps
  ]
  steps_per_dispatch = step_lib.resolve_steps_per_dispatch(
    config.steps_per_dispatch, state, remaining or plans, example
  )
  compiled = step_lib.compile_train_steps(
    mesh,
    state,
    remaining,
    example,
    running_metrics=True,
    steps_per_dispatch=steps_per_dispatch,
  )
  logging.info('%d update(s) per call of the compiled step.', steps_per_dispatch)
  for shape, executable in compiled.items():
    analysis = executable.memory_analysis()
    logging.info(
      'Step for batch shape (accumulation, devices × micro-batch) = %s compiled; %s',
      shape,
      analysis
      if analysis is None
      else (
        f'temp {analysis.temp_size_in_bytes / 2**20:.1f} MiB, arguments '
        f'{analysis.argument_size_in_bytes / 2**20:.1f} MiB'
      ),
    )
  eval_step = step_lib.jit_eval_step(mesh)
  compile_s = time.perf_counter() - compile_start

  lr_fn = schedules.learning_rate_schedule(schedule)
  n = spec.num_train_examples
  log_every = max(1, round(config.log_every_epochs * n))
  eval_every = max(1, round(config.eval_every_epochs * n))
  checkpoint_every = max(1, round(config.checkpoint_every_epochs * n))
  stop_at = min(total_steps, config.stop_after_steps or total_steps)
  progress = reporting.Progress(  # reporting: progress and throughput in examples
    total_examples=spans[-1].end_examples,
    num_train_examples=n,
    total_steps=total_steps,
    start_examples=clock.position(schedule, start_step).examples_seen,
    start_step=start_step,
    batch_sizes=tuple(p.batch_size for p in schedule.phases),
    log=logging.info if jax.process_index() == 0 else lambda *a: None,
  )

  train_metrics = step_lib.empty_train_metrics(mesh)
  eval_results: dict[str, float] = {}
  step = start_step
  with metric_writers.ensure_flushes(writer):
    for phase_index, (phase, span, plan) in enumerate(
      zip(schedule.phases, spans, plans, strict=True)
    ):
      end = min(span.first_step + span.num_steps, stop_at)
      if step >= end:
        continue
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
      train_step = compiled[plan.shape]
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
        prefetch=2 * steps_per_dispatch,
      )
      while step < end:
        # Up to K steps in one dispatch, ending where a log, evaluation or checkpoint
        # is due, so that those happen at the same steps whatever K is.
        num_steps = min(
          steps_per_dispatch,
          end - step,
          *(
            _steps_to_cross(examples, phase.batch_size, period)
            for period in (log_every, eval_every, checkpoint_every)
          ),
        )
        chunk = [next(local_batches) for _ in range(num_steps)]
        if steps_per_dispatch == 1:
          state, train_metrics = train_step(
            state, step_lib.global_train_batch(chunk[0], plan, mesh), train_metrics
          )
        else:
          batches = step_lib.global_train_batches(chunk, plan, mesh, steps_per_dispatch)
          state, train_metrics = train_step(state, batches, train_metrics, num_steps)
        before = examples
        examples += num_steps * phase.batch_size
        step += num_steps
        progress.update(step, examples, phase_index)  # reporting
        done = step == total_steps
        position = {
          'epoch': examples / n,
          'examples_seen': examples,
          'parameter_updates': step,
        }
        if done or _crossed(before, examples, log_every):
          scalars = {f'train_{k}': float(v) for k, v in train_metrics.compute().items()}
          scalars.update(_phase_scalars(schedule, phase_index, float(lr_fn(step - 1))))
          scalars.update(progress.period_scalars())  # reporting: examples/s, step time
          writer.write_scalars(step, {**scalars, **position})
          train_metrics = step_lib.empty_train_metrics(mesh)
        if done or _crossed(before, examples, eval_every):
          with progress.timed('eval'):
            eval_results = evaluate(
              eval_step, state, test_source, preprocess, config, mesh
            )
          writer.write_scalars(step, {**eval_results, **position})
        if done or step == stop_at or _crossed(before, examples, checkpoint_every):
          with progress.timed('checkpoint'):
            checkpoint.save(
              manager,
              state,
              checkpoint.Position(
                step,
                examples,
                phase_index,
                config.data_seed,
                fingerprint,
                reporting.cumulative_time(previous_train_s, wall_start),
              ),
            )
  manager.wait_until_finished()
  manager.close()
  if step == total_steps and not eval_results:  # Rerun of a finished workdir.
    eval_results = evaluate(eval_step, state, test_source, preprocess, config, mesh)

  final = clock.position(schedule, step) if step < total_steps else None
  examples_seen = final.examples_seen if final else spans[-1].end_examples
  summary = {
    **eval_results,
    'parameter_updates': step,
    'examples_seen': examples_seen,
    'epoch': examples_seen / n,
    # reporting: training time summed over resumes, this session's, per-phase throughput
    'wall_clock_s': reporting.cumulative_time(previous_train_s, wall_start),
    'session_wall_clock_s': time.perf_counter() - wall_start,
    'compile_s': compile_s,
    'throughput': progress.throughput(),
    'finished': step == total_steps,
  }
  if summary['finished'] and jax.process_index() == 0:
    summary = reporting.finish_summary(workdir, summary, step - start_step)
    print(format_summary(summary, schedule), flush=True)
  return summary
