"""Checkpoints that carry the position: train state + where training stands.

An orbax CheckpointManager stores, per saved step, the TrainState (params, optimizer state
with its injected hyperparameters and update count, BN statistics) and a small JSON record
(CheckpointRecord): examples seen, phase, data seed and a fingerprint of the config fields
that determine the trajectory (docs/DESIGN.md decision 8). Rerunning the same command on
the same workdir resumes exactly; rerunning a *different* config on that workdir is
refused rather than silently mixing two runs (and nothing in the workdir is deleted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from ibs import aot, sharding

# Config fields that decide the parameters' trajectory. Logging, evaluation and
# checkpoint cadence, the stop-after switch, steps per dispatch, the micro-batch cap
# (accumulation over ghost batches is exact), the eval batch, data_dir and the cache
# directory do not.
TRAJECTORY_FIELDS = (
  'dataset',
  'mnist1d',
  'fake',
  'image_size',
  'model',
  'model_kwargs',
  'ghost_batch_size',
  'half_precision',
  'optimizer',
  'weight_decay',
  'decoupled_weight_decay',
  'weight_decay_mask',
  'schedule',
  'seed',
  'data_seed',
)

# Config fields that do not decide the trajectory, so a changed value may resume: where
# and how often to log, evaluate and checkpoint; how the batch is split and dispatched
# (accumulation over ghost batches is exact); the measured noise scale (it only reads
# the gradients; on one device with one micro-batch its updates differ in float rounding);
# what to do on a non-finite update and how many skips to bear (nothing happens until
# one occurs); whether the train split lives on the devices (the same batches either
# way, ibs/data/resident.py).
# tests/test_fingerprint.py checks every config field is in one list or the other.
NON_TRAJECTORY_FIELDS = (
  'checkpoint_every_epochs',
  'compilation_cache_dir',
  'data_dir',
  'eval_batch_size',
  'eval_every_epochs',
  'gns',
  'log_every_epochs',
  'max_micro_batch_size',
  'nonfinite',
  'nonfinite_max_skipped',
  'resident_data',
  'resident_data_fraction',
  'steps_per_dispatch',
  'stop_after_steps',
)


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
  """What is saved beside a checkpoint's state: where it stands, and how to verify it.

  Not ibs.clock.ClockPosition, which is where the schedule says a step stands; a restored
  record is checked against that (ibs.setup.check_restored). Saved as the checkpoint item
  'position' (JSON), the name it has had since ibs began, so older workdirs resume.
  """

  step: int  # parameter updates done
  examples_seen: int
  phase: int
  data_seed: int
  config_fingerprint: str
  # state_checksum() of the saved state; '' in checkpoints written before it existed
  # (restored unverified).
  checksum: str = ''
  # Updates skipped as non-finite so far (config.nonfinite = 'skip').
  skipped_updates: int = 0
  # Whether the running train metrics (since the last log) were saved beside the state,
  # so that a resume between two logs logs what an uninterrupted run logs.
  with_metrics: bool = False
  # Wall-clock seconds of training up to this checkpoint, summed over resumes
  # (ibs/reporting.py).
  train_time_s: float = 0.0
  # An adaptive schedule's decisions so far (ibs/adaptive.py): each switch as
  # (examples seen when the new rung begins, rung), and the examples since which the
  # current rung has been ready to climb (-1: not ready). Empty for fixed schedules.
  switches: tuple[tuple[int, int], ...] = ()
  ready_since: int = -1
  # Any other schedule kind's decisions (ibs/segments.py, `RunSchedule.to_record`), as
  # JSON: what it decided, replayed on resume, never re-derived.
  decisions: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_json(cls, fields: dict[str, Any]) -> CheckpointRecord:
    """The record of saved JSON fields; fields this version does not know are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


# The checkpoint item that holds the CheckpointRecord.
_RECORD_ITEM = 'position'


class Restored(NamedTuple):
  state: Any
  record: CheckpointRecord
  metrics: Any  # the running train metrics, or None when not saved


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written, or no intact checkpoint to resume from.

  The message is one line, meant to be printed as it is.
  """


class SaveError(CheckpointError):
  """A save (or a metric write) the disk or the store did not take: a full disk, a
  failed background write, a save orbax declined. The run stops at once: training on
  without a checkpoint would lose everything after the last good one. Its one line is
  the last thing printed: the process exits without the interpreter's teardown, whose
  writers and checkpoint threads would fail again on the same disk, each with a
  traceback (ibs.reporting.one_line_errors)."""

  exit_at_once = True


class ConfigMismatchError(ValueError):
  """The workdir's checkpoint was written by a config with other trajectory fields."""


def config_fingerprint(config: Any) -> str:
  """A short hash of the trajectory-determining config fields the config has.

  A field the config lacks is left out rather than hashed as None, so adding a field to
  TRAJECTORY_FIELDS keeps the fingerprint (and the resumability) of configs without it.
  """
  fields = {k: config[k] for k in TRAJECTORY_FIELDS if k in config}
  if config.get('schedule', {}).get('kind') in ('adaptive', 'measured_batch', 'plateau'):
    # Its switches follow the measured noise scale: how it is averaged decides them.
    fields['gns'] = config.gns
  text = json.dumps(fields, sort_keys=True, default=_to_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_jsonable(value: Any) -> Any:
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  return repr(value)


# ----------------------------------------------------------------------- the checksum


def _bits(x: jax.Array) -> jax.Array:
  """The array's bits as a flat uint32 vector (one element per 1-, 2- or 4-byte item)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _leaf_sums(tree: Any) -> tuple[jax.Array, jax.Array]:
  """Per leaf, Σ bits_i · w_i mod 2³² with odd weights w_i; and whether all are finite.

  Any change to a single element changes its leaf's sum (an odd weight is invertible
  mod 2³²); moved elements change it too, the weights depending on the position.
  """
  sums, finite = [], jnp.array(True)
  for leaf in jax.tree.leaves(tree):
    bits = _bits(leaf)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    weights = (index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)) | jnp.uint32(1)
    sums.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(leaf))
  return jnp.stack(sums) if sums else jnp.zeros(0, jnp.uint32), finite


def state_checksum(state: Any, leaf_sums: Any = _leaf_sums) -> tuple[str, bool]:
  """(checksum, all floats finite) of a state, computed on its devices in one dispatch.

  The checksum does not depend on the devices or their number: integer sums are exact.
  `leaf_sums` is that dispatch's program: `checksum_program`'s for the loop.
  """
  sums, finite = (sharding.host_value(x) for x in leaf_sums(state))
  return hashlib.sha256(sums.tobytes()).hexdigest()[:16], bool(finite)


def checksum_program(tree: Any) -> aot.Precompiled:
  """`state_checksum`'s program for trees shaped and placed as `tree` (arrays or
  abstract values), compiling beside training from now on: the first checkpoint of a
  run then compiles nothing (ibs/aot.py)."""
  return aot.Precompiled(_leaf_sums, tree)


# ----------------------------------------------------------------------- saving


def create_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    checkpoints_dir(workdir),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
  )


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def save(
  manager: ocp.CheckpointManager,
  state: Any,
  record: CheckpointRecord,
  metrics: Any = None,
  leaf_sums: Any = _leaf_sums,
) -> CheckpointRecord:
  """Saves asynchronously, with the state's checksum; returns the record saved.

  `metrics`, the running train metrics, are saved beside the state and covered by the
  checksum too. `leaf_sums`: the checksum's program (`state_checksum`).

  Raises CheckpointError, writing nothing, when the state is not finite; SaveError when
  the previous save failed or orbax declines this one (it saves only steps above its
  latest). A save that fails in the background surfaces at the next
  `check_save_errors`; call `manager.wait_until_finished()` before exiting.
  """
  checksum, finite = state_checksum(
    state if metrics is None else (state, metrics), leaf_sums
  )
  if not finite:
    raise CheckpointError(
      f'Refusing to checkpoint step {record.step}: the state holds NaN or inf. '
      f'The last good checkpoint is {last_good(manager)}.'
    )
  record = dataclasses.replace(
    record, checksum=checksum, with_metrics=metrics is not None
  )
  items = {
    'state': ocp.args.StandardSave(state),
    _RECORD_ITEM: ocp.args.JsonSave(dataclasses.asdict(record)),
  }
  if metrics is not None:
    items['train_metrics'] = ocp.args.StandardSave(metrics)
  check_save_errors(manager, wait=True)  # the previous save, confirmed, or named
  try:
    saved = manager.save(record.step, args=ocp.args.Composite(**items))
  except Exception as e:  # any failure is reported the same way
    raise save_error(manager, record.step, e) from None
  if not saved:  # orbax saves only steps above its latest
    raise SaveError(
      f'Saving the checkpoint of step {record.step} was declined by orbax: its latest '
      f'step is {manager.latest_step()}, at or above it (a step directory that does not '
      f'belong to this run?). The last good checkpoint is '
      f'{last_good(manager, exclude=record.step)}.'
    )
  _unconfirmed[manager] = record.step
  return record


def last_good(manager: ocp.CheckpointManager, exclude: int | None = None) -> str:
  """The newest checkpoint on disk other than `exclude`, in words."""
  directory = str(manager.directory)
  steps = [
    s
    for s in manager.all_steps()
    if s != exclude and os.path.isdir(os.path.join(directory, str(s)))
  ]
  if not steps:
    return 'none (a rerun starts from scratch)'
  return f'step {max(steps)} in {directory}'


def _cause(error: BaseException) -> str:
  """The innermost cause of an error, on one line."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) < 300 else text[:297] + '...'


def save_error(
  manager: ocp.CheckpointManager, step: int, error: BaseException
) -> SaveError:
  return SaveError(
    f'Saving the checkpoint of step {step} failed: {_cause(error)}. '
    f'The last good checkpoint is {last_good(manager, exclude=step)}.'
  )


# The step of each manager's last save, until confirmed on disk.
_unconfirmed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_save_errors(manager: ocp.CheckpointManager, wait: bool = False) -> None:
  """Raises SaveError at once if the manager's last save failed; confirms it once done.

  Called after every dispatch, and by `save` before the next save (with `wait`). While
  the save runs in the background, asks orbax for an error; once it has finished,
  confirms it: the finalize thread ended without an error (orbax's own error check may
  already have turned it into a log line) and the step is on disk. The manager is
  closed before raising (its threads would otherwise report the error again, with
  tracebacks, at interpreter exit).
  """
  step = _unconfirmed.get(manager)
  if step is None:
    return
  try:
    manager.check_for_errors()
    if not wait and manager.is_saving_in_progress():
      return
    manager.wait_until_finished()  # finished: re-raises its failure, if any
    if step not in manager.all_steps() or not (manager.directory / str(step)).exists():
      raise OSError('the save ended without an error but the step is not on disk')
  except Exception as e:
    error = save_error(manager, step, e)
    with contextlib.suppress(Exception):
      manager.close()
    raise error from None
  del _unconfirmed[manager]


def close(manager: ocp.CheckpointManager, saved_step: int | None) -> None:
  """Waits for the last save, `saved_step` (its failure in one line, SaveError), and
  closes `manager`: a session's end."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # a failed background save, in one line
    raise save_error(manager, saved_step, e) from None
  manager.close()


@contextlib.contextmanager
def metric_writes_confirmed(
  writer: Any, manager: ocp.CheckpointManager
) -> Iterator[None]:
  """clu's `ensure_flushes` for the run's metric writer, with its failure in one line.

  The TensorBoard writer writes in a background thread and raises the failure of an
  earlier write (a full disk: ENOSPC) at a later call, as clu's AsyncError: that
  becomes a SaveError naming the workdir, the cause and the last good checkpoint. After
  any other error the writer is left unflushed: on a full disk its pending writes would
  only fail again, each with a traceback after the run's one line.
  """
  from clu import asynclib  # noqa: PLC0415

  try:
    yield
  except asynclib.AsyncError as e:
    raise _write_error(manager, e) from None
  try:
    writer.flush()
  except Exception as e:
    raise _write_error(manager, e) from None


def _write_error(manager: ocp.CheckpointManager, error: BaseException) -> SaveError:
  workdir = os.path.dirname(str(manager.directory))
  return SaveError(
    f'Writing the metrics to {workdir} failed: {_cause(error)}. The last good '
    f'checkpoint is {last_good(manager)}.'
  )


# ----------------------------------------------------------------------- restoring


def open_read_only(workdir: str) -> ocp.CheckpointManager:
  """A workdir's checkpoints opened read-only: orbax creates, deletes and writes nothing
  (the probe's branches read a run that may still be training)."""
  return ocp.CheckpointManager(
    checkpoints_dir(workdir),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )


def read_record(manager: ocp.CheckpointManager, step: int) -> CheckpointRecord:
  """The record saved beside the checkpoint of `step` (raises if it cannot be read)."""
  fields = manager.restore(
    step, args=ocp.args.Composite(**{_RECORD_ITEM: ocp.args.JsonRestore()})
  )[_RECORD_ITEM]
  return CheckpointRecord.from_json(fields)


def check_fingerprint(manager, step: int, record: CheckpointRecord, fingerprint: str):
  """Raises ConfigMismatchError, touching nothing, when another config wrote `record`."""
  if record.config_fingerprint != fingerprint:
    raise ConfigMismatchError(
      f'The checkpoint at step {step} in {manager.directory} was written by a '
      f'different config (fingerprint {record.config_fingerprint}, this config '
      f'{fingerprint}); a changed dataset, model, optimizer, schedule or seed cannot '
      'resume it. Use a new --workdir, or restore the original config. The '
      'checkpoint was left untouched.'
    )


def read_records(
  manager: ocp.CheckpointManager, fingerprint: str
) -> dict[int, CheckpointRecord]:
  """{step: record} of every checkpoint whose record reads; one being written or
  damaged is left out. Raises ConfigMismatchError if another config wrote one."""
  records = {}
  for step in sorted(manager.all_steps()):
    try:
      record = read_record(manager, step)
    except Exception:  # a checkpoint being written or damaged: skip it
      continue
    check_fingerprint(manager, step, record, fingerprint)
    records[step] = record
  return records


class Damaged(CheckpointError):
  """One checkpoint that cannot be read, or whose state does not match its checksum."""


def restore_verified(
  manager: ocp.CheckpointManager,
  step: int,
  record: CheckpointRecord,
  abstract_state: Any,
  abstract_metrics: Any = None,
) -> Restored:
  """The state (and running metrics, when saved and `abstract_metrics` is given) saved at
  `step`, verified against the checksum in `record`. Raises Damaged saying why.

  The one reader of a checkpoint's state: resume (`restore_latest`) and the probe's
  branches (ibs/tools/branch.py) both restore through it.
  """
  items = {'state': ocp.args.StandardRestore(abstract_state)}
  if record.with_metrics:  # the checksum covers the running metrics too
    items['train_metrics'] = ocp.args.StandardRestore(abstract_metrics)
  missing = _missing_manifest(manager, step, items)
  if missing:  # orbax's failed read would leave tensorstore reads behind, each
    # printing an 'Event loop is closed' traceback as it completes
    raise Damaged(f'state unreadable: {missing} is missing')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise Damaged(f'state unreadable: {_cause(e)}') from e
  state, metrics = restored['state'], restored.get('train_metrics')
  if record.checksum:
    checksum, _ = state_checksum(state if metrics is None else (state, metrics))
    if checksum != record.checksum:
      raise Damaged(f'checksum mismatch (recorded {record.checksum}, read {checksum})')
  else:
    logging.warning(
      'The checkpoint of step %d records no checksum (written before ibs stored '
      'one); restored unverified.',
      step,
    )
  return Restored(state, record, metrics if abstract_metrics is not None else None)


def restore_latest(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  fingerprint: str,
  abstract_metrics: Any = None,
  validate: Callable[[CheckpointRecord, Any], None] | None = None,
) -> Restored | None:
  """The newest intact (state, record, metrics), or None for a fresh workdir.

  `metrics` are restored (like `abstract_metrics`) when the checkpoint holds them and
  `abstract_metrics` is given, else None.

  Checkpoints are tried newest first. One that cannot be read, is incomplete, whose
  state does not match its recorded checksum, whose record names another step than its
  directory (a checkpoint copied or renamed: left there, it would make orbax decline
  every later save), or that `validate(record, state)` rejects with a CheckpointError
  (a record that does not follow from the schedule) is skipped with a warning naming it
  and why, and moved to `damaged_checkpoints/` beside `checkpoints/` (never deleted).
  Raises CheckpointError when checkpoints exist but none is intact, and
  ConfigMismatchError (a ValueError), touching nothing, when the newest readable one was
  written by a config whose trajectory fields differ.
  """
  damaged: list[tuple[int, str]] = []
  result = None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      record = read_record(manager, step)
    except Exception as e:  # a damaged record is any failure to read it
      damaged.append((step, f'position record unreadable: {_cause(e)}'))
      continue
    if record.step != step:
      damaged.append((step, f'its record is of step {record.step} (copied or renamed)'))
      continue
    check_fingerprint(manager, step, record, fingerprint)
    try:
      result = restore_verified(manager, step, record, abstract_state, abstract_metrics)
    except Damaged as e:
      damaged.append((step, str(e)))
      continue
    if validate is not None:
      try:
        validate(result.record, result.state)
      except CheckpointError as e:
        damaged.append((step, f'inconsistent record: {e}'))
        result = None
        continue
    break
  if damaged:
    _quarantine(manager, damaged)
  if result is None and damaged:
    raise CheckpointError(
      f'No intact checkpoint left in {manager.directory}: '
      + '; '.join(f'step {s} ({why})' for s, why in damaged)
      + f'. They were moved to {_damaged_root(manager)}; a rerun starts from scratch.'
    )
  return result


def _missing_manifest(manager: ocp.CheckpointManager, step: int, items) -> str:
  """The first OCDBT manifest of an item written in that format that is not there."""
  for name in items:
    item = os.path.join(str(manager.directory), str(step), name)
    written = os.path.isdir(item) and any(
      entry.startswith('ocdbt.process_') for entry in os.listdir(item)
    )
    if written and not os.path.exists(os.path.join(item, 'manifest.ocdbt')):
      return f'{name}/manifest.ocdbt'
  return ''


def _damaged_root(manager: ocp.CheckpointManager) -> str:
  return os.path.join(os.path.dirname(str(manager.directory)), 'damaged_checkpoints')


def _quarantine(manager: ocp.CheckpointManager, damaged: list[tuple[int, str]]) -> None:
  """Moves damaged step directories out of the manager's sight, never deleting them."""
  root = _damaged_root(manager)
  sync = ocp.multihost.sync_global_processes
  sync('ibs_checkpoint_quarantine_start')  # Every process has finished reading.
  for step, why in damaged:
    source = os.path.join(str(manager.directory), str(step))
    target = os.path.join(root, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(root, f'{step}.{suffix}')
      suffix += 1
    logging.warning(
      'Skipping the damaged checkpoint %s: %s. Moved to %s for inspection.',
      source,
      why,
      target,
    )
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(root, exist_ok=True)
      os.replace(source, target)
      with open(os.path.join(root, 'REASONS.txt'), 'a') as f:
        f.write(f'{os.path.basename(target)}: {why}\n')
  sync('ibs_checkpoint_quarantine_end')
  manager.reload()
