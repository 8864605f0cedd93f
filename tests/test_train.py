"""End to end: the shrunk default config trains, logs, checkpoints and resumes exactly."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from ibs import reporting, train, writers


def latest_state(workdir, step=None):
  """(step, the train state saved by the latest checkpoint in `workdir`, or by `step`'s,
  as numpy arrays), read by orbax directly: ibs's own restore path is what the tests
  check."""
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step() if step is None else step
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  manager.close()
  return step, jax.tree.map(np.asarray, restored['state'])


def _final_params(workdir):
  """(step, parameters) of the latest checkpoint in `workdir`, as numpy arrays."""
  step, state = latest_state(workdir)
  return step, state['params']


@pytest.mark.slow
def test_default_config_trains_end_to_end(tiny_run):
  _, workdir, summary = tiny_run  # tiny_config, checkpointed every 1.5 epochs

  # Updates by hand: 4 phases of one epoch (2000 examples) at B = 32, 64, 128, 256,
  # each rounded up (the rounding rule); phase p starts where p − 1's last batch ended.
  examples, steps = 0, 0
  for phase, batch in enumerate((32, 64, 128, 256)):
    due = 2000 * (phase + 1)
    n = -(-(due - examples) // batch)
    steps, examples = steps + n, examples + n * batch
  assert summary['parameter_updates'] == steps
  assert summary['examples_seen'] == examples
  assert summary['finished']
  # Ten classes: chance is 0.1. Four epochs of a tiny CNN on 2000 examples clear 0.5.
  assert summary['test_accuracy'] > 0.5
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  step, _ = _final_params(workdir)
  assert step == steps
  # The measured noise scale is logged beside the paper's g at every log.
  tags = _logged_tags(workdir)
  for tag in ('gns/b_simple', 'gns/grad_sq_norm', 'gns/trace_cov', 'g_sgd'):
    assert tag in tags, sorted(tags)
  b_simple = tags['gns/b_simple']
  assert len(b_simple) == len(tags['batch_size'])
  # Both terms are measured at every log; B_simple is their ratio where the |G|²
  # estimate is positive, NaN (not resolved) where noise swamps it (ibs/gns.py).
  g2, trace = tags['gns/grad_sq_norm'], tags['gns/trace_cov']
  assert all(np.isfinite(g2)) and all(np.isfinite(trace)), (g2, trace)
  for ratio, g, t in zip(b_simple, g2, trace, strict=True):
    if g > 0:
      assert ratio == pytest.approx(t / g, rel=1e-4) and ratio > 0, (ratio, g, t)
    else:
      assert np.isnan(ratio), (ratio, g, t)
  assert any(g > 0 for g in g2), g2


def _logged_tags(workdir):
  """{tag: [values in step order]} of the scalars in `workdir`'s event files."""
  import tensorflow as tf

  tags = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('simple_value'):  # tensorboardX's scalars (a local workdir)
          tags.setdefault(value.tag, []).append(value.simple_value)
        elif value.HasField('tensor') and not value.tensor.string_val:
          array = tf.make_ndarray(value.tensor)
          if array.ndim == 0:  # a scalar (hparams summaries are not)
            tags.setdefault(value.tag, []).append(float(array))
  return tags


_CREATE_WRITER = writers.create_writer


def _train_recording_logs(config, workdir, monkeypatch):
  """Trains `config`; returns the summary and the (step, scalars) of every log and eval.

  Throughput scalars (examples/s, step time) are left out: they depend on time.
  """
  logged = []

  def recording_writer(*args, **kwargs):
    writer = _CREATE_WRITER(*args, **kwargs)
    write_scalars = writer.write_scalars

    def record(step, scalars):
      if 'examples_seen' in scalars:
        logged.append(
          (
            step,
            {
              k: float(v)
              for k, v in scalars.items()
              if k not in reporting.TIME_SCALARS  # they depend on time
            },
          )
        )
      write_scalars(step, scalars)

    writer.write_scalars = record
    return writer

  monkeypatch.setattr(writers, 'create_writer', recording_writer)
  summary = train.train_and_evaluate(config, workdir)
  assert logged, 'no log or evaluation was recorded'
  return summary, logged


@pytest.mark.slow
def test_steps_per_dispatch_changes_neither_the_events_nor_the_training(
  tiny_config, tmp_path, monkeypatch
):
  """K = 5 steps per dispatch against K = 1, the plain loop of one step per call.

  Logs, evaluations and checkpoints fall on the same steps (a dispatch ends where one is
  due) and the training is the same up to float32 rounding (the K-step executable is
  compiled separately from the single step).
  """
  runs = {}
  for k in (1, 5):
    config = tiny_config.copy_and_resolve_references()
    config.steps_per_dispatch = k
    # Periods that end inside phases (the phases end at whole epochs), at other steps.
    config.log_every_epochs = 0.3
    config.eval_every_epochs = 0.7
    config.checkpoint_every_epochs = 0.9
    workdir = str(tmp_path / f'k{k}')
    summary, logged = _train_recording_logs(config, workdir, monkeypatch)
    checkpoints = sorted(
      int(os.path.basename(d))
      for d in glob.glob(os.path.join(workdir, 'checkpoints', '*'))
    )
    runs[k] = summary, logged, checkpoints, _final_params(workdir)[1]

  (summary_1, logged_1, checkpoints_1, params_1), (summary_5, logged_5, *rest) = (
    runs[1],
    runs[5],
  )
  checkpoints_5, params_5 = rest
  assert [(step, sorted(s)) for step, s in logged_5] == [
    (step, sorted(s)) for step, s in logged_1
  ]
  assert checkpoints_5 == checkpoints_1
  for (_, scalars_5), (_, scalars_1) in zip(logged_5, logged_1, strict=True):
    for name, value in scalars_1.items():
      assert scalars_5[name] == pytest.approx(value, rel=1e-3, abs=1e-4, nan_ok=True), (
        name
      )
  assert summary_5['parameter_updates'] == summary_1['parameter_updates']
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    params_5,
    params_1,
  )


@pytest.mark.slow
@pytest.mark.parametrize('first_data', ['auto', 'off'])
def test_resume_ends_with_the_same_parameters(
  tiny_config, tiny_run, tmp_path, first_data
):
  """Stopped at step 70 and resumed: the uninterrupted run's parameters, bit for bit.
  The uninterrupted run and the resumed part read resident data ('auto'); the first
  part reads it too, or the host pipeline ('off'): the same batches either way."""
  _, uninterrupted, _ = tiny_run  # tiny_config, checkpointed every 1.5 epochs

  interrupted = str(tmp_path / 'interrupted')
  first = tiny_config.copy_and_resolve_references()
  first.resident_data = first_data
  first.stop_after_steps = 70  # Inside phase 1 (steps 63–94), not at a checkpoint period.
  partial = train.train_and_evaluate(first, interrupted)
  assert partial['parameter_updates'] == 70 and not partial['finished']
  train.train_and_evaluate(tiny_config, interrupted)  # Same command, same workdir.

  step_a, params_a = _final_params(uninterrupted)
  step_b, params_b = _final_params(interrupted)
  assert step_a == step_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.mark.slow
def test_a_different_config_does_not_resume_someone_elses_checkpoint(
  tiny_config, tiny_run, tmp_path
):
  _, first, _ = tiny_run  # tiny_config's checkpoints
  workdir = tmp_path / 'run'
  shutil.copytree(first, workdir)
  step, _ = _final_params(str(workdir))
  other = tiny_config.copy_and_resolve_references()
  other.schedule.learning_rate = 0.05
  with pytest.raises(ValueError, match='different config'):
    train.train_and_evaluate(other, str(workdir))
  assert os.path.isdir(workdir / 'checkpoints' / str(step))


def test_a_later_phase_that_cannot_fit_stops_the_run_before_its_first_update(
  tiny_config, tmp_path, monkeypatch
):
  """Later phases compile beside training (ibs/setup.py): a step whose memory check
  fails there stops the run at its next dispatch with the check's error, never running
  an update of that batch. Here B = 64's check fails (a device too small for it)."""
  from ibs import setup
  from tests.conftest import fake_explicit_config

  phases = ((0.0, 32, 0.1, 0.9), (1.0, 64, 0.1, 0.9))
  config = fake_explicit_config(tiny_config, phases, num_epochs=2.0)
  check_memory = setup.check_memory
  checked = []

  def small_device(batch_size, analysis):
    checked.append(batch_size)
    if batch_size == 64:
      raise MemoryError('The train step for batch 64 needs more than the device has.')
    check_memory(batch_size, analysis)

  monkeypatch.setattr(setup, 'check_memory', small_device)
  dispatched = []
  step_call = setup.step_lib.TrainStep.__call__

  def recording(self, state, batches, *args, **kwargs):
    result = step_call(self, state, batches, *args, **kwargs)
    dispatched.append(self.plan.batch_size)
    return result

  monkeypatch.setattr(setup.step_lib.TrainStep, '__call__', recording)
  with pytest.raises(MemoryError, match='batch 64'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert checked == [32, 64]
  assert dispatched and set(dispatched) == {32}, dispatched


def test_the_loop_compiles_nothing(
  tiny_config, tmp_path, monkeypatch, without_compilation_cache
):
  """Every program the loop runs (the phases' steps, the evaluation, the checkpoint
  checksum, the log's arithmetic) is compiled beside it, in other threads, or before
  it: after `setup.build` returns, the training thread compiles nothing. Counted with
  jax.monitoring's backend compile event (the compilation cache is off here)."""
  import threading

  from ibs import setup, train
  from tests.conftest import on_each_compile

  built = []
  build = setup.build

  def build_and_mark(*args, **kwargs):
    run = build(*args, **kwargs)
    built.append(run)
    return run

  monkeypatch.setattr(setup, 'build', build_and_mark)
  in_loop = []

  def record(fun_name):
    if built and threading.current_thread() is threading.main_thread():
      in_loop.append(fun_name)

  with on_each_compile(record):
    summary = train.train_and_evaluate(tiny_config, str(tmp_path))

  assert summary['finished']
  assert in_loop == []
  (run,) = built
  assert run.eval_step.misses == 0 and run.leaf_sums.misses == 0
