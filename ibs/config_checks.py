"""Config validation: a config that cannot work fails here, before data or compilation.

Every message names the field and says how to fix it (docs/DESIGN.md decision 10).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ibs import adaptive, measured, models, optim, schedules, sharding
from ibs.data import catalog, resident
from ibs.durability import divergence


class ConfigError(ValueError):
  """A config that cannot be trained."""


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class Checked(NamedTuple):
  """What a valid config resolves to; a run resolves it once and passes it on."""

  spec: catalog.DatasetSpec  # sizes and shapes of config.dataset
  schedule: schedules.Schedule  # built for spec.num_train_examples


def check_config(
  config: Any, num_devices: int, process_count: int = 1, workdir: str | None = None
) -> Checked:
  """Validates `config` for this many devices and processes; returns spec and Schedule.

  The dataset spec is resolved here, once per run: the schedule, the model and the input
  pipeline all read this one (ibs/train.py passes it on). Given `workdir`, also checks
  that it can be created and written (last: a config that fails another check leaves
  the file system untouched).
  """
  if config.dataset not in catalog.DATASETS:
    raise ConfigError(str(catalog.unknown_dataset(config.dataset)))
  if config.model not in models.model_names():
    raise ConfigError(
      f'Unknown config.model={config.model!r}. Choose one of {models.model_names()}.'
    )
  if config.optimizer not in optim.OPTIMIZERS:
    raise ConfigError(
      f'Unknown config.optimizer={config.optimizer!r}. Choose one of '
      f'{list(optim.OPTIMIZERS)}.'
    )
  if config.weight_decay < 0:
    raise ConfigError(
      f'config.weight_decay={config.weight_decay} must be >= 0 (0 for none).'
    )
  if config.weight_decay_mask not in ('all', 'kernels'):
    raise ConfigError(
      f"config.weight_decay_mask={config.weight_decay_mask!r} must be 'all' (decay every "
      "parameter) or 'kernels' (no decay on batch-norm parameters and biases)."
    )
  for field in ('eval_every_epochs', 'checkpoint_every_epochs', 'log_every_epochs'):
    value = config[field]
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
      raise ConfigError(f'config.{field}={value} must be positive (in epochs).')
  for field in ('seed', 'data_seed'):
    if not (_is_int(config[field]) and 0 <= config[field] < 2**32):
      raise ConfigError(
        f'config.{field}={config[field]!r} must be an integer in [0, 2**32).'
      )
  if not (_is_int(config.eval_batch_size) and config.eval_batch_size > 0):
    raise ConfigError(
      f'config.eval_batch_size={config.eval_batch_size!r} must be a positive integer '
      f'(a multiple of the {num_devices} devices).'
    )
  if not (_is_int(config.stop_after_steps) and config.stop_after_steps >= 0):
    raise ConfigError(
      f'config.stop_after_steps={config.stop_after_steps!r} must be an integer >= 0 '
      '(0: train to the end).'
    )
  if not (_is_int(config.max_micro_batch_size) and config.max_micro_batch_size > 0):
    raise ConfigError(
      f'config.max_micro_batch_size={config.max_micro_batch_size!r} must be a positive '
      'integer.'
    )
  for name, value in config.model_kwargs.items():
    if _is_int(value) and value < 1:
      raise ConfigError(f'config.model_kwargs.{name}={value} must be a positive integer.')
  if not (isinstance(config.steps_per_dispatch, int) and config.steps_per_dispatch >= 1):
    raise ConfigError(
      f'config.steps_per_dispatch={config.steps_per_dispatch!r} must be an integer >= 1 '
      '(1: one update per call of the compiled step).'
    )
  _check_step_options(config)
  if not (_is_int(config.ghost_batch_size) and config.ghost_batch_size > 0):
    raise ConfigError(
      f'config.ghost_batch_size={config.ghost_batch_size} must be positive.'
    )

  check_optimizer_rules(config)
  spec = catalog.dataset_spec(config)
  try:
    if config.schedule.kind == 'adaptive':
      adaptive.check_config(config)
    if config.schedule.kind in measured.KINDS:
      measured.check_config(config, spec.num_train_examples)
    schedule = schedules.from_config(config, spec.num_train_examples)
  except schedules.ScheduleError as e:
    raise ConfigError(str(e)) from None

  if config.optimizer == 'sgd' and any(p.momentum for p in schedule.phases):
    raise ConfigError(
      "config.optimizer='sgd' is plain SGD without momentum, but the schedule's momentum "
      'is not 0. Set config.schedule.momentum=0 (for an explicit schedule, 0 in every '
      "phase; no scale_batch_with_momentum) or use optimizer 'momentum'."
    )
  if num_devices % process_count:
    raise ConfigError(
      f'{num_devices} devices do not split over {process_count} processes; every '
      'process must drive the same number of devices.'
    )
  for phase in schedule.phases:
    try:
      sharding.plan_micro_batches(
        phase.batch_size,
        num_devices,
        config.ghost_batch_size,
        config.max_micro_batch_size,
      )
    except ValueError as e:
      raise ConfigError(f'Phase starting at epoch {phase.start_epoch:g}: {e}') from None
  if config.schedule.kind in measured.KINDS:  # every batch it may choose
    rule = measured.from_config(config, spec.num_train_examples)
    for batch in rule.batch_sizes(rule.initial()):
      try:
        sharding.plan_micro_batches(
          batch, num_devices, config.ghost_batch_size, config.max_micro_batch_size
        )
      except ValueError as e:
        raise ConfigError(
          f'config.schedule.kind={config.schedule.kind!r} may choose batch {batch}: {e}'
        ) from None
  if config.eval_batch_size % num_devices:
    raise ConfigError(
      f'config.eval_batch_size={config.eval_batch_size} is not divisible by the '
      f'{num_devices} devices; use a multiple of {num_devices}.'
    )
  _check_model(config, spec)
  _check_resident_data(config, spec)
  if workdir is not None:
    check_workdir(workdir)
  return Checked(spec, schedule)


def _check_step_options(config: Any) -> None:
  """The measured noise scale and the non-finite policy (ibs/step.py)."""
  if not isinstance(config.gns.enabled, bool):
    raise ConfigError(f'config.gns.enabled={config.gns.enabled!r} must be True or False.')
  horizon = config.gns.horizon_examples
  if isinstance(horizon, bool) or not isinstance(horizon, int | float) or not horizon > 0:
    raise ConfigError(
      f'config.gns.horizon_examples={horizon!r} must be a positive number of examples '
      '(the horizon of the noise-scale moving averages; one epoch is a good start).'
    )
  every = config.gns.split_every
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ConfigError(
      f'config.gns.split_every={every!r} must be an integer >= 1 (on one device with one '
      'micro-batch of a single ghost batch, measure the noise scale on every '
      'this-many-th update).'
    )
  if config.nonfinite not in divergence.POLICIES:
    raise ConfigError(
      f"config.nonfinite={config.nonfinite!r} must be 'stop' (end the run at a NaN or "
      "inf loss or gradient) or 'skip' (leave the parameters as they were, count it)."
    )
  fraction = config.nonfinite_max_skipped
  if (
    isinstance(fraction, bool)
    or not isinstance(fraction, int | float)
    or not 0.0 <= fraction <= 1.0
  ):
    raise ConfigError(
      f'config.nonfinite_max_skipped={fraction!r} must be a fraction in [0, 1] (with '
      "nonfinite='skip', the run stops when more of the updates between two events "
      'were skipped).'
    )


def _check_resident_data(config: Any, spec: catalog.DatasetSpec) -> None:
  """config.resident_data and its fraction; 'on' where the split cannot be resident
  (ibs/data/resident.py)."""
  mode = config.get('resident_data', 'auto')
  if mode not in resident.MODES:
    raise ConfigError(
      f'config.resident_data={mode!r} must be one of {list(resident.MODES)} (auto: the '
      'train split on the devices where it fits, else the host pipeline).'
    )
  fraction = config.get('resident_data_fraction', 0.25)
  if (
    isinstance(fraction, bool)
    or not isinstance(fraction, int | float)
    or not 0.0 < fraction <= 1.0
  ):
    raise ConfigError(
      f'config.resident_data_fraction={fraction!r} must be a fraction in (0, 1] (of one '
      "device's memory that resident_data='auto' may fill with the train split)."
    )
  try:
    resident.choose(config, spec)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_optimizer_rules(config: Any) -> None:
  """Refuses the optimizer-aware schedule rules where their theory does not apply.

  sqrt_scaling and seesaw keep Adam's ε/√B falling as the decay does (ibs.schedules);
  with SGD, heavy-ball or Nesterov momentum the quantity to keep is ε/B (the paper's
  conversion), and Seesaw would lower it by α^1.5 per milestone instead of α.
  scale_weight_decay keeps τ = B/(ε·λ·N) of *decoupled* decay; L2 decay goes through the
  momentum or Adam's normalisation, and has no such timescale.
  """
  s = config.schedule
  if s.kind in schedules.ADAM_KINDS and config.optimizer != 'adam':
    raise ConfigError(
      f'config.schedule.kind={s.kind!r} converts the recipe for Adam, whose noise falls '
      f'with ε/√B; with config.optimizer={config.optimizer!r} the noise scale is '
      "g = εN/(B(1 − m)) and the paper's conversion keeps it: use "
      "kind='increasing_batch' (or 'hybrid'), or optimizer 'adam'."
    )
  for field in ('adam_b2', 'adam_eps', 'sqrt_scaling_b1'):
    if s.get(field) is not None and s.kind != 'sqrt_scaling':
      raise ConfigError(
        f"config.schedule.{field} is read only by kind='sqrt_scaling', not "
        f'{s.kind!r}; remove it.'
      )
  if s.get('scale_weight_decay'):
    if not config.decoupled_weight_decay:
      raise ConfigError(
        'config.schedule.scale_weight_decay keeps the timescale τ = B/(ε·λ·N) of '
        'decoupled weight decay, but config.decoupled_weight_decay is False (L2 decay). '
        'Set config.decoupled_weight_decay=True (AdamW, SGDW) or drop '
        'scale_weight_decay.'
      )
    if not config.weight_decay > 0:
      raise ConfigError(
        'config.schedule.scale_weight_decay scales λ from config.weight_decay, which is '
        f'{config.weight_decay}; set it > 0 or drop scale_weight_decay.'
      )


def _check_model(config: Any, spec: catalog.DatasetSpec) -> None:
  """Builds the model's parameter shapes abstractly (tracing, no compilation)."""
  try:
    model = models.create_model(
      config.model,
      num_classes=spec.num_classes,
      ghost_batch_size=config.ghost_batch_size,
      half_precision=config.half_precision,
      **config.model_kwargs,
    )
    dummy = jax.ShapeDtypeStruct(
      (config.ghost_batch_size, *spec.input_shape), jnp.float32
    )
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
  except Exception as e:  # any failure here is the config's
    detail = ' '.join(f'{type(e).__name__}: {e}'.split())[:300]
    raise ConfigError(
      f'config.model={config.model!r} cannot be built with config.model_kwargs='
      f'{config.model_kwargs.to_dict()} ({detail}).'
    ) from None


def check_workdir(workdir: str) -> None:
  """The workdir is named, and can be created and written."""
  if not workdir or not str(workdir).strip():
    raise ConfigError(
      '--workdir is empty; name a directory for the checkpoints and TensorBoard logs.'
    )
  path = os.path.abspath(os.path.expanduser(str(workdir)))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.ibs_write_check_'):
      pass
  except OSError as e:
    raise ConfigError(
      f'--workdir={workdir} cannot be created or written: {e.strerror or e} '
      f'({e.filename or path}).'
    ) from None
