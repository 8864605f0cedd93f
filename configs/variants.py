"""The variants a config argument selects (`--config=FILE.py:ARGS`, ARGS `k=v,k=v`).

`parse` reads and checks the argument; `grid` writes the arguments of a study grid (a
config's `get_grids`); `set_schedule` and `set_optimizer` apply the paper's §5.1/§5.2
variants, which the CIFAR-10 study and its MNIST-1D miniature share,
so that a schedule or optimizer name means the same in both (only the capped increasing
batch is named per study: increasing_batch_5120, increasing_batch_capped).
"""

import difflib
import itertools

import ml_collections


def parse(arg: str, allowed: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """{key: value} from 'k=v,k=v', each key and value checked against `allowed`.

  Keys not given take the first allowed value (the default). A bare value stands for
  the one key that allows it: with data in ('cifar10', 'fake'), 'fake' is 'data=fake'.
  """
  chosen = {key: values[0] for key, values in allowed.items()}
  for item in filter(None, (part.strip() for part in arg.split(','))):
    key, sep, value = item.partition('=')
    if not sep:
      key, value = _key_of(item, allowed), item
    if key not in allowed:
      close = difflib.get_close_matches(key, allowed, n=1)
      hint = f' Did you mean {close[0]}={value}?' if close and sep else ''
      raise ValueError(
        f'Config argument {item!r} is not key=value with key in {sorted(allowed)}.{hint}'
      )
    if value not in allowed[key]:
      close = difflib.get_close_matches(value, allowed[key], n=1)
      hint = f' Did you mean {key}={close[0]}?' if close else ''
      raise ValueError(f'{key}={value!r}: choose one of {list(allowed[key])}.{hint}')
    chosen[key] = value
  return chosen


def grid(**axes: tuple[str, ...]) -> list[str]:
  """The 'k=v,k=v' argument of every combination of the axes, the last axis fastest.

  grid(optimizer=('sgd', 'adam'), schedule=('hybrid',)) is
  ['optimizer=sgd,schedule=hybrid', 'optimizer=adam,schedule=hybrid'].
  """
  return [
    ','.join(f'{key}={value}' for key, value in zip(axes, values, strict=True))
    for values in itertools.product(*axes.values())
  ]


def _key_of(value: str, allowed: dict[str, tuple[str, ...]]) -> str:
  """The one key whose allowed values include the bare `value`."""
  keys = [key for key, values in allowed.items() if value in values]
  if not keys:
    choices = '; '.join(f'{key}: {", ".join(values)}' for key, values in allowed.items())
    raise ValueError(
      f'Config argument {value!r} is not key=value or a value of ({choices}).'
    )
  if len(keys) > 1:
    raise ValueError(
      f'Config argument {value!r} is a value of {keys}; write key={value} to choose.'
    )
  return keys[0]


def set_schedule(
  s: ml_collections.ConfigDict,
  schedule: str,
  *,
  hybrid_max_batch_size: int,
  capped_max_batch_size: int,
) -> None:
  """Sets `s.kind` and the batch caps of a §5.1 or §5.2 schedule, in place.

  §5.1: decaying_lr (= §5.2's original), hybrid (the batch grows to
  `hybrid_max_batch_size`, then ε decays) and increasing_batch; for Adam also seesaw and
  sqrt_scaling (ibs.schedules; β1 kept, see below). Beyond the paper: adaptive
  (increasing_batch's ladder, climbed when the measured noise scale says so;
  ibs/adaptive.py) and constant (one phase at the initial ε, B and m: a control). Any
  other name is a
  §5.2 schedule, all capped at B_max = `capped_max_batch_size`: increasing batch, or
  the same with the initial B scaled up by a larger ε (increased_lr) and also by a
  larger momentum (increased_momentum). `s` must already hold the §5.1 ε, B and m.
  """
  if schedule in ('decaying_lr', 'original'):
    s.kind = 'decaying_lr'
  elif schedule == 'hybrid':
    s.kind, s.max_batch_size = 'hybrid', hybrid_max_batch_size
  elif schedule in (
    'increasing_batch',
    'seesaw',
    'adaptive',
    'measured_batch',
    'plateau',
  ):
    s.kind = schedule  # adaptive: increasing_batch's ladder, climbed by measurement
  elif schedule == 'constant':  # a control: neither ε nor B changes
    s.kind = 'explicit'
    s.phases = ((0.0, s.batch_size, s.learning_rate, s.momentum),)
  elif schedule == 'sqrt_scaling':
    # Malladi et al.'s rule sets 1 − β1 ← κ(1 − β1); over the three ×5 milestones κ = 125
    # and β1 = 0.9 would become negative, so β1 stays and only β2 and ε̂ follow the rule.
    s.kind, s.sqrt_scaling_b1 = 'sqrt_scaling', False
  else:  # §5.2
    s.kind, s.max_batch_size = 'hybrid', capped_max_batch_size
    if schedule == 'increased_lr':
      s.scale_batch_with_learning_rate = 5.0  # B ∝ ε: ε 0.5, B ×5
    elif schedule == 'increased_momentum':
      s.scale_batch_with_learning_rate = 5.0
      s.scale_batch_with_momentum = 0.98  # B ∝ 1/(1 − m): B ×5 again


def set_optimizer(
  config: ml_collections.ConfigDict, optimizer: str, adamw_weight_decay: float = 0.1
) -> None:
  """Sets `config.optimizer` and adapts the §5.1 ε of `config.schedule` to it, in place.

  sgd keeps the noise scale g = εN/(B(1 − m)) of momentum m by taking ε/(1 − m) and no
  momentum; adam takes its usual ε 1e-3; adamw is adam with decoupled weight decay
  λ = `adamw_weight_decay`; momentum and nesterov keep ε and m.
  """
  config.optimizer = 'adam' if optimizer == 'adamw' else optimizer
  s = config.schedule
  if optimizer == 'sgd':
    s.learning_rate, s.momentum = s.learning_rate / (1 - s.momentum), 0.0
  elif optimizer in ('adam', 'adamw'):
    s.learning_rate = 1e-3
  if optimizer == 'adamw':
    config.decoupled_weight_decay, config.weight_decay = True, adamw_weight_decay
