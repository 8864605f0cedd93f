"""Shared fixtures: a shrunk default config and a per-session TFDS data directory."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest

from configs import default


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """MNIST-1D is generated once per test session into this directory."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def tiny_config(data_dir):
  """The default config shrunk to seconds: 2000 examples, 4 epochs, 4 phases."""
  config = default.get_config()
  config.data_dir = data_dir
  config.mnist1d.num_train = 2000
  config.mnist1d.num_test = 500
  config.model_kwargs.width = 16
  config.schedule.num_epochs = 4.0
  config.schedule.milestones = (1.0, 2.0, 3.0)
  config.schedule.batch_size = 32
  config.schedule.decay_factor = 2.0  # 32 → 64 → 128 → 256
  config.max_micro_batch_size = 64  # the last phases accumulate
  config.eval_batch_size = 250
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 2.0
  return config
