"""The mistakes a researcher makes on the command line, in ibs.main and ibs.calculator.

Each ends in at most 3 lines of stderr, no traceback and exit status 2; with
--verbosity=1 the traceback is back. The expected messages are written here by hand:
the field and variant names come from configs/default.py and configs/cifar10_wrn.py,
the refusals from the checks training runs (ibs/config_checks.py), which the calculator
runs too.
"""

import os
import subprocess
import sys

import pytest

from ibs import reporting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('ibs.main', 'ibs.calculator')


def run(module, *args, cwd):
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env={**os.environ, 'PYTHONPATH': REPO},
    timeout=300,
  )


def mistakes(workdir):
  """(name, arguments, a part of the message) for each mistake of the issue's list."""
  return [
    (
      'misspelled field',
      ['--config=configs/default.py', '--config.schedule.batchsize=64'],
      "config.schedule has no field 'batchsize'. Did you mean "
      '--config.schedule.batch_size=64?',
    ),
    (
      'misspelled variant',
      ['--config=configs/cifar10_wrn.py:schedul=hybrid'],
      'Did you mean schedule=hybrid?',
    ),
    (
      'missing file',
      ['--config=configs/defualt.py'],
      '--config=configs/defualt.py: no such file. Did you mean configs/default.py?',
    ),
    (
      'bad batch',
      ['--config=configs/default.py', '--config.schedule.batch_size=48'],
      'Batch size 48 is not divisible by devices × ghost_batch_size = 1 × 32 = 32.',
    ),
    (
      'seesaw with momentum',
      ['--config=configs/default.py', '--config.schedule.kind=seesaw'],
      "config.schedule.kind='seesaw' converts the recipe for Adam",
    ),
  ]


def check_one_line(result, message):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr and 'FATAL' not in result.stderr
  assert len(lines) <= 3, result.stderr
  assert lines[0].startswith('error: ') and message in lines[0], lines
  assert lines[-1] == '(run with --verbosity=1 for the traceback)'


@pytest.mark.parametrize('module', COMMANDS)
def test_each_mistake_is_one_line_and_exit_2(module, tmp_path):
  """From a directory without configs/ (they resolve against the checkout), with a
  workdir that must not be created."""
  workdir = tmp_path / 'w'
  extra = [f'--workdir={workdir}'] if module == 'ibs.main' else []
  for name, args, message in mistakes(workdir):
    result = run(module, *args, *extra, cwd=REPO if name == 'missing file' else tmp_path)
    check_one_line(result, message)
  assert not workdir.exists()


@pytest.mark.parametrize(
  'module, args, message',
  [
    ('ibs.main', ['--config=configs/default.py'], 'missing --workdir: Directory for'),
    ('ibs.calculator', [], 'missing --config: '),
  ],
)
def test_a_missing_flag_is_one_line_and_exit_2(module, args, message, tmp_path):
  check_one_line(run(module, *args, cwd=tmp_path), message)


def test_verbosity_1_gives_the_traceback(tmp_path):
  args = ['--config=configs/default.py', '--config.schedule.batchsize=64']
  for module in COMMANDS:
    extra = [f'--workdir={tmp_path / "w"}'] if module == 'ibs.main' else []
    result = run(module, *args, *extra, '--verbosity=1', cwd=REPO)
    assert 'Traceback' in result.stderr
    assert 'Did you mean "batch_size"' in result.stderr


def test_the_calculator_refuses_what_training_refuses():
  """One function: check_config refuses, so the calculator's report does too."""
  from configs import default
  from ibs import calculator, config_checks

  for field, value, match in (
    ('batch_size', 48, 'not divisible by devices × ghost_batch_size'),
    ('kind', 'seesaw', 'converts the recipe for Adam'),
  ):
    config = default.get_config()
    config.schedule[field] = value
    with pytest.raises(config_checks.ConfigError, match=match):
      calculator.report(config)


def test_path_flags_expand_home_and_variables(monkeypatch):
  monkeypatch.setenv('HOME', '/home/r')
  monkeypatch.setenv('RUNS', '/runs')
  argv = [
    'prog',
    '--data_dir=~/tensorflow_datasets',
    '--workdir',
    '$RUNS/a',
    '--config.data_dir=~/d',
    '--manual_dir=gs://bucket/~x',
    '--points=~1',
  ]
  assert reporting.expand_path_arguments(argv) == [
    'prog',
    '--data_dir=/home/r/tensorflow_datasets',
    '--workdir',
    '/runs/a',
    '--config.data_dir=/home/r/d',
    '--manual_dir=gs://bucket/~x',
    '--points=~1',
  ]
