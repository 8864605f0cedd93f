"""The schedule calculator: a config's phases, g and updates, before anything trains.

    python -m ibs.calculator --config=configs/default.py
    python -m ibs.calculator --config=configs/resnet50_tpu.py --baseline \
        --plot=/tmp/fig1.png

It prints one row per phase and the totals (ibs/noise_scale.py's table); `--baseline`
compares with the decaying-LR version of the same recipe (before any scaling rule), and
`--plot` draws ε, B and g against epochs (the paper's Figure 1). A config it prints,
training accepts: it runs training's own checks (ibs/config_checks.py) for one device.
It never imports TensorFlow.
"""

from __future__ import annotations

from typing import Any

from ibs import noise_scale, reporting, schedules


def report(config: Any, baseline: bool = False, plot: str | None = None) -> str:
  """The calculator's output for `config`: table, optional baseline, optional plot."""
  from ibs import config_checks  # JAX: only once the config has loaded

  # Training's own checks, for the smallest machine (one device): what the calculator
  # prints, training accepts (a phase batch that ghost batches do not divide, a rule
  # for another optimizer, a model that cannot be built are refused here too).
  spec, schedule = config_checks.check_config(config, num_devices=1)
  n = spec.num_train_examples
  optimizer = config.get('optimizer')
  title = f'{config.schedule.kind} schedule on {config.dataset}'
  if optimizer:
    decoupled = optimizer == 'adam' and config.get('decoupled_weight_decay')
    title += f' ({"adamw" if decoupled else optimizer})'
  if config.schedule.kind == 'adaptive':
    title += (
      ": its ladder, at the recipe's milestones; the run decides when to climb "
      '(ibs/adaptive.py)'
    )
  if config.schedule.kind in ('measured_batch', 'plateau'):
    title += ': before any decision; the run decides its phases (ibs/measured/)'
  parts = [noise_scale.format_table(schedule, title=title, optimizer=optimizer)]
  reference = None
  if baseline:
    reference = noise_scale.baseline_schedule(config, n)
    parts += [
      noise_scale.format_table(
        reference, title='baseline: decaying learning rate', optimizer=optimizer
      )
    ]
    parts += [noise_scale.format_comparison(schedule, reference)]
  if plot:
    noise_scale.plot_schedule(schedule, plot, reference, title=title)
    parts += [f'wrote {plot}']
  return '\n\n'.join(parts)


def main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  config = values.config
  config.keys()  # a config file that failed to load says so here, before JAX's imports
  print(report(config, baseline=values.baseline, plot=values.plot))


def _is_user_error(e: BaseException) -> bool:
  from ibs import config_checks

  return isinstance(e, config_checks.ConfigError | schedules.ScheduleError)


def _define_flags() -> None:
  """Flags only when run as a program: ibs.main defines its own --config."""
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_bool(
    'baseline', False, 'Also print the decaying-LR version of the recipe.'
  )
  flags.DEFINE_string('plot', None, 'Write ε, B and g against epochs to this PNG.')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  _define_flags()
  reporting.run_command(main, _is_user_error)
