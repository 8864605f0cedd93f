"""ibs.reporting: config.json, flat hparams, progress in examples, throughput, timings."""

import json
import logging as std_logging
import os
import pathlib

import pytest

from configs import default
from ibs import reporting, writers
from ibs.durability import checkpoint


def test_flat_hparams_name_every_nested_field():
  config = default.get_config()
  flat = reporting.flatten_hparams(config)
  assert flat['schedule.kind'] == 'increasing_batch'
  assert flat['schedule.learning_rate'] == 0.1
  assert flat['schedule.milestones'] == '(30.0, 60.0, 80.0)'
  assert flat['mnist1d.num_train'] == 20000 and flat['model'] == 'cnn1d'
  assert all(isinstance(v, bool | int | float | str) for v in flat.values())
  other = default.get_config()
  other.schedule.kind = 'decaying_lr'
  changed = {k for k, v in reporting.flatten_hparams(other).items() if flat[k] != v}
  assert changed == {'schedule.kind'}


def test_config_json_round_trip_and_differences(tmp_path):
  config = default.get_config()
  path = reporting.write_config_json(config, str(tmp_path / 'run'))
  saved = json.loads(pathlib.Path(path).read_text())
  assert saved['schedule']['milestones'] == [30.0, 60.0, 80.0]
  assert reporting.read_config_json(str(tmp_path / 'run')) == saved
  other = default.get_config()
  other.schedule.kind, other.log_every_epochs = 'decaying_lr', 2.0
  assert reporting.config_differences([saved, reporting.config_dict(other)]) == {
    'log_every_epochs': [1.0, 2.0],
    'schedule.kind': ['increasing_batch', 'decaying_lr'],
  }
  # The refusal names only the trajectory fields that changed.
  assert reporting.describe_config_change(
    str(tmp_path / 'run'), other, checkpoint.TRAJECTORY_FIELDS
  ) == ("schedule.kind: 'increasing_batch' → 'decaying_lr'")
  assert reporting.describe_config_change(str(tmp_path), other, ('schedule',)) == ''


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_is_counted_in_examples_and_reports_every_period():
  """A growing batch: 100 steps of 1, then 10 steps of 10, at 1 example/s."""
  clock, lines = FakeClock(), []
  progress = reporting.Progress(
    total_examples=200,
    num_train_examples=100,
    total_steps=110,
    every_secs=50.0,
    clock=clock,
    log=lambda fmt, line: lines.append(line),
  )
  examples = 0
  for step in range(1, 111):
    phase = 0 if step <= 100 else 1
    batch = 1 if phase == 0 else 10
    clock.now += batch  # 1 example/s whatever the batch
    examples += batch
    progress.update(step, examples, phase, batch)
    if step == 100:
      # Half the examples after 91 % of the steps: the progress line says 50 %.
      assert progress.line().startswith('epoch 1.00/2 (50.0% of examples), step 100/110')
      assert progress.line().endswith('ETA 1m40s')
      assert progress.period_scalars() == {
        'examples_per_sec': pytest.approx(1),
        'step_time_ms': pytest.approx(1000),
      }
      with progress.timed('eval'):
        clock.now += 5.0  # not training time, not in the next period's rate
  # Every 50 s of wall-clock: 50 s, 100 s, 155 s (5 s of evaluation, 5 steps of 10),
  # 205 s.
  assert [line.split(',')[0] for line in lines] == [
    'epoch 0.50/2 (25.0% of examples)',
    'epoch 1.00/2 (50.0% of examples)',
    'epoch 1.50/2 (75.0% of examples)',
    'epoch 2.00/2 (100.0% of examples)',
  ]
  assert progress.period_scalars() == {
    'examples_per_sec': pytest.approx(1),
    'step_time_ms': pytest.approx(10_000),
  }
  phases = progress.throughput()
  assert [(r['phase'], r['batch_size'], r['steps'], r['examples']) for r in phases] == [
    (0, 1, 100, 100),
    (1, 10, 10, 100),
  ]
  assert [r['examples_per_sec'] for r in phases] == [pytest.approx(1)] * 2
  assert progress.timed_totals() == {'eval': 5.0}
  assert 'examples/s' in reporting.format_throughput(phases)


def test_a_rerun_that_trains_nothing_keeps_the_finished_timings(tmp_path):
  first = {'test_accuracy': 0.9, 'wall_clock_s': 45.0, 'compile_s': 5.0, 'finished': True}
  reporting.finish_summary(str(tmp_path), first, trained_steps=100)
  rerun = {**first, 'wall_clock_s': 3.6, 'compile_s': 3.0}
  kept = reporting.finish_summary(str(tmp_path), rerun, trained_steps=0)
  assert kept['wall_clock_s'] == 45.0 and kept['compile_s'] == 5.0
  assert json.loads((tmp_path / 'summary.json').read_text())['wall_clock_s'] == 45.0
  # A run that trained (a resumed one) writes its own, cumulative, timings.
  resumed = {**first, 'wall_clock_s': 50.0}
  assert reporting.finish_summary(str(tmp_path), resumed, 10)['wall_clock_s'] == 50.0


def _record(pathname, level, msg='message'):
  return std_logging.LogRecord('absl', level, pathname, 1, msg, (), None)


def test_quiet_filter_keeps_ibs_and_metrics_drops_other_info():
  ibs_dir = os.path.dirname(reporting.__file__) + os.sep
  quiet = reporting._QuietFilter((ibs_dir,))
  site = '/venv/lib/python3.11/site-packages/'
  assert quiet.filter(_record(ibs_dir + 'train.py', std_logging.INFO))
  assert not quiet.filter(
    _record(site + 'orbax/checkpoint/checkpoint_manager.py', std_logging.INFO)
  )
  assert quiet.filter(_record(site + 'orbax/checkpoint/x.py', std_logging.WARNING))
  assert not quiet.filter(
    _record(
      site + 'tensorflow_datasets/core/dataset_builder.py',
      std_logging.WARNING,
      'Using custom data configuration: Mnist1dConfig(...)',
    )
  )


@pytest.mark.slow
def test_training_time_adds_up_over_resumes_and_survives_a_rerun(tiny_config, tmp_path):
  from ibs import train

  workdir = str(tmp_path)
  first = tiny_config.copy_and_resolve_references()
  first.stop_after_steps = 70
  partial = train.train_and_evaluate(first, workdir)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['schedule']['kind'] == 'increasing_batch'

  manager = checkpoint.create_manager(workdir)
  position = manager.restore(
    70, args=checkpoint.ocp.args.Composite(position=checkpoint.ocp.args.JsonRestore())
  )['position']
  manager.close()
  assert 0 < position['train_time_s'] <= partial['wall_clock_s']

  finished = train.train_and_evaluate(tiny_config, workdir)
  assert finished['finished']
  # Cumulative: the first session's checkpointed time plus the whole second session.
  assert finished['wall_clock_s'] == pytest.approx(
    position['train_time_s'] + finished['session_wall_clock_s'], rel=0.05
  )
  assert [r['phase'] for r in finished['throughput']] == [1, 2, 3]
  written = json.loads((tmp_path / 'summary.json').read_text())

  rerun = train.train_and_evaluate(tiny_config, workdir)
  assert rerun['wall_clock_s'] == written['wall_clock_s']
  assert rerun['throughput'] == written['throughput']
  after = json.loads((tmp_path / 'summary.json').read_text())
  assert after['wall_clock_s'] == written['wall_clock_s']
  assert after['compile_s'] == written['compile_s']


# The scalars of a log period and of an evaluation as ibs.train writes them.
PERIOD = {
  'train_loss': 0.51234,
  'train_accuracy': 0.8123,
  'learning_rate': 0.1,
  'momentum': 0.9,
  'batch_size': 160,
  'phase': 1,
  'g_sgd': 124.3,
  'nonfinite_updates': 0,
  'gns/grad_sq_norm': 0.0123,
  'gns/trace_cov': 9.87,
  'gns/b_simple': 802.4,
  'examples_per_sec': 12345.6,
  'step_time_ms': 0.951,
  'epoch': 30.0,
  'examples_seen': 600_000,
  'parameter_updates': 18_750,
}


def test_metric_lines_are_grouped_short_and_count_unresolved_b_simple():
  counter = reporting.Unresolved()
  lines = reporting.metric_lines(18_750, PERIOD, counter)
  assert lines == [
    '[18,750] epoch 30.00 | train loss 0.5123 acc 0.8123 | ε 0.1 m 0.9 B 160 g 124.3 '
    'phase 1 | 12,346 examples/s 0.951 ms/step',
    '[18,750] B_simple 802 (|G|² 0.0123, tr(Σ) 9.87)',
  ]
  unresolved = {**PERIOD, 'gns/grad_sq_norm': -0.003, 'gns/b_simple': float('nan')}
  assert reporting.metric_lines(18_750, unresolved, counter)[1] == (
    '[18,750] B_simple unresolved (|G|² estimate -0.003 ≤ 0: noise dominates; '
    '1 of 2 logs)'
  )
  # Whatever else is logged wraps at MAX_LINE; nothing is dropped.
  many = {**PERIOD, **{f'extra/metric_{i}': i / 3 for i in range(20)}}
  lines = reporting.metric_lines(18_750, many, counter)
  assert all(len(line) <= reporting.MAX_LINE for line in lines)
  assert all(f'extra/metric_{i} ' in ' '.join(lines) for i in range(20))


def test_the_hyperparameter_line_is_short(tiny_config):
  line = reporting.hparams_line(reporting.flatten_hparams(tiny_config))
  assert len(line) <= reporting.MAX_LINE, line
  assert line == (
    'hyperparameters: mnist1d, cnn1d, momentum, increasing_batch, ε 0.1, B 32, m 0.9, '
    'epochs 4.0 (all 58 in config.json, HParams)'
  )


def test_the_writer_logs_short_lines_and_keeps_every_scalar(tmp_path, caplog):
  from ibs.tools import curves

  writer = writers.create_writer(str(tmp_path))
  with caplog.at_level(std_logging.INFO):
    writer.write_scalars(18_750, PERIOD)
    writer.flush()
  logged = [
    r.getMessage() for r in caplog.records if r.getMessage().startswith('[18,750]')
  ]
  assert len(logged) == 2 and all(len(line) <= reporting.MAX_LINE for line in logged)
  writer.close()
  scalars = curves.read_scalars(str(tmp_path))
  assert set(scalars) == set(PERIOD)
  assert scalars['gns/b_simple'][1][0] == pytest.approx(802.4)


class _ListWriter:
  """A writer that keeps its calls."""

  def __init__(self):
    self.calls = []

  def write_scalars(self, step, scalars):
    self.calls.append(('scalars', step, dict(scalars)))

  def write_hparams(self, hparams):
    self.calls.append(('hparams', dict(hparams)))

  def flush(self):
    self.calls.append(('flush',))

  def close(self):
    self.calls.append(('close',))


def test_a_starting_writer_delivers_the_writes_made_before_it_was_built_in_order():
  import threading

  release, built = threading.Event(), _ListWriter()

  def create():
    release.wait(timeout=30)
    return built

  writer = writers.StartingWriter(create)
  writer.write_hparams({'lr': 0.1})
  writer.write_scalars(1, {'loss': 2.0})
  assert built.calls == []  # not built yet: the writes wait
  release.set()
  writer.write_scalars(2, {'loss': 1.0})
  writer.flush()
  writer.close()
  assert built.calls == [
    ('hparams', {'lr': 0.1}),
    ('scalars', 1, {'loss': 2.0}),
    ('scalars', 2, {'loss': 1.0}),
    ('flush',),
    ('close',),
  ]


def test_a_starting_writer_that_fails_to_build_raises_at_the_next_call():
  def create():
    raise PermissionError('workdir is read-only')

  writer = writers.StartingWriter(create)
  with pytest.raises(PermissionError, match='read-only'):
    writer.flush()
  with pytest.raises(PermissionError, match='read-only'):
    writer.write_scalars(1, {'loss': 1.0})


def test_a_remote_workdir_is_written_through_tensorflows_file_systems():
  """gs:// and the like go to clu's SummaryWriter (TensorFlow's file systems append);
  TensorFlow's in-memory file system stands in for a bucket."""
  import tensorflow as tf

  workdir = 'ram://ibs_remote_workdir'
  assert writers.is_remote(workdir) and not writers.is_remote('/tmp/run')
  writer = writers.create_writer(workdir)
  writer.write_hparams({'lr': 0.1})
  writer.write_scalars(3, {'loss': 1.5})
  writer.close()
  logged = [
    (event.step, value.tag, float(tf.make_ndarray(value.tensor)))
    for path in tf.io.gfile.glob(workdir + '/events.out.tfevents.*')
    for event in tf.compat.v1.train.summary_iterator(path)
    for value in event.summary.value
    if value.tag == 'loss'
  ]
  assert logged == [(3, 'loss', 1.5)]
