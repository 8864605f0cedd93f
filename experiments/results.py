r"""Tables of a finished grid from its workdirs' summary.json files (Markdown).

For every (config argument) it gives final test accuracy mean ± std over seeds, parameter
updates and wall-clock; then the paper's claim, per optimizer: does each other schedule
reach decaying LR's test accuracy within noise — a difference within 2 standard errors
or at most 0.5 points — and with how many times fewer parameter updates? With
`--detail`, a third table: accuracy ± its standard error, the final training loss (the
last logged, from TensorBoard) and, for schedules decided by measurement, when each
decision fell (epoch: batch, ε) in every seed.

  python -m experiments.results --experiment=mnist1d_5_1 --root=workdirs
"""

import json
import math
import os
import statistics

from absl import app, flags

from experiments import reproduce

# --experiment, --root and --seeds are reproduce.py's.


def load_runs(experiment: str, root: str, seeds: list[int]) -> dict[str, list[dict]]:
  """{argument: [summary per finished seed]}."""
  runs = {}
  for path, arg in reproduce.EXPERIMENTS[experiment]:
    summaries = []
    for seed in seeds:
      file = os.path.join(reproduce.run_workdir(root, path, arg, seed), 'summary.json')
      if os.path.exists(file):
        with open(file) as f:
          summaries.append(json.load(f))
    runs[arg] = summaries
  return runs


def mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def claim_holds(ours: list[float], baseline: list[float]) -> tuple[float, float, bool]:
  """(difference in points, its standard error, within noise?) of mean test accuracy."""
  difference = 100 * (statistics.mean(ours) - statistics.mean(baseline))
  if len(ours) < 2 or len(baseline) < 2:
    return difference, math.nan, abs(difference) <= 0.5
  se = 100 * math.sqrt(
    statistics.variance(ours) / len(ours) + statistics.variance(baseline) / len(baseline)
  )
  return difference, se, abs(difference) <= max(2 * se, 0.5)


def table(runs: dict[str, list[dict]]) -> str:
  lines = [
    '| run | seeds | test accuracy (%) | parameter updates | wall-clock (s) |',
    '|---|---|---|---|---|',
  ]
  for arg, summaries in runs.items():
    if not summaries:
      lines.append(f'| {arg or "default"} | 0 | – | – | – |')
      continue
    acc, sd = mean_std([100 * s['test_accuracy'] for s in summaries])
    wall = statistics.mean(s['wall_clock_s'] for s in summaries)
    lines.append(
      f'| {arg or "default"} | {len(summaries)} | {acc:.2f} ± {sd:.2f} | '
      f'{format_updates(summaries)} | {wall:.0f} |'
    )
  return '\n'.join(lines)


def format_updates(summaries: list[dict]) -> str:
  """The parameter updates: one number when the schedule fixes them, else the mean and
  the range over seeds (an adaptive schedule decides them per run)."""
  updates = [s['parameter_updates'] for s in summaries]
  if len(set(updates)) == 1:
    return f'{updates[0]:,}'
  return f'{statistics.mean(updates):,.0f} ({min(updates):,}–{max(updates):,})'


def claim_table(runs: dict[str, list[dict]]) -> str:
  """Each run against the decaying-LR run of its group (`reproduce.group_and_label`)."""
  lines = [
    '| run | vs decaying LR (points) | 2 × SE | within noise | update ratio |',
    '|---|---|---|---|---|',
  ]
  groups = {arg: reproduce.group_and_label(arg) for arg in runs}
  baselines = {
    group: runs[arg] for arg, (group, label) in groups.items() if label == 'decaying_lr'
  }
  for arg, summaries in runs.items():
    group, label = groups[arg]
    baseline = baselines.get(group)
    if label == 'decaying_lr' or not summaries or not baseline:
      continue
    diff, se, ok = claim_holds(
      [s['test_accuracy'] for s in summaries], [s['test_accuracy'] for s in baseline]
    )
    ratio = statistics.mean(s['parameter_updates'] for s in baseline) / statistics.mean(
      s['parameter_updates'] for s in summaries
    )
    lines.append(
      f'| {arg or "default"} | {diff:+.2f} | {2 * se:.2f} | {"yes" if ok else "no"} '
      f'| {ratio:.2f}× |'
    )
  return '\n'.join(lines)


def final_train_loss(workdir: str) -> float:
  """The last logged training cross-entropy of a run (TensorBoard's train_loss)."""
  from ibs.tools import curves

  _, values = curves.against(curves.read_scalars(workdir), 'train_loss', 'epoch')
  return float(values[-1]) if len(values) else math.nan


def format_decisions(summary: dict) -> str:
  """'epoch: B, ε' of every switch a run decided ('–' for a fixed schedule)."""
  switches = summary.get('switches')
  if not switches:
    return '–' if switches is None else 'none'
  return '; '.join(
    f'{s["epoch"]:.1f}: {s["batch_size"]}, {s["learning_rate"]:.3g}' for s in switches
  )


def detail_table(experiment: str, root: str, seeds: list[int]) -> str:
  """Accuracy ± SE, updates, final train loss; then each run's decisions per seed."""
  lines = [
    '| run | seeds | test accuracy (%) ± SE | parameter updates | final train loss |',
    '|---|---|---|---|---|',
  ]
  decisions = []
  for path, arg in reproduce.EXPERIMENTS[experiment]:
    found = []
    for seed in seeds:
      workdir = reproduce.run_workdir(root, path, arg, seed)
      file = os.path.join(workdir, 'summary.json')
      if os.path.exists(file):
        with open(file) as f:
          found.append((seed, workdir, json.load(f)))
    if not found:
      lines.append(f'| {arg} | 0 | – | – | – |')
      continue
    summaries = [s for _, _, s in found]
    acc, sd = mean_std([100 * s['test_accuracy'] for s in summaries])
    se = sd / math.sqrt(len(summaries))
    loss = statistics.mean(final_train_loss(w) for _, w, _ in found)
    lines.append(
      f'| {arg} | {len(found)} | {acc:.2f} ± {se:.2f} | {format_updates(summaries)} | '
      f'{loss:.4f} |'
    )
    if summaries[0].get('switches') is not None:
      decisions += [
        f'- {arg}, seed {seed}: {format_decisions(s)}' for seed, _, s in found
      ]
  return '\n'.join(lines + ([''] if decisions else []) + decisions)


def main(argv):
  del argv
  values = flags.FLAGS
  seeds = [int(s) for s in values.seeds]
  runs = load_runs(values.experiment, values.root, seeds)
  print(f'### {values.experiment}\n')
  print(table(runs))
  print()
  print(claim_table(runs))
  if values.detail:
    print()
    print(detail_table(values.experiment, values.root, seeds))


if __name__ == '__main__':
  reproduce.define_flags()
  flags.DEFINE_bool('detail', False, 'Also: ± SE, final train loss, decisions per seed.')
  flags.mark_flags_as_required(['experiment'])
  app.run(main)
