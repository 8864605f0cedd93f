r"""Figures of a grid from its workdirs' TensorBoard event files (the paper's Figs. 1–5).

For every optimizer of the experiment one figure of learning curves, one line per
schedule (mean over the seeds found, shaded from the lowest to the highest seed):
training cross-entropy and test accuracy, each against epochs and against parameter
updates; and one figure of the schedules that ran, ε, B and g against epochs, read from
the same logs. Per epoch the schedules should overlap; per update, increasing the batch
should get there in far fewer steps.

  python -m experiments.plots --experiment=mnist1d_5_1 --root=workdirs --out=docs/figures

`read_scalars(workdir)` (ibs.tools.curves) is the one reader of ibs's logs; the notebooks
and `python -m ibs.tools.compare` use it too, and `save_paper_figure` is the one way both
save a figure (panels lettered, one y-range per metric, updates on a log axis).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import reproduce

# The curves themselves (reading event files, drawing) live in ibs.tools.curves,
# re-exported here for the notebooks and scripts that use them as plots.*.
from ibs.tools.curves import (  # noqa: F401
  LEARNING_CURVES,
  LOG_SCALE,
  NAMES,
  PIECEWISE_CONSTANT,
  SCHEDULES,
  Scalars,
  against,
  plot_runs,
  read_scalars,
  save_paper_figure,
  seed_band,
)


def experiment_groups(experiment: str) -> dict[str, dict[str, tuple[str, str]]]:
  """{optimizer: {schedule label: (config path, argument)}} of a reproduce experiment.

  Groups and labels as `reproduce.group_and_label` gives them.
  """
  groups: dict[str, dict[str, tuple[str, str]]] = {}
  for path, arg in reproduce.EXPERIMENTS[experiment]:
    optimizer, label = reproduce.group_and_label(arg)
    groups.setdefault(optimizer, {})[label] = (path, arg)
  return groups


def load_group(
  runs: dict[str, tuple[str, str]], root: str, seeds: list[int]
) -> dict[str, list[Scalars]]:
  """{label: [scalars of each seed whose workdir has event files]}; empty labels dropped.

  `root` may be a bucket (gs://...), as reproduce.py --print_commands writes there.
  """
  from etils import epath

  loaded = {}
  for label, (path, arg) in runs.items():
    seed_scalars = []
    for seed in seeds:
      workdir = epath.Path(reproduce.run_workdir(root, path, arg, seed))
      if workdir.is_dir() and any(workdir.glob('events.out.tfevents.*')):
        seed_scalars.append(read_scalars(str(workdir)))
    if seed_scalars:
      loaded[label] = seed_scalars
  return loaded


def plot_experiment(experiment: str, root: str, seeds: list[int], out: str) -> list[str]:
  """Writes every figure of `experiment` into `out`; returns the files written.

  Per optimizer: <experiment>_<optimizer>.png (learning curves) and
  <experiment>_<optimizer>_schedules.png (ε, B, g). Optimizers with no runs are skipped.
  """
  os.makedirs(out, exist_ok=True)
  written = []
  for optimizer, runs in experiment_groups(experiment).items():
    loaded = load_group(runs, root, seeds)
    if not loaded:
      print(f'{experiment} {optimizer}: no event files under {root}, skipped')
      continue
    name = experiment if optimizer == 'all' else f'{experiment}_{optimizer}'
    title = experiment if optimizer == 'all' else f'{experiment}: {optimizer}'
    for suffix, panels in (('', LEARNING_CURVES), ('_schedules', SCHEDULES)):
      path = os.path.join(out, f'{name}{suffix}.png')
      save_paper_figure(loaded, path, panels, title, column=False)
      written.append(path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  seeds = [int(s) for s in values.seeds]
  for path in plot_experiment(values.experiment, values.root, seeds, values.out):
    print(f'wrote {path}')


if __name__ == '__main__':
  reproduce.define_flags()
  flags.DEFINE_string('out', 'docs/figures', 'Directory for the PNG files.')
  flags.mark_flags_as_required(['experiment'])
  app.run(main)
