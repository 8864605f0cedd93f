"""The critical-batch probe (ibs/tools/probe.py, branch.py) on tiny runs of fake data.

The estimator, the ε rule and the measurement points against hand-computed values; the
argument errors; the source run's checkpoints byte for byte before and after a probe;
and a branch at the run's own B and ε against the run's own later checkpoint.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from ibs import reporting, schedules, train
from ibs.durability import checkpoint
from ibs.tools import branch, probe

# ----------------------------------------------------------------------- pure parts


def test_linear_and_sqrt_rules_match_their_formulas():
  # linear: ε·B/B_run; sqrt: ε·√(B/B_run).
  assert probe.scaled_learning_rate(0.1, 1024, 160, 'linear') == pytest.approx(0.64)
  assert probe.scaled_learning_rate(0.1, 32, 160, 'linear') == pytest.approx(0.02)
  assert probe.scaled_learning_rate(0.1, 640, 160, 'sqrt') == pytest.approx(0.2)
  assert probe.scaled_learning_rate(0.1, 40, 160, 'sqrt') == pytest.approx(0.05)
  assert probe.scaled_learning_rate(0.1, 1024, 160, 'sqrt') == pytest.approx(
    0.1 * math.sqrt(6.4)
  )
  for rule in probe.RULES:  # at the run's own B, the run's own ε
    assert probe.scaled_learning_rate(0.3, 800, 800, rule) == 0.3
  with pytest.raises(ValueError, match='--rule'):
    probe.scaled_learning_rate(0.1, 64, 32, 'cubic')


@pytest.mark.parametrize(
  'losses, tolerance, expected, at_least',
  [
    # 1% of 1.0: 64 passes (1.005), 128 fails (1.02); 256 passing again does not count.
    ((1.0, 1.005, 1.02, 1.0), 0.01, 64, False),
    ((1.0, 1.01, 1.009, 0.5), 0.01, 256, True),  # all within: B* ≥ the largest
    ((1.0, 1.011, 1.0, 1.0), 0.01, 32, False),  # only the reference
    ((1.0, 0.9, 0.8, 2.0), 0.01, 128, False),  # lower is within
    ((1.0, 1.0, 1.0, 1.0), 0.0, 256, True),  # equal passes a zero tolerance
    ((1.0, 1.04, 1.06, 1.2), 0.05, 64, False),
    ((1.0, 1.0, math.inf, 1.0), 0.01, 64, False),  # a diverged branch fails
    ((1.0, math.nan, 1.0, 1.0), 0.01, 32, False),  # so does NaN
  ],
)
def test_critical_batch_by_hand(losses, tolerance, expected, at_least):
  got = probe.critical_batch((32, 64, 128, 256), losses, tolerance)
  assert (got.batch_size, got.at_least) == (expected, at_least)


def test_critical_batch_sorts_and_names_its_bound():
  got = probe.critical_batch((256, 32, 128, 64), (1.3, 1.0, 1.0, 1.0), 0.1)
  assert (got.batch_size, got.at_least, str(got)) == (128, False, '128')
  assert str(probe.critical_batch((32, 64), (1.0, 1.0), 0.01)) == '≥64'
  none = probe.critical_batch((32, 64), (math.inf, 1.0), 0.01)
  assert (none.batch_size, str(none)) == (None, 'n/a')


def test_measurement_updates_by_hand():
  # L = 20480, K = 8: marks 10240 + 1280·j, j = 1…8.
  assert probe.measurement_updates(20480, 32, 8) == [
    360,
    400,
    440,
    480,
    520,
    560,
    600,
    640,
  ]
  # At B = 1024 the marks 11520, 12800, 14080, ... fall inside updates: the next one.
  assert probe.measurement_updates(20480, 1024, 8) == [12, 13, 14, 15, 17, 18, 19, 20]
  assert probe.measurement_updates(20480, 1024, 1) == [20]  # K = 1: the end
  assert probe.measurement_updates(512, 64, 2) == [6, 8]


def test_paired_ratio_sem_by_hand():
  assert probe.paired_ratio_sem([2.0, 4.0], [1.0, 2.0]) == 0.0  # a constant ratio
  # ratios 1.1, 0.9: sd = √(2·0.1²/1) = 0.1414, sem = sd/√2 = 0.1.
  assert probe.paired_ratio_sem([1.1, 0.9], [1.0, 1.0]) == pytest.approx(0.1)
  assert math.isnan(probe.paired_ratio_sem([1.0], [1.0]))  # K = 1
  assert math.isnan(probe.paired_ratio_sem([1.0], [1.0, 1.0]))  # diverged: cut short


def test_nearest_checkpoint_prefers_the_earlier_of_two():
  checkpoints = {100: 1000, 200: 2000, 300: 3000}  # step: examples seen
  assert probe.nearest_checkpoint(2400, checkpoints) == 200
  assert probe.nearest_checkpoint(2500, checkpoints) == 200  # a tie
  assert probe.nearest_checkpoint(0, checkpoints) == 100
  assert probe.nearest_checkpoint(9999, checkpoints) == 300


def test_logged_b_simple_is_the_last_log_at_or_before_the_step():
  scalars = {'gns/b_simple': (np.array([10, 20, 30]), np.array([5.0, 6.0, 7.0]))}
  assert probe.logged_b_simple(scalars, 20) == (6.0, 20)
  assert probe.logged_b_simple(scalars, 29) == (6.0, 20)
  assert probe.logged_b_simple(scalars, 5) is None
  assert probe.logged_b_simple({}, 20) is None


# ----------------------------------------------------------------------- arguments


def _fake_workdir(path, checkpoints=True):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text('{}')
  if checkpoints:
    (path / 'checkpoints').mkdir(exist_ok=True)
  return str(path)


def _parse(workdir, **overrides):
  kwargs = dict(
    workdir=workdir,
    points=['1', '2'],
    batch_sizes=['32', '64'],
    branch_examples=512,
    loss_evals=2,
  )
  return probe.parse_arguments(**{**kwargs, **overrides})


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(points=['a']), "--points: 'a' is not a number"),
    (dict(points=['-1']), '--points: -1 must be an epoch >= 0'),
    (dict(points=[]), '--points is empty'),
    (dict(batch_sizes=['32', 'x']), "--batch_sizes: 'x' is not an integer"),
    (dict(batch_sizes=['32', '0']), '--batch_sizes: 0 must be a positive integer'),
    (dict(batch_sizes=['32', '64', '32']), '--batch_sizes lists 32 more than once'),
    (dict(batch_sizes=['32']), '--batch_sizes needs at least two'),
    (dict(branch_examples=0), '--branch_examples=0 must be a positive integer'),
    (
      dict(batch_sizes=['32', '96'], branch_examples=500),
      r'--branch_examples=500 is not a multiple of every batch size \(of 96\).*'
      r'use 480 or 576',
    ),
    (dict(rule='cubic'), "--rule='cubic'"),
    (dict(tolerance=-0.1), '--tolerance=-0.1 must be a number >= 0'),
    (dict(tolerance=math.nan), '--tolerance=nan'),
    (dict(loss_examples=-1), '--loss_examples=-1 must be >= 0'),
    (dict(loss_evals=0), '--loss_evals=0 must be between 1 and 4'),
    (dict(loss_evals=5), '--loss_evals=5 must be between 1 and 4'),
  ],
)
def test_bad_arguments_are_named(tmp_path, overrides, message):
  workdir = _fake_workdir(tmp_path / 'run')
  with pytest.raises(probe.UserError, match=message) as raised:
    _parse(workdir, **overrides)
  assert '\n' not in str(raised.value)


def test_bad_workdirs_and_outputs_are_named(tmp_path):
  with pytest.raises(probe.UserError, match='--workdir=.* is not a directory'):
    _parse(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(probe.UserError, match='--workdir=.* has no config.json'):
    _parse(str(tmp_path / 'empty'))
  early = _fake_workdir(tmp_path / 'early', checkpoints=False)
  with pytest.raises(probe.UserError, match='--workdir=.* has no checkpoints/'):
    _parse(early)
  workdir = _fake_workdir(tmp_path / 'run')
  inside = os.path.join(workdir, 'checkpoints', 'probe')
  with pytest.raises(probe.UserError, match="--out=.* is inside the run's checkpoints"):
    _parse(workdir, out=inside)
  assert _parse(workdir).out == os.path.join(workdir, 'probe')  # the default


def test_arguments_against_the_run_are_named(tmp_path):
  args = _parse(_fake_workdir(tmp_path / 'run'), points=['1', '4.5'])
  with pytest.raises(probe.UserError, match=r'--points: 4.5 is past the end .*4 epochs'):
    probe.check_against_run(args, 4.0, 512, 32, 1)
  args = _parse(_fake_workdir(tmp_path / 'run'))
  with pytest.raises(
    probe.UserError, match='--batch_sizes: 32 is not a multiple of .* 64'
  ):
    probe.check_against_run(args, 4.0, 512, 32, 2)
  args = _parse(_fake_workdir(tmp_path / 'run'), loss_examples=513)
  with pytest.raises(probe.UserError, match='--loss_examples=513 exceeds'):
    probe.check_against_run(args, 4.0, 512, 32, 1)


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--points=1', '--branch_examples=64'], 'error: --workdir=.* is not a directory'),
    (['--points=1', '--branch_examples=64', '--rule=cubic'], 'error: flag --rule=cubic'),
    (['--points=1'], 'error: missing --branch_examples: Examples each branch'),
  ],
)
def test_the_command_line_errors_in_one_line_with_status_2(tmp_path, flags, message):
  command = [sys.executable, '-m', 'ibs.tools.probe', f'--workdir={tmp_path / "nothing"}']
  done = subprocess.run(command + flags, capture_output=True, text=True, timeout=120)
  assert done.returncode == reporting.EXIT_USER_ERROR, done.stderr
  lines = [line for line in done.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and re.match(message, lines[0]), done.stderr
  assert 'Traceback' not in done.stderr


# ----------------------------------------------------------------------- tiny runs


def _tiny_config(model='cnn1d'):
  """512 fake examples, 4 epochs, B 32 then 64 from epoch 2, a checkpoint every epoch
  (the run keeps the last 3: steps 32, 40, 48); logs that cut dispatches mid-epoch."""
  config = default.get_config()
  config.dataset = 'fake'
  config.fake.num_train = 512
  config.fake.num_test = 128
  config.model = model
  config.model_kwargs = ml_collections.ConfigDict(
    dict(width=8, depth=2) if model == 'cnn1d' else dict(hidden=(32,))
  )
  config.schedule.num_epochs = 4.0
  config.schedule.milestones = (2.0,)
  config.schedule.decay_factor = 2.0  # 32 → 64
  config.max_micro_batch_size = 64  # B = 128 accumulates two micro-batches
  config.eval_batch_size = 128
  config.log_every_epochs = 0.3
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 1.0
  config.gns.horizon_examples = 256
  config.gns.split_every = 3
  return config


@pytest.fixture(scope='module')
def probe_source(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('probe_source'))
  train.train_and_evaluate(_tiny_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def tiny_prober(probe_source):
  """The probe's compiled steps for B = 32, 64, 128, shared by the tests of this run."""
  return branch.Prober.create(branch.load_run_config(probe_source), [32, 64, 128])


def _tree_digest(directory):
  """{relative path: sha256} of every file under `directory`."""
  digests = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.mark.slow
def test_probe_writes_its_outputs_and_leaves_the_source_untouched(
  probe_source, tiny_prober
):
  checkpoints = os.path.join(probe_source, 'checkpoints')
  before = _tree_digest(checkpoints)
  assert sorted(os.listdir(checkpoints)) == ['32', '40', '48']
  args = probe.parse_arguments(
    workdir=probe_source,
    points=['0.5', '2', '3.2'],
    batch_sizes=['32', '64', '128'],
    branch_examples=512,
    evaluate=True,
    loss_evals=2,
  )
  logged = []
  results = probe.probe(args, log=logged.append, prober=tiny_prober)
  paths = probe.write_outputs(results, args.out)

  assert _tree_digest(checkpoints) == before  # byte for byte, no file added
  assert os.path.dirname(paths['csv']) == os.path.join(probe_source, 'probe')
  # Points 0.5 and 2 share the nearest checkpoint (epoch 2, step 32), measured once.
  assert [p['checkpoint_step'] for p in results['points']] == [32, 40]
  assert results['points'][0]['points'] == [0.5, 2.0]
  assert any('points 0.5, 2: the checkpoint of step 32 (epoch 2)' in m for m in logged)
  for point in results['points']:
    # Step 32 starts phase 1: the run's next update is at B = 64.
    assert point['run_batch_size'] == 64
    rows = point['branches']
    assert [r['batch_size'] for r in rows] == [32, 64, 128]
    assert [r['updates'] for r in rows] == [16, 8, 4]
    for row in rows:
      assert row['learning_rate'] == pytest.approx(0.1 * row['batch_size'] / 64)
      assert len(row['loss_trace']) == 2 and not row['diverged']
      assert row['loss'] == pytest.approx(np.mean(row['loss_trace']))
      assert 0 <= row['test_accuracy'] <= 1
    expected = probe.critical_batch(
      [r['batch_size'] for r in rows], [r['loss'] for r in rows], args.tolerance
    )
    assert point['critical_batch_size'] == expected.batch_size
    assert math.isfinite(point['b_simple'])  # the run measured it (split_every = 3)
  with open(paths['json']) as f:
    assert json.load(f)['points'][1]['checkpoint_epoch'] == 3.0
  with open(paths['csv']) as f:
    assert len(f.read().strip().splitlines()) == 1 + 2 * 3
  assert os.path.getsize(paths['png']) > 0
  assert 'B* =' in probe.format_table(results)


def _continue_the_run(workdir, prober):
  """Branches from the checkpoint of step 32 at the run's B and ε for one checkpoint
  interval (one epoch, 8 updates at B = 64); returns (branch state, saved state)."""
  config = prober.config
  manager = branch.open_checkpoints(workdir)
  positions = branch.read_positions(manager, checkpoint.config_fingerprint(config))
  try:
    run = branch.run_point(prober.schedule, config, positions[32])
    assert (run.batch_size, run.hyperparams['learning_rate']) == (64, pytest.approx(0.1))
    start = prober.restore(manager, 32, positions[32])
    result = prober.branch(start, run.examples_seen, 64, run.hyperparams, 512)
    later = prober.restore(manager, 40, positions[40])
  finally:
    manager.close()
  assert positions[40].examples_seen == run.examples_seen + 512
  return result.state, later


@pytest.mark.slow
def test_a_branch_at_the_runs_own_batch_and_rate_is_the_runs_continuation(
  probe_source, tiny_prober
):
  """cnn1d on XLA:CPU: one update per dispatch (ibs/step.py), as in the run."""
  got, want = _continue_the_run(probe_source, tiny_prober)
  assert int(got.step) == int(want.step) == 40
  for name in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))
  jax.tree.map(
    np.testing.assert_array_equal, got.opt_state.inner_state, want.opt_state.inner_state
  )


@pytest.mark.slow
def test_the_continuation_is_exact_under_other_dispatches_too(tmp_path):
  """An MLP runs K = 8 updates per dispatch: the run cut its dispatches at logs every
  0.3 epochs, the branch only at K; the noise scale is measured every 3rd update inside
  a conditional. Still the run's continuation, bit for bit."""
  workdir = str(tmp_path / 'mlp')
  train.train_and_evaluate(_tiny_config('mlp'), workdir)
  prober = branch.Prober.create(branch.load_run_config(workdir), [64])
  got, want = _continue_the_run(workdir, prober)
  for name in ('params', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal, getattr(got, name), getattr(want, name))


def test_an_adaptive_runs_point_is_read_from_its_record():
  """B_run and ε of an adaptive run come from the switches its checkpoint recorded.

  The ladder of B₀ 32 ×2 capped at 64 over milestones 1/2/3 (N = 1000): 32, 64, then ε
  halves twice at B = 64 (the hybrid cap rule). A run that switched at 1024 and 1536
  examples stands on rung 2 (B 64, ε 0.05) at step 40 (1024/32 + 512/64), where the
  recipe's fixed milestones put it on rung 1 (ε 0.1, steps 32–47 by ibs/clock.py's
  rule: ceil(1000/32) = 32 steps to 1024, ceil(976/64) = 16 to 2048).
  """
  config = default.get_config()
  config.schedule.kind = 'adaptive'
  config.schedule.batch_size, config.schedule.learning_rate = 32, 0.1
  config.schedule.milestones, config.schedule.decay_factor = (1.0, 2.0, 3.0), 2.0
  config.schedule.max_batch_size = 64
  config.schedule.num_epochs = 4.0
  config.schedule.adaptive.min_epochs = 1.0
  schedule = schedules.from_config(config, 1000)
  record = checkpoint.CheckpointRecord(
    step=40,
    examples_seen=1536,
    phase=1,
    data_seed=0,
    config_fingerprint='',
    switches=((1024, 1), (1536, 2)),
  )
  point = branch.run_point(schedule, config, record)
  assert point.batch_size == 64
  assert point.hyperparams['learning_rate'] == pytest.approx(0.05)
  fixed = config.copy_and_resolve_references()
  fixed.schedule.kind = 'hybrid'
  assert branch.run_point(schedule, fixed, record).hyperparams[
    'learning_rate'
  ] == pytest.approx(0.1)
