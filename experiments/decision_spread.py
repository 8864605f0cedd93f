r"""The spread of each kind's decision input across seeds at the same points of training.

What a rule decides on is the noise scale at its decision points: `decide/b_simple` for
the kinds of ibs/measured/ (the window mean of ibs/measured/window.py, measured on every
update), `adaptive/b_simple` for the adaptive kind (the step's moving average alone,
measured on every 100th update), and for reference `gns/b_simple` of the decaying-LR
runs (the same moving average, logged each epoch). For each, at each epoch asked, the
value at the last point at or before it in every seed, and their spread: the median,
the range, and the coefficient of variation (sample std / mean). Seeds differ in their
parameters as well as in their measurement noise, so this is an upper bound on the
spread of the measurement at one point of training.

  python -m experiments.decision_spread --root=workdirs --seeds=0,1,2,3,4 \
      --epochs=5,10,20,29,45,70
"""

import math
import os
import statistics

import numpy as np
from absl import app, flags

from experiments import reproduce
from ibs.tools import curves

_CONFIG = 'configs/mnist1d_study.py'
INPUTS = (
  ('measured_batch', 'decide/b_simple'),
  ('plateau', 'decide/b_simple'),
  ('adaptive', 'adaptive/b_simple'),
  ('decaying_lr', 'gns/b_simple'),
)


def value_at(scalars, tag: str, epoch: float) -> float:
  x, y = curves.against(scalars, tag, 'epoch')
  before = np.nonzero(x <= epoch + 1e-9)[0]
  return float(y[before[-1]]) if len(before) else math.nan


def main(argv):
  del argv
  values = flags.FLAGS
  epochs = [float(e) for e in values.epochs]
  print('| problem | kind (input) | epoch | median | range | CV |')
  print('|---|---|---|---|---|---|')
  for prefix, problem in (('', '10k'), ('size=20k,', '20k')):
    for kind, tag in INPUTS:
      workdirs = [
        reproduce.run_workdir(values.root, _CONFIG, f'{prefix}schedule={kind}', s)
        for s in (int(s) for s in values.seeds)
      ]
      runs = [
        curves.read_scalars(w)
        for w in workdirs
        if os.path.exists(os.path.join(w, 'summary.json'))  # finished runs only
      ]
      runs = [r for r in runs if tag in r]
      for epoch in epochs:
        found = [v for v in (value_at(r, tag, epoch) for r in runs) if math.isfinite(v)]
        if len(found) < 2:
          continue
        cv = statistics.stdev(found) / statistics.mean(found)
        print(
          f'| {problem} | {kind} ({tag}) | {epoch:g} | {statistics.median(found):,.0f} '
          f'| {min(found):,.0f}–{max(found):,.0f} | {cv:.2f} ({len(found)} seeds) |'
        )


if __name__ == '__main__':
  reproduce.define_flags()
  flags.DEFINE_list(
    'epochs', ['5', '10', '20', '29', '45', '70'], 'Epochs to compare at.'
  )
  app.run(main)
