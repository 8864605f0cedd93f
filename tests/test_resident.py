"""Device-resident data: the host pipeline's batches, order and numbers, from the device.

The references are the host pipeline (ibs/data/pipeline.py with ibs/data/augment.py)
and a run on it: the resident path must produce the same batches (CIFAR-10: the same
float32 values, augmentation included) and the same trained parameters (MNIST-1D). No
data is downloaded: CIFAR-10 is a generated uint8 array of its shape.
"""

import logging
import os

import jax
import numpy as np
import pytest

from configs import cifar10_wrn, default
from ibs import config_checks, sharding, train
from ibs import step as step_lib
from ibs.data import augment, catalog, pipeline, resident
from tests.test_train import _final_params, latest_state

CIFAR = catalog.CATALOG['cifar10']


def _cifar_source(n):
  """n random CIFAR-shaped uint8 images, labels 0…n−1."""
  images = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  return pipeline.ArraySource(inputs=images, labels=np.arange(n, dtype=np.int32))


def _cifar_config(seed):
  config = default.get_config()
  config.dataset, config.data_seed = 'cifar10', seed
  return config


@pytest.mark.parametrize(
  ('start', 'batch_size', 'process_index', 'process_count'),
  [(0, 16, 0, 1), (37, 16, 0, 1), (90, 24, 1, 2), (5, 60, 2, 3)],
  ids=str,
)
def test_cifar10_batches_on_the_device_equal_the_host_pipelines(
  start, batch_size, process_index, process_count
):
  """Crop, flip and normalisation on the device, from the host's keys: bit for bit the
  host pipeline's batch, across epoch boundaries (N = 50) and for any process's slice."""
  source, seed = _cifar_source(50), 7
  mesh = sharding.make_mesh()
  on_device = resident.Resident.place(_cifar_config(seed), source, mesh)
  where = dict(
    start_examples=start,
    batch_size=batch_size,
    num_steps=4,
    process_index=process_index,
    process_count=process_count,
  )
  host = list(pipeline.train_batches(source, augment.cifar10(seed), seed=seed, **where))
  keys = list(on_device.train_batches(**where))
  materialise = jax.jit(on_device.materialise)
  assert len(keys) == len(host) == 4
  for key, expected in zip(keys, host, strict=True):
    got = jax.tree.map(np.asarray, materialise(on_device.arrays, key))
    assert got['input'].dtype == np.float32
    np.testing.assert_array_equal(got['label'], expected['label'])
    np.testing.assert_array_equal(got['input'], expected['input'])
  # Not trivially equal: some crops moved and some images flipped.
  flips = np.concatenate([k['flip'] for k in keys])
  assert flips.any() and not flips.all()
  assert (np.concatenate([k['crop'] for k in keys]) != augment.CIFAR_PADDING).any()


def test_mnist1d_keys_name_the_host_pipelines_examples():
  """Float inputs: the gather returns the stored rows, in the host pipeline's order."""
  n = 30
  inputs = np.random.default_rng(0).standard_normal((n, 40)).astype(np.float32)
  source = pipeline.ArraySource(inputs=inputs, labels=np.arange(n, dtype=np.int32))
  config = default.get_config()
  config.data_seed = 3
  on_device = resident.Resident.place(config, source, sharding.make_mesh())
  where = dict(start_examples=25, batch_size=8, num_steps=300)  # > one host chunk
  host = pipeline.train_batches(source, augment.cast, seed=3, **where)
  materialise = jax.jit(on_device.materialise)
  for key, expected in zip(on_device.train_batches(**where), host, strict=True):
    got = materialise(on_device.arrays, key)
    np.testing.assert_array_equal(np.asarray(got['input']), expected['input'])
    np.testing.assert_array_equal(np.asarray(got['label']), expected['label'])


@pytest.mark.parametrize(
  ('mode', 'fraction', 'memory', 'resident_expected'),
  [
    ('auto', 0.25, 4 * 50_000 * (32 * 32 * 3 + 4), True),  # exactly the fraction
    ('auto', 0.25, 4 * 50_000 * (32 * 32 * 3 + 4) - 1, False),
    ('auto', 1.0, 50_000 * (32 * 32 * 3 + 4), True),
    ('on', 0.01, 50_000 * (32 * 32 * 3 + 4), True),  # 'on' ignores the fraction
    ('off', 1.0, 10**12, False),
  ],
)
def test_auto_places_the_split_where_it_fits_the_fraction(
  mode, fraction, memory, resident_expected
):
  """CIFAR-10's train split: 50,000 × (3,072 image bytes + a 4-byte label) per device."""
  config = _cifar_config(0)
  config.resident_data, config.resident_data_fraction = mode, fraction
  choice = resident.choose(config, CIFAR, memory=memory)
  assert choice.resident == resident_expected
  if resident_expected:
    assert choice.bytes == 50_000 * 3076
    assert choice.describe() == 'data: resident on device (153.8 MB per device)'
  else:
    assert choice.describe().startswith('data: host pipeline (')


def test_on_fails_where_the_split_cannot_be_resident():
  config = _cifar_config(0)
  config.resident_data = 'on'
  with pytest.raises(ValueError, match=r"'on', but the cifar10 train split needs 153.8"):
    resident.choose(config, CIFAR, memory=100_000_000)
  config.dataset = 'imagenet2012'
  spec = catalog.CATALOG['imagenet2012']
  with pytest.raises(ValueError, match='stored as JPEG bytes'):
    resident.choose(config, spec, memory=10**15)
  config.resident_data = 'auto'  # auto: the host pipeline, and why
  assert resident.choose(config, spec).describe() == (
    'data: host pipeline (imagenet2012 is stored as JPEG bytes, decoded per batch)'
  )


def test_a_split_too_large_for_the_device_fails_the_config_check(monkeypatch):
  """'on' with more bytes than the device has: a ConfigError before any data."""
  config = cifar10_wrn.get_config()
  config.resident_data = 'on'
  monkeypatch.setattr(resident, 'device_memory_bytes', lambda: 10**6)
  with pytest.raises(config_checks.ConfigError, match='more than the 1.0 MB a device'):
    config_checks.check_config(config, 1)


class _Device:
  def __init__(self, stats):
    self._stats = stats

  def memory_stats(self):
    return self._stats


def test_device_memory_is_the_reported_limit_or_the_hosts_shared_by_its_devices(
  monkeypatch,
):
  """A backend that reports `bytes_limit` (GPU, TPU) is taken at its word; XLA:CPU
  reports none: the host's physical memory over its local devices."""
  monkeypatch.setattr(
    resident.jax, 'local_devices', lambda: [_Device({'bytes_limit': 16 * 2**30})]
  )
  assert resident.device_memory_bytes() == 16 * 2**30
  monkeypatch.setattr(resident.jax, 'local_devices', lambda: [_Device(None)] * 2)
  physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  assert resident.device_memory_bytes() == physical // 2


@pytest.mark.slow
def test_resident_run_ends_with_the_host_runs_parameters(
  tiny_run, tiny_config, tmp_path, caplog
):
  """The same training on the host pipeline (tiny_run places MNIST-1D on the device by
  'auto'), to the checkpoint that tiny_run writes at 1.5 epochs (step 79, in phase 1):
  bit-identical parameters. The run's opening lines say where the data is."""
  _, resident_workdir, _ = tiny_run
  config = tiny_config.copy_and_resolve_references()
  config.resident_data = 'off'
  config.stop_after_steps = 79  # 63 steps of 32, then 16 of 64: 3040 ≥ 1.5 epochs
  workdir = str(tmp_path / 'host')
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, workdir)
  assert "data: host pipeline (config.resident_data='off')" in caplog.text
  step, host_params = _final_params(workdir)
  _, resident_state = latest_state(resident_workdir, step=79)
  assert step == 79
  jax.tree.map(np.testing.assert_array_equal, resident_state['params'], host_params)


def test_tiny_run_is_resident(tiny_config):
  """The choice the default config's tests make: MNIST-1D is small, so 'auto' puts it
  on the device (the runs of tests/test_train.py exercise resident data)."""
  spec, _ = config_checks.check_config(tiny_config, 1)
  choice = resident.choose(tiny_config, spec)
  assert choice.resident and choice.bytes == 2000 * (40 * 4 + 4)


@pytest.mark.parametrize(('host_loop', 'k'), [(False, 3), (True, 1)], ids=str)
def test_the_step_on_keys_equals_the_step_on_host_batches(host_loop, k):
  """The compiled step given keys (the batch gathered inside it) against the same step
  given the host pipeline's batches: the same state, bit for bit, after 3 updates of
  A = 2 micro-batches, in one dispatch of the update loop (K = 3) and in XLA:CPU's host
  loop (one micro-batch program per call)."""
  from tests import test_step

  n, seed = 40, 5
  rng = np.random.default_rng(1)
  source = pipeline.ArraySource(
    inputs=rng.normal(size=(n, test_step.LENGTH)).astype(np.float32),
    labels=rng.integers(0, 10, n).astype(np.int32),
  )
  config = default.get_config()
  config.data_seed = seed
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(test_step.BATCH, 1, test_step.GHOST, 16)
  assert plan.accumulation == 2
  on_device = resident.Resident.place(config, source, mesh)
  where = dict(start_examples=10, batch_size=test_step.BATCH, num_steps=3)
  host = list(pipeline.train_batches(source, augment.cast, seed=seed, **where))
  keys = list(on_device.train_batches(**where))
  states = []
  for placed, batches in ((None, host), (on_device, keys)):
    state = test_step._state(*test_step._initial_variables())
    state = jax.device_put(state, sharding.replicated(mesh))
    (step,) = step_lib.compile_train_steps(
      mesh,
      state,
      [plan],
      {key: value[:1] for key, value in host[0].items()},
      ghost_batch_size=test_step.GHOST,
      steps_per_dispatch=k,
      options=step_lib.StepOptions(gns_horizon_examples=1000.0),
      host_loop=host_loop,
      resident=placed,
    ).values()
    assert step.host_loop == host_loop
    metrics = step_lib.empty_metrics(mesh)
    for first in range(0, 3, k):
      state, metrics = step(state, batches[first : first + k], metrics)
    states.append(jax.tree.map(np.asarray, (state.params, state.batch_stats, state.gns)))
  jax.tree.map(np.testing.assert_array_equal, *states)
