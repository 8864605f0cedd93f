r"""Runs a named experiment's whole grid (seeds × schedules × optimizers), run by run.

The grids are the configs' own (`get_grids()` in configs/mnist1d_study.py,
cifar10_wrn.py, imagenet_irv2.py, resnet50_tpu.py), gathered into EXPERIMENTS.

Each run gets its own workdir, ROOT/<config>/<argument>/seed_<k>; a run whose workdir
holds summary.json is finished and skipped, and an interrupted one resumes from its
checkpoint, so rerunning the command completes a grid. Runs share a persistent
compilation cache under ROOT.

  python -m experiments.reproduce --experiment=mnist1d_5_1 --root=workdirs
  python -m experiments.reproduce --experiment=cifar10_5_1 --print_commands \
      --root=gs://BUCKET/ibs          # the per-run commands for a TPU VM instead
  python -m experiments.results --experiment=mnist1d_5_1 --root=workdirs  # tables
  python -m experiments.plots --experiment=mnist1d_5_1 --root=workdirs    # figures
  python -m ibs.tools.compare workdirs/mnist1d_study/*/seed_0  # any workdirs, side by
                                                               # side
"""

import importlib
import importlib.util
import os
import pkgutil
import time

from absl import app, flags, logging

import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gather_experiments() -> dict[str, list[tuple[str, str]]]:
  """{experiment: [(config file, argument), ...]} from every config's `get_grids()`.

  A study's grid lives beside its config (big_vision's `get_hyper` habit), so a config
  and its variants change in one file; here they are only collected. An experiment name
  defined by two configs is an error.
  """
  experiments: dict[str, list[tuple[str, str]]] = {}
  for module_info in sorted(pkgutil.iter_modules(configs.__path__), key=lambda m: m.name):
    module = importlib.import_module(f'configs.{module_info.name}')
    if not hasattr(module, 'get_grids'):
      continue
    path = f'configs/{module_info.name}.py'
    for name, args in module.get_grids().items():
      if name in experiments:
        raise ValueError(f'Experiment {name!r} is defined twice (again in {path}).')
      experiments[name] = [(path, arg) for arg in args]
  return experiments


EXPERIMENTS = gather_experiments()


def define_flags() -> None:
  """--experiment, --root and --seeds; shared with results.py and plots.py.

  Defined only when one of them runs as a script, so that importing the package
  (notebooks, tests, ibs.tools.compare users) defines no absl flags.
  """
  flags.DEFINE_enum('experiment', None, sorted(EXPERIMENTS), 'Which grid.')
  flags.DEFINE_string('root', 'workdirs', "Parent of every run's workdir.")
  flags.DEFINE_list(
    'seeds',
    ['0', '1', '2'],
    "Seeds, each a run's initialisation and data order (results and plots: where found).",
  )


def group_and_label(arg: str) -> tuple[str, str]:
  """(group, schedule label) of a grid argument, e.g. ('sgd', 'hybrid').

  Runs of one optimizer and one problem size are compared (results.py) and drawn
  (plots.py) together: the group is the optimizer ('all' without `optimizer=`), with
  `,size=…` when the argument names one. The label is the rest of the argument with
  `schedule=` dropped, or 'default' for the config's own schedule.
  """
  parts = [p for p in arg.split(',') if p]
  optimizer = next(
    (p.split('=', 1)[1] for p in parts if p.startswith('optimizer=')), 'all'
  )
  size = [p for p in parts if p.startswith('size=')]
  label = ','.join(
    p.removeprefix('schedule=')
    for p in parts
    if not p.startswith(('optimizer=', 'size='))
  )
  return ','.join([optimizer, *size]), label or 'default'


def load_config(path: str, arg: str):
  """`get_config(arg)` of a config file, as `--config=path:arg` would load it."""
  spec = importlib.util.spec_from_file_location(
    'ibs_run_config', os.path.join(REPO, path)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def run_workdir(root: str, path: str, arg: str, seed: int) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(root, stem, arg.replace(',', '__') or 'default', f'seed_{seed}')


def main(argv):
  del argv
  experiment, root = flags.FLAGS.experiment, flags.FLAGS.root
  runs = [
    (path, arg, int(seed))
    for seed in flags.FLAGS.seeds
    for path, arg in EXPERIMENTS[experiment]
  ]
  if flags.FLAGS.print_commands:
    for path, arg, seed in runs:
      config_arg = f'{path}:{arg}' if arg else path
      print(
        f'python -m ibs.main --config={config_arg} --config.seed={seed} '
        f'--config.data_seed={seed} --workdir={run_workdir(root, path, arg, seed)}'
      )
    return

  from ibs import train  # Deferred: printing commands needs no JAX.

  start = time.perf_counter()
  for i, (path, arg, seed) in enumerate(runs):
    workdir = run_workdir(root, path, arg, seed)
    if os.path.exists(os.path.join(workdir, 'summary.json')):
      print(f'[{i + 1}/{len(runs)}] {workdir}: finished, skipped', flush=True)
      continue
    config = load_config(path, arg)
    config.seed = config.data_seed = seed
    config.compilation_cache_dir = os.path.join(root, '.jax_cache')
    summary = train.train_and_evaluate(config, workdir)
    print(
      f'[{i + 1}/{len(runs)}] {workdir}: test accuracy {summary["test_accuracy"]:.4f}, '
      f'{summary["parameter_updates"]} updates, {summary["wall_clock_s"]:.0f} s',
      flush=True,
    )
  print(f'{experiment}: {time.perf_counter() - start:.0f} s in all', flush=True)


if __name__ == '__main__':
  define_flags()
  flags.DEFINE_bool('print_commands', False, 'Print per-run commands; run nothing.')
  flags.mark_flags_as_required(['experiment'])
  logging.set_verbosity(logging.WARNING)
  app.run(main)
