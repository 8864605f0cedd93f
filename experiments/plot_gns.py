r"""docs/figures/gns_default.png: the measured noise scale over the default recipe.

Two runs of configs/default.py, the paper's increasing batch and the decaying-LR recipe
it converts (the same ε, m, milestones, budget). Top: the measured B_simple of each
(ibs/gns.py) against examples seen, with the increasing-batch run's B. Bottom: the
paper's g = εN/(B(1 − m)) of each, the quantity its schedules hold equal.

  python -m ibs.main --config=configs/default.py --workdir=/tmp/gns_runs/increasing
  python -m ibs.main --config=configs/default.py --workdir=/tmp/gns_runs/decaying \
      --config.schedule.kind=decaying_lr
  python experiments/plot_gns.py --increasing=/tmp/gns_runs/increasing \
      --decaying=/tmp/gns_runs/decaying --out=docs/figures/gns_default.png
"""

import json

import numpy as np
from absl import app, flags

from ibs.tools import curves

_INCREASING = flags.DEFINE_string('increasing', None, 'Workdir of the default run.')
_DECAYING = flags.DEFINE_string('decaying', None, 'Workdir of the decaying-LR run.')
_OUT = flags.DEFINE_string('out', 'docs/figures/gns_default.png', 'Figure to write.')


def phase_means(scalars, b_simple_tag='gns/b_simple') -> list[dict]:
  """Median measured B_simple over the second half of each phase, beside the phase's B.

  The median, because late in training the |G|² estimate can fall to ≤ 0 (the true
  gradient is small against the noise) and B_simple is then unbounded (logged as inf).
  """
  epochs, b_simple = curves.against(scalars, b_simple_tag, 'epoch')
  _, batch = curves.against(scalars, 'batch_size', 'epoch')
  _, g = curves.against(scalars, 'g_sgd', 'epoch')
  _, lr = curves.against(scalars, 'learning_rate', 'epoch')
  rows = []
  changes = np.flatnonzero(np.diff(lr * 1e9 + batch)) + 1  # a phase: constant ε and B
  for segment in np.split(np.arange(len(epochs)), changes):
    late = segment[len(segment) // 2 :]
    rows.append(
      {
        'log_epochs': f'{epochs[segment[0]]:.0f}–{epochs[segment[-1]]:.0f}',
        'batch_size': int(batch[segment[0]]),
        'learning_rate': float(lr[segment[0]]),
        'g': float(g[segment[0]]),
        'b_simple_median_late_half': float(np.median(b_simple[late])),
        'unbounded_logs': int(np.sum(~np.isfinite(b_simple[segment]))),
        'logs': len(segment),
      }
    )
  return rows


def main(argv):
  del argv
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  runs = {
    'increasing batch': curves.read_scalars(_INCREASING.value),
    'decaying LR': curves.read_scalars(_DECAYING.value),
  }
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 5.0), sharex=True)
  colors = {'increasing batch': 'C0', 'decaying LR': 'C1'}
  for name, scalars in runs.items():
    x, y = curves.against(scalars, 'gns/b_simple', 'examples_seen')
    top.plot(x, y, color=colors[name], lw=1.2, label=f'measured B_simple, {name}')
    x, g = curves.against(scalars, 'g_sgd', 'examples_seen')
    bottom.step(x, g, where='pre', color=colors[name], lw=1.2, label=f"paper's g, {name}")
  x, b = curves.against(runs['increasing batch'], 'batch_size', 'examples_seen')
  top.step(x, b, where='pre', color='k', lw=1.0, ls='--', label='B, increasing batch')
  for ax in (top, bottom):
    ax.set_yscale('log')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7, loc='best')
  top.set_ylabel('examples')
  bottom.set_ylabel('g = εN/(B(1 − m))')
  bottom.set_xlabel('examples seen')
  top.set_title(
    'MNIST-1D, configs/default.py: measured noise scale vs schedule', fontsize=9
  )
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=150)
  for name, scalars in runs.items():
    print(json.dumps({'run': name, 'phases': phase_means(scalars)}))


if __name__ == '__main__':
  app.run(main)
