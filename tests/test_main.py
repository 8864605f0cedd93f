"""python -m ibs.main: mistakes end in one readable line and exit status 2."""

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ibs_main(*args, cwd, python_options=()):
  env = {**os.environ, 'PYTHONPATH': REPO}
  start = time.perf_counter()
  result = subprocess.run(
    [sys.executable, *python_options, '-m', 'ibs.main', *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=300,
  )
  return result, time.perf_counter() - start


def test_a_misspelled_config_fails_before_tf_and_jax(tmp_path):
  result, _ = ibs_main('--config=configs/defualt.py', f'--workdir={tmp_path}', cwd=REPO)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
    'error: --config=configs/defualt.py: no such file. Did you mean configs/default.py?',
    '(run with --verbosity=1 for the traceback)',
  ]
  importtime = subprocess.run(
    [sys.executable, '-X', 'importtime', '-m', 'ibs.main', '--config=nope.py']
    + [f'--workdir={tmp_path}'],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, 'PYTHONPATH': REPO},
  ).stderr
  imported = _imported(importtime)
  assert 'jax' not in imported and 'tensorflow' not in imported


def _imported(stderr):
  """The modules `python -X importtime` reported importing."""
  return {
    line.split('|')[-1].strip()
    for line in stderr.splitlines()
    if line.startswith('import time:')
  }


def test_config_errors_are_one_line_from_any_directory(tmp_path):
  """configs/... resolves against the checkout when the working directory lacks it. The
  config is checked before TensorFlow is imported, and nothing is written."""
  result, _ = ibs_main(
    '--config=configs/default.py',
    '--config.optimizer=adamw',
    f'--workdir={tmp_path / "w"}',
    cwd=tmp_path,
    python_options=('-X', 'importtime'),
  )
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == [
    "error: Unknown config.optimizer='adamw'. Choose one of "
    "['sgd', 'momentum', 'nesterov', 'adam']."
  ]
  assert 'Traceback' not in result.stderr
  assert 'tensorflow' not in _imported(result.stderr)
  assert not (tmp_path / 'w').exists()
  verbose, _ = ibs_main(
    '--config=configs/default.py',
    '--config.optimizer=adamw',
    f'--workdir={tmp_path / "w"}',
    '--verbosity=1',
    cwd=tmp_path,
  )
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr


def test_an_unprepared_dataset_names_the_prepare_command(tmp_path):
  """Found from the data directory alone: before TensorFlow, and no workdir is made."""
  result, _ = ibs_main(
    '--config=configs/cifar10_wrn.py',
    f'--config.data_dir={tmp_path}',
    f'--workdir={tmp_path / "w"}',
    cwd=REPO,
    python_options=('-X', 'importtime'),
  )
  assert result.returncode == 2
  assert f'python -m ibs.data.prepare cifar10 --data_dir={tmp_path}' in result.stderr
  assert 'Traceback' not in result.stderr
  assert 'tensorflow' not in _imported(result.stderr)
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_a_refused_checkpoint_names_the_changed_fields(tmp_path, data_dir):
  tiny = [
    '--config=configs/default.py',
    f'--config.data_dir={data_dir}',
    '--config.mnist1d.num_train=2000',
    '--config.mnist1d.num_test=500',
    '--config.model_kwargs.width=8',
    '--config.schedule.num_epochs=2',
    '--config.schedule.milestones=(1.,)',
    '--config.schedule.decay_factor=2',
    '--config.eval_batch_size=250',
    f'--workdir={tmp_path}',
  ]
  first, _ = ibs_main(*tiny, '--config.stop_after_steps=5', cwd=REPO)
  assert first.returncode == 0, first.stderr[-2000:]
  assert os.path.exists(tmp_path / 'config.json')
  second, _ = ibs_main(*tiny, '--config.schedule.learning_rate=0.05', cwd=REPO)
  assert second.returncode == 2
  assert 'Traceback' not in second.stderr
  assert 'Changed: schedule.learning_rate: 0.1 → 0.05.' in second.stderr


def test_a_local_run_writes_its_tensorboard_events_without_tensorflow(tmp_path):
  """TensorFlow's import is the largest of a run; a local workdir needs none of it
  (ibs/writers.py), nor does generated data."""
  from ibs.tools import curves

  workdir = tmp_path / 'run'
  result, _ = ibs_main(
    '--config=configs/default.py',
    f'--workdir={workdir}',
    '--config.dataset=fake',
    '--config.schedule.num_epochs=2',
    '--config.schedule.milestones=(1.0,)',
    '--config.eval_every_epochs=1',
    cwd=REPO,
    python_options=('-X', 'importtime'),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not {m for m in _imported(result.stderr) if m.split('.')[0] == 'tensorflow'}
  scalars = curves.read_scalars(str(workdir))
  steps, batch = scalars['batch_size']
  assert list(batch) == [32, 160] and steps[-1] == 32 + 7  # 1024/32, then ⌈1024/160⌉
  assert 'test_accuracy' in scalars or 'eval/accuracy' in scalars, sorted(scalars)
