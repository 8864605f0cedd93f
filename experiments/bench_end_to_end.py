r"""The README's main job end to end: ibs, the lean loop, and ibs without the noise scale.

Three programs do the same work (configs/default.py: cnn1d on MNIST-1D, 32 → 160 → 800 →
4000, heavy-ball 0.9, the test split every 5 epochs), each as a fresh subprocess:

  lean        python -m experiments.lean_loop            (the speed floor; see there)
  ibs         python -m ibs.main --config=configs/default.py
  ibs_no_gns  the same with --config.gns.enabled=False
  ibs_host_data  ibs with --config.resident_data=off: the host pipeline, not the train
              split on the device (ibs/data/resident.py)

Every repetition runs all three in a shuffled order, so load from other processes falls
on all alike. Per run: training s, in all and per phase (ibs: the summary's per-phase
training time, which leaves out evaluation and checkpoints; lean: its epoch
dispatches), compilation s (ibs: the summary's `compile_s`, the ahead-of-time compile
of every phase's step; lean: its four epoch functions and the evaluation) and the
whole run, the subprocess's wall-clock from
start to exit (imports, data, compilation, training, evaluation, checkpoints), and its
CPU time (user + system: on a shared machine less sensitive to other load). The table
gives medians and, for ibs, the median over repetitions of the paired ratio
lean / ibs (≥ 1: ibs faster) and no_gns / ibs (the noise scale's end-to-end cost).
MNIST-1D must be generated first (any earlier run does it).

  ibs_baseline  ibs as another checkout of the repository has it (`--baseline_checkout`,
              e.g. a `git worktree` of an earlier commit): its own code, the same
              command, for the speed of a change end to end

  python -m experiments.bench_end_to_end                   # 3 repetitions
  python -m experiments.bench_end_to_end --repetitions=5 --variants=ibs,ibs_no_gns
  git worktree add /tmp/ibs_before HEAD~1
  python -m experiments.bench_end_to_end --variants=ibs,ibs_baseline \
    --baseline_checkout=/tmp/ibs_before
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
  'lean': ['-m', 'experiments.lean_loop'],
  'ibs': ['-m', 'ibs.main', '--config=configs/default.py'],
  'ibs_no_gns': [
    '-m',
    'ibs.main',
    '--config=configs/default.py',
    '--config.gns.enabled=False',
  ],
  'ibs_host_data': [
    '-m',
    'ibs.main',
    '--config=configs/default.py',
    '--config.resident_data=off',
  ],
}
COMMANDS['ibs_baseline'] = COMMANDS['ibs']  # run in another checkout (`cwd`)
FIELDS = ('train_s', 'compile_s', 'whole_s', 'cpu_s', 'test_accuracy')  # in the table


def run_once(
  name: str, scratch: str, extra: list[str], cwd: str | None = None
) -> dict[str, float]:
  """One run of variant `name` in a subprocess (in `cwd`, whose `ibs` it imports):
  its times and test accuracy."""
  out = os.path.join(scratch, f'{name}.json')
  workdir = os.path.join(scratch, f'{name}_workdir')
  args = [sys.executable, *COMMANDS[name], *extra]
  args += [f'--out={out}'] if name == 'lean' else [f'--workdir={workdir}']
  start, cpu = time.perf_counter(), _children_cpu_s()
  done = subprocess.run(args, capture_output=True, text=True, check=False, cwd=cwd)
  whole, cpu = time.perf_counter() - start, _children_cpu_s() - cpu
  if done.returncode:
    raise RuntimeError(f'{" ".join(args)} failed:\n{done.stderr[-3000:]}')
  if name == 'lean':
    with open(out) as f:
      result = json.load(f)
  else:
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    result = {
      'train_s': sum(row['train_s'] for row in summary['throughput']),
      'phase_train_s': [row['train_s'] for row in summary['throughput']],
      'compile_s': summary['compile_s'],
      'test_accuracy': summary['test_accuracy'],
    }
  return {
    **{k: result[k] for k in ('train_s', 'phase_train_s', 'compile_s', 'test_accuracy')},
    'whole_s': whole,
    'cpu_s': cpu,
  }


def _children_cpu_s() -> float:
  """User + system CPU seconds of the finished subprocesses so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def paired(runs: dict[str, list[dict]], base: str, name: str, field: str) -> float:
  """Median over repetitions of base/name for `field` (≥ 1: `name` is faster)."""
  return statistics.median(
    b[field] / r[field] for b, r in zip(runs[base], runs[name], strict=True)
  )


def table(runs: dict[str, list[dict]]) -> str:
  lines = [
    '| run | training s | compile s | whole run s | whole run CPU s | test acc |',
    '|---|---|---|---|---|---|',
  ]
  for name, results in runs.items():
    cells = []
    for field in FIELDS:
      values = [r[field] for r in results]
      fmt = '{:.4f}' if field == 'test_accuracy' else '{:.1f}'
      cells.append(
        f'{fmt.format(statistics.median(values))} '
        f'({" / ".join(fmt.format(v) for v in values)})'
      )
    lines.append(f'| {name} | {" | ".join(cells)} |')
  lines.append('')
  lines.append('training s per phase, median over repetitions:')
  for name, results in runs.items():
    per_phase = zip(*(r['phase_train_s'] for r in results), strict=True)
    medians = [statistics.median(p) for p in per_phase]
    lines.append(f'- {name}: {" / ".join(f"{t:.2f}" for t in medians)}')
  lines.append('')
  lines.append('paired ratios, median over repetitions (≥ 1: the second is faster):')
  pairs = [
    ('lean', 'ibs'),
    ('lean', 'ibs_no_gns'),
    ('ibs_no_gns', 'ibs'),
    ('ibs_host_data', 'ibs'),
    ('ibs_baseline', 'ibs'),
  ]
  for base, name in pairs:
    if base in runs and name in runs:
      ratios = ', '.join(
        f'{field} {paired(runs, base, name, field):.3f}'
        for field in ('train_s', 'compile_s', 'whole_s', 'cpu_s')
      )
      lines.append(f'- {base} / {name}: {ratios}')
  return '\n'.join(lines)


def main(argv=None) -> dict[str, list[dict]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repetitions', type=int, default=3)
  parser.add_argument(
    '--variants', default=','.join(n for n in COMMANDS if n != 'ibs_baseline')
  )
  parser.add_argument('--seed', type=int, default=0, help='of the shuffled order')
  parser.add_argument('--json', default='', help='write every run here')
  parser.add_argument(
    '--baseline_checkout',
    default='',
    help='another checkout of the repository, for the variant ibs_baseline',
  )
  args = parser.parse_args(argv)
  names = args.variants.split(',')
  unknown = sorted(set(names) - set(COMMANDS))
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {list(COMMANDS)}')
  baseline = os.path.abspath(args.baseline_checkout) if args.baseline_checkout else ''
  if ('ibs_baseline' in names) != bool(baseline):
    parser.error('the variant ibs_baseline and --baseline_checkout=DIR go together')
  if baseline and not os.path.isfile(os.path.join(baseline, 'ibs', 'main.py')):
    parser.error(f'--baseline_checkout={baseline} holds no ibs/main.py')
  rng = random.Random(args.seed)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  loads = [os.getloadavg()[0]]
  with tempfile.TemporaryDirectory(prefix='ibs_e2e_') as scratch:
    for repetition in range(args.repetitions):
      order = rng.sample(names, len(names))
      for name in order:
        cwd = baseline if name == 'ibs_baseline' else None
        result = run_once(name, os.path.join(scratch, str(repetition)), [], cwd)
        runs[name].append(result)
        loads.append(os.getloadavg()[0])
        print(f'repetition {repetition} {name}: {json.dumps(result)}', flush=True)
  print()
  print(table(runs))
  print(
    f'\nload average (1 min) sampled after each run: min {min(loads):.2f}, '
    f'median {statistics.median(loads):.2f}, max {max(loads):.2f}; '
    f'{os.cpu_count()} CPUs'
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'runs': runs, 'load_average': loads}, f, indent=1)
  return runs


if __name__ == '__main__':
  main()
