"""Verified restore: every damage to the newest checkpoint falls back to an intact one.

Each case saves three checkpoints of a small state (steps 10, 20, 30), damages the
workdir the way a crash, a full disk or a bad copy would, and restores: the newest
intact checkpoint comes back, the damaged one is moved to damaged_checkpoints/ (never
deleted) with a warning naming it and why.
"""

import dataclasses
import glob
import json
import logging
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ibs.durability import checkpoint

FINGERPRINT = 'f' * 16


def _state(step):
  rng = np.random.default_rng(step)  # Random floats: stored uncompressed, like params.
  return {
    'params': jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)),
    'bias': jnp.asarray(rng.normal(size=(7,)).astype(np.float32)),
    'count': jnp.int32(step),
    'half': jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
  }


@pytest.fixture
def workdir(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path))
  for step in (10, 20, 30):
    checkpoint.save(
      manager,
      _state(step),
      checkpoint.CheckpointRecord(step, step * 32, 0, 0, FINGERPRINT),
    )
  manager.wait_until_finished()
  manager.close()
  return tmp_path


def _restore(workdir):
  manager = checkpoint.create_manager(str(workdir))
  try:
    return checkpoint.restore_latest(manager, _state(0), FINGERPRINT)
  finally:
    manager.close()


def _step_dir(workdir, step):
  return os.path.join(workdir, 'checkpoints', str(step))


def _data_files(step_dir):
  return glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)


def _largest_data_file(step_dir):
  return max(_data_files(step_dir), key=os.path.getsize)


def _truncate_data(d):
  path = _largest_data_file(d)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


_BTREE_NODE = bytes.fromhex('0cdb20de')  # the magic opening an OCDBT b-tree node file


def _flip_bytes(d, count: int | None = 64):
  """Inverts `count` bytes in the middle of every file of array values (None: the whole
  file), not the b-tree nodes, whose damage is an unreadable checkpoint, not a silent
  one. Every such file, because OCDBT can leave a file of values that the manifest no
  longer references (seen: the largest file of a run's final checkpoint), and damage
  there changes nothing read."""
  for path in _data_files(d):
    with open(path, 'r+b') as f:
      if f.read(4) == _BTREE_NODE:
        continue
      start = 0 if count is None else os.path.getsize(path) // 2
      f.seek(start)
      chunk = f.read(-1 if count is None else count)
      f.seek(start)
      f.write(bytes(b ^ 0xFF for b in chunk))


def _delete(*parts):
  def damage(d):
    os.remove(os.path.join(d, *parts))

  return damage


def _empty(d):
  shutil.rmtree(d)
  os.mkdir(d)


def test_intact_checkpoints_restore_verified(workdir):
  state, record, _ = _restore(workdir)
  assert record.step == 30 and len(record.checksum) == 16
  jax.tree.map(np.testing.assert_array_equal, state, _state(30))
  assert not os.path.exists(os.path.join(workdir, 'damaged_checkpoints'))


@pytest.mark.parametrize(
  ('damage', 'reason'),
  [
    (_truncate_data, 'state unreadable|checksum mismatch'),
    (_flip_bytes, 'checksum mismatch'),
    (_delete('state', 'manifest.ocdbt'), 'state unreadable'),
    (_delete('state', '_METADATA'), 'verified'),
    (_delete('position', 'metadata'), 'position record unreadable'),
    (_delete('_CHECKPOINT_METADATA'), 'verified'),
    (_empty, 'unreadable'),
  ],
  ids=[
    'truncated_data_file',
    'flipped_bytes',
    'deleted_manifest',
    'deleted_state_metadata',
    'deleted_position_record',
    'deleted_checkpoint_metadata',
    'empty_step_dir',
  ],
)
def test_damaged_newest_checkpoint_falls_back(workdir, damage, reason, caplog):
  damage(_step_dir(workdir, 30))
  with caplog.at_level(logging.WARNING):
    restored = _restore(workdir)
  if reason == 'verified' and restored[1].step == 30:
    # Orbax needs no metadata file given the target's structure; what it read matched
    # the checksum, so nothing was lost.
    jax.tree.map(np.testing.assert_array_equal, restored[0], _state(30))
    return
  state, record, _ = restored
  assert record.step == 20
  jax.tree.map(np.testing.assert_array_equal, state, _state(20))
  warnings = [r.getMessage() for r in caplog.records if 'damaged checkpoint' in r.message]
  assert len(warnings) == 1 and '/checkpoints/30' in warnings[0], warnings
  assert any(part in warnings[0] for part in reason.split('|')), warnings[0]
  print(warnings[0])  # pytest -s: the reason, as the user sees it
  # Kept for inspection, out of the way of the next saves.
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '30'))
  assert not os.path.exists(_step_dir(workdir, 30))


def test_stray_empty_higher_step_dir_is_skipped(workdir, caplog):
  os.mkdir(_step_dir(workdir, 99999))
  with caplog.at_level(logging.WARNING):
    _, record, _ = _restore(workdir)
  assert record.step == 30
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '99999'))


def test_half_copied_higher_step_dir_is_skipped(workdir):
  # A copy of step 30 to step 40 that stopped half-way: some files are missing.
  shutil.copytree(_step_dir(workdir, 30), _step_dir(workdir, 40))
  for path in sorted(
    glob.glob(os.path.join(_step_dir(workdir, 40), 'state', '**', '*'), recursive=True)
  )[::2]:
    if os.path.isfile(path):
      os.remove(path)
  _, record, _ = _restore(workdir)
  assert record.step == 30
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '40'))


def test_nothing_intact_says_so_in_one_line(workdir):
  # Whole files: 64 flipped bytes once left step 10 restoring (under the load of a
  # parallel test session); this test is about the message, not about finding damage.
  for step in (10, 20, 30):
    _flip_bytes(_step_dir(workdir, step), count=None)
  with pytest.raises(checkpoint.CheckpointError) as info:
    _restore(workdir)
  message = str(info.value)
  assert '\n' not in message and 'No intact checkpoint' in message
  assert all(f'step {s} (' in message for s in (10, 20, 30))
  assert sorted(os.listdir(os.path.join(workdir, 'damaged_checkpoints'))) == [
    '10',
    '20',
    '30',
    'REASONS.txt',
  ]


def test_checksum_sees_a_single_changed_element_and_not_the_devices():
  state = _state(3)
  checksum, finite = checkpoint.state_checksum(state)
  assert finite
  changed = dict(state, bias=state['bias'].at[4].add(1e-6))
  assert checkpoint.state_checksum(changed)[0] != checksum
  swapped = dict(state, bias=state['bias'][::-1])
  assert checkpoint.state_checksum(swapped)[0] != checksum
  assert not checkpoint.state_checksum(dict(state, bias=state['bias'] * np.nan))[1]


def test_non_finite_state_is_never_saved(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path))
  bad = dict(_state(1), params=_state(1)['params'].at[0, 0].set(jnp.inf))
  with pytest.raises(checkpoint.CheckpointError, match='NaN or inf'):
    checkpoint.save(manager, bad, checkpoint.CheckpointRecord(1, 32, 0, 0, FINGERPRINT))
  manager.wait_until_finished()
  manager.close()
  assert not os.listdir(os.path.join(tmp_path, 'checkpoints'))


def test_running_metrics_are_saved_verified_and_restored(tmp_path):
  manager = checkpoint.create_manager(str(tmp_path))
  metrics = {'loss_total': jnp.float32(12.5), 'count': jnp.float32(40.0)}
  checkpoint.save(
    manager,
    _state(5),
    checkpoint.CheckpointRecord(5, 160, 0, 0, FINGERPRINT),
    metrics=metrics,
  )
  manager.wait_until_finished()
  empty = jax.tree.map(jnp.zeros_like, metrics)
  state, record, restored = checkpoint.restore_latest(
    manager, _state(0), FINGERPRINT, empty
  )
  manager.close()
  assert record.with_metrics
  jax.tree.map(np.testing.assert_array_equal, restored, metrics)
  jax.tree.map(np.testing.assert_array_equal, state, _state(5))


def test_a_restored_record_is_checked_against_the_clock():
  """setup.check_restored: the record's step, examples and data seed follow the config."""
  from configs import default
  from ibs import clock, schedules, setup

  config = default.get_config()
  schedule = schedules.from_config(config, config.mnist1d.num_train)
  step = clock.phase_spans(schedule)[1].first_step + 3  # inside the second phase
  where = clock.position(schedule, step)
  record = checkpoint.CheckpointRecord(
    step, where.examples_seen, where.phase, config.data_seed, FINGERPRINT
  )
  state = types.SimpleNamespace(step=jnp.int32(step))
  setup.check_restored(record, state, schedule, config)  # agrees: no error
  seen, seed = where.examples_seen, config.data_seed
  for changed, what in [
    (dict(examples_seen=seen + 32), rf'examples seen {seen + 32} \(expected {seen}\)'),
    (dict(data_seed=seed + 1), rf'data seed {seed + 1} \(expected {seed}\)'),
    (dict(step=step + 1), rf'step {step} \(expected {step + 1}\)'),
  ]:
    with pytest.raises(checkpoint.CheckpointError, match=what):
      setup.check_restored(
        dataclasses.replace(record, **changed), state, schedule, config
      )


def test_stray_intact_higher_step_is_moved_aside_and_saving_goes_on(workdir, caplog):
  """An intact checkpoint copied to a higher step: before, it was restored as the real
  one (or left there), and orbax then declined every later save while the run reported
  success. Its record names another step than its directory: moved aside."""
  shutil.copytree(_step_dir(workdir, 30), _step_dir(workdir, 99999))
  manager = checkpoint.create_manager(str(workdir))
  with caplog.at_level(logging.WARNING):
    _, record, _ = checkpoint.restore_latest(manager, _state(0), FINGERPRINT)
  assert record.step == 30
  assert 'its record is of step 30 (copied or renamed)' in caplog.text
  assert os.path.isdir(os.path.join(workdir, 'damaged_checkpoints', '99999'))
  checkpoint.save(
    manager, _state(31), checkpoint.CheckpointRecord(31, 31, 0, 0, 'f' * 16)
  )
  checkpoint.check_save_errors(manager, wait=True)  # confirmed on disk
  manager.close()
  assert os.path.isdir(_step_dir(workdir, 31))


def test_a_save_orbax_declines_stops_with_one_line(workdir):
  manager = checkpoint.create_manager(str(workdir))
  with pytest.raises(checkpoint.SaveError) as info:
    checkpoint.save(manager, _state(25), checkpoint.CheckpointRecord(25, 25, 0, 0, 'f'))
  manager.close()
  message = str(info.value)
  assert '\n' not in message
  assert 'step 25 was declined by orbax: its latest step is 30' in message, message
  assert f'last good checkpoint is step 30 in {workdir}' in message, message


def test_an_inconsistent_newest_record_falls_back(workdir):
  """The newest record edited (its examples seen no longer follow from its step): like
  any damage, the one before it is restored and the edited one moved aside."""
  path = os.path.join(_step_dir(workdir, 30), 'position', 'metadata')
  with open(path) as f:
    fields = json.load(f)
  fields['examples_seen'] += 7
  with open(path, 'w') as f:
    json.dump(fields, f)

  def validate(record, state):  # step · 32 examples, as the fixture saved them
    if record.examples_seen != record.step * 32:
      raise checkpoint.CheckpointError(f'examples seen {record.examples_seen}')

  manager = checkpoint.create_manager(str(workdir))
  _, record, _ = checkpoint.restore_latest(
    manager, _state(0), FINGERPRINT, validate=validate
  )
  manager.close()
  assert record.step == 20
  with open(os.path.join(workdir, 'damaged_checkpoints', 'REASONS.txt')) as f:
    assert 'inconsistent record: examples seen 967' in f.read()
