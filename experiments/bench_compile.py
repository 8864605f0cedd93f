r"""What the default run's train steps cost to compile, program by program.

For every phase batch of configs/default.py (32, 160, 800, 4000), with the noise scale
on and off: builds the run's step for that batch alone (`setup.build`, `Mode.BENCH`,
as training compiles it), and records XLA's backend compile time of each of its
programs (the `compile` spans of `jit(_updates)` that experiments/trace_startup.py reads
off jax.monitoring; one per batch shape, since the measuring update is a conditional
inside the step) and the number of instructions in its optimised HLO. Compilation is
the part of a run a user waits for before the first step and the part that later
phases' programs take from training's cores (docs/BENCHMARKS.md, "End to end").

  python -m experiments.bench_compile --repetitions=3
  python -m experiments.bench_compile --repetitions=1 --gns=on --batch_sizes=160

prints one row per (noise scale, batch): the medians over repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax

from experiments import trace_startup
from ibs.tools import hlo


def measure(batch_size: int, gns: bool) -> dict:
  """One build of `batch_size`'s step: per-program compile seconds, HLO size."""
  spans, _, run = trace_startup.timeline(gns, [batch_size])
  return {
    'compile_s': sorted(
      end - start
      for start, end, _, stage, program in spans
      if stage == 'compile' and program == 'jit(_updates)'
    ),
    'instructions': hlo.instruction_count(run.steps[batch_size].as_text()),
  }


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repetitions', type=int, default=3)
  parser.add_argument('--batch_sizes', default='32,160,800,4000')
  parser.add_argument('--gns', default='on,off', help='noise scale: on, off or both')
  args = parser.parse_args(argv)
  rows = []
  print(f'jax {jax.__version__}, {os.cpu_count()} CPUs')
  print('gns  batch  programs  compile s each (median)   total s  HLO instructions')
  for gns in (g == 'on' for g in args.gns.split(',')):
    for b in (int(x) for x in args.batch_sizes.split(',')):
      runs = [measure(b, gns) for _ in range(args.repetitions)]
      each = [
        statistics.median(r['compile_s'][i] for r in runs)
        for i in range(len(runs[0]['compile_s']))
      ]
      row = {
        'gns': gns,
        'batch_size': b,
        'compile_s': each,
        'total_s': statistics.median(sum(r['compile_s']) for r in runs),
        'instructions': runs[0]['instructions'],
      }
      rows.append(row)
      print(
        f'{"on" if gns else "off":>3}  {b:5d}  {len(each):8d}  '
        f'{" / ".join(f"{s:.2f}" for s in each):24s}  {row["total_s"]:7.2f}  '
        f'{row["instructions"]:16,d}',
        flush=True,
      )
  return rows


if __name__ == '__main__':
  main()
