"""Checkpoints that carry the position: train state + where training stands.

An orbax CheckpointManager stores, per saved step, the TrainState (params, optimizer state
with its injected hyperparameters and update count, BN statistics) and a small JSON record:
examples seen, phase, data seed and a fingerprint of the config fields that determine
the trajectory (DESIGN.md decision 8). Rerunning the same command with the same workdir
resumes exactly; rerunning a *different* config on that workdir is refused rather than
silently mixing two runs (and nothing in the workdir is deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import orbax.checkpoint as ocp

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


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a checkpoint stands in training."""

  step: int  # parameter updates done
  examples_seen: int
  phase: int
  data_seed: int
  config_fingerprint: str
  # Wall-clock seconds of training up to this checkpoint, summed over resumes (ibs.reporting).
  # Defaulted so that checkpoints written before the field existed still restore.
  train_time_s: float = 0.0


class ConfigMismatchError(ValueError):
  """The workdir's checkpoint was written by a config with other trajectory fields."""


def config_fingerprint(config: Any) -> str:
  """A short hash of the trajectory-determining config fields the config has.

  A field the config lacks is left out rather than hashed as None, so adding a field to
  TRAJECTORY_FIELDS keeps the fingerprint (and the resumability) of configs without it.
  """
  fields = {k: config[k] for k in TRAJECTORY_FIELDS if k in config}
  text = json.dumps(fields, sort_keys=True, default=_to_jsonable)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _to_jsonable(value: Any) -> Any:
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  return repr(value)


def create_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
  )


def save(manager: ocp.CheckpointManager, state: Any, position: Position) -> None:
  """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
  manager.save(
    position.step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      position=ocp.args.JsonSave(dataclasses.asdict(position)),
    ),
  )


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any, fingerprint: str
) -> tuple[Any, Position] | None:
  """The latest (state, position), or None for a fresh workdir.

  Raises ConfigMismatchError (a ValueError), without touching the checkpoint, when it was written by a config
  whose trajectory fields differ.
  """
  step = manager.latest_step()
  if step is None:
    return None
  position = Position(
    **manager.restore(step, args=ocp.args.Composite(position=ocp.args.JsonRestore()))[
      'position'
    ]
  )
  if position.config_fingerprint != fingerprint:
    raise ConfigMismatchError(
      f'The checkpoint at step {step} in {manager.directory} was written by a different '
      f'config (fingerprint {position.config_fingerprint}, this config {fingerprint}); '
      'a changed dataset, model, optimizer, schedule or seed cannot resume it. Use a new '
      '--workdir, or restore the original config. The checkpoint was left untouched.'
    )
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  )
  return restored['state'], position
