r"""docs/figures/adaptive_mnist1d.png: the adaptive schedule's batch, with B_simple.

One panel per seed of the mnist1d_adaptive grid (experiments/reproduce.py): the adaptive
run's batch B and its measured noise scale B_simple against epochs, the B at which the
rule calls the rung ready (threshold × B), and the fixed increasing-batch schedule's B
(the recipe's milestones 30/60/80) for comparison. Prints each adaptive run's switches.

  python -m experiments.reproduce --experiment=mnist1d_adaptive --root=workdirs
  python -m experiments.plot_adaptive --root=workdirs \
    --out=docs/figures/adaptive_mnist1d.png
"""

import json
import os

from absl import app, flags

from experiments import reproduce
from ibs.tools import curves

_CONFIG = 'configs/mnist1d_study.py'


def main(argv):
  del argv
  root, out = flags.FLAGS.root, flags.FLAGS.out
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  seeds = [int(s) for s in flags.FLAGS.seeds]
  fig, axes = plt.subplots(
    1, len(seeds), figsize=(3.2 * len(seeds), 3.0), sharey=True, squeeze=False
  )
  for ax, seed in zip(axes[0], seeds, strict=True):
    adaptive = reproduce.run_workdir(root, _CONFIG, 'schedule=adaptive', seed)
    fixed = reproduce.run_workdir(root, _CONFIG, 'schedule=increasing_batch', seed)
    scalars = curves.read_scalars(adaptive)
    x, b_simple = curves.against(scalars, 'gns/b_simple', 'epoch')
    ax.plot(x, b_simple, color='C0', lw=1.0, label='measured B_simple')
    x, batch = curves.against(scalars, 'batch_size', 'epoch')
    ax.step(x, batch, where='pre', color='k', lw=1.4, label='B, adaptive')
    x, ready = curves.against(scalars, 'adaptive/ready_at', 'epoch')
    ax.step(x, ready, where='post', color='C3', lw=0.8, ls=':', label='threshold × B')
    x, batch = curves.against(curves.read_scalars(fixed), 'batch_size', 'epoch')
    ax.step(x, batch, where='pre', color='0.5', lw=1.0, ls='--', label='B, fixed')
    ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_title(f'seed {seed}', fontsize=9)
    ax.grid(alpha=0.3, which='both')
    with open(os.path.join(adaptive, 'summary.json')) as f:
      summary = json.load(f)
    print(json.dumps({'seed': seed, 'switches': summary.get('switches')}))
  axes[0][0].set_ylabel('examples')
  axes[0][0].legend(fontsize=6, loc='lower right')
  fig.suptitle('MNIST-1D: the adaptive schedule climbs when B_simple ≥ 5·B', fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=150)


if __name__ == '__main__':
  flags.DEFINE_string('root', 'workdirs', "Parent of every run's workdir.")
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to draw.')
  flags.DEFINE_string('out', 'docs/figures/adaptive_mnist1d.png', 'Figure to write.')
  app.run(main)
