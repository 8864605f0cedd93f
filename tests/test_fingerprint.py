"""Every field of every config and study variant is in the fingerprint or explicitly not.

The fingerprint (ibs/durability/checkpoint.py) decides whether a workdir's checkpoint may
be resumed by a config; a field missing from it lets a changed trajectory resume silently,
as `image_size` once did. A new config field must be placed in one list or the other.
"""

import importlib
import pathlib

import pytest

from ibs.durability import checkpoint

CONFIGS = sorted(
  p.stem
  for p in (pathlib.Path(__file__).resolve().parents[1] / 'configs').glob('*.py')
  if p.stem not in ('__init__', 'variants')
)


def _arguments(module) -> list[str]:
  """The config's default, every argument of its study grids, its fake-data variant."""
  arguments = {''}
  for grid in getattr(module, 'get_grids', dict)().values():
    arguments.update(grid)
  try:
    module.get_config('data=fake')
    arguments.add('data=fake')
  except (TypeError, ValueError):  # no arguments, or no data=fake variant
    pass
  return sorted(arguments)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_field_is_classified_for_the_fingerprint(name):
  module = importlib.import_module(f'configs.{name}')
  for arg in _arguments(module):
    config = module.get_config(arg) if arg else module.get_config()
    _check_classified(config, f'configs/{name}.py:{arg}')


def _check_classified(config, where: str) -> None:
  trajectory = set(checkpoint.TRAJECTORY_FIELDS)
  other = set(checkpoint.NON_TRAJECTORY_FIELDS)
  assert not trajectory & other, trajectory & other
  unclassified = set(config.keys()) - trajectory - other
  assert not unclassified, (
    f'{where} has fields {sorted(unclassified)} in neither '
    'checkpoint.TRAJECTORY_FIELDS nor checkpoint.NON_TRAJECTORY_FIELDS'
  )


def test_changing_a_trajectory_field_changes_the_fingerprint():
  from configs import default

  base = default.get_config()
  for field, value in (
    ('seed', 1),
    ('ghost_batch_size', 16),
    ('optimizer', 'nesterov'),
  ):
    changed = base.copy_and_resolve_references()
    changed[field] = value
    assert checkpoint.config_fingerprint(changed) != checkpoint.config_fingerprint(base)
  changed = base.copy_and_resolve_references()
  changed.schedule.learning_rate = 0.2
  assert checkpoint.config_fingerprint(changed) != checkpoint.config_fingerprint(base)
  changed = base.copy_and_resolve_references()
  changed.eval_every_epochs = 1.0  # not a trajectory field
  assert checkpoint.config_fingerprint(changed) == checkpoint.config_fingerprint(base)
