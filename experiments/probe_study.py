r"""The critical-batch probe at three points of the MNIST-1D decaying-LR run.

The run is the mnist1d_adaptive grid's decaying_lr run of seed 0
(configs/mnist1d_study.py, ε 0.1 → 0.02 → 0.004 → 0.0008 at epochs 30/60/80, B 32),
trained in its own workdir in stages that stop, each with a checkpoint, at the probe's
points: a run keeps its three newest checkpoints, and periodic checkpoints are turned off
here (a non-trajectory field), so the three kept are exactly the points. Then
`python -m ibs.tools.probe` branches each point at B = 32 … 1024 for two epochs with ε
scaled by B ∝ ε, and writes its table and figure under ROOT/probe_decaying_lr/probe.

  python -m experiments.probe_study --root=workdirs
"""

import os
import subprocess
import sys

from absl import app, flags, logging

from experiments import reproduce

CONFIG, ARG, SEED = 'configs/mnist1d_study.py', 'schedule=decaying_lr', 0
POINTS = (10, 40, 70)  # epochs: early and late in the first ε, and in the third
BATCH_SIZES = (32, 64, 128, 256, 512, 1024)
BRANCH_EXAMPLES = 20_480  # two epochs of N = 10,000, a multiple of every B


def main(argv):
  del argv
  from ibs import train  # Deferred: --help needs no JAX.

  workdir = os.path.join(flags.FLAGS.root, 'probe_decaying_lr')
  for epoch in POINTS:
    config = reproduce.load_config(CONFIG, ARG)
    config.seed = config.data_seed = SEED
    config.checkpoint_every_epochs = 1000.0  # only the stops below checkpoint
    batch = config.schedule.batch_size  # decaying LR: B is constant
    config.stop_after_steps = epoch * config.mnist1d.num_train // batch
    train.train_and_evaluate(config, workdir)
  command = [
    sys.executable,
    '-m',
    'ibs.tools.probe',
    f'--workdir={workdir}',
    f'--points={",".join(map(str, POINTS))}',
    f'--batch_sizes={",".join(map(str, BATCH_SIZES))}',
    f'--branch_examples={BRANCH_EXAMPLES}',
    '--eval',
  ]
  print(' '.join(command[1:]), flush=True)
  subprocess.run(command, check=True, cwd=reproduce.REPO)


if __name__ == '__main__':
  flags.DEFINE_string('root', 'workdirs', 'Parent of the probed run and its probe.')
  logging.set_verbosity(logging.WARNING)
  app.run(main)
