"""train_and_evaluate(config, workdir): the loop and its events.

Reads top to bottom (the flax examples' style): build the run (ibs/setup.py: checked
config, data, state initialised or restored, every phase's compiled step) → for each
segment of the schedule, for each dispatch: step, then the events that are due (log,
evaluate, checkpoint, a schedule's decision) → summary. Everything is keyed to examples
seen (docs/DESIGN.md decision 1, ibs/cadence.py), whatever the batch size of the phase;
the schedule, fixed or deciding as it runs, is driven through one interface
(ibs/segments.py).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
from absl import logging

from ibs import cadence, gns, noise_scale, reporting, segments, setup, writers
from ibs import step as step_lib
from ibs.durability import checkpoint, divergence, lock, preemption


def stop_step(config: Any, segs: segments.Segments) -> int:
  """The step this session trains to: the end, or config.stop_after_steps before it."""
  return min(segs.num_steps, config.stop_after_steps or segs.num_steps)


class Reporter:
  """The events the loop runs when they are due (log, evaluate, checkpoint, a
  decision) and the session's end (the last save waited for, a preemption said).

  Opening it writes the workdir's config.json (and the hparams of a fresh run) and logs
  the schedule; it keeps the metric writer, the progress line and the last evaluation.
  """

  def __init__(self, run: setup.Run, workdir: str, wall_start: float):
    self.run, self.config, self.wall_start = run, run.config, wall_start
    self.n = run.spec.num_train_examples
    self.fingerprint = checkpoint.config_fingerprint(run.config)
    self.eval_results: dict[str, float] = {}
    self.saved_step: int | None = None  # the step of the last checkpoint saved
    self.preempted = False
    primary = jax.process_index() == 0
    self.writer = writers.StartingWriter(  # built beside training
      lambda: writers.create_writer(workdir, just_logging=not primary)
    )
    start_step = int(run.state.step)
    if primary:  # The workdir says what produced it.
      reporting.write_config_json(run.config, workdir)
    if start_step == 0:
      self.writer.write_hparams(reporting.flatten_hparams(run.config))
    logging.info('\n%s', run.schedule.describe(run.config.optimizer))
    self.progress = reporting.Progress(  # progress, ETA and throughput in examples
      total_examples=run.schedule.budget_examples,
      num_train_examples=self.n,
      total_steps=run.schedule.total_steps(run.decisions),
      start_examples=run.segments.examples_at(start_step),
      start_step=start_step,
      log=logging.info if primary else lambda *a: None,
    )

  def position(self, step: int, examples: int) -> dict[str, float]:
    return {
      'epoch': examples / self.n,
      'examples_seen': examples,
      'parameter_updates': step,
    }

  def decision(self, decision: segments.Decision, step: int, examples: int) -> None:
    """A decision point: what it saw, and at a switch the new phase, in one line."""
    if decision.switched:
      logging.info('%s', decision.describe(step))
    self.writer.write_scalars(
      step, {**decision.scalars(), **self.position(step, examples)}
    )

  def __call__(
    self,
    due: set[str],
    state: step_lib.TrainState,
    metrics: step_lib.Metrics,
    segs: segments.Segments,
    step: int,
    examples: int,
    decisions: Any,
  ) -> step_lib.Metrics:
    """Runs the `due` events after step `step`; returns the running train metrics."""
    position = self.position(step, examples)
    segment = segs.at(step - 1)  # of the last update
    if 'log' in due:
      computed = step_lib.on_host(metrics).compute()  # no program to compile
      scalars = {f'train_{k}': float(v) for k, v in computed.items()}
      scalars.update(
        noise_scale.logged_scalars(
          state.opt_state.hyperparams, segment.phase.batch_size, self.n
        )
      )
      scalars['phase'] = segment.index
      scalars['nonfinite_updates'] = int(state.nonfinite_updates)
      if self.config.gns.enabled:
        scalars.update(gns.estimates(state.gns))
      scalars.update(self.progress.period_scalars())  # examples/s and step time
      self.writer.write_scalars(step, {**scalars, **position})
      metrics = step_lib.empty_metrics(self.run.mesh)
    if 'eval' in due:
      with self.progress.timed('eval'):
        self.evaluate(state)
      self.writer.write_scalars(step, {**self.eval_results, **position})
    if 'checkpoint' in due:
      with self.progress.timed('checkpoint'):
        record = checkpoint.CheckpointRecord(
          step,
          examples,
          segment.index,
          self.config.data_seed,
          self.fingerprint,
          train_time_s=self.train_time_s(),
          skipped_updates=int(state.nonfinite_updates),
          **self.run.schedule.to_record(decisions),
        )
        checkpoint.save(
          self.run.manager, state, record, metrics=metrics, leaf_sums=self.run.leaf_sums
        )
      self.saved_step = step
    return metrics

  def evaluate(self, state: step_lib.TrainState) -> None:
    self.eval_results = {f'test_{k}': v for k, v in self.run.evaluate(state).items()}

  def train_time_s(self) -> float:
    return reporting.cumulative_time(self.run.previous_train_s, self.wall_start)

  def finish(
    self, preempt: preemption.PreemptionHandler, step: int, segs: segments.Segments
  ) -> None:
    """Waits for the last save (a failure in one line); says if a signal stopped the
    run."""
    checkpoint.close(self.run.manager, self.saved_step)
    # A signal in the last dispatch: done, not preempted.
    self.preempted = preempt.signal_name is not None and step < segs.num_steps
    if self.preempted:
      logging.warning(
        '%s: stopped at step %d with a checkpoint of it; rerun the same command to '
        'resume.',
        preempt.signal_name,
        step,
      )


def summarize(
  report: Reporter,
  state: step_lib.TrainState,
  segs: segments.Segments,
  decisions: Any,
  step: int,
) -> dict[str, Any]:
  """The session's summary (see `train_and_evaluate`)."""
  examples_seen = segs.examples_at(step)
  return {
    **report.eval_results,
    'parameter_updates': step,
    'examples_seen': examples_seen,
    'epoch': examples_seen / report.n,
    'wall_clock_s': report.train_time_s(),
    'session_wall_clock_s': time.perf_counter() - report.wall_start,
    'compile_s': report.run.compile_s,
    'throughput': report.progress.throughput(),
    'finished': step == segs.num_steps,
    'preempted': report.preempted,
    'skipped_updates': int(state.nonfinite_updates),
    **report.run.schedule.summary(decisions, segs),
  }


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns a summary.

  The summary holds the final test metrics, parameter updates, examples seen, epoch,
  training time (summed over resumes), per-phase throughput and, for a schedule that
  decides as it runs, its switches. When `config.stop_after_steps` > 0 training stops
  (with a checkpoint) after that many parameter updates, as a preemption would; SIGTERM
  or SIGINT does the same at the end of the dispatch in flight (summary['preempted'];
  docs/RELIABILITY.md). One process owns a workdir (ibs/durability/lock.py).
  """
  checked = setup.check(config, workdir)  # A bad config fails before anything else.
  workdir_lock = (
    lock.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  )
  with workdir_lock, preemption.PreemptionHandler(jax.process_count()) as preempt:
    wall_start = time.perf_counter()
    run = setup.build(config, workdir, checked=checked)
    return train(run, workdir, preempt, wall_start)


def train(
  run: setup.Run, workdir: str, preempt: preemption.PreemptionHandler, wall_start: float
) -> dict[str, Any]:
  """The loop over the run's segments and their dispatches (see the module docstring)."""
  config, manager, events = run.config, run.manager, run.cadence
  report = Reporter(run, workdir, wall_start)
  state, metrics, decisions, segs = run.state, run.metrics, run.decisions, run.segments
  step = start_step = int(state.step)
  dispatch, preempted = 0, False  # dispatches: counted alike on every process
  # Across processes on XLA:CPU, each dispatch ends before the next (preemption.py).
  one_at_a_time = preemption.dispatch_one_at_a_time()
  skips = divergence.skip_window(config, state)  # 'skip': too many stop the run
  preempt.training = True  # A signal from now on saves the step reached.
  with checkpoint.metric_writes_confirmed(report.writer, manager):  # a full disk
    while step < stop_step(config, segs) and not preempted:
      segment = segs.at(step)
      phase, examples = segment.phase, segment.examples_at(step)
      end = min(segment.end_step, stop_step(config, segs))
      train_step = run.steps[phase.batch_size]
      state = segments.begin_phase(run.schedule, state, phase)  # ε, m if host-set
      decides = bool(run.schedule.decide_every_examples)
      reporting.log_phase(segment, train_step.plan, step, end, decides)
      batches = run.data.train_batches(
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
          state, metrics = train_step(state, chunk, metrics)
          if one_at_a_time:  # A lost peer must not leave a collective behind.
            jax.block_until_ready((state, metrics))
          before, examples = examples, examples + num_steps * phase.batch_size
          step, dispatch = step + num_steps, dispatch + 1
          report.progress.update(step, examples, segment.index, phase.batch_size)
          checkpoint.check_save_errors(manager)  # A failed save.
          preempted = preempt.should_stop(dispatch)
          due = events.due(before, examples)
          if step == segs.num_steps:
            due |= set(cadence.EVENTS)
          if step == stop_step(config, segs) or preempted:
            due.add('checkpoint')
          if not due:
            continue
          divergence.check(state, segs, manager, skips)
          if 'decide' in due:  # Before the checkpoint, which records the decision.
            measured = segments.measure(
              run.schedule, state, metrics, run.train_slice_loss
            )
            decision = run.schedule.decide(decisions, examples, measured)
            decisions, switched = decision.decisions, decision.switched
            if switched:  # The phases as known now: held until the next switch.
              segs = segments.Segments.of(run.schedule.realized(decisions))
            report.decision(decision, step, examples)
          metrics = report(due, state, metrics, segs, step, examples, decisions)

  report.finish(preempt, step, segs)
  if step == segs.num_steps and not report.eval_results:
    report.evaluate(state)  # Rerun of a finished workdir.
  summary = summarize(report, state, segs, decisions, step)
  if summary['finished'] and jax.process_index() == 0:
    summary = reporting.finish_summary(workdir, summary, step - start_step)
    table = noise_scale.format_table(segs.schedule, title='phases')
    print(reporting.format_summary(summary, table), flush=True)
  return summary
