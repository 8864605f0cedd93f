"""Every experiment config builds, validates, and counts the paper's parameter updates.

References: the paper's statements (§5.1–5.3, docs/PAPER.md) and, for §5.1, the updates
written out by hand as Σ epochs · N / B over the phases. No data is read: the schedule
needs only the dataset's size.
"""

import importlib
import re

import pytest

from configs import default, mnist1d_study, resnet50_tpu, variants
from experiments import reproduce
from ibs import clock, config_checks, schedules
from ibs.data import catalog
from ibs.durability import checkpoint

CIFAR_N = 50_000


def _updates(module: str, arg: str = '') -> float:
  config = importlib.import_module(f'configs.{module}').get_config(arg)
  num_train = catalog.dataset_spec(config).num_train_examples
  return sum(clock.nominal_updates(schedules.from_config(config, num_train)))


@pytest.mark.parametrize(
  ('arg', 'phases'),
  [
    # (epochs, B) per phase: ε decays ×5 at 60/120/160 of 200 epochs, or B grows ×5.
    ('schedule=decaying_lr', [(200, 128)]),
    ('schedule=increasing_batch', [(60, 128), (60, 640), (40, 3200), (40, 16000)]),
    # Hybrid: B grows once to its cap 640, then ε decays.
    ('schedule=hybrid', [(60, 128), (140, 640)]),
  ],
)
def test_cifar10_section_5_1_updates_by_hand(arg, phases):
  by_hand = sum(epochs * CIFAR_N / batch for epochs, batch in phases)
  assert _updates('cifar10_wrn', arg) == pytest.approx(by_hand)


@pytest.mark.parametrize(
  ('module', 'arg', 'low', 'high'),
  [
    ('cifar10_wrn', 'schedule=decaying_lr', 75_000, 85_000),  # "≈80k"
    ('cifar10_wrn', 'schedule=increasing_batch', 28_000, 30_000),  # "≈29k"
    ('cifar10_wrn', 'schedule=increased_lr', 0, 6_500),  # "under 6,500"
    ('cifar10_wrn', 'schedule=increased_momentum', 0, 2_500),  # "under 2,500"
    ('imagenet_irv2', 'schedule=decaying_lr', 14_000, 14_500),  # "just over 14,000"
    ('imagenet_irv2', '', 0, 6_000),  # "under 6,000"
    ('imagenet_irv2', 'momentum=0.975', 0, 2_500),  # "under 2,500"
  ],
)
def test_update_counts_match_the_paper(module, arg, low, high):
  assert low < _updates(module, arg) < high


@pytest.mark.parametrize(
  ('module', 'arg', 'devices'),
  [
    ('default', '', 1),
    ('mnist1d_study', 'schedule=increased_momentum', 1),
    ('cifar10_wrn', 'schedule=increasing_batch', 1),
    ('cifar10_wrn', 'data=fake', 1),
    ('imagenet_irv2', '', 256),
    ('imagenet_irv2', 'data=fake', 1),
    ('resnet50_tpu', '', 32),
    ('resnet50_tpu', 'fake', 1),
  ],
)
def test_configs_pass_their_checks(module, arg, devices):
  """Each config is valid on the hardware its docstring names (a TPU pod, or one CPU)."""
  module = importlib.import_module(f'configs.{module}')
  config = module.get_config(arg) if arg else module.get_config()
  config_checks.check_config(config, num_devices=devices, process_count=1)


@pytest.mark.parametrize(
  ('bare', 'spelled_out'),
  [
    ('decaying_lr', 'schedule=decaying_lr'),
    ('fake', 'data=fake'),
    ('fake,decaying_lr', 'data=fake,schedule=decaying_lr'),
    ('', 'schedule=increasing_batch,data=imagenet2012'),
  ],
)
def test_resnet50_tpu_bare_variants_name_their_key(bare, spelled_out):
  assert resnet50_tpu.get_config(bare) == resnet50_tpu.get_config(spelled_out)


def test_resnet50_tpu_variants_are_the_recipe_and_its_baseline():
  assert resnet50_tpu.get_config('').schedule.kind == 'hybrid'
  assert resnet50_tpu.get_config('decaying_lr').schedule.kind == 'decaying_lr'
  fake = resnet50_tpu.get_config('schedule=decaying_lr,data=fake')
  assert (fake.dataset, fake.schedule.kind) == ('fake', 'decaying_lr')
  config_checks.check_config(fake, num_devices=1, process_count=1)


@pytest.mark.parametrize(
  ('arg', 'message'),
  [
    ('bogus', 'is not key=value or a value of'),
    ('schedule=bogus', "choose one of ['a', 'b']"),
    ('b', 'is a value of'),
    ('colour=a', 'is not key=value with key in'),
  ],
)
def test_variants_parse_rejects_what_it_cannot_place(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    variants.parse(arg, {'schedule': ('a', 'b'), 'other': ('b', 'c')})


def test_study_grids_are_gathered_from_their_configs():
  """Each config's get_grids() is an experiment of experiments/reproduce.py, by name."""
  assert {
    name: sorted({path for path, _ in runs})
    for name, runs in reproduce.EXPERIMENTS.items()
  } == {
    'mnist1d_5_1': ['configs/mnist1d_study.py'],
    'mnist1d_5_2': ['configs/mnist1d_study.py'],
    'mnist1d_adam': ['configs/mnist1d_study.py'],
    'mnist1d_adaptive': ['configs/mnist1d_study.py'],
    'mnist1d_measured': ['configs/mnist1d_study.py'],
    'mnist1d_measured_20k': ['configs/mnist1d_study.py'],
    'cifar10_5_1': ['configs/cifar10_wrn.py'],
    'cifar10_5_2': ['configs/cifar10_wrn.py'],
    'imagenet_5_3': ['configs/imagenet_irv2.py'],
    'resnet50_5_4': ['configs/resnet50_tpu.py'],
  }
  # §5.1: 4 optimizers × 3 schedules, no run twice.
  args = [arg for _, arg in reproduce.EXPERIMENTS['cifar10_5_1']]
  assert len(args) == len(set(args)) == 12


@pytest.mark.parametrize('experiment', sorted(reproduce.EXPERIMENTS))
def test_every_grid_argument_is_one_its_config_accepts(experiment):
  for path, arg in reproduce.EXPERIMENTS[experiment]:
    reproduce.load_config(path, arg)  # variants.parse refuses what it cannot place


def test_the_study_at_20k_examples_is_the_default_run():
  """`size=20k` is configs/default.py's problem: the same trajectory (fingerprint) for
  the fixed schedule, and the measured kinds differ from it only by their kind and
  their measurement on every update (gns.split_every, in their fingerprint)."""
  config = mnist1d_study.get_config('size=20k,schedule=increasing_batch')
  fingerprint = checkpoint.config_fingerprint
  assert fingerprint(config) == fingerprint(default.get_config())
  for kind in ('measured_batch', 'plateau'):
    study = mnist1d_study.get_config(f'size=20k,schedule={kind}')
    assert study.gns.split_every == 1
    expected = default.get_config()
    expected.schedule.kind, expected.gns.split_every = kind, 1
    assert fingerprint(study) == fingerprint(expected)
    config_checks.check_config(study, num_devices=1, process_count=1)


def test_runs_of_one_size_are_compared_with_each_other():
  assert reproduce.group_and_label('size=20k,schedule=plateau') == (
    'all,size=20k',
    'plateau',
  )
  assert reproduce.group_and_label('schedule=plateau') == ('all', 'plateau')
  assert reproduce.group_and_label('optimizer=sgd,schedule=hybrid') == ('sgd', 'hybrid')


def test_grid_is_every_combination_last_axis_fastest():
  assert variants.grid(optimizer=('sgd', 'adam'), schedule=('a', 'b')) == [
    'optimizer=sgd,schedule=a',
    'optimizer=sgd,schedule=b',
    'optimizer=adam,schedule=a',
    'optimizer=adam,schedule=b',
  ]
