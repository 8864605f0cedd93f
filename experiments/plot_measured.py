r"""docs/figures/measured_mnist1d.png: B, ε and g over training, per schedule kind.

One column per problem (the mnist1d_measured grids: N = 10,000 and 20,000), rows B, ε
and the paper's g = εN/(B(1 − m)) (TensorBoard's batch_size, learning_rate and
noise_scale, logged every epoch) against epochs, for one seed of each kind: decaying LR,
the fixed increasing batch, today's adaptive kind, and the two kinds of ibs/measured/.

  python -m experiments.reproduce --experiment=mnist1d_measured --root=workdirs \
      --seeds=0,1,2,3,4
  python -m experiments.reproduce --experiment=mnist1d_measured_20k --root=workdirs \
      --seeds=0,1,2,3,4
  python -m experiments.plot_measured --root=workdirs \
      --out=docs/figures/measured_mnist1d.png
"""

from absl import app, flags

from experiments import reproduce
from ibs.tools import curves

_CONFIG = 'configs/mnist1d_study.py'
KINDS = (
  ('decaying_lr', 'decaying LR', '0.5', '-'),
  ('increasing_batch', 'increasing batch (fixed)', 'k', '--'),
  ('adaptive', 'adaptive', 'C0', '-'),
  ('measured_batch', 'measured_batch', 'C3', '-'),
  ('plateau', 'plateau', 'C2', '-'),
)
PROBLEMS = (('', 'N = 10,000'), ('size=20k,', 'N = 20,000 (configs/default.py)'))
ROWS = (('batch_size', 'B'), ('learning_rate', 'ε'), ('noise_scale', 'g = εN/(B(1−m))'))


def main(argv):
  del argv
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  seed = flags.FLAGS.seed
  fig, axes = plt.subplots(len(ROWS), len(PROBLEMS), figsize=(9, 7.5), sharex=True)
  for column, (prefix, title) in enumerate(PROBLEMS):
    for kind, label, color, style in KINDS:
      workdir = reproduce.run_workdir(
        flags.FLAGS.root, _CONFIG, f'{prefix}schedule={kind}', seed
      )
      scalars = curves.read_scalars(workdir)
      for row, (tag, _) in enumerate(ROWS):
        x, y = curves.against(scalars, tag, 'epoch')
        axes[row][column].step(
          x, y, where='pre', color=color, ls=style, lw=1.2, label=label
        )
    axes[0][column].set_title(f'{title}, seed {seed}', fontsize=9)
    for row, (_, name) in enumerate(ROWS):
      axes[row][column].set_yscale('log')
      axes[row][column].grid(alpha=0.3, which='both')
      axes[row][0].set_ylabel(name)
    axes[-1][column].set_xlabel('epoch')
  axes[1][0].legend(fontsize=7, loc='lower left')
  fig.suptitle('MNIST-1D: what each schedule kind ran (one log per epoch)', fontsize=10)
  fig.tight_layout()
  fig.savefig(flags.FLAGS.out, dpi=130)


if __name__ == '__main__':
  flags.DEFINE_string('root', 'workdirs', "Parent of every run's workdir.")
  flags.DEFINE_integer('seed', 0, 'Seed to draw.')
  flags.DEFINE_string('out', 'docs/figures/measured_mnist1d.png', 'Figure to write.')
  app.run(main)
