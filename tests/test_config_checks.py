"""A config that cannot work fails before data or compilation, naming field and fix."""

import pytest

from configs import default
from ibs import config_checks, step, train
from ibs.data import pipeline


def _config(**overrides):
  config = default.get_config()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
  ('overrides', 'devices', 'message'),
  [
    ({'schedule.milestones': (30.0, 20.0, 80.0)}, 1, 'strictly increase'),
    ({'schedule.milestones': (30.0, 30.0, 80.0)}, 1, 'strictly increase'),
    ({'schedule.learning_rate': 0.0}, 1, 'learning_rate=0.0 must be a positive'),
    ({'schedule.learning_rate': -0.1}, 1, 'learning_rate=-0.1 must be a positive'),
    ({'schedule.momentum': 1.0}, 1, r'momentum=1.0 must be in \[0, 1\)'),
    ({'schedule.momentum': -0.5}, 1, r'must be in \[0, 1\)'),
    ({'schedule.batch_size': 48}, 1, 'not divisible by devices × ghost_batch_size'),
    ({}, 3, 'not divisible by devices × ghost_batch_size = 3 × 32'),
    ({'optimizer': 'lamb'}, 1, "Unknown config.optimizer='lamb'"),
    ({'model': 'vgg'}, 1, "Unknown config.model='vgg'"),
    ({'dataset': 'svhn'}, 1, "Unknown config.dataset='svhn'"),
    ({'schedule.kind': 'cosine'}, 1, "Unknown config.schedule.kind='cosine'"),
    ({'schedule.decay_factor': 0.2}, 1, 'decay_factor=0.2 must be > 1'),
    ({'schedule.milestones': (30.0, 60.0, 120.0)}, 1, 'starts at or after the end'),
    ({'schedule.kind': 'hybrid', 'schedule.max_batch_size': 0}, 1, 'max_batch_size'),
    ({'schedule.batch_size': 8000}, 1, 'exceeds the 20000 training examples'),
    ({'optimizer': 'sgd'}, 1, 'Set config.schedule.momentum=0'),
    ({'ghost_batch_size': 1024}, 1, 'exceeds config.max_micro_batch_size'),
    ({'eval_batch_size': 1001, 'ghost_batch_size': 16}, 2, 'eval_batch_size=1001'),
    ({'weight_decay': -1.0}, 1, 'weight_decay=-1.0'),
    ({'steps_per_dispatch': 0}, 1, 'steps_per_dispatch=0 must be an integer >= 1'),
    ({'resident_data': 'yes'}, 1, "resident_data='yes' must be one of"),
    (
      {'resident_data_fraction': 0.0},
      1,
      r'resident_data_fraction=0.0 must be .* \(0, 1\]',
    ),
    ({'resident_data_fraction': 1.5}, 1, 'resident_data_fraction=1.5 must be a fraction'),
    (
      {'resident_data': 'on', 'dataset': 'fake', 'fake.num_train': 40_000},
      1,
      "resident_data='on', but fake data is generated per batch",
    ),
    ({'weight_decay_mask': 'kernel'}, 1, "weight_decay_mask='kernel' must be"),
    ({'eval_every_epochs': 0.0}, 1, 'eval_every_epochs=0.0 must be positive'),
    ({'ghost_batch_size': 0}, 1, 'ghost_batch_size=0 must be positive'),
    # Issue 16: what failed late, after compilation or with a bare exception.
    ({'eval_batch_size': 0}, 1, 'eval_batch_size=0 must be a positive integer'),
    ({'eval_batch_size': -1000}, 1, 'eval_batch_size=-1000 must be a positive'),
    ({'data_seed': -1}, 1, r'data_seed=-1 must be an integer in \[0, 2\*\*32\)'),
    ({'seed': -3}, 1, 'seed=-3 must be an integer'),
    ({'log_every_epochs': float('inf')}, 1, 'log_every_epochs=inf must be positive'),
    ({'checkpoint_every_epochs': -1.0}, 1, 'checkpoint_every_epochs=-1.0 must be'),
    ({'stop_after_steps': -5}, 1, 'stop_after_steps=-5 must be an integer >= 0'),
    ({'max_micro_batch_size': 0}, 1, 'max_micro_batch_size=0 must be a positive'),
    ({'nonfinite': 'ignore'}, 1, "nonfinite='ignore' must be 'stop'"),
    ({'nonfinite_max_skipped': 1.5}, 1, 'nonfinite_max_skipped=1.5 must be a fraction'),
    ({'model_kwargs.width': 0}, 1, 'model_kwargs.width=0 must be a positive integer'),
    ({'model_kwargs.widht': 16}, 1, r'cannot be built with config.model_kwargs=.*widht'),
  ],
)
def test_bad_config_names_the_field(overrides, devices, message):
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_config(_config(**overrides), num_devices=devices)


def test_workdir_must_be_named_and_writable(tmp_path):
  with pytest.raises(config_checks.ConfigError, match='--workdir is empty'):
    config_checks.check_config(_config(), num_devices=1, workdir='')
  (tmp_path / 'file').write_text('')
  with pytest.raises(
    config_checks.ConfigError, match='cannot be created or written: Not a directory'
  ):
    config_checks.check_config(
      _config(), num_devices=1, workdir=str(tmp_path / 'file' / 'sub')
    )
  config_checks.check_config(_config(), num_devices=1, workdir=str(tmp_path / 'new'))
  assert not list((tmp_path / 'new').iterdir())  # Created, and the probe removed.


def test_devices_must_split_evenly_over_processes():
  with pytest.raises(config_checks.ConfigError, match='4 devices do not split over 3'):
    config_checks.check_config(_config(), num_devices=4, process_count=3)


def test_default_config_is_valid():
  schedule = config_checks.check_config(default.get_config(), num_devices=1).schedule
  assert [p.batch_size for p in schedule.phases] == [32, 160, 800, 4000]


def test_bad_config_fails_before_reading_data_or_compiling(monkeypatch, tmp_path):
  def forbidden(*args, **kwargs):
    raise AssertionError('reached data loading or compilation')

  monkeypatch.setattr(pipeline, 'load_source', forbidden)
  monkeypatch.setattr(step, 'compile_train_steps', forbidden)
  with pytest.raises(config_checks.ConfigError, match='learning_rate'):
    train.train_and_evaluate(_config(**{'schedule.learning_rate': -1.0}), str(tmp_path))
  assert not list(tmp_path.iterdir())  # Nothing written to the workdir either.
